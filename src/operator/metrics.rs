//! The operator's Prometheus metrics.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::space::Stage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

pub struct Metrics {
    pub reconciles: Counter,
    pub errors: Family<ReasonLabel, Counter>,
    pub duration: Histogram,
    pub status_writes: Counter,
    /// Requests reconciles send to the apiserver, by call (watches not counted).
    pub api_calls: Family<CallLabel, Counter>,
    pub spaces: Family<StageLabel, Gauge>,
    /// Last stage per Space (`namespace/name`), to keep `spaces` exact.
    stages: Mutex<HashMap<String, Stage>>,
}

fn stage_label(stage: Stage) -> StageLabel {
    StageLabel { stage: stage.as_str().to_owned() }
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Counter::default(),
            errors: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            status_writes: Counter::default(),
            api_calls: Family::default(),
            spaces: Family::default(),
            stages: Mutex::new(HashMap::new()),
        };
        let r = registry.sub_registry_with_prefix("hangar_operator");
        r.register("reconciles", "Reconciliations run", metrics.reconciles.clone());
        r.register("reconcile_errors", "Failed reconciliations by reason", metrics.errors.clone());
        r.register("reconcile_duration_seconds", "Time per reconciliation", metrics.duration.clone());
        r.register("status_writes", "Space status writes", metrics.status_writes.clone());
        r.register("api_calls", "Apiserver requests of reconciles by call", metrics.api_calls.clone());
        r.register("spaces", "Spaces by stage", metrics.spaces.clone());
        metrics
    }

    pub fn observe(&self, elapsed: Duration) {
        self.reconciles.inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn error(&self, reason: &str) {
        self.errors.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// Counts one apiserver request of a reconcile.
    pub fn call(&self, call: &'static str) {
        self.api_calls.get_or_create(&CallLabel { call }).inc();
    }

    /// Records a Space's stage (`None`: the Space is gone).
    pub fn set_stage(&self, key: &str, stage: Option<Stage>) {
        let Ok(mut stages) = self.stages.lock() else { return };
        let old = match stage {
            Some(stage) => stages.insert(key.to_owned(), stage),
            None => stages.remove(key),
        };
        if old == stage {
            return;
        }
        if let Some(old) = old {
            self.spaces.get_or_create(&stage_label(old)).dec();
        }
        if let Some(new) = stage {
            self.spaces.get_or_create(&stage_label(new)).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_gauge_counts_each_space_once() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.set_stage("a/x", Some(Stage::Building));
        m.set_stage("a/x", Some(Stage::Running));
        m.set_stage("a/y", Some(Stage::Running));
        m.set_stage("a/y", Some(Stage::Running));
        assert_eq!(m.spaces.get_or_create(&stage_label(Stage::Building)).get(), 0);
        assert_eq!(m.spaces.get_or_create(&stage_label(Stage::Running)).get(), 2);
        m.set_stage("a/x", None);
        assert_eq!(m.spaces.get_or_create(&stage_label(Stage::Running)).get(), 1);
    }
}
