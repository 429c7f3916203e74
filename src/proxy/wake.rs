//! Waking and holding: one wake signal per sleeping Space however many
//! requests arrive, and a bounded number of requests held until it is ready.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::route::{Disposition, RouteTable, SpaceKey, SpaceRoute};
use super::source::RouteSource;
use crate::space::Stage;

/// A Space still asleep this long after its wake signal gets another one
/// (the first may have been lost, e.g. the Lease update failed silently upstream).
pub const WAKE_RESIGNAL: Duration = Duration::from_secs(30);

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
        Arc::new(Self { source, metrics, max_held, spaces: Mutex::new(HashMap::new()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpaceKey, Entry>> {
        self.spaces.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Signals a wake unless one was signalled recently. Returns whether this call sent it.
    pub fn signal(self: &Arc<Self>, key: &SpaceKey) -> bool {
        let now = Instant::now();
        {
            let mut spaces = self.lock();
            let entry = spaces.entry(key.clone()).or_default();
            if entry.signalled.is_some_and(|at| now.duration_since(at) < WAKE_RESIGNAL) {
                return false;
            }
            entry.signalled = Some(now);
        }
        self.metrics.wake(key);
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
            self.metrics.wake_done(key, at.elapsed().as_secs_f64());
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
/// will not be, at most `timeout`. Signals a wake again if it falls asleep meanwhile.
pub async fn wait_ready(
    wakes: &Arc<Wakes>,
    mut routes: watch::Receiver<Arc<RouteTable>>,
    key: &SpaceKey,
    timeout: Duration,
) -> WaitOutcome {
    let deadline = Instant::now() + timeout;
    loop {
        let table = Arc::clone(&routes.borrow_and_update());
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
                    None
                }
                Disposition::Hold => None,
            },
        };
        if let Some(outcome) = outcome {
            return outcome;
        }
        match tokio::time::timeout_at(deadline, routes.changed()).await {
            Ok(Ok(())) => {}
            // The source is gone: nothing will ever change.
            Ok(Err(_)) => return WaitOutcome::Gone,
            Err(_) => return WaitOutcome::TimedOut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::source::MemorySource;
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
