//! Forwarding one request to an upstream: pooled HTTP/1.1 client, streamed
//! bodies both ways, hop-by-hop headers removed, `X-Forwarded-*` set, and
//! upgraded connections (WebSocket) spliced byte for byte.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, HeaderName, HeaderValue, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body the proxy sends: upstream streams and its own pages.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// How long an idle pooled upstream connection is kept. Below the usual app
/// servers' keep-alive (uvicorn: 5 s) so the pool rarely picks a connection
/// the app is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), plus the
/// de-facto ones proxies drop.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// A body made of one chunk, for the proxy's own answers.
pub fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An upstream response body, streamed frame by frame.
pub fn stream_body(body: Incoming) -> ProxyBody {
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
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(UPGRADE);
}

/// What the proxy knows about the request beyond its own bytes.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    pub upstream: SocketAddr,
    /// Path and query the app sees.
    pub path_and_query: &'a str,
    pub client_addr: SocketAddr,
    /// `X-Forwarded-Prefix` for path routing; empty for host routing.
    pub prefix: &'a str,
    /// The request's `Authorization` was the proxy's own (private Space): drop it.
    pub strip_authorization: bool,
    /// Keep and extend incoming `X-Forwarded-*` (the proxy sits behind a trusted load balancer).
    pub trust_forwarded: bool,
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
    let client_ip = out.client_addr.ip().to_canonical().to_string();
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if out.trust_forwarded => format!("{prior}, {client_ip}"),
        _ => client_ip,
    };
    headers.insert(X_FORWARDED_FOR.clone(), HeaderValue::try_from(forwarded_for)?);
    if !(out.trust_forwarded && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if !(out.trust_forwarded && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
            None => headers.remove(&X_FORWARDED_HOST),
        };
    }
    if out.prefix.is_empty() {
        if !out.trust_forwarded {
            headers.remove(&X_FORWARDED_PREFIX);
        }
    } else {
        headers.insert(X_FORWARDED_PREFIX.clone(), HeaderValue::from_str(out.prefix)?);
    }
    parts.uri =
        Uri::builder().scheme("http").authority(out.upstream.to_string()).path_and_query(out.path_and_query).build()?;
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
pub enum Forwarded {
    Response(Response<Incoming>),
    Upgraded { response: Response<Incoming>, tunnel: Tunnel },
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

/// The pooled upstream client.
pub struct Forwarder {
    client: Client<HttpConnector, Incoming>,
    header_timeout: Duration,
}

impl Forwarder {
    /// `connect_timeout` bounds the TCP connect; `header_timeout` the wait for
    /// the response head. Nothing bounds a body or a tunnel once it flows.
    pub fn new(connect_timeout: Duration, header_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(30)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Self { client, header_timeout }
    }

    /// Sends the request upstream and returns its response head (body still streaming).
    pub async fn forward(&self, mut req: Request<Incoming>, out: Outgoing<'_>) -> Result<Forwarded, ForwardError> {
        let client_upgrade =
            upgrade_protocol(req.version(), req.headers()).is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        prepare_request(&mut parts, &out)?;
        let upstream = out.upstream;
        let sent = tokio::time::timeout(self.header_timeout, self.client.request(Request::from_parts(parts, body)));
        let mut response = match sent.await {
            Err(_) => return Err(ForwardError::Timeout { upstream, timeout: self.header_timeout }),
            Ok(Err(e)) if e.is_connect() => {
                return Err(ForwardError::Connect { upstream, reason: source_chain(&e) });
            }
            Ok(Err(e)) => return Err(ForwardError::Upstream { upstream, reason: source_chain(&e) }),
            Ok(Ok(r)) => r,
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client) = client_upgrade
        {
            let upstream = hyper::upgrade::on(&mut response);
            return Ok(Forwarded::Upgraded { response, tunnel: Tunnel { client, upstream } });
        }
        strip_hop_by_hop(response.headers_mut());
        Ok(Forwarded::Response(response))
    }
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

    fn out(prefix: &str, trust: bool) -> Outgoing<'_> {
        Outgoing {
            upstream: SocketAddr::from(([10, 0, 0, 5], 7860)),
            path_and_query: "/queue/join?x=1",
            client_addr: SocketAddr::from(([192, 168, 1, 9], 50000)),
            prefix,
            strip_authorization: true,
            trust_forwarded: trust,
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
                .header("accept", "text/event-stream")
                .body(())
                .expect("request"),
        );
        prepare_request(&mut p, &out("/spaces/a/b", false)).expect("prepares");
        let h = &p.headers;
        for gone in ["connection", "keep-alive", "x-secret-hop", "te", "authorization"] {
            assert!(!h.contains_key(gone), "{gone} must not be forwarded");
        }
        assert_eq!(h["host"], "proxy.example.com");
        assert_eq!(h["x-forwarded-for"], "192.168.1.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "proxy.example.com");
        assert_eq!(h["x-forwarded-prefix"], "/spaces/a/b");
        assert_eq!(h["accept"], "text/event-stream");
        assert_eq!(p.uri, "http://10.0.0.5:7860/queue/join?x=1");
        assert_eq!(p.version, Version::HTTP_11);
    }

    #[test]
    fn trusted_forwarded_headers_are_extended() {
        let mut p = parts(
            Request::get("/")
                .header("host", "h")
                .header("x-forwarded-for", "1.2.3.4")
                .header("x-forwarded-proto", "https")
                .body(())
                .expect("request"),
        );
        prepare_request(&mut p, &out("", true)).expect("prepares");
        assert_eq!(p.headers["x-forwarded-for"], "1.2.3.4, 192.168.1.9");
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
        prepare_request(&mut p, &out("", false)).expect("prepares");
        assert_eq!(p.headers["connection"], "upgrade");
        assert_eq!(p.headers["upgrade"], "websocket");
        assert_eq!(p.headers["sec-websocket-key"], "k");

        let mut p =
            parts(Request::get("https://a-b.spaces.test/x").version(Version::HTTP_2).body(()).expect("request"));
        prepare_request(&mut p, &out("", false)).expect("prepares");
        assert_eq!(p.headers["host"], "a-b.spaces.test");
        assert_eq!(p.version, Version::HTTP_11);
        // An HTTP/2 request cannot upgrade this way.
        assert_eq!(upgrade_protocol(Version::HTTP_2, &p.headers), None);
    }
}
