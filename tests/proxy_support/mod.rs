//! A real upstream app on loopback and helpers to put hangar's proxy in front of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures::StreamExt;
use hangar::proxy::{MemorySource, ProxyConfig, ProxyHandle, SpaceKey, SpaceRoute};
use hangar::space::Stage;
use tokio::net::TcpListener;

/// What the upstream saw of a request.
async fn echo(req: Request) -> Response {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), serde_json::Value::from(v.to_str().unwrap_or("<bin>"))))
        .collect();
    axum::Json(serde_json::json!({
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    }))
    .into_response()
}

/// Five events, 200 ms apart.
async fn sse() -> impl IntoResponse {
    let events = futures::stream::unfold(0u32, |n| async move {
        if n == 5 {
            return None;
        }
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some((Ok::<_, std::convert::Infallible>(Event::default().data(format!("event {n}"))), n + 1))
    });
    Sse::new(events)
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(format!("echo: {}", t.as_str()).into()),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

/// Counts the bytes of a streamed upload.
async fn upload(req: Request) -> String {
    let mut body = req.into_body().into_data_stream();
    let mut n: u64 = 0;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => n += c.len() as u64,
            Err(e) => return format!("error after {n}: {e}"),
        }
    }
    n.to_string()
}

/// A chunk every 300 ms for 1.8 s: longer than the test's header timeout.
async fn trickle() -> Response {
    let chunks = futures::stream::unfold(0u32, |n| async move {
        if n == 6 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from(format!("chunk {n}\n"))), n + 1))
    });
    Body::from_stream(chunks).into_response()
}

/// Answers its head only after 3 s.
async fn slow_head() -> &'static str {
    tokio::time::sleep(Duration::from_secs(3)).await;
    "late"
}

/// Sends one chunk, then dies mid-body.
async fn die() -> Response {
    let chunks = futures::stream::unfold(0u32, |n| async move {
        match n {
            0 => Some((Ok(Bytes::from_static(b"partial")), 1)),
            1 => {
                // Let the head and the first chunk leave before dying.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some((Err(std::io::Error::other("app crashed")), 2))
            }
            _ => None,
        }
    });
    Body::from_stream(chunks).into_response()
}

/// A body that never ends until the client goes away (for shutdown and activity tests).
async fn forever(State(name): State<Arc<str>>) -> Response {
    let chunks = futures::stream::unfold(0u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from(format!("{n}\n"))), n + 1))
    });
    let _ = name;
    Body::from_stream(chunks).into_response()
}

/// The upstream app; `name` is echoed by `/whoami`.
pub fn app(name: &str) -> Router {
    let name: Arc<str> = Arc::from(name);
    Router::new()
        .route("/whoami", get(|State(n): State<Arc<str>>| async move { n.to_string() }))
        .route("/sse", get(sse))
        .route("/ws", get(ws))
        .route("/upload", post(upload))
        .route("/trickle", get(trickle))
        .route("/slow-head", get(slow_head))
        .route("/die", get(die))
        .route("/forever", get(forever))
        .route("/custom", get(|| async { ([("cross-origin-opener-policy", "unsafe-none")], "app sets COOP") }))
        .fallback(any(echo))
        .with_state(name)
}

/// A running upstream on a loopback port.
pub struct Upstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str) -> Self {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("binding the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let app = app(name);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("upstream serves");
        });
        Self { addr, task }
    }

    /// Stops accepting and drops open connections.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// A free loopback port (bound and released; good enough for a test).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

pub fn key(ns: &str, name: &str) -> SpaceKey {
    SpaceKey::new(ns, name)
}

/// A running public Space served by `addr`.
pub fn running(ns: &str, name: &str, addr: SocketAddr) -> SpaceRoute {
    let mut r = SpaceRoute::new(key(ns, name));
    r.stage = Some(Stage::Running);
    r.endpoints = vec![addr];
    r
}

pub const DOMAIN: &str = "spaces.test";

/// The proxy on loopback (main and admin ports) in front of `source`.
pub async fn proxy(source: &Arc<MemorySource>, tweak: impl FnOnce(&mut ProxyConfig)) -> ProxyHandle {
    let mut config = ProxyConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..ProxyConfig::default()
    };
    tweak(&mut config);
    hangar::proxy::start(config, source.clone()).await.expect("proxy starts")
}

/// A client that never uses an environment proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().expect("client")
}

/// `http://{proxy}/spaces/{ns}/{name}{path}`
pub fn url(p: &ProxyHandle, ns: &str, name: &str, path: &str) -> String {
    format!("http://{}/spaces/{ns}/{name}{path}", p.addr)
}

/// A loopback upstream speaking raw bytes, for what an app framework never
/// does: HTTP/1.0 answers delimited by close, keep-alive connections closed
/// the moment a response is out. `serve` gets each accepted connection.
pub struct RawUpstream {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the raw upstream");
        let addr = listener.local_addr().expect("raw upstream address");
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        Self { addr, connections, task }
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head (a request without a body) from `stream`; `None` at EOF.
pub async fn read_request_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}
