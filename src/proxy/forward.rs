//! Forwarding one request to an upstream: pooled HTTP/1.1 client, streamed
//! bodies both ways, hop-by-hop headers removed, `X-Forwarded-*` set, and
//! upgraded connections (WebSocket) spliced byte for byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, HeaderName, HeaderValue, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body the proxy sends: upstream streams and its own pages.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// How long an idle pooled upstream connection is kept. Below the usual app
/// servers' keep-alive (uvicorn: 5 s) so the pool rarely picks a connection
/// the app is closing.
pub(super) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Idle time before TCP keep-alive probes on upstream connections (and between them).
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), plus the
/// de-facto ones proxies drop, and `Upgrade` (set again for upgrades).
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    UPGRADE,
];

/// A body made of one chunk, for the proxy's own answers.
pub fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An upstream response body, streamed frame by frame.
pub fn stream_body(body: UpstreamBody) -> ProxyBody {
    body.map_err(BoxError::from).boxed_unsync()
}

/// The `Upgrade` protocol a request asks for, if it is an HTTP/1.1 upgrade.
pub fn upgrade_protocol(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(UPGRADE).cloned()).flatten()
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names, no lookups.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// What the proxy knows about the request beyond its own bytes.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    pub upstream: SocketAddr,
    /// Path and query the app sees.
    pub path_and_query: &'a str,
    /// The client (once per connection): its address, and whether its forwarding headers are trusted.
    pub client: &'a Client,
    /// `X-Forwarded-Prefix` for path routing; empty for host routing.
    pub prefix: &'a str,
    /// The request's `Authorization` was the proxy's own (private Space): drop it.
    pub strip_authorization: bool,
}

/// Who is on the other end of a client connection.
#[derive(Clone, Debug)]
pub struct Client {
    /// Its address as `X-Forwarded-For` and `X-Real-IP` carry it ([`client_ip`]).
    pub ip: HeaderValue,
    /// The proxy's own `Forwarded` for it (RFC 7239): `for=...;proto=http`.
    pub forwarded: HeaderValue,
    /// A trusted proxy: its `X-Forwarded-*`, `Forwarded` and `X-Real-IP` are kept.
    pub trusted: bool,
}

impl Client {
    pub fn new(peer: SocketAddr, trusted_proxies: &[ipnet::IpNet]) -> Self {
        let ip = peer.ip().to_canonical();
        let node = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let forwarded = HeaderValue::try_from(format!("for={node};proto=http"))
            .unwrap_or_else(|_| HeaderValue::from_static("for=unknown;proto=http"));
        Self { ip: client_ip(peer), forwarded, trusted: trusted_proxies.iter().any(|net| net.contains(&ip)) }
    }
}

/// A client address as `X-Forwarded-For` carries it (IPv4-mapped IPv6 as IPv4).
pub fn client_ip(addr: SocketAddr) -> HeaderValue {
    let ip = addr.ip().to_canonical().to_string();
    // An IP address is always a valid header value.
    HeaderValue::try_from(ip).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Rewrites a client request into the upstream request, in place.
pub fn prepare_request(parts: &mut http::request::Parts, out: &Outgoing<'_>) -> Result<(), http::Error> {
    let upgrade = upgrade_protocol(parts.version, &parts.headers);
    // HTTP/2 carries the host in `:authority`; the app speaks HTTP/1.1 and wants `Host`.
    let host = match parts.headers.get(HOST) {
        Some(h) => Some(h.clone()),
        None => parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    if let Some(proto) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, proto);
    }
    if out.strip_authorization {
        headers.remove(http::header::AUTHORIZATION);
    }
    if let Some(host) = &host {
        headers.insert(HOST, host.clone());
    }
    let trusted = out.client.trusted;
    let prior = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()).filter(|_| trusted);
    let forwarded_for = match prior {
        Some(prior) => {
            let mut v = Vec::with_capacity(prior.len() + 2 + out.client.ip.len());
            v.extend_from_slice(prior.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(out.client.ip.as_bytes());
            HeaderValue::from_bytes(&v)?
        }
        None => out.client.ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    // A client's own claims about who it is reach the app only through a trusted proxy.
    if !(trusted && headers.contains_key(&X_REAL_IP)) {
        headers.insert(X_REAL_IP.clone(), out.client.ip.clone());
    }
    if !(trusted && headers.contains_key(&FORWARDED)) {
        headers.insert(FORWARDED.clone(), out.client.forwarded.clone());
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
            None => headers.remove(&X_FORWARDED_HOST),
        };
    }
    if out.prefix.is_empty() {
        if !trusted {
            headers.remove(&X_FORWARDED_PREFIX);
        }
    } else {
        headers.insert(X_FORWARDED_PREFIX.clone(), HeaderValue::from_str(out.prefix)?);
    }
    if !headers.contains_key(HOST) {
        // HTTP/1.1 wants a Host; a client that sent none gets the upstream's.
        headers.insert(HOST, HeaderValue::try_from(out.upstream.to_string())?);
    }
    // Origin form, as the app expects from a proxy; the original's bytes when unchanged (host routing).
    let path_and_query = match parts.uri.path_and_query() {
        Some(pq) if pq.as_str() == out.path_and_query => pq.clone(),
        _ => PathAndQuery::try_from(out.path_and_query)?,
    };
    parts.uri = Uri::from(path_and_query);
    parts.version = Version::HTTP_11;
    Ok(())
}

/// Why a request got no upstream response.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("could not connect to {upstream}: {reason}")]
    Connect { upstream: SocketAddr, reason: String },
    #[error("{upstream} sent no response head within {timeout:?}")]
    Timeout { upstream: SocketAddr, timeout: Duration },
    #[error("{upstream} failed before responding: {reason}")]
    Upstream { upstream: SocketAddr, reason: String },
    #[error("invalid request for upstream: {0}")]
    Request(#[from] http::Error),
}

/// A forwarded response, or a switched protocol with its two ends to splice.
pub enum Forwarded<B> {
    Response(Response<B>),
    Upgraded { response: Response<B>, tunnel: Tunnel },
}

/// Both sides of an upgraded connection.
pub struct Tunnel {
    client: OnUpgrade,
    upstream: OnUpgrade,
}

impl Tunnel {
    /// Copies bytes both ways until either side closes. Returns bytes (to upstream, to client).
    pub async fn run(self) -> std::io::Result<(u64, u64)> {
        let (client, upstream) = tokio::try_join!(self.client, self.upstream).map_err(std::io::Error::other)?;
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
    }
}

/// One worker's upstream client: HTTP/1.1 keep-alive connections per
/// endpoint, driven on the worker's own event loop. A connection goes back to
/// the pool when its response body has been read to the end; one whose body
/// was dropped early, or that upgraded, is closed.
pub struct Forwarder {
    pool: Arc<Pool>,
    connect_timeout: Duration,
    header_timeout: Duration,
}

type Sender = http1::SendRequest<Incoming>;

#[derive(Default)]
struct Pool {
    /// Worker-local: the lock is never contended, it only makes the pool `Sync`.
    idle: Mutex<HashMap<SocketAddr, Vec<(Sender, Instant)>>>,
}

impl Pool {
    /// An idle connection to `upstream` ready for a request, if there is one.
    fn checkout(&self, upstream: SocketAddr) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&upstream)?;
        let mut found = None;
        let mut not_yet = Vec::new();
        // Most recently used first: it is the least likely to be closing.
        while let Some((sender, since)) = list.pop() {
            if sender.is_closed() || since.elapsed() >= POOL_IDLE_TIMEOUT {
                continue;
            }
            if sender.is_ready() {
                found = Some(sender);
                break;
            }
            // Its connection has not finished the previous exchange yet.
            not_yet.push((sender, since));
        }
        list.extend(not_yet);
        found
    }

    fn put(&self, upstream: SocketAddr, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.entry(upstream).or_default().push((sender, Instant::now()));
    }

    /// Drops connections idle for too long (they would only be refused later).
    fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in idle.values_mut() {
            list.retain(|(sender, since)| !sender.is_closed() && since.elapsed() < POOL_IDLE_TIMEOUT);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

/// An upstream response body; returns its connection to the pool once read to the end.
pub struct UpstreamBody {
    body: Incoming,
    /// Where the connection goes back when the body has ended.
    conn: Option<(Arc<Pool>, SocketAddr, Sender)>,
    ended: bool,
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if (self.ended || hyper::body::Body::is_end_stream(&self.body))
            && let Some((pool, upstream, sender)) = self.conn.take()
        {
            pool.put(upstream, sender);
        }
    }
}

/// Why a request could not be sent on a connection, and whether it can be retried on another.
/// Calls `sweep` on `pool` every [`POOL_IDLE_TIMEOUT`], from the current
/// runtime, until the pool is dropped (it holds only a weak reference).
pub fn sweep_idle<P: Send + Sync + 'static>(pool: &Arc<P>, sweep: fn(&P)) {
    let weak = Arc::downgrade(pool);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POOL_IDLE_TIMEOUT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match weak.upgrade() {
                Some(pool) => sweep(&pool),
                None => return,
            }
        }
    });
}

enum SendError {
    /// The connection was closed before the request was written: the request comes back.
    Unsent(Box<Request<Incoming>>, hyper::Error),
    Failed(hyper::Error),
}

impl Forwarder {
    /// `connect_timeout` bounds the TCP connect; `header_timeout` the wait for
    /// the response head. Nothing bounds a body or a tunnel once it flows.
    /// Must be created on the runtime that will drive its connections; it
    /// sweeps idle connections from there until dropped.
    pub fn new(connect_timeout: Duration, header_timeout: Duration) -> Self {
        let pool = Arc::new(Pool::default());
        sweep_idle(&pool, Pool::sweep);
        Self { pool, connect_timeout, header_timeout }
    }

    /// Sends the request upstream and returns its response head (body still streaming).
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        out: Outgoing<'_>,
    ) -> Result<Forwarded<UpstreamBody>, ForwardError> {
        let client_upgrade =
            upgrade_protocol(req.version(), req.headers()).is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        prepare_request(&mut parts, &out)?;
        let upstream = out.upstream;
        let req = Request::from_parts(parts, body);
        let header_timeout = self.header_timeout;
        let exchange = async {
            // A pooled connection the upstream closed meanwhile gives the request
            // back unsent: it then goes out on a new connection.
            let req = match self.pool.checkout(upstream) {
                Some(sender) => match send(sender, req).await {
                    Ok(done) => return Ok(done),
                    Err(SendError::Unsent(req, _)) => *req,
                    Err(SendError::Failed(e)) => return Err(upstream_error(upstream, &e)),
                },
                None => req,
            };
            let sender = self.connect(upstream).await?;
            match send(sender, req).await {
                Ok(done) => Ok(done),
                Err(SendError::Unsent(_, e) | SendError::Failed(e)) => Err(upstream_error(upstream, &e)),
            }
        };
        let (mut response, sender) = match tokio::time::timeout(header_timeout, exchange).await {
            Err(_) => return Err(ForwardError::Timeout { upstream, timeout: header_timeout }),
            Ok(result) => result?,
        };
        // After a switch of protocols the connection belongs to the tunnel (or is closed): never pooled.
        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switched && let Some(client) = client_upgrade {
            let upstream = hyper::upgrade::on(&mut response);
            let response = response.map(|body| UpstreamBody { body, conn: None, ended: false });
            return Ok(Forwarded::Upgraded { response, tunnel: Tunnel { client, upstream } });
        }
        strip_hop_by_hop(response.headers_mut());
        let conn = (!switched).then(|| (Arc::clone(&self.pool), upstream, sender));
        Ok(Forwarded::Response(response.map(|body| UpstreamBody { body, conn, ended: false })))
    }

    /// A new connection to `upstream`, driven by a task on this worker.
    async fn connect(&self, upstream: SocketAddr) -> Result<Sender, ForwardError> {
        let stream = connect_tcp(upstream, self.connect_timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ForwardError::Upstream { upstream, reason: source_chain(&e) })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%upstream, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// A TCP connection to an upstream, within `connect_timeout`, set up as every
/// upstream connection is (this client's and the HTTP/1.1 fast path's).
pub(super) async fn connect_tcp(upstream: SocketAddr, connect_timeout: Duration) -> Result<TcpStream, ForwardError> {
    let refused = |e: &dyn std::fmt::Display| ForwardError::Connect { upstream, reason: e.to_string() };
    let socket = if upstream.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let socket = socket.map_err(|e| refused(&e))?;
    let stream = match tokio::time::timeout(connect_timeout, socket.connect(upstream)).await {
        Err(_) => return Err(refused(&format!("no answer within {connect_timeout:?}"))),
        Ok(Err(e)) => return Err(refused(&e)),
        Ok(Ok(stream)) => stream,
    };
    // Small writes (SSE events, WebSocket frames) must leave at once; a
    // vanished peer of a quiet stream is noticed within a minute or so.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%upstream, error = %e, "set_nodelay failed");
    }
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE).with_interval(TCP_KEEPALIVE);
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%upstream, error = %e, "setting TCP keep-alive failed");
    }
    Ok(stream)
}

/// One exchange on a connection: its response head, and the connection for reuse.
async fn send(mut sender: Sender, req: Request<Incoming>) -> Result<(Response<Incoming>, Sender), SendError> {
    match sender.try_send_request(req).await {
        Ok(response) => Ok((response, sender)),
        Err(mut e) => match e.take_message() {
            Some(req) => Err(SendError::Unsent(Box::new(req), e.into_error())),
            None => Err(SendError::Failed(e.into_error())),
        },
    }
}

fn upstream_error(upstream: SocketAddr, e: &hyper::Error) -> ForwardError {
    ForwardError::Upstream { upstream, reason: source_chain(e) }
}

/// An error and its causes, deduplicated: hyper-util's errors wrap the useful
/// part ("Connection refused") a few levels down.
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    fn client(trust: bool) -> Client {
        let nets: Vec<ipnet::IpNet> = if trust { vec!["192.168.0.0/16".parse().expect("cidr")] } else { Vec::new() };
        Client::new(SocketAddr::from(([192, 168, 1, 9], 50000)), &nets)
    }

    fn out<'a>(prefix: &'a str, client: &'a Client) -> Outgoing<'a> {
        Outgoing {
            upstream: SocketAddr::from(([10, 0, 0, 5], 7860)),
            path_and_query: "/queue/join?x=1",
            client,
            prefix,
            strip_authorization: true,
        }
    }

    #[test]
    fn strips_hop_by_hop_and_sets_forwarded() {
        let mut p = parts(
            Request::get("/spaces/a/b/queue/join?x=1")
                .header("host", "proxy.example.com")
                .header("connection", "keep-alive, x-secret-hop")
                .header("keep-alive", "timeout=5")
                .header("x-secret-hop", "1")
                .header("te", "trailers")
                .header("authorization", "Bearer t")
                .header("x-forwarded-for", "6.6.6.6")
                .header("x-forwarded-proto", "https")
                .header("x-real-ip", "6.6.6.6")
                .header("forwarded", "for=6.6.6.6;proto=https")
                .header("accept", "text/event-stream")
                .body(())
                .expect("request"),
        );
        prepare_request(&mut p, &out("/spaces/a/b", &client(false))).expect("prepares");
        let h = &p.headers;
        for gone in ["connection", "keep-alive", "x-secret-hop", "te", "authorization"] {
            assert!(!h.contains_key(gone), "{gone} must not be forwarded");
        }
        assert_eq!(h["host"], "proxy.example.com");
        assert_eq!(h["x-forwarded-for"], "192.168.1.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "proxy.example.com");
        assert_eq!(h["x-forwarded-prefix"], "/spaces/a/b");
        assert_eq!(h["x-real-ip"], "192.168.1.9");
        assert_eq!(h["forwarded"], "for=192.168.1.9;proto=http");
        assert_eq!(h["accept"], "text/event-stream");
        assert_eq!(p.uri, "/queue/join?x=1");
        assert_eq!(p.version, Version::HTTP_11);
    }

    #[test]
    fn client_ip_is_canonical() {
        assert_eq!(client_ip("[::ffff:10.1.2.3]:80".parse().expect("addr")), "10.1.2.3");
        assert_eq!(client_ip("[::1]:80".parse().expect("addr")), "::1");
        let nets: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let mapped = Client::new("[::ffff:10.1.2.3]:80".parse().expect("addr"), &nets);
        assert!(mapped.trusted, "IPv4-mapped addresses match IPv4 ranges");
        assert!(!Client::new("[::1]:80".parse().expect("addr"), &nets).trusted);
        assert_eq!(Client::new("[::1]:80".parse().expect("addr"), &[]).forwarded, "for=\"[::1]\";proto=http");
    }

    #[test]
    fn trusted_forwarded_headers_are_extended() {
        let mut p = parts(
            Request::get("/")
                .header("host", "h")
                .header("x-forwarded-for", "1.2.3.4")
                .header("x-forwarded-proto", "https")
                .header("x-real-ip", "1.2.3.4")
                .header("forwarded", "for=1.2.3.4")
                .body(())
                .expect("request"),
        );
        prepare_request(&mut p, &out("", &client(true))).expect("prepares");
        assert_eq!(p.headers["x-forwarded-for"], "1.2.3.4, 192.168.1.9");
        assert_eq!(
            (p.headers["x-real-ip"].as_bytes(), p.headers["forwarded"].as_bytes()),
            (&b"1.2.3.4"[..], &b"for=1.2.3.4"[..])
        );
        assert_eq!(p.headers["x-forwarded-proto"], "https");
        assert!(!p.headers.contains_key("x-forwarded-prefix"));
    }

    #[test]
    fn keeps_upgrades_and_fills_host_from_http2_authority() {
        let mut p = parts(
            Request::get("/ws")
                .header("host", "h")
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-key", "k")
                .body(())
                .expect("request"),
        );
        prepare_request(&mut p, &out("", &client(false))).expect("prepares");
        assert_eq!(p.headers["connection"], "upgrade");
        assert_eq!(p.headers["upgrade"], "websocket");
        assert_eq!(p.headers["sec-websocket-key"], "k");

        let mut p =
            parts(Request::get("https://a-b.spaces.test/x").version(Version::HTTP_2).body(()).expect("request"));
        prepare_request(&mut p, &out("", &client(false))).expect("prepares");
        assert_eq!(p.headers["host"], "a-b.spaces.test");
        assert_eq!(p.version, Version::HTTP_11);
        // An HTTP/2 request cannot upgrade this way.
        assert_eq!(upgrade_protocol(Version::HTTP_2, &p.headers), None);
    }
}
