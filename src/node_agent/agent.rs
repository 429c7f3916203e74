//! The agent's state: the Space pods on its node, and the two ways their
//! cgroups change: converging to the operator's decision, and a thaw asked
//! through the API. One lock per pod orders them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::json;

use super::cgroup::{Cgroups, FreezerState};
use super::decision::{self, DecisionId, FreezerRecord, RecordedState};
use crate::space::naming::{FREEZER_ANNOTATION, SPACE_LABEL};

/// A freeze or thaw that takes longer than this failed (a frozen task in the
/// kernel's uninterruptible sleep can hold a v1 freeze in FREEZING).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent knows of one pod.
#[derive(Debug, Clone, PartialEq)]
struct PodInfo {
    namespace: String,
    name: String,
    space: String,
    running: bool,
    /// Being deleted: never frozen (a frozen process cannot take its SIGTERM,
    /// and on cgroup v1 not even a SIGKILL, so the pod would never go).
    terminating: bool,
    decision: Option<DecisionId>,
    /// The newest decision a thaw overrode (from the pod's record, then ours).
    thawed_over: Option<DecisionId>,
    record: Option<FreezerRecord>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    /// `request` (the thaw API) or `decision` (converging to the operator's).
    trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpaceLabels {
    namespace: String,
    space: String,
}

struct Metrics {
    freezes: Counter,
    thaws: Family<TriggerLabels, Counter>,
    thaw_duration: Histogram,
    frozen_memory: Family<SpaceLabels, Gauge>,
    failures: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            freezes: Counter::default(),
            thaws: Family::default(),
            // 0.1 ms .. ~3 s
            thaw_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            frozen_memory: Family::default(),
            failures: Counter::default(),
        };
        registry.register("freezes", "Pods frozen (the operator's decision)", m.freezes.clone());
        registry.register("thaws", "Frozen pods thawed, by trigger", m.thaws.clone());
        registry.register(
            "thaw_duration_seconds",
            "From a thaw request to the cgroup reporting THAWED",
            m.thaw_duration.clone(),
        );
        registry.register(
            "frozen_memory_bytes",
            "Memory held by frozen Space pods on this node",
            m.frozen_memory.clone(),
        );
        registry.register("cgroup_failures", "Freezes or thaws that failed", m.failures.clone());
        m
    }
}

/// Which pods a thaw request names.
#[derive(Debug, Clone, serde::Deserialize, Default)]
pub struct ThawTarget {
    /// A pod's uid (what the proxy knows from the EndpointSlice).
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    /// A pod by name (with `namespace`).
    #[serde(default)]
    pub pod: Option<String>,
    /// Every pod of a Space on this node (with `namespace`).
    #[serde(default)]
    pub space: Option<String>,
    /// The decision the caller saw (`status.sleep.since`): overridden too, even
    /// if this agent has not seen it yet.
    #[serde(default)]
    pub decision: Option<DecisionId>,
}

/// What a thaw did.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ThawReport {
    /// Pods named by the request.
    pub pods: usize,
    /// Of those, the ones that were frozen and are thawed now.
    pub thawed: usize,
}

/// The agent: see the module docs.
pub struct Agent {
    client: Client,
    cgroups: Cgroups,
    pods: Mutex<HashMap<String, PodInfo>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Metrics,
}

fn merge_thawed(a: Option<DecisionId>, b: Option<DecisionId>) -> Option<DecisionId> {
    a.max(b)
}

impl Agent {
    pub fn new(client: Client, cgroups: Cgroups, registry: &mut Registry) -> Arc<Self> {
        let metrics = Metrics::register(registry);
        Arc::new(Self { client, cgroups, pods: Mutex::new(HashMap::new()), locks: Mutex::new(HashMap::new()), metrics })
    }

    fn pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodInfo>> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_of(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(locks.entry(uid.to_owned()).or_default())
    }

    /// Takes in a pod from the watch; returns its uid when it is one to converge.
    pub fn observe(&self, pod: &Pod) -> Option<String> {
        let uid = pod.metadata.uid.clone()?;
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let record = FreezerRecord::from_annotations(&annotations);
        let recorded_thaw = record.as_ref().filter(|r| r.state == RecordedState::Thawed).and_then(|r| r.decision);
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let mut pods = self.pods();
        let previous = pods.get(&uid).and_then(|p| p.thawed_over);
        let info = PodInfo {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            space: pod.labels().get(SPACE_LABEL).cloned().unwrap_or_default(),
            running,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            decision: decision::decision(&annotations),
            thawed_over: merge_thawed(previous, recorded_thaw),
            record,
        };
        pods.insert(uid.clone(), info);
        Some(uid)
    }

    /// A pod left the node: forget it (its cgroup went with it).
    pub fn forget(&self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_deref() else { return };
        if let Some(info) = self.pods().remove(uid) {
            self.metrics.frozen_memory.remove(&SpaceLabels { namespace: info.namespace, space: info.space });
        }
        self.locks.lock().unwrap_or_else(PoisonError::into_inner).remove(uid);
    }

    /// Forgets every pod not in `uids` (after a relist).
    pub fn retain(&self, uids: &std::collections::HashSet<String>) {
        let gone: Vec<String> = self.pods().keys().filter(|u| !uids.contains(*u)).cloned().collect();
        for uid in gone {
            let mut pod = Pod::default();
            pod.metadata.uid = Some(uid);
            self.forget(&pod);
        }
    }

    pub fn known(&self) -> Vec<String> {
        self.pods().keys().cloned().collect()
    }

    /// Brings one pod's cgroup to what the decision and the last thaw call for.
    pub async fn converge(self: &Arc<Self>, uid: &str) {
        let lock = self.lock_of(uid);
        let _guard = lock.lock().await;
        let Some(info) = self.pods().get(uid).cloned() else { return };
        if !info.running && !info.terminating {
            return;
        }
        let Some(cgroup) = self.cgroups.find(uid) else { return };
        let want_frozen = !info.terminating && decision::should_freeze(info.decision, info.thawed_over);
        let state = match self.cgroups.state(&cgroup).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pod = %info.name, namespace = %info.namespace, error = %e, "cannot read the freezer state");
                return;
            }
        };
        let labels = SpaceLabels { namespace: info.namespace.clone(), space: info.space.clone() };
        let record = if want_frozen {
            if state != FreezerState::Frozen {
                if let Err(e) = self.cgroups.freeze(&cgroup, SETTLE_TIMEOUT).await {
                    self.metrics.failures.inc();
                    tracing::warn!(pod = %info.name, namespace = %info.namespace, error = %e, "freeze failed; thawing back");
                    // Never leave a pod half frozen.
                    if let Err(e) = self.cgroups.thaw(&cgroup, SETTLE_TIMEOUT).await {
                        tracing::error!(pod = %info.name, error = %e, "thaw after a failed freeze failed");
                    }
                    return;
                }
                self.metrics.freezes.inc();
                tracing::info!(pod = %info.name, namespace = %info.namespace, decision = ?info.decision, "frozen");
            }
            let memory = self.cgroups.memory_bytes(&cgroup).await.ok();
            if let Some(bytes) = memory {
                self.metrics.frozen_memory.get_or_create(&labels).set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
            // Keep the memory first measured: it barely moves while frozen, and
            // rewriting the record for every byte would wake the operator for nothing.
            let memory = info
                .record
                .as_ref()
                .filter(|r| r.state == RecordedState::Frozen)
                .and_then(|r| r.memory_bytes)
                .or(memory);
            Some(FreezerRecord { state: RecordedState::Frozen, decision: info.decision, memory_bytes: memory })
        } else {
            if state != FreezerState::Thawed {
                let started = Instant::now();
                if let Err(e) = self.cgroups.thaw(&cgroup, SETTLE_TIMEOUT).await {
                    self.metrics.failures.inc();
                    tracing::error!(pod = %info.name, namespace = %info.namespace, error = %e, "thaw failed");
                    return;
                }
                self.metrics.thaws.get_or_create(&TriggerLabels { trigger: "decision" }).inc();
                self.metrics.thaw_duration.observe(started.elapsed().as_secs_f64());
                tracing::info!(pod = %info.name, namespace = %info.namespace, "thawed (no freeze decision stands)");
            }
            self.metrics.frozen_memory.remove(&labels);
            info.thawed_over.map(|t| FreezerRecord {
                state: RecordedState::Thawed,
                decision: Some(t),
                memory_bytes: None,
            })
        };
        if let Some(record) = record
            && info.record.as_ref() != Some(&record)
        {
            self.write_record(&info, &record).await;
        }
    }

    /// Thaws the pods `target` names and returns once their cgroups are THAWED.
    pub async fn thaw(self: &Arc<Self>, target: &ThawTarget) -> ThawReport {
        let uids: Vec<String> = {
            let pods = self.pods();
            pods.iter()
                .filter(|(uid, p)| match target {
                    ThawTarget { uid: Some(u), .. } => *uid == u,
                    ThawTarget { namespace: Some(ns), pod: Some(name), .. } => &p.namespace == ns && &p.name == name,
                    ThawTarget { namespace: Some(ns), space: Some(space), .. } => {
                        &p.namespace == ns && &p.space == space
                    }
                    _ => false,
                })
                .map(|(uid, _)| uid.clone())
                .collect()
        };
        let mut thawed = 0;
        for uid in &uids {
            let lock = self.lock_of(uid);
            let _guard = lock.lock().await;
            let started = Instant::now();
            let info = {
                let mut pods = self.pods();
                let Some(info) = pods.get_mut(uid) else { continue };
                // Override what is recorded now and what the caller saw.
                info.thawed_over = merge_thawed(merge_thawed(info.thawed_over, info.decision), target.decision);
                info.clone()
            };
            let Some(cgroup) = self.cgroups.find(uid) else { continue };
            match self.cgroups.state(&cgroup).await {
                Ok(FreezerState::Thawed) => {}
                Ok(_) => match self.cgroups.thaw(&cgroup, SETTLE_TIMEOUT).await {
                    Ok(()) => {
                        thawed += 1;
                        self.metrics.thaws.get_or_create(&TriggerLabels { trigger: "request" }).inc();
                        self.metrics.thaw_duration.observe(started.elapsed().as_secs_f64());
                        self.metrics
                            .frozen_memory
                            .remove(&SpaceLabels { namespace: info.namespace.clone(), space: info.space.clone() });
                    }
                    Err(e) => {
                        self.metrics.failures.inc();
                        tracing::error!(pod = %info.name, namespace = %info.namespace, error = %e, "thaw failed");
                    }
                },
                Err(e) => tracing::warn!(pod = %info.name, error = %e, "cannot read the freezer state"),
            }
            // Recording the override is off the wake path: the caller is answered first.
            if info.thawed_over.is_some() {
                let record =
                    FreezerRecord { state: RecordedState::Thawed, decision: info.thawed_over, memory_bytes: None };
                if info.record.as_ref() != Some(&record) {
                    let this = Arc::clone(self);
                    tokio::spawn(async move { this.write_record(&info, &record).await });
                }
            }
        }
        if thawed > 0 {
            tracing::info!(?target, thawed, "thawed on request");
        }
        ThawReport { pods: uids.len(), thawed }
    }

    async fn write_record(&self, info: &PodInfo, record: &FreezerRecord) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &info.namespace);
        let patch =
            json!({"metadata": {"annotations": BTreeMap::from([(FREEZER_ANNOTATION, record.to_annotation())])}});
        if let Err(e) = api.patch(&info.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::warn!(pod = %info.name, namespace = %info.namespace, error = %e, "cannot record the freezer state on the pod");
        }
    }
}
