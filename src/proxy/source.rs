//! Where routes, readiness and activity go: the [`RouteSource`] trait, and an
//! in-memory implementation for local mode and tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::route::{RouteTable, SpaceKey, SpaceRoute};

/// A failure of a source's side effects (wake signal, activity record).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

/// What the proxy needs from the world around it. Kubernetes mode watches
/// Spaces + EndpointSlices and writes activity Leases ([`super::KubeSource`]);
/// local mode and tests drive a [`MemorySource`].
pub trait RouteSource: Send + Sync + 'static {
    /// The current route table, and every later one. The proxy waits on this
    /// channel for readiness changes; it never polls.
    fn routes(&self) -> watch::Receiver<Arc<RouteTable>>;

    /// Signals that a sleeping Space must start (Kubernetes: renew its
    /// activity Lease now). The proxy calls it once per wake, not per request.
    fn wake(&self, space: &SpaceKey) -> BoxFuture<'static, Result<(), SourceError>>;

    /// Records that the Space saw traffic at `at` (Kubernetes: renew the Lease).
    /// The proxy calls it at most once per `LEASE_RENEW_INTERVAL` per Space,
    /// and keeps calling it while a WebSocket or stream stays open.
    fn record_activity(&self, space: &SpaceKey, at: SystemTime) -> BoxFuture<'static, Result<(), SourceError>>;

    /// Thaws a frozen Space's pods ([`SpaceRoute::frozen`]) and resolves once
    /// they run again (Kubernetes: through their node agents). The proxy calls
    /// it once per freeze decision, however many requests wait.
    fn thaw(&self, route: &SpaceRoute) -> BoxFuture<'static, Result<(), SourceError>> {
        let _ = route;
        Box::pin(async { Ok(()) })
    }
}

/// Called by [`MemorySource::wake`]: local mode starts the container here
/// (and by [`MemorySource::thaw`]: local mode unpauses it).
pub type WakeHandler = Arc<dyn Fn(SpaceKey) -> BoxFuture<'static, Result<(), SourceError>> + Send + Sync>;

#[derive(Default)]
struct Record {
    wakes: usize,
    activity: usize,
    last_activity: Option<SystemTime>,
}

/// Routes held in memory: whoever owns it (local mode, a test) publishes
/// routes and readiness, and learns about wakes and activity.
pub struct MemorySource {
    tx: watch::Sender<Arc<RouteTable>>,
    wake_handler: Mutex<Option<WakeHandler>>,
    thaw_handler: Mutex<Option<WakeHandler>>,
    records: Mutex<HashMap<SpaceKey, Record>>,
}

impl MemorySource {
    /// An empty table for Spaces under `domain`.
    pub fn new(domain: &str) -> Arc<Self> {
        let (tx, _) = watch::channel(Arc::new(RouteTable::new(domain, [])));
        Arc::new(Self {
            tx,
            wake_handler: Mutex::new(None),
            thaw_handler: Mutex::new(None),
            records: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `handler` on every wake signal (after counting it).
    pub fn set_wake_handler(&self, handler: WakeHandler) {
        *self.wake_handler.lock().unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// Runs `handler` on every thaw of a frozen route; it resolves once the
    /// Space serves again. Without one a thaw succeeds at once.
    pub fn set_thaw_handler(&self, handler: WakeHandler) {
        *self.thaw_handler.lock().unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// The current table.
    pub fn table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.tx.borrow())
    }

    /// Adds or replaces a route. A route without [`SpaceRoute::since`] keeps
    /// the one it replaces, or is the newest: the order routes are first
    /// given in is their age, which decides a host two Spaces share.
    pub fn upsert(&self, mut route: SpaceRoute) {
        self.tx.send_modify(|t| {
            if route.since.is_none() {
                route.since = Some(match t.get(&route.key) {
                    Some(old) => old.since.unwrap_or(0),
                    None => t.routes().filter_map(|r| r.since).max().map_or(0, |n| n.saturating_add(1)),
                });
            }
            *t = Arc::new(t.with(route));
        });
    }

    /// Changes a route in place; `false` if there is no such Space.
    pub fn update(&self, key: &SpaceKey, f: impl FnOnce(&mut SpaceRoute)) -> bool {
        let Some(mut route) = self.tx.borrow().get(key).map(|r| (**r).clone()) else {
            return false;
        };
        f(&mut route);
        self.upsert(route);
        true
    }

    pub fn remove(&self, key: &SpaceKey) {
        self.tx.send_modify(|t| *t = Arc::new(t.without(key)));
    }

    /// How many wake signals the Space received.
    pub fn wakes(&self, key: &SpaceKey) -> usize {
        self.with_record(key, |r| r.wakes)
    }

    /// How many activity records the Space received.
    pub fn activity_count(&self, key: &SpaceKey) -> usize {
        self.with_record(key, |r| r.activity)
    }

    /// The last activity time recorded for the Space (a wake counts).
    pub fn last_activity(&self, key: &SpaceKey) -> Option<SystemTime> {
        self.with_record(key, |r| r.last_activity)
    }

    fn with_record<T>(&self, key: &SpaceKey, f: impl FnOnce(&mut Record) -> T) -> T {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        f(records.entry(key.clone()).or_default())
    }
}

impl RouteSource for MemorySource {
    fn routes(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.tx.subscribe()
    }

    fn wake(&self, space: &SpaceKey) -> BoxFuture<'static, Result<(), SourceError>> {
        self.with_record(space, |r| {
            r.wakes += 1;
            r.last_activity = Some(SystemTime::now());
        });
        let handler = self.wake_handler.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let key = space.clone();
        Box::pin(async move {
            match handler {
                Some(h) => h(key).await,
                None => Ok(()),
            }
        })
    }

    fn record_activity(&self, space: &SpaceKey, at: SystemTime) -> BoxFuture<'static, Result<(), SourceError>> {
        self.with_record(space, |r| {
            r.activity += 1;
            r.last_activity = Some(at);
        });
        Box::pin(async { Ok(()) })
    }

    fn thaw(&self, route: &SpaceRoute) -> BoxFuture<'static, Result<(), SourceError>> {
        let handler = self.thaw_handler.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match handler {
            Some(h) => h(route.key.clone()),
            None => Box::pin(async { Ok(()) }),
        }
    }
}
