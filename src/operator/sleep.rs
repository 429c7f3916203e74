//! Sleep and wake from the activity Lease: pure decisions on timestamps,
//! and the freeze decision recorded on the Space's pods for the node agents.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::node_agent::decision::{DecisionId, FreezerRecord, RecordedState};
use crate::space::naming::FREEZE_ANNOTATION;
use crate::space::{SleepPolicy, SleepStatus, SleepTier, SleepTimes, SpaceStatus, Stage};

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

/// Where a Space stands for its idle clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Asleep (its status says `SLEEPING`): frozen or stopped.
    Asleep,
    /// A ready pod serves it.
    Serving,
    /// Not serving since its last start or wake: building, starting, failing.
    Starting,
}

/// The phase from the stage last recorded and whether a pod is ready now.
pub fn phase(recorded: Option<Stage>, pods: &[Pod]) -> Phase {
    let serving = pods.iter().any(|p| p.metadata.deletion_timestamp.is_none() && super::status::is_ready(p));
    if recorded == Some(Stage::Sleeping) {
        // A frozen pod may still read ready for a moment, and fails its probe
        // after that by design: asleep is what the status says.
        Phase::Asleep
    } else if serving {
        Phase::Serving
    } else {
        Phase::Starting
    }
}

/// When the Space last began to serve, as its status records it: `readySince`,
/// else (a status written before that field, or by an operator whose CRD
/// lacks it) the time its `Ready` condition turned true, while it is true.
pub fn recorded_ready_since(status: Option<&SpaceStatus>) -> Option<Timestamp> {
    let status = status?;
    let ready = || status.conditions.iter().find(|c| c.type_ == super::status::READY && c.status == "True");
    status.ready_since.as_ref().or_else(|| ready().map(|c| &c.last_transition_time)).map(|t| t.0)
}

/// When the Space last began to serve (`status.readySince`): kept while it
/// serves or sleeps, `now` when it begins to serve after a start or wake.
pub fn ready_since(
    phase: Phase,
    recorded_stage: Option<Stage>,
    recorded: Option<Timestamp>,
    now: Timestamp,
) -> Option<Timestamp> {
    let was_serving = recorded_stage.is_some_and(Stage::is_serving);
    match (phase, recorded) {
        (Phase::Serving, Some(since)) if was_serving => Some(since),
        (Phase::Serving, _) => Some(now),
        (Phase::Asleep | Phase::Starting, recorded) => recorded,
    }
}

/// The moment a Space's idle time counts from: its last activity, but never
/// before it began to serve after its last start or wake, so a first start
/// (image pull, model load) longer than its idle times does not put it to
/// sleep before anyone could use it. While it has not served yet, the clock
/// waits for its startup timeout: a Space that never serves still sleeps.
pub fn idle_since(
    phase: Phase,
    last_activity: Option<Timestamp>,
    ready_since: Option<Timestamp>,
    startup_timeout: Duration,
) -> Option<Timestamp> {
    match phase {
        Phase::Asleep | Phase::Serving => last_activity.max(ready_since),
        Phase::Starting => {
            let timeout = SignedDuration::try_from(startup_timeout).unwrap_or(SignedDuration::MAX);
            last_activity.map(|a| a.checked_add(timeout).unwrap_or(Timestamp::MAX))
        }
    }
}

/// A [`SleepPolicy`] from the command line (`never` turns a default off).
#[derive(Debug, Clone, clap::Args)]
pub struct SleepArgs {
    /// Idle time before a CPU Space without `freezeAfter` is frozen (needs the
    /// node agent on its node); `never` turns the frozen tier off.
    #[arg(long, env = "HANGAR_CPU_FREEZE_AFTER", default_value = "5m", value_parser = parse_sleep_time)]
    pub cpu_freeze_after: SleepTime,
    /// The same for GPU flavors (a frozen pod keeps its GPU allocated).
    #[arg(long, env = "HANGAR_GPU_FREEZE_AFTER", default_value = "never", value_parser = parse_sleep_time)]
    pub gpu_freeze_after: SleepTime,
}

/// A duration or `never` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepTime(pub Option<Duration>);

fn parse_sleep_time(s: &str) -> Result<SleepTime, String> {
    crate::space::duration::parse_sleep(s).map(SleepTime).map_err(|e| e.to_string())
}

impl SleepArgs {
    pub fn policy(&self) -> SleepPolicy {
        SleepPolicy { cpu_freeze_after: self.cpu_freeze_after.0, gpu_freeze_after: self.gpu_freeze_after.0 }
    }
}

/// The sleep tier a Space is due for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// `None`: awake.
    pub tier: Option<SleepTier>,
    /// When the tier began (last activity + its idle time), in whole seconds:
    /// a frozen Space's decision is this second ([`Tier::freeze_decision`]).
    pub since: Option<Timestamp>,
    /// Time until the next tier is due.
    pub recheck_in: Option<Duration>,
}

impl Tier {
    /// Stopped: no replica.
    pub fn stopped(&self) -> bool {
        self.tier == Some(SleepTier::Stopped)
    }

    /// The decision recorded on the pods while frozen.
    pub fn freeze_decision(&self) -> Option<DecisionId> {
        (self.tier == Some(SleepTier::Frozen)).then_some(self.since?.as_second())
    }
}

/// The tier for a Space idle since `last_activity` (`None`: no record yet,
/// counts as now), given its idle times (`None`: never sleeps).
pub fn decide_tier(last_activity: Option<Timestamp>, times: Option<SleepTimes>, now: Timestamp) -> Tier {
    let (Some(last), Some(times)) = (last_activity, times) else {
        return Tier { tier: None, since: None, recheck_in: None };
    };
    let idle = Duration::try_from(now.duration_since(last)).unwrap_or(Duration::ZERO);
    let decision = times.tier(idle);
    let after = match decision.tier {
        Some(SleepTier::Frozen) => times.freeze_after,
        Some(SleepTier::Stopped) => times.stop_after,
        None => None,
    };
    let since = after.and_then(|after| {
        let at = last.checked_add(SignedDuration::try_from(after).ok()?).ok()?;
        Timestamp::from_second(at.as_second()).ok()
    });
    Tier { tier: decision.tier, since, recheck_in: decision.recheck_in }
}

/// `status.sleep` for the tier; a frozen Space reports the memory its pods
/// hold, as their node agents recorded it.
pub fn status(tier: &Tier, pods: &[Pod]) -> Option<SleepStatus> {
    let kind = tier.tier?;
    let memory: Option<u64> = (kind == SleepTier::Frozen)
        .then(|| {
            pods.iter()
                .filter_map(|p| FreezerRecord::from_annotations(p.metadata.annotations.as_ref()?))
                .filter(|r| r.state == RecordedState::Frozen)
                .filter_map(|r| r.memory_bytes)
                .reduce(|a, b| a + b)
        })
        .flatten();
    Some(SleepStatus {
        tier: kind,
        since: tier.since.map(Time),
        memory_bytes: memory.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
    })
}

/// The pods whose recorded decision differs from `decision`, with the value
/// to record (`None`: remove it). Terminating pods are left alone.
pub fn decision_changes(pods: &[Pod], decision: Option<DecisionId>) -> Vec<(String, Option<String>)> {
    let want = decision.map(|d| d.to_string());
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.annotations().get(FREEZE_ANNOTATION) != want.as_ref())
        .map(|p| (p.name_any(), want.clone()))
        .collect()
}

/// Records the freeze decision on the Space's pods (the node agents act on it).
pub async fn record_decision(
    client: &Client,
    namespace: &str,
    pods: &[Pod],
    decision: Option<DecisionId>,
) -> crate::Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for (name, value) in decision_changes(pods, decision) {
        let patch = json!({"metadata": {"annotations": {FREEZE_ANNOTATION: value}}});
        match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            // Gone meanwhile: nothing to record on.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_agent::decision::FreezerRecord;
    use crate::space::naming::FREEZER_ANNOTATION;
    use std::collections::BTreeMap;

    #[test]
    fn tiers_with_since_and_decision() {
        let times = Some(SleepTimes {
            freeze_after: Some(Duration::from_secs(10)),
            stop_after: Some(Duration::from_secs(100)),
        });
        let awake = decide_tier(Some(at(0)), times, at(4));
        assert_eq!(awake, Tier { tier: None, since: None, recheck_in: Some(Duration::from_secs(6)) });
        assert_eq!(awake.freeze_decision(), None);
        // Activity stamped with microseconds: since is the whole second, the same on every pass.
        let last = Timestamp::from_microsecond(at(0).as_microsecond() + 250_000).expect("valid time");
        let frozen = decide_tier(Some(last), times, at(30));
        assert_eq!(frozen.tier, Some(SleepTier::Frozen));
        assert_eq!(frozen.since, Some(at(10)));
        assert_eq!(frozen.freeze_decision(), Some(at(10).as_second()));
        assert_eq!(decide_tier(Some(last), times, at(31)).freeze_decision(), frozen.freeze_decision());
        assert!(!frozen.stopped());
        let stopped = decide_tier(Some(at(0)), times, at(100));
        assert!(stopped.stopped());
        assert_eq!((stopped.since, stopped.freeze_decision()), (Some(at(100)), None));
        assert_eq!(decide_tier(Some(at(0)), None, at(1_000)).tier, None);
        assert_eq!(decide_tier(None, times, at(1_000)).tier, None);
    }

    #[test]
    fn decisions_go_to_the_pods_that_lack_them_and_memory_comes_back() {
        let pod = |name: &str, annotations: &[(&str, String)]| {
            let mut p = Pod::default();
            p.metadata.name = Some(name.into());
            p.metadata.annotations =
                Some(annotations.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect::<BTreeMap<_, _>>());
            p
        };
        let record = FreezerRecord { state: RecordedState::Frozen, decision: Some(7), memory_bytes: Some(1000) };
        let pods =
            [pod("a", &[(FREEZE_ANNOTATION, "7".into()), (FREEZER_ANNOTATION, record.to_annotation())]), pod("b", &[])];
        assert_eq!(decision_changes(&pods, Some(7)), vec![("b".to_owned(), Some("7".to_owned()))]);
        assert_eq!(decision_changes(&pods, None), vec![("a".to_owned(), None)]);
        let tier = Tier { tier: Some(SleepTier::Frozen), since: Some(at(7)), recheck_in: None };
        let s = status(&tier, &pods).expect("asleep");
        assert_eq!((s.tier, s.memory_bytes), (SleepTier::Frozen, Some(1000)));
        assert_eq!(s.since, Some(Time(at(7))));
        let stopped = Tier { tier: Some(SleepTier::Stopped), ..tier };
        assert_eq!(status(&stopped, &pods).and_then(|s| s.memory_bytes), None);
        assert_eq!(status(&Tier { tier: None, since: None, recheck_in: None }, &pods), None);
    }

    fn ready_pod(ready: bool) -> Pod {
        Pod {
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_phase_comes_from_the_recorded_stage_and_ready_pods() {
        let (ready, starting) = ([ready_pod(true)], [ready_pod(false)]);
        assert_eq!(phase(Some(Stage::AppStarting), &ready), Phase::Serving);
        assert_eq!(phase(None, &ready), Phase::Serving);
        assert_eq!(phase(Some(Stage::Running), &starting), Phase::Starting);
        assert_eq!(phase(Some(Stage::Building), &[]), Phase::Starting);
        // Frozen: its pod may read ready or not; asleep either way.
        assert_eq!(phase(Some(Stage::Sleeping), &ready), Phase::Asleep);
        assert_eq!(phase(Some(Stage::Sleeping), &[]), Phase::Asleep);
        let mut going = ready_pod(true);
        going.metadata.deletion_timestamp = Some(Time(at(0)));
        assert_eq!(phase(Some(Stage::Running), &[going]), Phase::Starting, "a terminating pod serves no more");
    }

    #[test]
    fn ready_since_is_the_start_of_serving_kept_while_asleep() {
        let now = at(50);
        // Began to serve now (first start, or after a wake).
        assert_eq!(ready_since(Phase::Serving, Some(Stage::AppStarting), None, now), Some(now));
        assert_eq!(ready_since(Phase::Serving, Some(Stage::Sleeping), Some(at(1)), now), Some(now));
        // Serving on: kept.
        assert_eq!(ready_since(Phase::Serving, Some(Stage::Running), Some(at(1)), now), Some(at(1)));
        assert_eq!(ready_since(Phase::Serving, Some(Stage::RunningBuilding), Some(at(1)), now), Some(at(1)));
        // A status from before this field: from now.
        assert_eq!(ready_since(Phase::Serving, Some(Stage::Running), None, now), Some(now));
        // Asleep or starting: kept.
        assert_eq!(ready_since(Phase::Asleep, Some(Stage::Sleeping), Some(at(1)), now), Some(at(1)));
        assert_eq!(ready_since(Phase::Starting, Some(Stage::AppStarting), Some(at(1)), now), Some(at(1)));
    }

    #[test]
    fn ready_since_falls_back_to_the_ready_condition() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
        let ready = |status: &str| Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: String::new(),
            message: String::new(),
            last_transition_time: Time(at(5)),
            observed_generation: None,
        };
        let mut s = SpaceStatus { conditions: vec![ready("True")], ..Default::default() };
        assert_eq!(recorded_ready_since(Some(&s)), Some(at(5)), "serving since its Ready condition turned true");
        s.ready_since = Some(Time(at(3)));
        assert_eq!(recorded_ready_since(Some(&s)), Some(at(3)));
        let asleep = SpaceStatus { conditions: vec![ready("False")], ..Default::default() };
        assert_eq!(recorded_ready_since(Some(&asleep)), None);
        assert_eq!(recorded_ready_since(None), None);
    }

    #[test]
    fn idle_time_counts_from_readiness() {
        let times =
            Some(SleepTimes { freeze_after: Some(Duration::from_secs(3)), stop_after: Some(Duration::from_secs(15)) });
        let startup = Duration::from_secs(180);
        let created = Some(at(0));
        // Its first start takes 60 s, far past its freeze and stop times: not asleep before it served.
        for t in [4, 16, 60] {
            let since = idle_since(Phase::Starting, created, None, startup);
            assert_eq!(decide_tier(since, times, at(t)).tier, None, "at {t} s, still starting");
        }
        // Ready at 60 s: awake until 63 s, frozen then, stopped at 75 s.
        let since = idle_since(Phase::Serving, created, Some(at(60)), startup);
        assert_eq!(since, Some(at(60)));
        assert_eq!(decide_tier(since, times, at(62)).tier, None);
        let frozen = decide_tier(since, times, at(64));
        assert_eq!((frozen.tier, frozen.since), (Some(SleepTier::Frozen), Some(at(63))));
        // Asleep, the same clock: the same freeze decision, then stopped.
        let asleep = idle_since(Phase::Asleep, created, Some(at(60)), startup);
        assert_eq!(decide_tier(asleep, times, at(70)).freeze_decision(), frozen.freeze_decision());
        assert!(decide_tier(asleep, times, at(75)).stopped());
        // Woken by a request (a renewed Lease): awake, then the clock waits for readiness again.
        let woken = idle_since(Phase::Asleep, Some(at(100)), Some(at(60)), startup);
        assert_eq!(decide_tier(woken, times, at(100)).tier, None);
        let restarting = idle_since(Phase::Starting, Some(at(100)), Some(at(60)), startup);
        assert_eq!(decide_tier(restarting, times, at(130)).tier, None, "a slow wake is not put back to sleep");
        // Traffic later than readiness counts as usual.
        assert_eq!(idle_since(Phase::Serving, Some(at(90)), Some(at(60)), startup), Some(at(90)));
        // A Space that never serves sleeps once its startup timeout has passed too.
        assert_eq!(
            decide_tier(idle_since(Phase::Starting, created, None, startup), times, at(184)).tier,
            Some(SleepTier::Frozen)
        );
        assert_eq!(idle_since(Phase::Starting, None, None, startup), None);
    }

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
