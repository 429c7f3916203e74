//! `hangar up`'s own metrics, served at `/metrics` on the logs API's address:
//! what the proxy cannot know, the memory frozen containers hold (the
//! cluster's node agents report the same for frozen pods).

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::proxy::SpaceKey;
use crate::proxy::metrics::SpaceLabels;

pub struct LocalMetrics {
    registry: Registry,
    frozen_memory: Family<SpaceLabels, Gauge>,
}

impl Default for LocalMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hangar_up");
        let frozen_memory = Family::<SpaceLabels, Gauge>::default();
        registry.register(
            "frozen_memory_bytes",
            "Memory held by a frozen Space's paused container (its working set)",
            frozen_memory.clone(),
        );
        Self { registry, frozen_memory }
    }

    /// The memory `key` holds while frozen; `None`: not frozen (the series goes away).
    pub fn frozen_memory(&self, key: &SpaceKey, bytes: Option<u64>) {
        match bytes {
            Some(b) => {
                self.frozen_memory.get_or_create(&key.into()).set(i64::try_from(b).unwrap_or(i64::MAX));
            }
            None => {
                self.frozen_memory.remove(&key.into());
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        crate::telemetry::encode_metrics(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_memory_comes_and_goes() {
        let m = LocalMetrics::new();
        let k = SpaceKey::new("local", "demo");
        m.frozen_memory(&k, Some(113 << 20));
        let text = m.encode();
        assert!(text.contains(r#"hangar_up_frozen_memory_bytes{namespace="local",space="demo"} 118489088"#), "{text}");
        m.frozen_memory(&k, None);
        assert!(!m.encode().contains(r#"space="demo""#));
    }
}
