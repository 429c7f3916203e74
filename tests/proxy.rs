//! The proxy in front of real TCP upstreams on loopback: routing, streaming,
//! WebSocket, HTTP/2, errors, wake/hold, auth, metrics, shutdown.

mod proxy_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hangar::proxy::{Access, MemorySource, SourceError, SpaceRoute};
use hangar::space::Stage;
use hangar::space::access_token::{ExpectedToken, TokenKey};
use http::HeaderValue;
use proxy_support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn routes_by_host_and_path_and_rewrites_headers() {
    let up = Upstream::start("whisper").await;
    let other = Upstream::start("other").await;
    let source = MemorySource::new(DOMAIN);
    let mut whisper = running("alice", "whisper", up.addr);
    whisper.custom_headers = vec![
        ("cross-origin-embedder-policy".parse().expect("name"), HeaderValue::from_static("require-corp")),
        ("cross-origin-opener-policy".parse().expect("name"), HeaderValue::from_static("same-origin")),
    ];
    source.upsert(whisper);
    let mut docs = running("bob-x", "docs", other.addr);
    docs.base_path = "/docs".into();
    source.upsert(docs);
    let p = proxy(&source, |_| {}).await;
    let c = client();

    // Host routing, query kept, X-Forwarded-* set, hop-by-hop removed.
    let r = c
        .get(format!("http://{}/run/predict?x=1", p.addr))
        .header("host", "alice-whisper.spaces.test")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("x-forwarded-for", "6.6.6.6")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cross-origin-embedder-policy"], "require-corp");
    let seen: serde_json::Value = r.json().await.expect("json");
    assert_eq!(seen["uri"], "/run/predict?x=1");
    assert_eq!(seen["headers"]["host"], "alice-whisper.spaces.test");
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1", "a client's own XFF is not trusted by default");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert_eq!(seen["headers"]["x-forwarded-host"], "alice-whisper.spaces.test");
    assert!(seen["headers"].get("x-hop").is_none(), "{seen}");
    assert!(seen["headers"].get("x-forwarded-prefix").is_none());

    // The Space's custom headers win over the app's.
    let r = c.get(url(&p, "alice", "whisper", "/custom")).send().await.expect("request");
    assert_eq!(r.headers()["cross-origin-opener-policy"], "same-origin");

    // Path routing strips the prefix and announces it.
    let seen: serde_json::Value =
        c.get(url(&p, "alice", "whisper", "/a/b?c=d")).send().await.expect("request").json().await.expect("json");
    assert_eq!(seen["uri"], "/a/b?c=d");
    assert_eq!(seen["headers"]["x-forwarded-prefix"], "/spaces/alice/whisper");
    assert_eq!(
        c.get(url(&p, "bob-x", "docs", "/whoami")).send().await.expect("request").text().await.expect("body"),
        "other"
    );

    // Base path and trailing slash redirects.
    let no_redirects =
        reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let r = no_redirects.get(url(&p, "bob-x", "docs", "/")).send().await.expect("request");
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], "/spaces/bob-x/docs/docs");
    let r = no_redirects
        .get(format!("http://{}/", p.addr))
        .header("host", "bob-x-docs.spaces.test")
        .send()
        .await
        .expect("request");
    assert_eq!((r.status().as_u16(), r.headers()["location"].to_str().expect("ascii")), (307, "/docs"));
    let r = no_redirects.get(url(&p, "alice", "whisper", "")).send().await.expect("request");
    assert_eq!(r.headers()["location"], "/spaces/alice/whisper/");

    // Unknown Spaces: 404 by host and by path.
    let r =
        c.get(format!("http://{}/", p.addr)).header("host", "alice-nope.spaces.test").send().await.expect("request");
    assert_eq!(r.status(), 404);
    assert!(r.text().await.expect("body").contains("no such Space"));
    assert_eq!(c.get(url(&p, "alice", "nope", "/")).send().await.expect("request").status(), 404);

    // The proxy's own endpoints: on the admin port, and on the main port for non-Space hosts.
    let admin = p.admin_addr.expect("admin listener");
    assert_eq!(
        c.get(format!("http://{admin}/healthz")).send().await.expect("request").text().await.expect("body"),
        "ok\n"
    );
    assert_eq!(c.get(format!("http://{}/healthz", p.addr)).send().await.expect("request").status(), 200);
    let metrics = c.get(format!("http://{admin}/metrics")).send().await.expect("request").text().await.expect("body");
    assert!(
        metrics.contains(r#"hangar_proxy_requests_total{namespace="alice",space="whisper",code="200"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"hangar_proxy_request_duration_seconds_count{namespace="alice",space="whisper"} 4"#),
        "{metrics}"
    );
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn sse_events_arrive_one_at_a_time() {
    let up = Upstream::start("sse").await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "chat", up.addr));
    let p = proxy(&source, |_| {}).await;
    let r = client().get(url(&p, "alice", "chat", "/sse")).send().await.expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let start = Instant::now();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut r = r;
    while let Some(chunk) = r.chunk().await.expect("chunk") {
        let s = String::from_utf8_lossy(&chunk);
        for _ in 0..s.matches("data: ").count() {
            arrivals.push(start.elapsed());
        }
        text.push_str(&s);
    }
    assert_eq!(arrivals.len(), 5, "{text}");
    // Each event arrives when sent (200 ms apart), not in one burst at the end.
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(120), "events arrived {gap:?} apart: {arrivals:?}");
    }
    assert!(arrivals[0] < Duration::from_millis(150), "first event late: {arrivals:?}");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn websocket_echo_passes_through_and_counts_as_activity() {
    let up = Upstream::start("ws").await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "live", up.addr));
    let p = proxy(&source, |c| c.activity_interval = Duration::from_millis(100)).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/spaces/alice/live/ws", p.addr))
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::Text(format!("hello {i}").into())).await.expect("send");
        let reply = ws.next().await.expect("a reply").expect("a message");
        assert_eq!(reply.into_text().expect("text").as_str(), format!("echo: hello {i}"));
    }
    ws.send(Message::Binary(vec![0u8, 1, 2, 255].into())).await.expect("send");
    assert_eq!(ws.next().await.expect("reply").expect("message").into_data().as_ref(), &[0u8, 1, 2, 255]);
    let metrics = p.metrics_text();
    assert!(metrics.contains(r#"hangar_proxy_open_tunnels{namespace="alice",space="live"} 1"#), "{metrics}");
    // Idle but open: activity keeps being recorded.
    // (Waits for the records rather than counting them after a fixed sleep: a busy machine delays ticks.)
    let before = source.activity_count(&key("alice", "live"));
    let waited = Instant::now();
    while source.activity_count(&key("alice", "live")) < before + 4 {
        let after = source.activity_count(&key("alice", "live"));
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "an open WebSocket must keep the Space active: {before} -> {after}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ws.close(None).await.expect("close");
    drop(ws);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = p.metrics_text();
    assert!(metrics.contains(r#"hangar_proxy_open_tunnels{namespace="alice",space="live"} 0"#), "{metrics}");
    let settled = source.activity_count(&key("alice", "live"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(source.activity_count(&key("alice", "live")) <= settled + 1, "a closed WebSocket stops renewing");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn http2_prior_knowledge_clients() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let up = Upstream::start("h2").await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "h2", up.addr));
    let p = proxy(&source, |_| {}).await;
    let h2: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    // Host routing over HTTP/2: the authority names the Space.
    let uri: http::Uri = format!("http://{}/hello?x=1", p.addr).parse().expect("uri");
    let mut req = http::Request::get(uri).body(Empty::new()).expect("request");
    req.headers_mut().insert("host", HeaderValue::from_static("alice-h2.spaces.test"));
    let r = h2.request(req).await.expect("h2 request");
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.expect("body").to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(seen["version"], "HTTP/1.1", "the app gets HTTP/1.1");
    assert_eq!(seen["uri"], "/hello?x=1");
    // Many concurrent streams on one connection, including SSE.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let h2 = h2.clone();
        let uri: http::Uri = format!("http://{}/spaces/alice/h2/whoami", p.addr).parse().expect("uri");
        tasks.push(tokio::spawn(async move {
            let r = h2.request(http::Request::get(uri).body(Empty::new()).expect("req")).await.expect("h2");
            r.into_body().collect().await.expect("body").to_bytes()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), "h2");
    }
    let uri: http::Uri = format!("http://{}/spaces/alice/h2/sse", p.addr).parse().expect("uri");
    let r = h2.request(http::Request::get(uri).body(Empty::new()).expect("req")).await.expect("h2 sse");
    let mut body = r.into_body();
    let start = Instant::now();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            for _ in 0..String::from_utf8_lossy(&data).matches("data: ").count() {
                arrivals.push(start.elapsed());
            }
        }
    }
    assert_eq!(arrivals.len(), 5);
    assert!(arrivals[4] - arrivals[0] >= Duration::from_millis(600), "{arrivals:?}");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn upstream_failures_are_502_and_504_and_the_proxy_keeps_serving() {
    let up = Upstream::start("ok").await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "ok", up.addr));
    let dead = free_port();
    source.upsert(running("alice", "dead", dead));
    let p = proxy(&source, |c| c.header_timeout = Duration::from_secs(1)).await;
    let c = client();

    let r = c.get(url(&p, "alice", "dead", "/")).send().await.expect("request");
    assert_eq!(r.status(), 502);
    let body = r.text().await.expect("body");
    assert!(
        body.contains("502 Bad Gateway") && body.contains("alice/dead") && body.contains(&dead.to_string()),
        "{body}"
    );
    assert!(body.to_lowercase().contains("refused"), "the reason is named: {body}");

    // No head within the header timeout: 504.
    let t0 = Instant::now();
    let r = c.get(url(&p, "alice", "ok", "/slow-head")).send().await.expect("request");
    assert_eq!(r.status(), 504);
    assert!(t0.elapsed() < Duration::from_millis(2500));

    // A live stream longer than the header timeout is never cut.
    let r = c.get(url(&p, "alice", "ok", "/trickle")).send().await.expect("request");
    assert_eq!(r.text().await.expect("the whole body").lines().count(), 6);

    // Dies mid-body: the client sees a broken body, not a clean end.
    let r = c.get(url(&p, "alice", "ok", "/die")).send().await.expect("head arrives");
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "a truncated body must not look complete");

    // And everything else still works.
    assert_eq!(
        c.get(url(&p, "alice", "ok", "/whoami")).send().await.expect("request").text().await.expect("body"),
        "ok"
    );
    let m = p.metrics_text();
    assert!(m.contains(r#"hangar_proxy_upstream_errors_total{namespace="alice",space="dead"} 1"#), "{m}");
    p.shutdown().await.expect("clean shutdown");
}

/// A Space that sleeps until its wake handler "starts" it: an upstream on a
/// fixed port comes up after `delay`, then the route turns ready.
fn sleeping_space(source: &Arc<MemorySource>, name: &str, delay: Duration) -> Arc<AtomicUsize> {
    let mut route = SpaceRoute::new(key("alice", name));
    route.stage = Some(Stage::Sleeping);
    route.startup_timeout = Duration::from_secs(20);
    source.upsert(route);
    let starts = Arc::new(AtomicUsize::new(0));
    let (weak, starts2, name) = (Arc::downgrade(source), Arc::clone(&starts), name.to_owned());
    source.set_wake_handler(Arc::new(move |k| {
        let (weak, starts, name) = (weak.clone(), Arc::clone(&starts2), name.clone());
        Box::pin(async move {
            starts.fetch_add(1, Ordering::SeqCst);
            let source = weak.upgrade().ok_or_else(|| SourceError::Other("gone".into()))?;
            source.update(&k, |r| r.stage = Some(Stage::AppStarting));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let up = Upstream::start(&name).await;
                source.update(&k, |r| {
                    r.stage = Some(Stage::Running);
                    r.endpoints = vec![up.addr];
                });
                std::mem::forget(up);
            });
            Ok(())
        })
    }));
    starts
}

#[tokio::test]
async fn hundred_concurrent_requests_to_a_sleeping_space_cause_one_wake() {
    let source = MemorySource::new(DOMAIN);
    let starts = sleeping_space(&source, "sleepy", Duration::from_millis(500));
    let p = proxy(&source, |_| {}).await;
    let c = client();
    let t0 = Instant::now();
    let requests = (0..100).map(|i| {
        let c = c.clone();
        let u = url(&p, "alice", "sleepy", &format!("/api/{i}"));
        tokio::spawn(async move {
            let r = c.get(u).send().await.expect("request");
            (r.status().as_u16(), r.json::<serde_json::Value>().await.expect("json")["uri"].clone())
        })
    });
    let results = futures::future::join_all(requests).await;
    for (i, r) in results.into_iter().enumerate() {
        let (status, uri) = r.expect("task");
        assert_eq!(status, 200, "request {i}");
        assert_eq!(uri, format!("/api/{i}"));
    }
    assert!(t0.elapsed() >= Duration::from_millis(500), "requests were held until the app was up");
    assert_eq!(starts.load(Ordering::SeqCst), 1, "exactly one wake");
    assert_eq!(source.wakes(&key("alice", "sleepy")), 1);
    let m = p.metrics_text();
    assert!(m.contains(r#"hangar_proxy_wakes_total{namespace="alice",space="sleepy",tier="stopped"} 1"#), "{m}");
    assert!(
        m.contains(r#"hangar_proxy_wake_duration_seconds_count{namespace="alice",space="sleepy",tier="stopped"} 1"#),
        "{m}"
    );
    assert!(m.contains(r#"hangar_proxy_held_requests{namespace="alice",space="sleepy"} 0"#), "{m}");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn held_requests_are_capped_and_bounded_by_the_startup_timeout() {
    let source = MemorySource::new(DOMAIN);
    let mut route = SpaceRoute::new(key("alice", "slow"));
    route.stage = Some(Stage::AppStarting);
    route.startup_timeout = Duration::from_millis(1500);
    source.upsert(route);
    let p = proxy(&source, |c| c.max_held_per_space = 5).await;
    let c = client();
    let requests = (0..10).map(|_| {
        let (c, u) = (c.clone(), url(&p, "alice", "slow", "/"));
        tokio::spawn(async move {
            let r = c.get(u).send().await.expect("request");
            (r.status().as_u16(), r.headers().get("retry-after").is_some())
        })
    });
    let t0 = Instant::now();
    let results: Vec<(u16, bool)> =
        futures::future::join_all(requests).await.into_iter().map(|r| r.expect("task")).collect();
    let refused = results.iter().filter(|(s, retry)| *s == 503 && *retry).count();
    let timed_out = results.iter().filter(|(s, _)| *s == 504).count();
    assert_eq!((refused, timed_out), (5, 5), "{results:?}");
    assert!(t0.elapsed() >= Duration::from_millis(1500));
    assert_eq!(source.wakes(&key("alice", "slow")), 0, "a starting Space is not woken");
    let m = p.metrics_text();
    assert!(m.contains(r#"hangar_proxy_rejected_held_requests_total{namespace="alice",space="slow"} 5"#), "{m}");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn browsers_get_a_loading_page_then_the_app() {
    let source = MemorySource::new(DOMAIN);
    let starts = sleeping_space(&source, "page", Duration::from_millis(300));
    let p = proxy(&source, |_| {}).await;
    let c = client();
    let browser = |c: &reqwest::Client| {
        c.get(url(&p, "alice", "page", "/whoami")).header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
    };
    let r = browser(&c).send().await.expect("request");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(r.headers()["retry-after"], "2");
    let page = r.text().await.expect("page");
    assert!(page.contains("http-equiv=refresh"), "{page}");
    assert!(page.contains("alice/page"));
    assert!(page.contains("SLEEPING") || page.contains("APP_STARTING"), "{page}");
    // The page's reloads: loading page until ready, then the app. One wake throughout.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = browser(&c).send().await.expect("reload");
        if r.status() == 200 {
            assert_eq!(r.text().await.expect("app"), "page");
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(r.text().await.expect("page").contains("APP_STARTING"));
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(starts.load(Ordering::SeqCst), 1);
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn paused_spaces_say_so_and_do_not_wake() {
    let source = MemorySource::new(DOMAIN);
    let mut route = SpaceRoute::new(key("alice", "paused"));
    route.stage = Some(Stage::Paused);
    route.paused = true;
    source.upsert(route);
    let mut broken = SpaceRoute::new(key("alice", "broken"));
    broken.stage = Some(Stage::BuildError);
    broken.message = Some("pip install failed".into());
    source.upsert(broken);
    let p = proxy(&source, |_| {}).await;
    let c = client();
    let t0 = Instant::now();
    let r = c.get(url(&p, "alice", "paused", "/")).header("accept", "text/html").send().await.expect("request");
    assert_eq!(r.status(), 503);
    assert!(r.text().await.expect("body").contains("paused"));
    assert!(t0.elapsed() < Duration::from_secs(1), "not held");
    assert_eq!(source.wakes(&key("alice", "paused")), 0);
    let r = c.get(url(&p, "alice", "broken", "/")).send().await.expect("request");
    assert_eq!(r.status(), 503);
    let body = r.text().await.expect("body");
    assert!(body.contains("BUILD_ERROR: pip install failed"), "{body}");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn private_spaces_need_the_token_which_is_not_forwarded() {
    let up = Upstream::start("secret").await;
    let source = MemorySource::new(DOMAIN);
    let mut route = running("alice", "private", up.addr);
    let token_key = Arc::new(TokenKey::random().expect("key"));
    route.access = Access::Private { token: Some(ExpectedToken::new(&token_key, b"hf_s3cret")) };
    source.upsert(route);
    let p = proxy(&source, |_| {}).await;
    let c = client();
    let r = c.get(url(&p, "alice", "private", "/x")).send().await.expect("request");
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"hangar\"");
    let r = c.get(url(&p, "alice", "private", "/x")).bearer_auth("hf_wrong").send().await.expect("request");
    assert_eq!(r.status(), 401);
    let r = c.get(url(&p, "alice", "private", "/x")).bearer_auth("hf_s3cret").send().await.expect("request");
    assert_eq!(r.status(), 200);
    let seen: serde_json::Value = r.json().await.expect("json");
    assert!(seen["headers"].get("authorization").is_none(), "the proxy's credential reached the app: {seen}");
    // Unauthenticated requests do not wake a private Space.
    let mut asleep = SpaceRoute::new(key("alice", "private-asleep"));
    asleep.stage = Some(Stage::Sleeping);
    asleep.access = Access::Private { token: Some(ExpectedToken::new(&token_key, b"t")) };
    source.upsert(asleep);
    assert_eq!(c.get(url(&p, "alice", "private-asleep", "/")).send().await.expect("request").status(), 401);
    assert_eq!(source.wakes(&key("alice", "private-asleep")), 0);
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn graceful_shutdown_drains_requests_and_tunnels() {
    let up = Upstream::start("drain").await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "drain", up.addr));
    let p = proxy(&source, |c| c.drain_timeout = Duration::from_secs(2)).await;
    let addr = p.addr;
    // An in-flight request whose response takes 1.8 s, and an open WebSocket.
    let c = client();
    let slow = tokio::spawn({
        let u = url(&p, "alice", "drain", "/trickle");
        async move { c.get(u).send().await.expect("request").text().await }
    });
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/spaces/alice/drain/ws")).await.expect("ws");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let shutdown = tokio::spawn(p.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are refused while draining; the tunnel still works.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed");
    ws.send(Message::Text("still here".into())).await.expect("send while draining");
    assert_eq!(
        ws.next().await.expect("reply").expect("message").into_text().expect("text").as_str(),
        "echo: still here"
    );
    // The in-flight request completes.
    assert_eq!(slow.await.expect("task").expect("complete body").lines().count(), 6);
    // The tunnel outlives the drain timeout: it is closed then, and shutdown returns.
    shutdown.await.expect("task").expect("clean shutdown");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(5), "shutdown took {took:?}");
    let next = tokio::time::timeout(Duration::from_secs(2), ws.next()).await.expect("the tunnel was closed");
    assert!(!matches!(next, Some(Ok(Message::Text(_)))), "{next:?}");
}
