//! Where a Space stands: a pure function from observed facts (spec, config,
//! build, activity, Deployment, pods) to the status the operator writes.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::render::{HARDWARE_ANNOTATION, TEMPLATE_LABEL};
use crate::space::{HardwareStatus, ReplicaStatus, SleepStatus, SleepTier, SpaceStatus, Stage};

pub const READY: &str = "Ready";
pub const SCHEDULED: &str = "Scheduled";
/// Present (False) when another Space holds the host name this one's names
/// map to ([`crate::space::host_claim`]): it is served by path only.
pub const HOST_ROUTE: &str = "HostRoute";

/// Container states that mean the app cannot run until something changes.
const RUNTIME_FAILURES: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What the build side knows about the Space's image.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildView {
    /// Nothing to build (prebuilt image) or the last build is current.
    Idle,
    Building {
        message: String,
    },
    Failed {
        stage: Stage,
        message: String,
    },
}

/// Everything the status is derived from.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub generation: Option<i64>,
    /// A configuration error: `(stage, message)` (`CONFIG_ERROR` or `NO_APP_FILE`).
    pub config_error: Option<(Stage, String)>,
    pub paused: bool,
    /// Stopped (the deep tier): no replica.
    pub asleep: bool,
    /// The sleep tier due now (frozen or stopped), for `status.sleep`.
    pub sleep: Option<SleepStatus>,
    pub build: BuildView,
    /// The image the Space runs, once there is one.
    pub image: Option<String>,
    pub hardware_requested: &'a str,
    pub replicas_requested: i32,
    pub url: Option<String>,
    /// Template hash of the Deployment as rendered now.
    pub template_hash: Option<&'a str>,
    pub pods: &'a [Pod],
    pub previous: Option<&'a SpaceStatus>,
    /// The build record for `status.build` (source Spaces).
    pub build_record: Option<crate::space::BuildStatus>,
    /// A private Space's published token MAC (`status.tokenHmac`).
    pub token_hmac: Option<String>,
    pub now: Timestamp,
}

pub(crate) fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_template(pod: &Pod) -> Option<&str> {
    pod.metadata.labels.as_ref()?.get(TEMPLATE_LABEL).map(String::as_str)
}

/// Placed on a node (the scheduler bound it).
fn is_scheduled(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "PodScheduled" && c.status == "True"))
}

/// The scheduler's verdict for a pending pod, e.g. "0/4 nodes are available: ... Insufficient nvidia.com/gpu".
fn unschedulable(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let c = conditions.iter().find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    (c.reason.as_deref() == Some("Unschedulable")).then(|| c.message.clone().unwrap_or_default())
}

/// The container's failure: "CrashLoopBackOff: back-off 10s restarting ... (last exit: Error, code 1)".
fn runtime_failure(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|cs| {
        let waiting = cs.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        if !RUNTIME_FAILURES.contains(&reason) {
            return None;
        }
        let mut text = format!("container {}: {reason}", cs.name);
        if let Some(message) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
            text.push_str(&format!(": {message}"));
        }
        if let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
            text.push_str(&format!(" (last exit: {}, code {})", t.reason.as_deref().unwrap_or("unknown"), t.exit_code));
        }
        Some(text)
    })
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, facts: &Facts) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    // Keep the transition time unless the status flipped: a status that only
    // restates itself must not change, or every pass would write it again.
    let since = facts
        .previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_ && c.status == status))
        .map_or(Time(facts.now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: facts.generation,
    }
}

/// Derives the status. Deterministic: the same facts give the same status.
pub fn derive(facts: &Facts) -> SpaceStatus {
    let pods: Vec<&Pod> = facts.pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    let current: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| facts.template_hash.is_some() && pod_template(p) == facts.template_hash)
        .collect();
    let ready: Vec<&Pod> = pods.iter().copied().filter(|p| is_ready(p)).collect();
    let current_ready = current.iter().any(|p| is_ready(p));
    let serving = !ready.is_empty();
    let pending = current.iter().find_map(|p| unschedulable(p));
    let failure = current.iter().find_map(|p| runtime_failure(p));
    let frozen = facts.sleep.as_ref().is_some_and(|s| s.tier == SleepTier::Frozen);

    let (stage, message) = if let Some((stage, message)) = &facts.config_error {
        (*stage, message.clone())
    } else if facts.paused {
        (Stage::Paused, "paused by its owner; traffic does not wake it".to_owned())
    } else if let BuildView::Failed { stage, message } = &facts.build {
        (*stage, message.clone())
    } else if let BuildView::Building { message } = &facts.build {
        if serving { (Stage::RunningBuilding, message.clone()) } else { (Stage::Building, message.clone()) }
    } else if facts.image.is_none() {
        (Stage::Building, "waiting for an image".to_owned())
    } else if facts.asleep {
        (Stage::Sleeping, "asleep after its idle time; the next request wakes it".to_owned())
    } else if frozen {
        // Before readiness and failures: a frozen pod fails its readiness probe
        // by design, and that is no runtime error.
        (Stage::Sleeping, "frozen after its idle time (memory kept); the next request thaws it".to_owned())
    } else if current_ready {
        (Stage::Running, "ready".to_owned())
    } else if let Some(failure) = failure {
        (Stage::RuntimeError, failure)
    } else if let Some(reason) = &pending {
        let stage = if serving { Stage::RunningAppStarting } else { Stage::AppStarting };
        (stage, format!("waiting for hardware {}: {reason}", facts.hardware_requested))
    } else if serving {
        (Stage::RunningAppStarting, "new version starting; the previous one serves".to_owned())
    } else {
        (Stage::AppStarting, "starting".to_owned())
    };

    let mut conditions = vec![condition(READY, stage.is_serving(), stage.as_str(), message.clone(), facts)];
    if let Some(reason) = pending {
        conditions.push(condition(SCHEDULED, false, "Unschedulable", reason, facts));
    } else if current.iter().any(|p| is_scheduled(p)) {
        conditions.push(condition(SCHEDULED, true, "Scheduled", "pods are placed on nodes".to_owned(), facts));
    }

    let current_hardware = ready
        .iter()
        .find(|p| pod_template(p) == facts.template_hash)
        .or(ready.first())
        .and_then(|p| p.metadata.annotations.as_ref()?.get(HARDWARE_ANNOTATION).cloned());
    // Counted from the pods, not the Deployment's status: that count follows
    // the pods' readiness a watch event later, and would cost a status write of its own.
    let ready_replicas = i32::try_from(ready.len()).unwrap_or(i32::MAX);

    SpaceStatus {
        stage: Some(stage),
        message: Some(message),
        conditions,
        observed_generation: facts.generation,
        url: facts.url.clone(),
        image: facts.image.clone(),
        hardware: Some(HardwareStatus {
            requested: Some(facts.hardware_requested.to_owned()),
            current: current_hardware,
        }),
        replicas: Some(ReplicaStatus { requested: facts.replicas_requested, current: ready_replicas }),
        build: facts.build_record.clone(),
        sleep: if stage == Stage::Sleeping { facts.sleep.clone() } else { None },
        token_hmac: facts.token_hmac.clone(),
        // The build side's record and the idle clock's start: the reconciler sets them.
        built: None,
        ready_since: None,
    }
}

/// Adds `HostRoute=False` (reason `HostTaken`) to a derived status: `host` is
/// this Space's host name, `holder` (`owner/name`) the older Space that has it.
pub fn host_taken(status: &mut SpaceStatus, host: &str, holder: &str, facts: &Facts) {
    let message = format!(
        "the host {host} is taken: Space {holder} (older) holds it, so this Space is served by its path route only; rename one of them to get a host of its own"
    );
    status.conditions.push(condition(HOST_ROUTE, false, "HostTaken", message, facts));
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, PodCondition, PodStatus,
    };
    use std::collections::BTreeMap;

    const HASH: &str = "abc";

    fn pod(template: &str, flavor: &str, conditions: &[(&str, &str, Option<&str>, Option<&str>)]) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.labels = Some(BTreeMap::from([(TEMPLATE_LABEL.to_owned(), template.to_owned())]));
        pod.metadata.annotations = Some(BTreeMap::from([(HARDWARE_ANNOTATION.to_owned(), flavor.to_owned())]));
        pod.status = Some(PodStatus {
            conditions: Some(
                conditions
                    .iter()
                    .map(|(t, s, reason, message)| PodCondition {
                        type_: (*t).into(),
                        status: (*s).into(),
                        reason: reason.map(Into::into),
                        message: message.map(Into::into),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        pod
    }

    fn facts<'a>(pods: &'a [Pod]) -> Facts<'a> {
        Facts {
            generation: Some(3),
            config_error: None,
            paused: false,
            asleep: false,
            sleep: None,
            build: BuildView::Idle,
            image: Some("reg/app:1".into()),
            hardware_requested: "t4-small",
            replicas_requested: 1,
            url: Some("https://alice-app.hf.test/".into()),
            template_hash: Some(HASH),
            pods,
            previous: None,
            build_record: None,
            token_hmac: None,
            now: Timestamp::from_second(1_700_000_000).expect("valid time"),
        }
    }

    fn stage(f: &Facts) -> (Stage, String) {
        let s = derive(f);
        (s.stage.expect("a stage"), s.message.expect("a message"))
    }

    #[test]
    fn a_taken_host_is_a_condition_that_names_it_and_its_holder() {
        let pods = [];
        let f = facts(&pods);
        let mut s = derive(&f);
        host_taken(&mut s, "acme-corp-app.hf.test", "acme/corp-app", &f);
        let c = s.conditions.iter().find(|c| c.type_ == HOST_ROUTE).expect("condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "HostTaken"));
        assert!(c.message.contains("acme-corp-app.hf.test") && c.message.contains("acme/corp-app"), "{}", c.message);
    }

    #[test]
    fn precedence_of_config_pause_build_and_sleep() {
        let pods = [];
        let base = facts(&pods);
        let f = Facts { config_error: Some((Stage::ConfigError, "spec.hardware: unknown".into())), ..base.clone() };
        assert_eq!(stage(&f), (Stage::ConfigError, "spec.hardware: unknown".into()));
        assert_eq!(stage(&Facts { paused: true, ..base.clone() }).0, Stage::Paused);
        let failed = BuildView::Failed { stage: Stage::BuildError, message: "pip failed".into() };
        assert_eq!(stage(&Facts { build: failed, ..base.clone() }), (Stage::BuildError, "pip failed".into()));
        let building = BuildView::Building { message: "building abc".into() };
        assert_eq!(stage(&Facts { build: building, ..base.clone() }).0, Stage::Building);
        assert_eq!(stage(&Facts { image: None, ..base.clone() }).0, Stage::Building);
        assert_eq!(stage(&Facts { asleep: true, ..base.clone() }).0, Stage::Sleeping);
        assert_eq!(stage(&base), (Stage::AppStarting, "starting".into()));
    }

    #[test]
    fn running_and_hardware_current() {
        let pods = [pod(HASH, "t4-small", &[("PodScheduled", "True", None, None), ("Ready", "True", None, None)])];
        let s = derive(&facts(&pods));
        assert_eq!(s.stage, Some(Stage::Running));
        let hw = s.hardware.expect("hardware");
        assert_eq!((hw.requested.as_deref(), hw.current.as_deref()), (Some("t4-small"), Some("t4-small")));
        let ready = &s.conditions[0];
        assert_eq!((ready.type_.as_str(), ready.status.as_str(), ready.reason.as_str()), ("Ready", "True", "RUNNING"));
        assert_eq!(s.observed_generation, Some(3));
        let replicas = s.replicas.expect("replicas");
        assert_eq!((replicas.requested, replicas.current), (1, 1), "counted with the stage, from the pod");
    }

    #[test]
    fn scheduled_only_once_the_pod_is_bound() {
        let scheduled = |pods: &[Pod]| {
            derive(&facts(pods)).conditions.iter().find(|c| c.type_ == SCHEDULED).map(|c| c.status.clone())
        };
        assert_eq!(scheduled(&[pod(HASH, "cpu-basic", &[])]), None, "created, not yet placed: nothing to say");
        let bound = pod(HASH, "cpu-basic", &[("PodScheduled", "True", None, None)]);
        assert_eq!(scheduled(&[bound]), Some("True".to_owned()));
    }

    #[test]
    fn unschedulable_gpu_space_says_why() {
        let why = "0/5 nodes are available: 5 Insufficient nvidia.com/gpu.";
        let pods = [pod(HASH, "t4-small", &[("PodScheduled", "False", Some("Unschedulable"), Some(why))])];
        let s = derive(&facts(&pods));
        assert_eq!(s.stage, Some(Stage::AppStarting));
        let scheduled = s.conditions.iter().find(|c| c.type_ == SCHEDULED).expect("Scheduled condition");
        assert_eq!((scheduled.status.as_str(), scheduled.reason.as_str()), ("False", "Unschedulable"));
        assert_eq!(scheduled.message, why);
        assert!(s.message.expect("message").contains("Insufficient nvidia.com/gpu"));
    }

    #[test]
    fn hardware_change_rolls_out_while_the_old_pod_serves() {
        let pods = [
            pod("old", "t4-small", &[("Ready", "True", None, None)]),
            pod(HASH, "a10g-large", &[("PodScheduled", "True", None, None)]),
        ];
        let f = Facts { hardware_requested: "a10g-large", ..facts(&pods) };
        let s = derive(&f);
        assert_eq!(s.stage, Some(Stage::RunningAppStarting));
        let hw = s.hardware.expect("hardware");
        assert_eq!((hw.requested.as_deref(), hw.current.as_deref()), (Some("a10g-large"), Some("t4-small")));
    }

    #[test]
    fn crash_loop_is_a_runtime_error_with_the_reason() {
        let mut p = pod(HASH, "cpu-basic", &[("PodScheduled", "True", None, None), ("Ready", "False", None, None)]);
        if let Some(status) = p.status.as_mut() {
            status.container_statuses = Some(vec![ContainerStatus {
                name: "app".into(),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CrashLoopBackOff".into()),
                        message: Some("back-off 10s restarting failed container".into()),
                    }),
                    ..Default::default()
                }),
                last_state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        reason: Some("Error".into()),
                        exit_code: 1,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        }
        let pods = [p];
        assert_eq!(
            stage(&facts(&pods)),
            (
                Stage::RuntimeError,
                "container app: CrashLoopBackOff: back-off 10s restarting failed container (last exit: Error, code 1)"
                    .into()
            )
        );
    }

    #[test]
    fn a_frozen_space_sleeps_even_though_its_pod_is_not_ready() {
        let mut p = pod(HASH, "cpu-basic", &[("PodScheduled", "True", None, None), ("Ready", "False", None, None)]);
        if let Some(status) = p.status.as_mut() {
            status.container_statuses = Some(vec![ContainerStatus { name: "app".into(), ..Default::default() }]);
        }
        let pods = [p];
        let frozen =
            SleepStatus { tier: SleepTier::Frozen, since: Some(Time(facts(&pods).now)), memory_bytes: Some(9) };
        let s = derive(&Facts { sleep: Some(frozen.clone()), ..facts(&pods) });
        assert_eq!(s.stage, Some(Stage::Sleeping));
        assert_eq!(s.sleep, Some(frozen.clone()));
        assert_eq!(s.replicas.map(|r| r.requested), Some(1), "a frozen Space keeps its pod");
        // Awake again: no sleep in the status.
        assert_eq!(derive(&facts(&pods)).sleep, None);
        // An error that comes first still shows (the sleep does not hide it).
        let failed = BuildView::Failed { stage: Stage::BuildError, message: "pip".into() };
        let s = derive(&Facts { sleep: Some(frozen), build: failed, ..facts(&pods) });
        assert_eq!((s.stage, s.sleep), (Some(Stage::BuildError), None));
    }

    #[test]
    fn restating_a_status_keeps_its_timestamps() {
        let pods = [pod(HASH, "t4-small", &[("Ready", "True", None, None)])];
        let first = derive(&facts(&pods));
        let later = Timestamp::from_second(1_700_000_600).expect("valid time");
        let again = derive(&Facts { previous: Some(&first), now: later, ..facts(&pods) });
        assert_eq!(first, again, "an unchanged Space derives an identical status");
        let asleep = derive(&Facts { previous: Some(&first), now: later, asleep: true, ..facts(&pods) });
        assert_eq!(asleep.conditions[0].last_transition_time, Time(later));
    }
}
