//! Prometheus metrics per Space, served at `/metrics`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::route::SpaceKey;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpaceLabels {
    pub namespace: String,
    pub space: String,
}

impl From<&SpaceKey> for SpaceLabels {
    fn from(k: &SpaceKey) -> Self {
        Self { namespace: k.namespace.clone(), space: k.name.clone() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub namespace: String,
    pub space: String,
    pub code: u16,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn wake_histogram() -> Histogram {
    // 1 ms (a thaw) .. ~35 min (a cold start)
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

/// A wake by sleep tier: `frozen` (thawed) or `stopped` (started).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WakeLabels {
    pub namespace: String,
    pub space: String,
    pub tier: &'static str,
}

impl WakeLabels {
    fn new(key: &SpaceKey, tier: &'static str) -> Self {
        Self { namespace: key.namespace.clone(), space: key.name.clone(), tier }
    }
}

/// All proxy metrics in one registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<CodeLabels, Counter>,
    duration: HistogramFamily<SpaceLabels>,
    wakes: Family<WakeLabels, Counter>,
    wake_duration: HistogramFamily<WakeLabels>,
    held: Family<SpaceLabels, Gauge>,
    rejected_held: Family<SpaceLabels, Counter>,
    tunnels: Family<SpaceLabels, Gauge>,
    upstream_errors: Family<SpaceLabels, Counter>,
    unmatched: Counter,
    spaces: RwLock<HashMap<SpaceKey, Arc<SpaceMetrics>>>,
}

/// The lowest status code with a slot in [`SpaceMetrics`]; codes 100..=599 have one.
const FIRST_CODE: u16 = 100;
const CODES: usize = 500;

/// One Space's request metrics, resolved once: recording a request takes no
/// label allocation and no map lookup (the proxy's workers cache these).
pub struct SpaceMetrics {
    labels: SpaceLabels,
    requests: Family<CodeLabels, Counter>,
    duration: Histogram,
    /// The Space's request counter per status code, filled on first use.
    by_code: Box<[OnceLock<Counter>]>,
}

impl SpaceMetrics {
    /// A request answered with `code`, its response head after `seconds`.
    pub fn request(&self, code: u16, seconds: f64) {
        self.duration.observe(seconds);
        let slot = code.checked_sub(FIRST_CODE).and_then(|i| self.by_code.get(usize::from(i)));
        match slot {
            Some(slot) => slot.get_or_init(|| self.counter(code)).inc(),
            None => self.counter(code).inc(),
        };
    }

    fn counter(&self, code: u16) -> Counter {
        let SpaceLabels { namespace, space } = self.labels.clone();
        // A clone shares the family's value: increments show in the exposition.
        self.requests.get_or_create(&CodeLabels { namespace, space, code }).clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hangar_proxy");
        let requests = Family::<CodeLabels, Counter>::default();
        let duration = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let wakes = Family::<WakeLabels, Counter>::default();
        let wake_duration = HistogramFamily::new_with_constructor(wake_histogram as fn() -> Histogram);
        let held = Family::<SpaceLabels, Gauge>::default();
        let rejected_held = Family::<SpaceLabels, Counter>::default();
        let tunnels = Family::<SpaceLabels, Gauge>::default();
        let upstream_errors = Family::<SpaceLabels, Counter>::default();
        let unmatched = Counter::default();
        registry.register("requests", "Requests per Space by response status code", requests.clone());
        registry.register(
            "request_duration_seconds",
            "Time to the response head (not the whole stream), per Space",
            duration.clone(),
        );
        registry.register("wakes", "Wakes of sleeping Spaces by sleep tier (frozen, stopped)", wakes.clone());
        registry.register(
            "wake_duration_seconds",
            "From the wake signal to the Space being ready (frozen: thawed), by sleep tier",
            wake_duration.clone(),
        );
        registry.register("held_requests", "Requests held while their Space starts", held.clone());
        registry.register(
            "rejected_held_requests",
            "Requests refused with 503 because too many were held",
            rejected_held.clone(),
        );
        registry.register("open_tunnels", "Open upgraded connections (WebSockets)", tunnels.clone());
        registry.register(
            "upstream_errors",
            "Requests answered 502/504 for upstream failures",
            upstream_errors.clone(),
        );
        registry.register("unmatched_requests", "Requests for unknown Spaces", unmatched.clone());
        Self {
            registry,
            requests,
            duration,
            wakes,
            wake_duration,
            held,
            rejected_held,
            tunnels,
            upstream_errors,
            unmatched,
            spaces: RwLock::new(HashMap::new()),
        }
    }

    /// The Space's request metrics (created on first use).
    pub fn space(&self, key: &SpaceKey) -> Arc<SpaceMetrics> {
        if let Some(m) = self.spaces.read().unwrap_or_else(PoisonError::into_inner).get(key) {
            return Arc::clone(m);
        }
        let mut spaces = self.spaces.write().unwrap_or_else(PoisonError::into_inner);
        let m = spaces.entry(key.clone()).or_insert_with(|| {
            let labels = SpaceLabels::from(key);
            Arc::new(SpaceMetrics {
                duration: self.duration.get_or_create(&labels).clone(),
                requests: self.requests.clone(),
                labels,
                by_code: (0..CODES).map(|_| OnceLock::new()).collect(),
            })
        });
        Arc::clone(m)
    }

    pub fn request(&self, key: &SpaceKey, code: u16, seconds: f64) {
        self.space(key).request(code, seconds);
    }

    pub fn wake(&self, key: &SpaceKey, tier: &'static str) {
        self.wakes.get_or_create(&WakeLabels::new(key, tier)).inc();
    }

    pub fn wake_done(&self, key: &SpaceKey, tier: &'static str, seconds: f64) {
        self.wake_duration.get_or_create(&WakeLabels::new(key, tier)).observe(seconds);
    }

    pub fn held(&self, key: &SpaceKey, delta: i64) {
        self.held.get_or_create(&key.into()).inc_by(delta);
    }

    pub fn rejected_held(&self, key: &SpaceKey) {
        self.rejected_held.get_or_create(&key.into()).inc();
    }

    pub fn tunnel(&self, key: &SpaceKey, delta: i64) {
        self.tunnels.get_or_create(&key.into()).inc_by(delta);
    }

    pub fn upstream_error(&self, key: &SpaceKey) {
        self.upstream_errors.get_or_create(&key.into()).inc();
    }

    pub fn unmatched(&self) {
        self.unmatched.inc();
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
    fn exposition_names_the_space() {
        let m = Metrics::new();
        let k = SpaceKey::new("alice", "whisper");
        m.request(&k, 200, 0.002);
        m.wake(&k, "frozen");
        m.held(&k, 3);
        let text = m.encode();
        assert!(
            text.contains(r#"hangar_proxy_requests_total{namespace="alice",space="whisper",code="200"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"hangar_proxy_wakes_total{namespace="alice",space="whisper",tier="frozen"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"hangar_proxy_held_requests{namespace="alice",space="whisper"} 3"#), "{text}");
        assert!(text.contains("hangar_proxy_request_duration_seconds_bucket"), "{text}");
    }
}
