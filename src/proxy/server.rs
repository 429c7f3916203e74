//! The listener: accepts HTTP/1.1 and HTTP/2 (h2c) connections, decides per
//! request (route, auth, wake/hold, forward), and drains on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::header::{CACHE_CONTROL, CONTENT_TYPE, HOST, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use super::activity::{Activity, SpaceActivity};
use super::forward::{self, ForwardError, Forwarded, Forwarder, Outgoing, ProxyBody, full_body, stream_body};
use super::h1_forward::{self, Served};
use super::loading;
use super::metrics::{Metrics, SpaceMetrics};
use super::rewind::Rewind;
use super::route::{Access, Disposition, Match, Resolution, RouteTable, SpaceKey, SpaceRoute};
use super::source::RouteSource;
use super::wake::{self, WaitOutcome, Wakes};
use crate::http_server;
use crate::space::{Stage, custom_headers, naming};

/// How the proxy listens and behaves.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Where Spaces are served.
    pub listen: SocketAddr,
    /// `/metrics` and `/healthz` (`listen` answers only `/healthz` for hosts
    /// that are not Spaces: metrics name every Space, they are not public).
    pub admin_listen: Option<SocketAddr>,
    pub connect_timeout: Duration,
    /// Bounds the wait for an upstream's response head; never a body or tunnel.
    pub header_timeout: Duration,
    /// Requests held per starting Space; more get 503 + `Retry-After`.
    pub max_held_per_space: usize,
    /// Peers whose `X-Forwarded-*`, `Forwarded` and `X-Real-IP` are kept and
    /// extended (trusted load balancers); from anyone else they are replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Client connections' header and idle timeouts (both listeners).
    pub limits: crate::http_server::Limits,
    /// On shutdown: how long open requests and tunnels may take to finish.
    pub drain_timeout: Duration,
    /// Activity records per Space at most this often.
    pub activity_interval: Duration,
    /// Threads serving connections, each with its own event loop and upstream
    /// pool; 0: one per CPU.
    pub workers: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: None,
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(300),
            max_held_per_space: 1000,
            trusted_proxies: Vec::new(),
            limits: crate::http_server::Limits::default(),
            drain_timeout: Duration::from_secs(30),
            activity_interval: naming::LEASE_RENEW_INTERVAL,
            workers: 0,
        }
    }
}

/// What the workers share.
pub(super) struct Inner {
    pub(super) config: ProxyConfig,
    routes: watch::Receiver<Arc<RouteTable>>,
    pub(super) activity: Arc<Activity>,
    wakes: Arc<Wakes>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) next_endpoint: AtomicUsize,
    tunnels: TaskTracker,
    /// Cancelled when the drain period is over: closes what is still open.
    hard_stop: CancellationToken,
    /// The runtime that started the proxy: wakes and held requests wait there,
    /// so a source's clients (Kubernetes, Docker) never live on a worker's event loop.
    main: Handle,
}

/// One worker's state: its own upstream pool and per-Space handles, so a
/// request and its upstream connection stay on one thread.
pub(super) struct Worker {
    inner: Arc<Inner>,
    forwarder: Forwarder,
    /// The HTTP/1.1 fast path's raw upstream connections.
    h1_pool: Arc<h1_forward::Pool>,
    /// This worker's copy of the route table, with `Arc`s of its own: the hot
    /// path touches no reference count another thread touches too.
    routes: Mutex<LocalRoutes>,
    spaces: Mutex<HashMap<SpaceKey, Arc<SpaceHandles>>>,
}

struct LocalRoutes {
    source: watch::Receiver<Arc<RouteTable>>,
    table: Arc<RouteTable>,
}

/// A Space's metrics and activity state, looked up once per worker.
pub(super) struct SpaceHandles {
    pub(super) metrics: Arc<SpaceMetrics>,
    pub(super) activity: Arc<SpaceActivity>,
}

/// A running proxy: its bound addresses and a way to stop it.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<crate::Result<()>>,
}

impl ProxyHandle {
    /// Stops accepting, drains open requests and tunnels (up to the drain timeout), and waits.
    pub async fn shutdown(self) -> crate::Result<()> {
        self.shutdown.cancel();
        self.task.await.map_err(|e| crate::Error::Io(std::io::Error::other(e)))?
    }

    /// The metrics exposition, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }
}

/// Binds the listeners and serves in the background until [`ProxyHandle::shutdown`].
///
/// Connections are served by `workers` threads, each with its own
/// current-thread runtime and upstream pool, all accepting from the one
/// listening socket (like nginx's workers): no request hops between threads.
/// A shared socket rather than one `SO_REUSEPORT` socket per worker keeps
/// "address in use" an error when another proxy already listens there.
pub async fn start(config: ProxyConfig, source: Arc<dyn RouteSource>) -> crate::Result<ProxyHandle> {
    let listener = bind(config.listen)?;
    let admin = match config.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let addr = listener.local_addr()?;
    let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
    let count = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n,
    };
    let shutdown = CancellationToken::new();
    let inner = Arc::new(Inner::new(config, source));
    let mut workers = Vec::with_capacity(count);
    for i in 0..count {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = listener.try_clone()?;
        let (drained_tx, drained) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let (inner, shutdown) = (Arc::clone(&inner), shutdown.clone());
        std::thread::Builder::new().name(format!("hangar-proxy-{i}")).spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve_listener(Worker::new(Arc::clone(&inner)), listener, false, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "proxy worker cannot listen"),
                }
                let _ = drained_tx.send(());
                // Tunnels run on this runtime: keep it until they end (at the hard stop at the latest).
                inner.tunnels.wait().await;
            });
            // Dropping the runtime closes whatever outlived the drain.
            drop(runtime);
            let _ = done_tx.send(());
        })?;
        workers.push((drained, done));
    }
    drop(listener);
    let metrics = Arc::clone(&inner.metrics);
    let task = tokio::spawn(supervise(inner, workers, admin, shutdown.clone()));
    tracing::info!(%addr, ?admin_addr, workers = count, "proxy listening");
    Ok(ProxyHandle { addr, admin_addr, metrics, shutdown, task })
}

/// The listening socket, non-blocking, for the workers to share.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// Serves until `shutdown` completes, then drains (the CLI entry point).
pub async fn run(
    config: ProxyConfig,
    source: Arc<dyn RouteSource>,
    shutdown: impl Future<Output = ()> + Send,
) -> crate::Result<()> {
    let handle = start(config, source).await?;
    shutdown.await;
    tracing::info!("shutting down: draining requests and tunnels");
    handle.shutdown().await
}

impl Inner {
    fn new(config: ProxyConfig, source: Arc<dyn RouteSource>) -> Self {
        let metrics = Arc::new(Metrics::new());
        Self {
            routes: source.routes(),
            activity: Activity::new(Arc::clone(&source), config.activity_interval),
            wakes: Wakes::new(Arc::clone(&source), Arc::clone(&metrics), config.max_held_per_space),
            metrics,
            next_endpoint: AtomicUsize::new(0),
            tunnels: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            main: Handle::current(),
            config,
        }
    }
}

type WorkerExit = (oneshot::Receiver<()>, oneshot::Receiver<()>);

/// Runs the activity ticker and the admin listener, and on shutdown drains the workers.
async fn supervise(
    inner: Arc<Inner>,
    workers: Vec<WorkerExit>,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> crate::Result<()> {
    // Should this task be dropped (its runtime ends), the workers stop too.
    let _stop_workers = (shutdown.clone().drop_guard(), inner.hard_stop.clone().drop_guard());
    let ticker = tokio::spawn(Arc::clone(&inner.activity).run(inner.hard_stop.clone()));
    let admin = admin.map(|l| tokio::spawn(serve_listener(Worker::new(Arc::clone(&inner)), l, true, shutdown.clone())));
    shutdown.cancelled().await;
    inner.tunnels.close();
    let (drained, done): (Vec<_>, Vec<_>) = workers.into_iter().unzip();
    let drain = async {
        for d in drained {
            let _ = d.await;
        }
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        inner.tunnels.wait().await;
    };
    if tokio::time::timeout(inner.config.drain_timeout, drain).await.is_err() {
        tracing::warn!("drain timeout reached: closing what is still open");
    }
    inner.hard_stop.cancel();
    for d in done {
        let _ = d.await;
    }
    if let Err(e) = ticker.await {
        tracing::warn!(error = %e, "activity ticker failed");
    }
    Ok(())
}

/// Accepts and serves connections until `shutdown`, then waits for them to
/// finish (or for the hard stop).
async fn serve_listener(worker: Worker, listener: TcpListener, is_admin: bool, shutdown: CancellationToken) {
    let worker = Arc::new(worker);
    let limits = worker.inner.config.limits;
    let builder = Arc::new(http_server::builder(&limits));
    // Every connection, fast path included: the drain waits for them.
    let connections = TaskTracker::new();
    // This worker's own: its connections wait on it between requests without touching the others'.
    let between_requests = shutdown.child_token();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => { accept_error(e).await; continue; }
            },
        };
        // Small writes (SSE events, WebSocket frames) must leave at once.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let worker = Arc::clone(&worker);
        let builder = Arc::clone(&builder);
        let between_requests = between_requests.clone();
        connections.spawn(async move {
            // Computed once per connection, not per request.
            let client = forward::Client::new(peer, &worker.inner.config.trusted_proxies);
            // Plain HTTP/1.1 to running public Spaces first; hyper gets the rest,
            // the bytes the fast path read replayed.
            let (stream, replay) = if is_admin {
                (stream, Vec::new())
            } else {
                match h1_forward::serve(&worker, stream, &client, &between_requests).await {
                    Served::Closed => return,
                    Served::HandOff(stream, replay) => (stream, replay),
                }
            };
            let handler = move |req| {
                let (worker, client) = (Arc::clone(&worker), client.clone());
                async move { if is_admin { admin_request(&worker.inner, &req) } else { worker.handle(req, &client).await } }
            };
            let io = TokioIo::new(Rewind::new(stream, replay));
            http_server::serve_connection(&builder, io, limits, &between_requests, handler).await;
        });
    }
    drop(listener);
    connections.close();
    tokio::select! {
        () = connections.wait() => {}
        () = worker.inner.hard_stop.cancelled() => {}
    }
}

async fn accept_error(e: std::io::Error) {
    // Usually EMFILE: back off instead of spinning.
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<ProxyBody> {
    let mut r = Response::new(full_body(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn retry_after(mut r: Response<ProxyBody>, seconds: u32) -> Response<ProxyBody> {
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
    r
}

fn admin_request(inner: &Inner, req: &Request<Incoming>) -> Response<ProxyBody> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/metrics" => {
            let mut r = text(StatusCode::OK, inner.metrics.encode());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The public listener's own answers: health only (`/metrics` names every
/// Space and their traffic: the admin listener's alone).
fn public_request(req: &Request<Incoming>) -> Response<ProxyBody> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "404 Not Found\n"),
    }
}

fn stage_text(stage: Stage, message: Option<&str>) -> String {
    let name = loading::stage_name(Some(stage));
    match message {
        Some(m) => format!("{name}: {m}"),
        None => name.to_owned(),
    }
}

impl Worker {
    fn new(inner: Arc<Inner>) -> Self {
        let forwarder = Forwarder::new(inner.config.connect_timeout, inner.config.header_timeout);
        let mut source = inner.routes.clone();
        let table = local_copy(&source.borrow_and_update());
        let routes = Mutex::new(LocalRoutes { source, table });
        let h1_pool = h1_forward::Pool::new();
        Self { inner, forwarder, h1_pool, routes, spaces: Mutex::new(HashMap::new()) }
    }

    pub(super) fn inner(&self) -> &Inner {
        &self.inner
    }

    pub(super) fn h1_pool(&self) -> &h1_forward::Pool {
        &self.h1_pool
    }

    /// The current route table (this worker's copy, refreshed when the source changed it).
    pub(super) fn table(&self) -> Arc<RouteTable> {
        let mut local = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        // A version check: no lock on the shared channel unless something changed.
        if local.source.has_changed().unwrap_or(false) {
            let table = local_copy(&local.source.borrow_and_update());
            local.table = table;
        }
        Arc::clone(&local.table)
    }

    /// The Space's handles, from this worker's cache.
    pub(super) fn space(&self, key: &SpaceKey) -> Arc<SpaceHandles> {
        let mut spaces = self.spaces.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = spaces.get(key) {
            return Arc::clone(h);
        }
        let h =
            Arc::new(SpaceHandles { metrics: self.inner.metrics.space(key), activity: self.inner.activity.entry(key) });
        spaces.insert(key.clone(), Arc::clone(&h));
        h
    }

    async fn handle(&self, req: Request<Incoming>, client: &forward::Client) -> Response<ProxyBody> {
        let start = Instant::now();
        let table = self.table();
        let host =
            req.headers().get(HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().authority().map(|a| a.as_str()));
        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        match table.resolve(host, path_and_query) {
            Resolution::NotASpace => public_request(&req),
            Resolution::UnknownSpace => {
                self.inner.metrics.unmatched();
                text(StatusCode::NOT_FOUND, "404 Not Found: no such Space\n")
            }
            Resolution::Space(m) => {
                let space = self.space(&m.route.key);
                let response = self.space_request(req, m, &space, client).await;
                space.metrics.request(response.status().as_u16(), start.elapsed().as_secs_f64());
                response
            }
        }
    }

    async fn space_request(
        &self,
        req: Request<Incoming>,
        m: Match,
        space: &SpaceHandles,
        client: &forward::Client,
    ) -> Response<ProxyBody> {
        let route = Arc::clone(&m.route);
        let key = &route.key;
        if !super::auth::allowed(&route.access, req.headers()) {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                format!("401 Unauthorized: {key} is private; send Authorization: Bearer <token>\n"),
            );
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"hangar\""));
            return r;
        }
        if let Some(location) = &m.redirect
            && matches!(*req.method(), Method::GET | Method::HEAD)
        {
            let mut r = text(StatusCode::TEMPORARY_REDIRECT, "");
            if let Ok(v) = HeaderValue::from_str(location) {
                r.headers_mut().insert(LOCATION, v);
            }
            return r;
        }
        let route = match route.disposition() {
            Disposition::Forward => route,
            Disposition::Paused => return paused(&route),
            Disposition::Unavailable(stage) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "503 Service Unavailable: {key} is not running ({})\n",
                        stage_text(stage, route.message.as_deref())
                    ),
                );
            }
            disposition @ (Disposition::Wake | Disposition::Hold) => {
                let inner = &self.inner;
                // A held request is activity for as long as it waits: the Lease stays
                // fresh, so a slow start is not put back to sleep under it.
                let _waiting = inner.activity.open_entry(Arc::clone(&space.activity));
                if disposition == Disposition::Wake {
                    // The wake is sent from the main runtime (see `Inner::main`).
                    let _main = inner.main.enter();
                    inner.wakes.signal(key);
                }
                // A frozen Space answers in milliseconds once thawed: no loading page.
                if route.frozen.is_none() && loading::wants_html(req.method(), req.headers()) {
                    return loading_page(&route);
                }
                let Some(hold) = inner.wakes.hold(key) else {
                    return retry_after(
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "503 Service Unavailable: too many requests are waiting for {key} to start; retry later\n"
                            ),
                        ),
                        loading::RELOAD_SECONDS * 5,
                    );
                };
                // Held on the main runtime, which also sends the wake signals
                // the wait may repeat; aborted if this request goes away.
                let (wakes, routes, waited_key) = (Arc::clone(&inner.wakes), inner.routes.clone(), key.clone());
                let timeout = route.startup_timeout;
                let wait = AbortOnDropHandle::new(inner.main.spawn(async move {
                    let _hold = hold;
                    wake::wait_ready(&wakes, routes, &waited_key, timeout).await
                }));
                let outcome = match wait.await {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        return text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("503 Service Unavailable: waiting for {key} failed: {e}\n"),
                        );
                    }
                };
                match outcome {
                    WaitOutcome::Ready(ready) => ready,
                    WaitOutcome::Gone => return text(StatusCode::NOT_FOUND, "404 Not Found: no such Space\n"),
                    WaitOutcome::Paused => return paused(&route),
                    WaitOutcome::Unavailable(stage) => {
                        return text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("503 Service Unavailable: {key} failed to start ({})\n", stage_text(stage, None)),
                        );
                    }
                    WaitOutcome::TimedOut => {
                        return retry_after(
                            text(
                                StatusCode::GATEWAY_TIMEOUT,
                                format!(
                                    "504 Gateway Timeout: {key} did not become ready within {:?}\n",
                                    route.startup_timeout
                                ),
                            ),
                            loading::RELOAD_SECONDS * 5,
                        );
                    }
                }
            }
        };
        self.forward(req, &m, route, space, client).await
    }
}

/// A copy of `table` whose routes are new `Arc`s (only when the source publishes a change).
fn local_copy(table: &RouteTable) -> Arc<RouteTable> {
    Arc::new(RouteTable::new(table.domain(), table.routes().map(|r| SpaceRoute::clone(r))))
}

fn paused(route: &SpaceRoute) -> Response<ProxyBody> {
    text(StatusCode::SERVICE_UNAVAILABLE, format!("503 Service Unavailable: {} is paused by its owner\n", route.key))
}

fn loading_page(route: &SpaceRoute) -> Response<ProxyBody> {
    let id = naming::space_id(&route.key.namespace, &route.key.name);
    let mut r = Response::new(full_body(loading::page(&id, route.stage, route.message.as_deref())));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(RETRY_AFTER, HeaderValue::from(loading::RELOAD_SECONDS));
    r
}

impl Worker {
    async fn forward(
        &self,
        req: Request<Incoming>,
        m: &Match,
        route: Arc<SpaceRoute>,
        space: &SpaceHandles,
        client: &forward::Client,
    ) -> Response<ProxyBody> {
        let inner = &self.inner;
        let key = &route.key;
        // Round robin only matters with several endpoints; one needs no shared counter.
        let n = if route.endpoints.len() > 1 { inner.next_endpoint.fetch_add(1, Ordering::Relaxed) } else { 0 };
        let Some(&upstream) = route.endpoints.get(n % route.endpoints.len().max(1)) else {
            return text(StatusCode::BAD_GATEWAY, format!("502 Bad Gateway: {key} has no ready endpoint\n"));
        };
        let out = Outgoing {
            upstream,
            path_and_query: &m.upstream_path,
            client,
            prefix: &m.prefix,
            strip_authorization: matches!(route.access, Access::Private { .. }),
        };
        let guard = inner.activity.open_entry(Arc::clone(&space.activity));
        match self.forwarder.forward(req, out).await {
            Ok(Forwarded::Response(response)) => {
                let (mut parts, body) = response.into_parts();
                for (name, value) in &route.custom_headers {
                    // Never framing or hop-by-hop, whatever reached the route.
                    if custom_headers::is_allowed_name(name.as_str()) {
                        parts.headers.insert(name.clone(), value.clone());
                    }
                }
                // The guard lives as long as the body streams: an open SSE stream is activity.
                let body = stream_body(body)
                    .map_frame(move |frame| {
                        let _open = &guard;
                        frame
                    })
                    .boxed_unsync();
                Response::from_parts(parts, body)
            }
            Ok(Forwarded::Upgraded { response, tunnel }) => {
                let (parts, _) = response.into_parts();
                inner.metrics.tunnel(key, 1);
                let metrics = Arc::clone(&inner.metrics);
                let hard_stop = inner.hard_stop.clone();
                let key = key.clone();
                inner.tunnels.spawn(async move {
                    tokio::select! {
                        result = tunnel.run() => {
                            if let Err(e) = result {
                                tracing::debug!(space = %key, error = %e, "tunnel ended with an error");
                            }
                        }
                        () = hard_stop.cancelled() => {}
                    }
                    metrics.tunnel(&key, -1);
                    drop(guard);
                });
                Response::from_parts(parts, full_body(bytes::Bytes::new()))
            }
            Err(e) => {
                inner.metrics.upstream_error(key);
                tracing::warn!(space = %key, error = %e, "upstream failed");
                let (status, body) = upstream_failure(key, &e);
                text(status, body)
            }
        }
    }
}

/// The answer when an upstream gave no response: 504 when it timed out, else 502, and why.
pub(super) fn upstream_failure(key: &SpaceKey, e: &ForwardError) -> (StatusCode, String) {
    let (status, what) = match e {
        ForwardError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout"),
        _ => (StatusCode::BAD_GATEWAY, "502 Bad Gateway"),
    };
    (status, format!("{what}: the Space {key} did not answer: {e}\n"))
}
