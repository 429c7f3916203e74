//! Sleep and wake from the activity Lease: pure decisions on timestamps.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;

/// Last activity the Lease records (`renewTime`, else `acquireTime`).
pub fn last_activity(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0)
}

/// Whether the Space should be asleep now, and when to look again if it is awake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepDecision {
    pub asleep: bool,
    /// Time until the idle deadline, when there is one ahead.
    pub recheck_in: Option<Duration>,
}

/// Asleep once idle for longer than `sleep_after`; `None` never sleeps. No
/// activity recorded yet counts as activity now (a new Space gets its full time).
pub fn decide(last_activity: Option<Timestamp>, sleep_after: Option<Duration>, now: Timestamp) -> SleepDecision {
    let (Some(last), Some(sleep_after)) = (last_activity, sleep_after) else {
        return SleepDecision { asleep: false, recheck_in: None };
    };
    let idle = now.duration_since(last);
    let idle = Duration::try_from(idle).unwrap_or(Duration::ZERO);
    if idle >= sleep_after {
        SleepDecision { asleep: true, recheck_in: None }
    } else {
        SleepDecision { asleep: false, recheck_in: Some(sleep_after - idle) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).expect("valid time")
    }

    #[test]
    fn sleeps_after_idle_time_and_wakes_on_renewal() {
        let five = Some(Duration::from_secs(5));
        assert_eq!(
            decide(Some(at(0)), five, at(2)),
            SleepDecision { asleep: false, recheck_in: Some(Duration::from_secs(3)) }
        );
        assert_eq!(decide(Some(at(0)), five, at(5)), SleepDecision { asleep: true, recheck_in: None });
        // The proxy renewed the Lease: awake again, with a fresh deadline.
        assert_eq!(
            decide(Some(at(9)), five, at(9)),
            SleepDecision { asleep: false, recheck_in: Some(Duration::from_secs(5)) }
        );
        // A renewal stamped slightly in the future (clock skew) is not an error.
        assert!(!decide(Some(at(12)), five, at(10)).asleep);
    }

    #[test]
    fn never_sleeps_without_a_sleep_time_or_activity_record() {
        assert_eq!(decide(Some(at(0)), None, at(1_000_000)), SleepDecision { asleep: false, recheck_in: None });
        assert!(!decide(None, Some(Duration::from_secs(1)), at(10)).asleep);
    }
}
