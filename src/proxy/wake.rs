//! Waking and holding: one wake signal per sleeping Space however many
//! requests arrive, and a bounded number of requests held until it is ready.
//! A frozen Space is thawed instead (one thaw per freeze decision), and its
//! requests go to its pods as soon as the thaw returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::watch;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::route::{Disposition, RouteTable, SpaceKey, SpaceRoute};
use super::source::RouteSource;
use crate::space::Stage;

/// A Space still asleep this long after its wake signal gets another one
/// (the first may have been lost, e.g. the Lease update failed silently upstream).
pub const WAKE_RESIGNAL: Duration = Duration::from_secs(10);
/// A failed thaw (agent restarting, unreachable) is tried again after this.
pub const THAW_RETRY: Duration = Duration::from_millis(500);

/// Tier labels of the wake metrics.
pub const TIER_FROZEN: &str = "frozen";
pub const TIER_STOPPED: &str = "stopped";

type ThawFuture = Shared<BoxFuture<'static, Result<(), String>>>;

/// The thaw of one freeze decision, shared by every request that waits on it.
struct Thaw {
    decision: i64,
    started: Instant,
    future: ThawFuture,
}

#[derive(Default)]
struct Entry {
    /// When the current wake was signalled; cleared once the Space is seen ready.
    signalled: Option<Instant>,
    held: usize,
}

/// Per-Space wake and hold bookkeeping.
pub struct Wakes {
    source: Arc<dyn RouteSource>,
    metrics: Arc<Metrics>,
    max_held: usize,
    spaces: Mutex<HashMap<SpaceKey, Entry>>,
    thaws: Mutex<HashMap<SpaceKey, Thaw>>,
}

/// How waiting for a Space ended.
#[derive(Debug)]
pub enum WaitOutcome {
    Ready(Arc<SpaceRoute>),
    /// The Space was deleted while we waited.
    Gone,
    Paused,
    Unavailable(Stage),
    TimedOut,
}

impl Wakes {
    pub fn new(source: Arc<dyn RouteSource>, metrics: Arc<Metrics>, max_held: usize) -> Arc<Self> {
        Arc::new(Self {
            source,
            metrics,
            max_held,
            spaces: Mutex::new(HashMap::new()),
            thaws: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpaceKey, Entry>> {
        self.spaces.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Signals a wake unless one was signalled recently. Returns whether this call sent it.
    /// A frozen Space gets its thaw started instead.
    pub fn signal(self: &Arc<Self>, key: &SpaceKey) -> bool {
        let route = self.source.routes().borrow().get(key).cloned();
        if let Some(route) = route.filter(|r| r.frozen.is_some()) {
            return self.thaw(&route).1;
        }
        let now = Instant::now();
        {
            let mut spaces = self.lock();
            let entry = spaces.entry(key.clone()).or_default();
            if entry.signalled.is_some_and(|at| now.duration_since(at) < WAKE_RESIGNAL) {
                return false;
            }
            entry.signalled = Some(now);
        }
        self.metrics.wake(key, TIER_STOPPED);
        tracing::info!(space = %key, "waking sleeping Space");
        let fut = self.source.wake(key);
        let this = Arc::clone(self);
        let key = key.clone();
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                tracing::warn!(space = %key, error = %e, "wake signal failed; the next request retries");
                // Let the next request try again rather than wait for the resignal period.
                if let Some(entry) = this.lock().get_mut(&key) {
                    entry.signalled = None;
                }
            }
        });
        true
    }

    /// The thaw of a frozen route's decision: the one under way or done, or a
    /// new one (which also renews the activity Lease: the operator then
    /// records the Space awake). Returns it and whether this call started it.
    pub fn thaw(self: &Arc<Self>, route: &SpaceRoute) -> (ThawFuture, bool) {
        let key = &route.key;
        let decision = route.frozen.as_ref().map_or(0, |f| f.decision);
        let mut thaws = self.thaws.lock().unwrap_or_else(PoisonError::into_inner);
        let retry = thaws.get(key).is_some_and(|t| t.decision == decision);
        if let Some(t) = thaws.get(key).filter(|t| t.decision == decision) {
            let failed = matches!(t.future.peek(), Some(Err(_)));
            if !failed || t.started.elapsed() < THAW_RETRY {
                return (t.future.clone(), false);
            }
        }
        // A retry after a failure is the same wake.
        if !retry {
            self.metrics.wake(key, TIER_FROZEN);
            tracing::info!(space = %key, decision, "thawing frozen Space");
        }
        let started = Instant::now();
        let thaw = self.source.thaw(route);
        let renew = self.source.wake(key);
        let (metrics, task_key) = (Arc::clone(&self.metrics), key.clone());
        let task = tokio::spawn(async move {
            let result = thaw.await.map_err(|e| e.to_string());
            // Renewed after the thaw, not before: the operator then withdraws its decision,
            // and were that first, the agent would thaw on it instead of on this request.
            let renew_key = task_key.clone();
            tokio::spawn(async move {
                if let Err(e) = renew.await {
                    tracing::warn!(space = %renew_key, error = %e, "activity renewal after a thaw failed");
                }
            });
            match &result {
                Ok(()) => metrics.wake_done(&task_key, TIER_FROZEN, started.elapsed().as_secs_f64()),
                Err(e) => tracing::warn!(space = %task_key, error = %e, "thaw failed; retrying"),
            }
            result
        });
        let future = async move { task.await.map_err(|e| format!("thaw task: {e}"))? }.boxed().shared();
        thaws.insert(key.clone(), Thaw { decision, started, future: future.clone() });
        (future, true)
    }

    /// Takes a hold slot, or `None` when the Space already holds `max_held` requests.
    pub fn hold(self: &Arc<Self>, key: &SpaceKey) -> Option<HoldGuard> {
        {
            let mut spaces = self.lock();
            let entry = spaces.entry(key.clone()).or_default();
            if entry.held >= self.max_held {
                drop(spaces);
                self.metrics.rejected_held(key);
                return None;
            }
            entry.held += 1;
        }
        self.metrics.held(key, 1);
        Some(HoldGuard { wakes: Arc::clone(self), key: key.clone() })
    }

    /// The Space was seen ready: ends the wake (and records how long it took).
    pub fn ready(&self, key: &SpaceKey) {
        let signalled = self.lock().get_mut(key).and_then(|e| e.signalled.take());
        if let Some(at) = signalled {
            self.metrics.wake_done(key, TIER_STOPPED, at.elapsed().as_secs_f64());
        }
    }

    /// Requests held for `key` now.
    pub fn held(&self, key: &SpaceKey) -> usize {
        self.lock().get(key).map_or(0, |e| e.held)
    }
}

/// A held request; releases its slot on drop.
pub struct HoldGuard {
    wakes: Arc<Wakes>,
    key: SpaceKey,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if let Some(entry) = self.wakes.lock().get_mut(&self.key) {
            entry.held = entry.held.saturating_sub(1);
        }
        self.wakes.metrics.held(&self.key, -1);
    }
}

/// Waits on the route channel (no polling) until the Space can be served or
/// will not be, at most `timeout`. Signals a wake again if it falls asleep
/// meanwhile, and every `WAKE_RESIGNAL` while it stays asleep.
pub async fn wait_ready(
    wakes: &Arc<Wakes>,
    mut routes: watch::Receiver<Arc<RouteTable>>,
    key: &SpaceKey,
    timeout: Duration,
) -> WaitOutcome {
    let deadline = Instant::now() + timeout;
    loop {
        let table = Arc::clone(&routes.borrow_and_update());
        let mut asleep = false;
        if let Some(route) = table.get(key).filter(|r| r.frozen.is_some() && !r.is_paused()) {
            let (thaw, _) = wakes.thaw(route);
            match tokio::time::timeout_at(deadline, thaw).await {
                Ok(Ok(())) => return WaitOutcome::Ready(Arc::new(route.thawed())),
                Err(_) => return WaitOutcome::TimedOut,
                // Failed: try again after a while, or sooner if the route changes.
                Ok(Err(_)) => {
                    let retry = (Instant::now() + THAW_RETRY).min(deadline);
                    if let Ok(Err(_)) = tokio::time::timeout_at(retry, routes.changed()).await {
                        return WaitOutcome::Gone;
                    }
                    if Instant::now() >= deadline {
                        return WaitOutcome::TimedOut;
                    }
                    continue;
                }
            }
        }
        let outcome = match table.get(key) {
            None => Some(WaitOutcome::Gone),
            Some(route) => match route.disposition() {
                Disposition::Forward => {
                    wakes.ready(key);
                    Some(WaitOutcome::Ready(Arc::clone(route)))
                }
                Disposition::Paused => Some(WaitOutcome::Paused),
                Disposition::Unavailable(stage) => Some(WaitOutcome::Unavailable(stage)),
                Disposition::Wake => {
                    wakes.signal(key);
                    asleep = true;
                    None
                }
                Disposition::Hold => None,
            },
        };
        if let Some(outcome) = outcome {
            return outcome;
        }
        // Still asleep: a lost signal must not leave the request waiting for a
        // route change that never comes.
        let until = if asleep { deadline.min(Instant::now() + WAKE_RESIGNAL) } else { deadline };
        match tokio::time::timeout_at(until, routes.changed()).await {
            Ok(Ok(())) => {}
            // The source is gone: nothing will ever change.
            Ok(Err(_)) => return WaitOutcome::Gone,
            Err(_) if Instant::now() >= deadline => return WaitOutcome::TimedOut,
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::source::{MemorySource, RouteSource};
    use std::net::SocketAddr;

    #[tokio::test]
    async fn one_wake_for_many_waiters_and_a_cap() {
        let source = MemorySource::new("d");
        let key = SpaceKey::new("a", "b");
        let mut route = SpaceRoute::new(key.clone());
        route.stage = Some(Stage::Sleeping);
        source.upsert(route);
        let wakes = Wakes::new(source.clone(), Arc::new(Metrics::new()), 50);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let guard = wakes.hold(&key).expect("below the cap");
            let (wakes, rx, key) = (Arc::clone(&wakes), source.routes(), key.clone());
            tasks.push(tokio::spawn(async move {
                let _guard = guard;
                wait_ready(&wakes, rx, &key, Duration::from_secs(10)).await
            }));
        }
        assert!(wakes.hold(&key).is_none(), "the 51st request is refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(source.wakes(&key), 1);
        source.update(&key, |r| r.stage = Some(Stage::AppStarting));
        tokio::time::sleep(Duration::from_millis(20)).await;
        source.update(&key, |r| {
            r.stage = Some(Stage::Running);
            r.endpoints = vec![SocketAddr::from(([127, 0, 0, 1], 9))];
        });
        for t in tasks {
            assert!(matches!(t.await.expect("task"), WaitOutcome::Ready(_)));
        }
        assert_eq!(source.wakes(&key), 1);
        assert_eq!(wakes.held(&key), 0);
        // Asleep again later: a new wake.
        source.update(&key, |r| {
            r.stage = Some(Stage::Sleeping);
            r.endpoints.clear();
        });
        assert!(wakes.signal(&key));
        assert!(!wakes.signal(&key));
    }

    /// A [`MemorySource`] whose thaw counts and takes a little while.
    struct Thawing {
        inner: Arc<MemorySource>,
        thaws: std::sync::atomic::AtomicUsize,
        fail_first: std::sync::atomic::AtomicBool,
    }

    impl RouteSource for Thawing {
        fn routes(&self) -> watch::Receiver<Arc<RouteTable>> {
            self.inner.routes()
        }
        fn wake(&self, space: &SpaceKey) -> BoxFuture<'static, Result<(), crate::proxy::SourceError>> {
            self.inner.wake(space)
        }
        fn record_activity(
            &self,
            space: &SpaceKey,
            at: std::time::SystemTime,
        ) -> BoxFuture<'static, Result<(), crate::proxy::SourceError>> {
            self.inner.record_activity(space, at)
        }
        fn thaw(&self, _route: &SpaceRoute) -> BoxFuture<'static, Result<(), crate::proxy::SourceError>> {
            use std::sync::atomic::Ordering;
            self.thaws.fetch_add(1, Ordering::SeqCst);
            let fail = self.fail_first.swap(false, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                if fail { Err(crate::proxy::SourceError::Other("agent restarting".into())) } else { Ok(()) }
            })
        }
    }

    #[tokio::test]
    async fn one_thaw_per_decision_for_many_waiters_then_forward_to_the_pods() {
        use crate::proxy::route::{Frozen, FrozenPod};
        use std::sync::atomic::Ordering;
        let inner = MemorySource::new("d");
        let key = SpaceKey::new("a", "f");
        let pod = FrozenPod { addr: SocketAddr::from(([10, 0, 0, 7], 7860)), node: Some("n".into()), uid: None };
        let mut route = SpaceRoute::new(key.clone());
        route.stage = Some(Stage::Sleeping);
        route.frozen = Some(Frozen { decision: 100, pods: vec![pod.clone()] });
        inner.upsert(route);
        let source = Arc::new(Thawing {
            inner: inner.clone(),
            thaws: Default::default(),
            fail_first: std::sync::atomic::AtomicBool::new(true),
        });
        let wakes = Wakes::new(source.clone(), Arc::new(Metrics::new()), 100);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            wakes.signal(&key);
            let (wakes, rx, key) = (Arc::clone(&wakes), source.routes(), key.clone());
            tasks.push(tokio::spawn(async move { wait_ready(&wakes, rx, &key, Duration::from_secs(10)).await }));
        }
        for t in tasks {
            match t.await.expect("task") {
                WaitOutcome::Ready(r) => assert_eq!(r.endpoints, vec![pod.addr]),
                other => panic!("{other:?}"),
            }
        }
        // The first thaw failed (agent restarting), one retry succeeded: two, not 50 or 100.
        assert_eq!(source.thaws.load(Ordering::SeqCst), 2);
        assert_eq!(inner.wakes(&key), 2, "each thaw renews the activity Lease");
        // More requests for the same decision: no new thaw.
        assert!(!wakes.signal(&key));
        assert!(matches!(
            wait_ready(&wakes, source.routes(), &key, Duration::from_secs(1)).await,
            WaitOutcome::Ready(_)
        ));
        assert_eq!(source.thaws.load(Ordering::SeqCst), 2);
        // Frozen again by a newer decision: a new thaw.
        inner.update(&key, |r| r.frozen = Some(Frozen { decision: 200, pods: vec![pod.clone()] }));
        assert!(wakes.signal(&key));
        assert_eq!(source.thaws.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn outcomes() {
        let source = MemorySource::new("d");
        let key = SpaceKey::new("a", "b");
        let wakes = Wakes::new(source.clone(), Arc::new(Metrics::new()), 10);
        assert!(matches!(wait_ready(&wakes, source.routes(), &key, Duration::from_secs(1)).await, WaitOutcome::Gone));
        let mut route = SpaceRoute::new(key.clone());
        route.stage = Some(Stage::AppStarting);
        source.upsert(route);
        let t0 = Instant::now();
        let out = wait_ready(&wakes, source.routes(), &key, Duration::from_millis(200)).await;
        assert!(matches!(out, WaitOutcome::TimedOut), "{out:?}");
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert_eq!(source.wakes(&key), 0, "a starting Space is not woken");
        let (w, rx, k) = (Arc::clone(&wakes), source.routes(), key.clone());
        let waiter = tokio::spawn(async move { wait_ready(&w, rx, &k, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        source.update(&key, |r| r.stage = Some(Stage::RuntimeError));
        assert!(matches!(waiter.await.expect("task"), WaitOutcome::Unavailable(Stage::RuntimeError)));
        source.update(&key, |r| r.paused = true);
        assert!(matches!(wait_ready(&wakes, source.routes(), &key, Duration::from_secs(1)).await, WaitOutcome::Paused));
    }
}
