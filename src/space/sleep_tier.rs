//! Two-tier sleep: an idle Space is first *frozen* (its processes stopped by
//! the cgroup freezer, memory kept, woken in milliseconds), later *stopped*
//! (no pod or container, woken by a cold start). Pure: which tier an idle
//! time means, and when the next tier is due.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::app_config::AppConfig;
use super::duration::{self, InvalidDuration};
use super::hardware::Flavor;

/// What `spec.freezeAfter` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FreezeAfter {
    /// Not set: the [`SleepPolicy`] default of the flavor applies.
    #[default]
    FlavorDefault,
    /// `never`.
    Never,
    After(Duration),
}

impl FreezeAfter {
    /// Parses `spec.freezeAfter` (same grammar as `sleepAfter`); `None` is the flavor default.
    pub fn parse(input: Option<&str>) -> Result<Self, InvalidDuration> {
        match input {
            None => Ok(Self::FlavorDefault),
            Some(s) => Ok(duration::parse_sleep(s)?.map_or(Self::Never, Self::After)),
        }
    }
}

/// Default freeze times per kind of flavor: configuration (operator flags,
/// Helm values; `hangar up` flags), not part of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepPolicy {
    /// CPU flavors: freezing costs nothing but the memory it keeps.
    pub cpu_freeze_after: Option<Duration>,
    /// GPU flavors: a frozen pod keeps its GPU allocated, so by default they
    /// are not frozen (they go straight to the stop at `sleepAfter`).
    pub gpu_freeze_after: Option<Duration>,
}

/// CPU Spaces freeze after this idle time unless told otherwise.
pub const DEFAULT_CPU_FREEZE_AFTER: Duration = Duration::from_secs(5 * 60);

impl Default for SleepPolicy {
    fn default() -> Self {
        Self { cpu_freeze_after: Some(DEFAULT_CPU_FREEZE_AFTER), gpu_freeze_after: None }
    }
}

/// The effective idle times of one Space. `freeze_after`, when set, is
/// strictly shorter than `stop_after` (a freeze at or past the stop is no tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepTimes {
    pub freeze_after: Option<Duration>,
    pub stop_after: Option<Duration>,
}

impl SleepPolicy {
    /// Resolves the idle times from the spec's `freezeAfter`, the flavor and
    /// the resolved `sleepAfter` (`None`: never stops).
    pub fn times(&self, flavor: &Flavor, freeze: FreezeAfter, sleep_after: Option<Duration>) -> SleepTimes {
        let freeze_after = match freeze {
            FreezeAfter::Never => None,
            FreezeAfter::After(d) => Some(d),
            FreezeAfter::FlavorDefault if flavor.gpu.is_some() => self.gpu_freeze_after,
            FreezeAfter::FlavorDefault => self.cpu_freeze_after,
        };
        let freeze_after = freeze_after.filter(|f| sleep_after.is_none_or(|s| *f < s));
        SleepTimes { freeze_after, stop_after: sleep_after }
    }

    /// [`Self::times`] of a resolved configuration.
    pub fn for_config(&self, config: &AppConfig) -> SleepTimes {
        self.times(config.flavor, config.freeze_after, config.sleep_after)
    }
}

/// Which sleep a sleeping Space is in. The stage stays `SLEEPING` for both.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum SleepTier {
    /// Processes frozen in place: memory (and any GPU) kept, wakes in milliseconds.
    Frozen,
    /// Scaled to zero: nothing kept, wakes by a cold start.
    Stopped,
}

impl SleepTier {
    pub fn as_str(self) -> &'static str {
        match self {
            SleepTier::Frozen => "Frozen",
            SleepTier::Stopped => "Stopped",
        }
    }
}

/// The tier an idle time calls for, and when to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierDecision {
    /// `None`: awake.
    pub tier: Option<SleepTier>,
    /// Time until the next tier is due, when one is ahead.
    pub recheck_in: Option<Duration>,
}

impl SleepTimes {
    /// The tier for `idle` time without traffic.
    pub fn tier(&self, idle: Duration) -> TierDecision {
        if let Some(stop) = self.stop_after
            && idle >= stop
        {
            return TierDecision { tier: Some(SleepTier::Stopped), recheck_in: None };
        }
        let until_stop = self.stop_after.map(|s| s - idle);
        match self.freeze_after {
            Some(freeze) if idle >= freeze => TierDecision { tier: Some(SleepTier::Frozen), recheck_in: until_stop },
            Some(freeze) => TierDecision { tier: None, recheck_in: Some(freeze - idle) },
            None => TierDecision { tier: None, recheck_in: until_stop },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::hardware::lookup;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn cpu() -> &'static Flavor {
        lookup("cpu-basic").expect("cpu-basic is in the catalog")
    }

    fn gpu() -> &'static Flavor {
        lookup("t4-small").expect("t4-small is in the catalog")
    }

    #[test]
    fn parses_the_spec_field() {
        assert_eq!(FreezeAfter::parse(None), Ok(FreezeAfter::FlavorDefault));
        assert_eq!(FreezeAfter::parse(Some("never")), Ok(FreezeAfter::Never));
        assert_eq!(FreezeAfter::parse(Some("1m30s")), Ok(FreezeAfter::After(S(90))));
        assert!(FreezeAfter::parse(Some("soon")).is_err());
    }

    #[test]
    fn defaults_freeze_cpu_flavors_only() {
        let policy = SleepPolicy::default();
        let two_days = Some(S(172_800));
        assert_eq!(
            policy.times(cpu(), FreezeAfter::FlavorDefault, two_days),
            SleepTimes { freeze_after: Some(DEFAULT_CPU_FREEZE_AFTER), stop_after: two_days }
        );
        // A frozen pod keeps its GPU: GPU flavors skip the tier by default...
        assert_eq!(policy.times(gpu(), FreezeAfter::FlavorDefault, None).freeze_after, None);
        // ...unless the policy or the Space says otherwise.
        let eager = SleepPolicy { gpu_freeze_after: Some(S(60)), ..policy };
        assert_eq!(eager.times(gpu(), FreezeAfter::FlavorDefault, None).freeze_after, Some(S(60)));
        assert_eq!(policy.times(gpu(), FreezeAfter::After(S(30)), None).freeze_after, Some(S(30)));
        assert_eq!(policy.times(cpu(), FreezeAfter::Never, two_days).freeze_after, None);
    }

    #[test]
    fn a_freeze_at_or_after_the_stop_is_no_tier() {
        let policy = SleepPolicy::default();
        assert_eq!(policy.times(cpu(), FreezeAfter::After(S(60)), Some(S(60))).freeze_after, None);
        assert_eq!(policy.times(cpu(), FreezeAfter::After(S(90)), Some(S(60))).freeze_after, None);
        // The 5 min default against a 3 s sleepAfter (tests, local mode): stop only.
        assert_eq!(policy.times(cpu(), FreezeAfter::FlavorDefault, Some(S(3))).freeze_after, None);
        assert_eq!(policy.times(cpu(), FreezeAfter::After(S(59)), Some(S(60))).freeze_after, Some(S(59)));
    }

    #[test]
    fn tiers_follow_the_idle_time() {
        let times = SleepTimes { freeze_after: Some(S(10)), stop_after: Some(S(100)) };
        assert_eq!(times.tier(S(0)), TierDecision { tier: None, recheck_in: Some(S(10)) });
        assert_eq!(times.tier(S(4)), TierDecision { tier: None, recheck_in: Some(S(6)) });
        assert_eq!(times.tier(S(10)), TierDecision { tier: Some(SleepTier::Frozen), recheck_in: Some(S(90)) });
        assert_eq!(times.tier(S(100)), TierDecision { tier: Some(SleepTier::Stopped), recheck_in: None });
        let stop_only = SleepTimes { freeze_after: None, stop_after: Some(S(100)) };
        assert_eq!(stop_only.tier(S(40)), TierDecision { tier: None, recheck_in: Some(S(60)) });
        let freeze_only = SleepTimes { freeze_after: Some(S(10)), stop_after: None };
        assert_eq!(freeze_only.tier(S(1_000_000)), TierDecision { tier: Some(SleepTier::Frozen), recheck_in: None });
        let never = SleepTimes { freeze_after: None, stop_after: None };
        assert_eq!(never.tier(S(1_000_000)), TierDecision { tier: None, recheck_in: None });
    }
}
