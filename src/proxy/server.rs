//! The listener: accepts HTTP/1.1 and HTTP/2 (h2c) connections, decides per
//! request (route, auth, wake/hold, forward), and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::header::{CACHE_CONTROL, CONTENT_TYPE, HOST, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::activity::Activity;
use super::forward::{ForwardError, Forwarded, Forwarder, Outgoing, ProxyBody, full_body, stream_body};
use super::loading;
use super::metrics::Metrics;
use super::route::{Access, Disposition, Match, Resolution, RouteTable, SpaceRoute};
use super::source::RouteSource;
use super::wake::{self, WaitOutcome, Wakes};
use crate::space::{Stage, naming};

/// How the proxy listens and behaves.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Where Spaces are served.
    pub listen: SocketAddr,
    /// `/metrics` and `/healthz` (also answered on `listen` for hosts that are not Spaces).
    pub admin_listen: Option<SocketAddr>,
    pub connect_timeout: Duration,
    /// Bounds the wait for an upstream's response head; never a body or tunnel.
    pub header_timeout: Duration,
    /// Requests held per starting Space; more get 503 + `Retry-After`.
    pub max_held_per_space: usize,
    /// Keep and extend incoming `X-Forwarded-*` (behind a trusted load balancer).
    pub trust_forwarded_headers: bool,
    /// On shutdown: how long open requests and tunnels may take to finish.
    pub drain_timeout: Duration,
    /// Activity records per Space at most this often.
    pub activity_interval: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: None,
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(300),
            max_held_per_space: 1000,
            trust_forwarded_headers: false,
            drain_timeout: Duration::from_secs(30),
            activity_interval: naming::LEASE_RENEW_INTERVAL,
        }
    }
}

struct Inner {
    config: ProxyConfig,
    routes: watch::Receiver<Arc<RouteTable>>,
    forwarder: Forwarder,
    activity: Arc<Activity>,
    wakes: Arc<Wakes>,
    metrics: Arc<Metrics>,
    next_endpoint: AtomicUsize,
    tunnels: TaskTracker,
    /// Cancelled when the drain period is over: closes what is still open.
    hard_stop: CancellationToken,
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
pub async fn start(config: ProxyConfig, source: Arc<dyn RouteSource>) -> crate::Result<ProxyHandle> {
    let listener = TcpListener::bind(config.listen).await?;
    let admin = match config.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let addr = listener.local_addr()?;
    let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
    let shutdown = CancellationToken::new();
    let inner = Arc::new(Inner::new(config, source));
    let metrics = Arc::clone(&inner.metrics);
    let task = tokio::spawn(serve(inner, listener, admin, shutdown.clone()));
    tracing::info!(%addr, ?admin_addr, "proxy listening");
    Ok(ProxyHandle { addr, admin_addr, metrics, shutdown, task })
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
            forwarder: Forwarder::new(config.connect_timeout, config.header_timeout),
            activity: Activity::new(Arc::clone(&source), config.activity_interval),
            wakes: Wakes::new(Arc::clone(&source), Arc::clone(&metrics), config.max_held_per_space),
            metrics,
            next_endpoint: AtomicUsize::new(0),
            tunnels: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            config,
        }
    }
}

async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> crate::Result<()> {
    let ticker = tokio::spawn(Arc::clone(&inner.activity).run(inner.hard_stop.clone()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    let builder = Arc::new(builder);
    loop {
        let (stream, peer, is_admin) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, p)) => (s, p, false),
                Err(e) => { accept_error(e).await; continue; }
            },
            accepted = accept_opt(admin.as_ref()) => match accepted {
                Ok((s, p)) => (s, p, true),
                Err(e) => { accept_error(e).await; continue; }
            },
        };
        // Small writes (SSE events, WebSocket frames) must leave at once.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let inner = Arc::clone(&inner);
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let inner = Arc::clone(&inner);
                async move {
                    Ok::<_, Infallible>(if is_admin {
                        admin_request(&inner, &req)
                    } else {
                        inner.handle(req, peer).await
                    })
                }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(admin);
    inner.tunnels.close();
    let drain = async {
        graceful.shutdown().await;
        inner.tunnels.wait().await;
    };
    if tokio::time::timeout(inner.config.drain_timeout, drain).await.is_err() {
        tracing::warn!("drain timeout reached: closing what is still open");
    }
    inner.hard_stop.cancel();
    inner.tunnels.wait().await;
    if let Err(e) = ticker.await {
        tracing::warn!(error = %e, "activity ticker failed");
    }
    Ok(())
}

async fn accept_opt(listener: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
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

fn stage_text(stage: Stage, message: Option<&str>) -> String {
    let name = loading::stage_name(Some(stage));
    match message {
        Some(m) => format!("{name}: {m}"),
        None => name.to_owned(),
    }
}

impl Inner {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let start = Instant::now();
        let table = Arc::clone(&self.routes.borrow());
        let host =
            req.headers().get(HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().authority().map(|a| a.as_str()));
        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        match table.resolve(host, path_and_query) {
            Resolution::NotASpace => admin_request(self, &req),
            Resolution::UnknownSpace => {
                self.metrics.unmatched();
                text(StatusCode::NOT_FOUND, "404 Not Found: no such Space\n")
            }
            Resolution::Space(m) => {
                let key = m.route.key.clone();
                let response = self.space_request(req, m, peer).await;
                self.metrics.request(&key, response.status().as_u16(), start.elapsed().as_secs_f64());
                response
            }
        }
    }

    async fn space_request(&self, req: Request<Incoming>, m: Match, peer: SocketAddr) -> Response<ProxyBody> {
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
            Disposition::Paused => return self.paused(&route),
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
                self.activity.touch(key);
                if disposition == Disposition::Wake {
                    self.wakes.signal(key);
                }
                // A frozen Space answers in milliseconds once thawed: no loading page.
                if route.frozen.is_none() && loading::wants_html(req.method(), req.headers()) {
                    return self.loading_page(&route);
                }
                let Some(_hold) = self.wakes.hold(key) else {
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
                match wake::wait_ready(&self.wakes, self.routes.clone(), key, route.startup_timeout).await {
                    WaitOutcome::Ready(ready) => ready,
                    WaitOutcome::Gone => return text(StatusCode::NOT_FOUND, "404 Not Found: no such Space\n"),
                    WaitOutcome::Paused => return self.paused(&route),
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
        self.forward(req, &m, route, peer).await
    }

    fn paused(&self, route: &SpaceRoute) -> Response<ProxyBody> {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("503 Service Unavailable: {} is paused by its owner\n", route.key),
        )
    }

    fn loading_page(&self, route: &SpaceRoute) -> Response<ProxyBody> {
        let id = naming::space_id(&route.key.namespace, &route.key.name);
        let mut r = Response::new(full_body(loading::page(&id, route.stage, route.message.as_deref())));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(RETRY_AFTER, HeaderValue::from(loading::RELOAD_SECONDS));
        r
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        m: &Match,
        route: Arc<SpaceRoute>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let key = &route.key;
        let n = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        let Some(&upstream) = route.endpoints.get(n % route.endpoints.len().max(1)) else {
            return text(StatusCode::BAD_GATEWAY, format!("502 Bad Gateway: {key} has no ready endpoint\n"));
        };
        let out = Outgoing {
            upstream,
            path_and_query: &m.upstream_path,
            client_addr: peer,
            prefix: &m.prefix,
            strip_authorization: matches!(route.access, Access::Private { .. }),
            trust_forwarded: self.config.trust_forwarded_headers,
        };
        let guard = self.activity.open(key);
        match self.forwarder.forward(req, out).await {
            Ok(Forwarded::Response(response)) => {
                let (mut parts, body) = response.into_parts();
                for (name, value) in &route.custom_headers {
                    parts.headers.insert(name.clone(), value.clone());
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
                self.metrics.tunnel(key, 1);
                let metrics = Arc::clone(&self.metrics);
                let hard_stop = self.hard_stop.clone();
                let key = key.clone();
                self.tunnels.spawn(async move {
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
                self.metrics.upstream_error(key);
                tracing::warn!(space = %key, error = %e, "upstream failed");
                let (status, what) = match &e {
                    ForwardError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout"),
                    _ => (StatusCode::BAD_GATEWAY, "502 Bad Gateway"),
                };
                text(status, format!("{what}: the Space {key} did not answer: {e}\n"))
            }
        }
    }
}
