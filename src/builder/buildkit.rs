//! Builds on the engine's own BuildKit (`POST /build?version=2`) with a
//! session that answers the Space's secrets to `RUN --mount=type=secret` steps.
//!
//! Why not bollard's `build_image`: in bollard 0.21 its BuildKit session
//! serves registry auth and file export only, so a secret mount finds no
//! provider (upstream added `build_image_with_session_providers` after
//! 0.21.1; switch to it once it is released). bollard's gRPC `Moby` driver
//! does serve secrets, but it returns no build output and holds the whole
//! context in memory. So this module opens the session itself (the engine's
//! `/session` endpoint upgraded to h2c, serving bollard's generated gRPC
//! services with tonic) and posts the build to `/build` itself, decoding the
//! BuildKit progress the engine streams back (`moby.buildkit.trace`).
//!
//! Secret values stay in this process's memory and travel only over the
//! session, on request of a step that mounts them; BuildKit puts them on a
//! tmpfs for that one step and keeps them out of the cache key, so they reach
//! no layer, no image config or history, and no log line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use base64::Engine as _;
use bollard::health::health_check_response::ServingStatus;
use bollard::health::health_server::{Health, HealthServer};
use bollard::health::{HealthCheckRequest, HealthCheckResponse, HealthListRequest, HealthListResponse};
use bollard::moby::buildkit::secrets::v1::secrets_server::{Secrets, SecretsServer};
use bollard::moby::buildkit::secrets::v1::{GetSecretRequest, GetSecretResponse};
use bollard::moby::buildkit::v1::StatusResponse;
use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use prost::Message;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::either::Either;
use tokio_util::io::ReaderStream;
use tonic::{Request, Response, Status};

use super::engine::{StepFailure, strip_ansi};

/// Where the engine listens: the raw connections a session needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineAddr {
    Unix(PathBuf),
    /// `host:port`
    Tcp(String),
}

impl EngineAddr {
    /// From `unix:///path`, `tcp://host:port` or `http://host:port`.
    pub fn parse(host: &str) -> Option<Self> {
        if let Some(path) = host.strip_prefix("unix://") {
            return Some(Self::Unix(path.into()));
        }
        let rest = host.strip_prefix("tcp://").or_else(|| host.strip_prefix("http://"))?;
        Some(Self::Tcp(rest.trim_end_matches('/').to_owned()))
    }

    async fn dial(&self) -> io::Result<Either<tokio::net::UnixStream, tokio::net::TcpStream>> {
        Ok(match self {
            Self::Unix(path) => Either::Left(tokio::net::UnixStream::connect(path).await?),
            Self::Tcp(addr) => Either::Right(tokio::net::TcpStream::connect(addr).await?),
        })
    }

    /// Sends one request on a connection of its own. The connection's task
    /// ends with the returned guard (dropping it closes the connection, which
    /// makes the engine cancel a running build).
    async fn send<B>(&self, req: http::Request<B>) -> Result<(http::Response<Incoming>, AbortOnDrop), String>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let io = self.dial().await.map_err(|e| format!("cannot connect to the engine: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("engine handshake: {e}"))?;
        let task = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        }));
        let response = sender.send_request(req).await.map_err(|e| format!("engine request: {e}"))?;
        Ok((response, task))
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A BuildKit session on the engine, serving secrets until dropped.
pub struct Session {
    id: String,
    _server: AbortOnDrop,
    _connection: AbortOnDrop,
}

/// gRPC methods the session serves; the engine calls only the ones listed.
const SESSION_METHODS: [&str; 2] = ["/grpc.health.v1.Health/Check", "/moby.buildkit.secrets.v1.Secrets/GetSecret"];

impl Session {
    /// Opens a session on the engine (API version `api`, e.g. `1.41`) that
    /// answers `secrets` (id -> value). Fails when the engine has no BuildKit
    /// sessions (old engines, Podman).
    pub async fn open(addr: &EngineAddr, api: &str, secrets: HashMap<String, Vec<u8>>) -> Result<Self, String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // Unique, not secret: the engine socket's users are trusted anyway.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let id = format!("hangar{}x{nanos:x}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let mut req = http::Request::post(format!("/v{api}/session"))
            .header(http::header::HOST, "docker")
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::UPGRADE, "h2c")
            .header("X-Docker-Expose-Session-Uuid", &id)
            .header("X-Docker-Expose-Session-Name", "hangar")
            .header("X-Docker-Expose-Session-Sharedkey", "");
        for method in SESSION_METHODS {
            req = req.header("X-Docker-Expose-Session-Grpc-Method", method);
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let (response, connection) = addr.send(req).await?;
        if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status();
            let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(format!("POST /session answered {status}: {}", String::from_utf8_lossy(&body).trim()));
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(|e| format!("session upgrade: {e}"))?;
        let io = SessionIo(TokioIo::new(upgraded));
        // The engine is the gRPC client on this connection; we serve.
        let router = tonic::transport::Server::builder()
            .add_service(HealthServer::new(Healthy))
            .add_service(SecretsServer::new(SecretStore { values: secrets }));
        let server = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming(futures::stream::iter([Ok::<_, io::Error>(io)])).await {
                tracing::debug!(error = %e, "BuildKit session ended");
            }
        }));
        Ok(Self { id, _server: server, _connection: connection })
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The upgraded session connection, as tonic's server wants it.
struct SessionIo(TokioIo<hyper::upgrade::Upgraded>);

impl tonic::transport::server::Connected for SessionIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SessionIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The engine checks the session's health while it holds it.
struct Healthy;

#[tonic::async_trait]
impl Health for Healthy {
    type WatchStream = futures::stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn check(&self, _: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse { status: ServingStatus::Serving as i32 }))
    }

    async fn list(&self, _: Request<HealthListRequest>) -> Result<Response<HealthListResponse>, Status> {
        Err(Status::unimplemented("list"))
    }

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

/// The Space's secrets, answered by id.
struct SecretStore {
    values: HashMap<String, Vec<u8>>,
}

#[tonic::async_trait]
impl Secrets for SecretStore {
    async fn get_secret(&self, request: Request<GetSecretRequest>) -> Result<Response<GetSecretResponse>, Status> {
        let id = &request.get_ref().id;
        match self.values.get(id) {
            Some(value) => Ok(Response::new(GetSecretResponse { data: value.clone() })),
            // NotFound: BuildKit then leaves an optional mount empty and fails a required one.
            None => Err(Status::not_found(format!("secret {id} is not a secret of this Space"))),
        }
    }
}

/// What a BuildKit build is asked to make.
pub struct BuildSpec<'a> {
    pub context_tar: &'a Path,
    pub dockerfile: &'a str,
    pub tag: &'a str,
    pub build_args: &'a HashMap<String, String>,
    pub labels: &'a HashMap<String, String>,
    /// `networkmode` of the build's RUN steps (`none`, `host`; `None`: the engine's default).
    pub network: Option<&'a str>,
}

/// One line of the engine's `/build` output stream.
#[derive(Debug, Deserialize)]
struct JsonMessage {
    id: Option<String>,
    stream: Option<String>,
    aux: Option<serde_json::Value>,
    error: Option<String>,
    #[serde(rename = "errorDetail")]
    error_detail: Option<ErrorDetail>,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    message: Option<String>,
}

/// Builds `spec` with BuildKit, its secrets served by `session`; every
/// progress line goes to `on_line`. Returns the image id.
pub async fn build(
    addr: &EngineAddr,
    api: &str,
    session: &Session,
    spec: &BuildSpec<'_>,
    mut on_line: impl FnMut(&str),
) -> Result<String, StepFailure> {
    let fail = |message: String| StepFailure { step: None, message };
    let json = |v: &HashMap<String, String>| serde_json::to_string(v).unwrap_or_else(|_| "{}".to_owned());
    let query = serde_urlencoded::to_string([
        ("version", "2"),
        ("session", session.id()),
        ("t", spec.tag),
        ("dockerfile", spec.dockerfile),
        ("buildargs", &json(spec.build_args)),
        ("labels", &json(spec.labels)),
        ("rm", "1"),
        ("forcerm", "1"),
        ("networkmode", spec.network.unwrap_or("default")),
    ])
    .map_err(|e| fail(format!("build options: {e}")))?;
    let file = tokio::fs::File::open(spec.context_tar)
        .await
        .map_err(|e| fail(format!("cannot read the build context: {e}")))?;
    let body = StreamBody::new(ReaderStream::new(file).map_ok(Frame::data));
    let req = http::Request::post(format!("/v{api}/build?{query}"))
        .header(http::header::HOST, "docker")
        .header(http::header::CONTENT_TYPE, "application/x-tar")
        .body(body)
        .map_err(|e| fail(e.to_string()))?;
    let (response, _connection) = addr.send(req).await.map_err(fail)?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&text).trim().to_owned());
        on_line(&message);
        return Err(fail(format!("the engine refused the build ({status}): {message}")));
    }
    let mut progress = Progress::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut image_id = None;
    let mut error = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(format!("reading the build output: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let message: JsonMessage = match serde_json::from_slice(&line) {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "undecodable build output line");
                    continue;
                }
            };
            handle(message, &mut progress, &mut on_line, &mut image_id, &mut error);
        }
    }
    for line in progress.finish() {
        on_line(&line);
    }
    if let Some(message) = error {
        on_line(&message);
        return Err(StepFailure { step: progress.failed_step().map(str::to_owned), message });
    }
    image_id.ok_or_else(|| fail("the build ended without an image id".to_owned()))
}

fn handle(
    message: JsonMessage,
    progress: &mut Progress,
    on_line: &mut impl FnMut(&str),
    image_id: &mut Option<String>,
    error: &mut Option<String>,
) {
    match (message.id.as_deref(), message.aux) {
        (Some("moby.buildkit.trace"), Some(serde_json::Value::String(encoded))) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .ok()
                .and_then(|bytes| StatusResponse::decode(bytes.as_slice()).ok());
            if let Some(status) = decoded {
                for line in progress.lines(&status) {
                    on_line(&line);
                }
            }
        }
        (Some("moby.image.id"), Some(aux)) => {
            if let Some(id) = aux.get("ID").and_then(|v| v.as_str()) {
                *image_id = Some(id.to_owned());
            }
        }
        _ => {}
    }
    if let Some(text) = message.stream.as_deref() {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            on_line(&strip_ansi(line));
        }
    }
    let detail = message.error_detail.and_then(|d| d.message);
    if let Some(e) = detail.or(message.error) {
        error.get_or_insert(e);
    }
}

/// Turns BuildKit status updates into plain log lines, numbered per step
/// like `docker build --progress=plain`: `#3 [2/4] RUN ...`, its output as
/// `#3 <line>`, then `#3 DONE 1.2s`, `#3 CACHED` or `#3 ERROR: ...`.
#[derive(Debug, Default)]
pub struct Progress {
    numbers: HashMap<String, usize>,
    names: HashMap<String, String>,
    announced: HashSet<String>,
    completed: HashSet<String>,
    /// Output of a step not yet ended by a newline.
    partial: BTreeMap<String, String>,
    failed: Option<String>,
}

fn seconds(t: &bollard_buildkit_proto::google::protobuf::Timestamp) -> f64 {
    t.seconds as f64 + f64::from(t.nanos) / 1e9
}

impl Progress {
    fn number(&mut self, digest: &str) -> usize {
        let next = self.numbers.len() + 1;
        *self.numbers.entry(digest.to_owned()).or_insert(next)
    }

    /// The lines `status` adds to the log.
    pub fn lines(&mut self, status: &StatusResponse) -> Vec<String> {
        let mut out = Vec::new();
        for v in &status.vertexes {
            let n = self.number(&v.digest);
            self.names.insert(v.digest.clone(), v.name.clone());
            if (v.started.is_some() || v.cached) && self.announced.insert(v.digest.clone()) {
                out.push(format!("#{n} {}", v.name));
            }
        }
        for log in &status.logs {
            let n = self.number(&log.vertex);
            let buf = self.partial.entry(log.vertex.clone()).or_default();
            buf.push_str(&String::from_utf8_lossy(&log.msg));
            while let Some(nl) = buf.find('\n') {
                let line: String = buf.drain(..=nl).collect();
                out.push(format!("#{n} {}", strip_ansi(line.trim_end_matches(['\r', '\n']))));
            }
        }
        for v in &status.vertexes {
            if v.completed.is_none() || !self.completed.insert(v.digest.clone()) {
                continue;
            }
            let n = self.number(&v.digest);
            if let Some(rest) = self.partial.remove(&v.digest).filter(|r| !r.trim().is_empty()) {
                out.push(format!("#{n} {}", strip_ansi(rest.trim_end())));
            }
            if !v.error.is_empty() {
                out.push(format!("#{n} ERROR: {}", v.error));
                // Steps cancelled because another failed are not the cause.
                if self.failed.is_none() && !v.error.contains("context canceled") {
                    self.failed = Some(v.name.clone());
                }
            } else if v.cached {
                out.push(format!("#{n} CACHED"));
            } else {
                let took = match (&v.started, &v.completed) {
                    (Some(s), Some(c)) => (seconds(c) - seconds(s)).max(0.0),
                    _ => 0.0,
                };
                out.push(format!("#{n} DONE {took:.1}s"));
            }
        }
        out
    }

    /// Output left without a final newline, at the end of the build.
    pub fn finish(&mut self) -> Vec<String> {
        let partial = std::mem::take(&mut self.partial);
        partial
            .into_iter()
            .filter(|(_, rest)| !rest.trim().is_empty())
            .map(|(digest, rest)| format!("#{} {}", self.number(&digest), strip_ansi(rest.trim_end())))
            .collect()
    }

    /// The name of the step that failed (`[3/4] RUN ...`), if one did.
    pub fn failed_step(&self) -> Option<&str> {
        self.failed.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::moby::buildkit::v1::{Vertex, VertexLog};
    use bollard_buildkit_proto::google::protobuf::Timestamp;

    fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    fn vertex(digest: &str, name: &str) -> Vertex {
        Vertex { digest: digest.into(), name: name.into(), ..Default::default() }
    }

    fn log(digest: &str, msg: &str) -> VertexLog {
        VertexLog { vertex: digest.into(), msg: msg.as_bytes().to_vec(), ..Default::default() }
    }

    #[test]
    fn steps_are_numbered_with_their_output_and_outcome() {
        let mut p = Progress::default();
        let started = StatusResponse {
            vertexes: vec![Vertex { started: at(10, 0), ..vertex("a", "[1/2] FROM base") }],
            ..Default::default()
        };
        assert_eq!(p.lines(&started), ["#1 [1/2] FROM base"]);
        let run = StatusResponse {
            vertexes: vec![
                Vertex { started: at(10, 0), completed: at(10, 500_000_000), ..vertex("a", "[1/2] FROM base") },
                Vertex { started: at(11, 0), ..vertex("b", "[2/2] RUN make") },
            ],
            logs: vec![log("b", "building\nhalf a "), log("b", "line\n\u{1b}[31mred\u{1b}[0m")],
            ..Default::default()
        };
        assert_eq!(
            p.lines(&run),
            ["#2 [2/2] RUN make", "#2 building", "#2 half a line", "#1 DONE 0.5s"],
            "a line split over two messages is joined"
        );
        let failed = StatusResponse {
            vertexes: vec![Vertex {
                started: at(11, 0),
                completed: at(12, 0),
                error: "exit code: 3".into(),
                ..vertex("b", "[2/2] RUN make")
            }],
            ..Default::default()
        };
        assert_eq!(p.lines(&failed), ["#2 red", "#2 ERROR: exit code: 3"]);
        assert_eq!(p.failed_step(), Some("[2/2] RUN make"));
        assert!(p.finish().is_empty());
    }

    #[test]
    fn cached_steps_and_cancelled_siblings() {
        let mut p = Progress::default();
        let s = StatusResponse {
            vertexes: vec![
                Vertex { cached: true, started: at(1, 0), completed: at(1, 0), ..vertex("a", "[1/3] COPY x") },
                Vertex {
                    started: at(1, 0),
                    completed: at(2, 0),
                    error: "context canceled".into(),
                    ..vertex("b", "[2/3] RUN a")
                },
                Vertex {
                    started: at(1, 0),
                    completed: at(2, 0),
                    error: "exit code: 1".into(),
                    ..vertex("c", "[3/3] RUN b")
                },
            ],
            logs: vec![log("c", "no newline at the end")],
            ..Default::default()
        };
        let lines = p.lines(&s);
        assert!(lines.contains(&"#1 CACHED".to_owned()), "{lines:?}");
        assert!(lines.contains(&"#3 no newline at the end".to_owned()), "{lines:?}");
        assert_eq!(p.failed_step(), Some("[3/3] RUN b"), "the cancelled sibling is not the cause");
    }

    /// An engine without BuildKit sessions (old Docker, Podman) refuses the
    /// upgrade: the builder then goes classic and says why.
    #[tokio::test]
    async fn a_refused_session_says_what_the_engine_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = EngineAddr::Tcp(listener.local_addr().expect("addr").to_string());
        let engine = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.expect("read");
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            let body = r#"{"message":"page not found"}"#;
            let answer = format!("HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            conn.write_all(answer.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&request).into_owned()
        });
        let err = Session::open(&addr, "1.41", HashMap::new()).await.err().expect("refused");
        assert!(err.contains("404") && err.contains("page not found"), "{err}");
        let request = engine.await.expect("join");
        assert!(request.starts_with("POST /v1.41/session HTTP/1.1\r\n"), "{request}");
        let lower = request.to_ascii_lowercase();
        assert!(lower.contains("upgrade: h2c") && lower.contains("x-docker-expose-session-uuid: hangar"), "{request}");
        assert!(lower.contains("x-docker-expose-session-grpc-method: /moby.buildkit.secrets.v1.secrets/getsecret"));
    }

    #[test]
    fn engine_addresses() {
        assert_eq!(EngineAddr::parse("unix:///run/d.sock"), Some(EngineAddr::Unix("/run/d.sock".into())));
        assert_eq!(EngineAddr::parse("tcp://127.0.0.1:2375"), Some(EngineAddr::Tcp("127.0.0.1:2375".into())));
        assert_eq!(EngineAddr::parse("ssh://x"), None);
    }
}
