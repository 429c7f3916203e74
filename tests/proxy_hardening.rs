//! The proxy against hostile clients and Spaces, on loopback: slow and
//! oversized requests, spoofed forwarding headers, `/metrics` off the public
//! port, custom headers that would reframe responses, and Space names that
//! collide into one host.

mod proxy_support;
mod slow_client;

use std::time::Duration;

use hangar::http_server::Limits;
use hangar::proxy::{Access, MemorySource, SpaceRoute};
use hangar::space::access_token::{ExpectedToken, TokenKey};
use http::HeaderValue;
use proxy_support::*;

const LIMITS: Limits = Limits { header_read_timeout: Duration::from_secs(1), idle_timeout: Duration::from_secs(2) };
const TOKEN: &str = "s3cret";

/// `alice/open` (public: the fast path) and `alice/closed` (private: hyper's path), both on `up`.
fn spaces(source: &MemorySource, up: &Upstream, tweak: impl Fn(&mut SpaceRoute)) {
    let mut open = running("alice", "open", up.addr);
    tweak(&mut open);
    source.upsert(open);
    let mut closed = running("alice", "closed", up.addr);
    let key = std::sync::Arc::new(TokenKey::random().expect("key"));
    closed.access = Access::Private { token: Some(ExpectedToken::new(&key, TOKEN.as_bytes())) };
    tweak(&mut closed);
    source.upsert(closed);
}

/// A GET of `path` on each Space, with `headers`: (fast path, hyper's path).
async fn both_paths(p: &hangar::proxy::ProxyHandle, path: &str, headers: &[(&str, &str)]) -> [reqwest::Response; 2] {
    let c = client();
    let mut answers = Vec::new();
    for (name, token) in [("open", None), ("closed", Some(TOKEN))] {
        let mut req = c.get(url(p, "alice", name, path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        answers.push(req.send().await.expect("request"));
    }
    let [fast, hyper]: [reqwest::Response; 2] = answers.try_into().unwrap_or_else(|_| panic!("two answers"));
    [fast, hyper]
}

#[tokio::test]
async fn slow_clients_are_cut_off_on_every_listener_and_protocol() {
    let up = Upstream::start("app").await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "app", up.addr));
    let p = proxy(&source, |c| c.limits = LIMITS).await;
    let admin = p.admin_addr.expect("admin listener");
    let timeout = LIMITS.header_read_timeout;
    // A head for a running public Space (the fast path), one for no Space (hyper), HTTP/2's preface.
    slow_client::assert_cut_off(p.addr, b"GET /whoami HTTP/1.1\r\nHost: alice-app.spaces.test\r\nX-Slow", timeout)
        .await;
    slow_client::assert_cut_off(p.addr, b"GET /healthz HTTP/1.0\r\nX-Slow", timeout).await;
    slow_client::assert_cut_off(p.addr, b"PRI * HTTP/2.0\r\n\r\nSM", timeout).await;
    slow_client::assert_idle_closed(p.addr, timeout).await;
    slow_client::assert_cut_off(admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow", timeout).await;
    slow_client::assert_cut_off(admin, b"PRI * HTTP/2.0\r\n", timeout).await;
    slow_client::assert_idle_closed(admin, timeout).await;

    // A kept-alive connection with nothing more to send closes after the idle timeout.
    let (after, answer) =
        slow_client::stall(p.addr, b"GET /whoami HTTP/1.1\r\nHost: alice-app.spaces.test\r\n\r\n").await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    assert!(after >= LIMITS.idle_timeout, "closed after {after:?}");

    // Heads too large: 431 on both ports, before and after the fast path.
    for (addr, path) in [(p.addr, "/spaces/alice/app/whoami"), (p.addr, "/healthz"), (admin, "/metrics")] {
        assert_eq!(slow_client::oversized_head(addr, path).await, "HTTP/1.1 431 Request Header Fields Too Large");
    }
    // And the proxy still serves.
    let r = client().get(url(&p, "alice", "app", "/whoami")).send().await.expect("request");
    assert_eq!(r.text().await.expect("body"), "app");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn metrics_are_not_public() {
    let up = Upstream::start("app").await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "app", up.addr));
    let p = proxy(&source, |_| {}).await;
    let c = client();
    assert_eq!(c.get(url(&p, "alice", "app", "/whoami")).send().await.expect("request").status(), 200);
    let public = c.get(format!("http://{}/metrics", p.addr)).send().await.expect("request");
    assert_eq!(public.status(), 404);
    assert!(!public.text().await.expect("body").contains("hangar_proxy"), "no metrics on the public port");
    let admin = p.admin_addr.expect("admin listener");
    let metrics = c.get(format!("http://{admin}/metrics")).send().await.expect("request");
    assert!(metrics.text().await.expect("body").contains("hangar_proxy_requests_total"));
    assert_eq!(c.get(format!("http://{}/healthz", p.addr)).send().await.expect("request").status(), 200);
    p.shutdown().await.expect("clean shutdown");
}

const SPOOFED: [(&str, &str); 5] = [
    ("x-real-ip", "6.6.6.6"),
    ("forwarded", "for=6.6.6.6;proto=https"),
    ("x-forwarded-for", "6.6.6.6"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "evil.example"),
];

#[tokio::test]
async fn spoofed_forwarding_headers_do_not_reach_the_app_unless_the_peer_is_trusted() {
    let up = Upstream::start("app").await;
    let source = MemorySource::new(DOMAIN);
    spaces(&source, &up, |_| {});
    let p = proxy(&source, |_| {}).await;
    for r in both_paths(&p, "/echo", &SPOOFED).await {
        let seen: serde_json::Value = r.json().await.expect("json");
        let h = &seen["headers"];
        assert_eq!(h["x-real-ip"], "127.0.0.1", "{seen}");
        assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http", "{seen}");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{seen}");
        assert_eq!(h["x-forwarded-proto"], "http", "{seen}");
        assert_ne!(h["x-forwarded-host"], "evil.example", "{seen}");
    }
    p.shutdown().await.expect("clean shutdown");

    // Behind a trusted load balancer (loopback here): its headers are kept.
    let p = proxy(&source, |c| c.trusted_proxies = vec!["127.0.0.0/8".parse().expect("cidr")]).await;
    for r in both_paths(&p, "/echo", &SPOOFED).await {
        let seen: serde_json::Value = r.json().await.expect("json");
        let h = &seen["headers"];
        assert_eq!((&h["x-real-ip"], &h["forwarded"]), (&"6.6.6.6".into(), &"for=6.6.6.6;proto=https".into()));
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.0.0.1", "{seen}");
    }
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn custom_headers_never_reframe_responses_on_either_path() {
    let up = Upstream::start("app").await;
    let source = MemorySource::new(DOMAIN);
    // As if a bad configuration had reached the route: only the allowed header may be written.
    spaces(&source, &up, |r| {
        r.custom_headers = [
            ("cross-origin-opener-policy", "same-origin"),
            ("content-length", "1"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("x-frame-options", "DENY"),
        ]
        .into_iter()
        .map(|(k, v)| (k.parse().expect("name"), HeaderValue::from_static(v)))
        .collect();
    });
    let p = proxy(&source, |_| {}).await;
    for _ in 0..2 {
        for r in both_paths(&p, "/whoami", &[]).await {
            let h = r.headers().clone();
            assert_eq!(h["cross-origin-opener-policy"], "same-origin");
            assert!(h.get("x-frame-options").is_none(), "{h:?}");
            assert!(h.get("connection").is_none_or(|v| v != "close"), "{h:?}");
            assert_ne!(h.get("content-length").map(|v| v.as_bytes()), Some(&b"1"[..]), "{h:?}");
            assert_eq!(r.text().await.expect("the whole body"), "app");
        }
    }
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn colliding_names_the_first_space_keeps_its_host() {
    let (victim, newcomer) = (Upstream::start("victim").await, Upstream::start("newcomer").await);
    for (first, second) in [(("acme", "corp-app"), ("acme-corp", "app")), (("acme-corp", "app"), ("acme", "corp-app"))]
    {
        let source = MemorySource::new(DOMAIN);
        source.upsert(running(first.0, first.1, victim.addr));
        source.upsert(running(second.0, second.1, newcomer.addr));
        let p = proxy(&source, |_| {}).await;
        let c = client();
        let by_host = c
            .get(format!("http://{}/whoami", p.addr))
            .header("host", "acme-corp-app.spaces.test")
            .send()
            .await
            .expect("request");
        assert_eq!(by_host.text().await.expect("body"), "victim", "{first:?} was there first");
        let by_path = c.get(url(&p, second.0, second.1, "/whoami")).send().await.expect("request");
        assert_eq!(by_path.text().await.expect("body"), "newcomer", "the other keeps its path route");
        p.shutdown().await.expect("clean shutdown");
    }
}
