//! The proxy's HTTP/1.1 fast path against real loopback upstreams, for what
//! it adds to the hyper path: close-delimited responses re-framed, pipelined
//! requests, stale pooled connections retried, streamed request bodies, and
//! requests it hands to hyper in the middle of a connection.

mod proxy_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use hangar::proxy::{MemorySource, ProxyHandle};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use proxy_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed_unsync()
}

/// One client connection to the proxy, for requests one after another on it.
async fn connection(p: &ProxyHandle) -> http1::SendRequest<Body> {
    let stream = TcpStream::connect(p.addr).await.expect("connect to the proxy");
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn get(sender: &mut http1::SendRequest<Body>, path: &str) -> (http::response::Parts, String) {
    let req = http::Request::get(path).header("host", "localhost").body(empty()).expect("request");
    send(sender, req).await
}

async fn send(sender: &mut http1::SendRequest<Body>, req: http::Request<Body>) -> (http::response::Parts, String) {
    sender.ready().await.expect("the connection is still open");
    let (parts, body) = sender.send_request(req).await.expect("response").into_parts();
    let body = body.collect().await.expect("a complete body").to_bytes();
    (parts, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn close_delimited_responses_are_rechunked_and_the_client_connection_kept() {
    // An HTTP/1.0-style app: no length, the end of the body is the end of the connection.
    let up = RawUpstream::start(|mut s| async move {
        if read_request_head(&mut s).await.is_some() {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = s.write_all(b"the end").await;
        }
    })
    .await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "old", up.addr));
    let p = proxy(&source, |_| {}).await;
    let mut c = connection(&p).await;
    for _ in 0..3 {
        let (parts, body) = get(&mut c, "/spaces/alice/old/").await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["transfer-encoding"], "chunked");
        assert_eq!(body, "until the end");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 3, "a close-delimited connection is never reused");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start("piped").await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "piped", up.addr));
    let p = proxy(&source, |_| {}).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    // Three requests in one write, a body in the middle one; the last asks to close.
    s.write_all(
        b"GET /spaces/alice/piped/whoami HTTP/1.1\r\nHost: localhost\r\n\r\n\
          POST /spaces/alice/piped/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello\
          GET /spaces/alice/piped/first?x=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .expect("the proxy closes after the last")
        .expect("read");
    let all = String::from_utf8_lossy(&all);
    assert_eq!(all.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{all}");
    let (first, rest) = all.split_once("piped").expect("first body");
    assert!(first.starts_with("HTTP/1.1 200"), "{all}");
    let (second, third) = rest.split_once("\r\n\r\n5").expect("the upload's count comes second");
    assert!(second.contains("HTTP/1.1 200"), "{all}");
    assert!(third.contains(r#""uri":"/first?x=1""#) && third.contains("connection: close"), "{all}");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_retried_not_a_502() {
    // Keep-alive in words, but a connection's second request is met with a
    // close (as when an app's idle timeout fires while a request is on its way).
    let up = RawUpstream::start(|mut s| async move {
        if read_request_head(&mut s).await.is_some() {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            let _ = read_request_head(&mut s).await;
        }
    })
    .await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "flaky", up.addr));
    let p = proxy(&source, |c| c.workers = 1).await;
    let c = client();
    for i in 0..200 {
        let r = c.get(url(&p, "alice", "flaky", "/")).send().await.expect("request");
        assert_eq!(r.status(), 200, "request {i}: {}", r.text().await.unwrap_or_default());
        assert_eq!(r.text().await.expect("body"), "ok");
    }
    let m = p.metrics_text();
    assert!(!m.contains("hangar_proxy_upstream_errors_total{"), "{m}");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_post_the_upstream_closed_under_is_answered_502_not_sent_twice() {
    // Answers a connection's first request, then reads the second and closes
    // without a word: the app may have acted on it, so a POST must not go again.
    let posts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&posts);
    let up = RawUpstream::start(move |mut s| {
        let seen = std::sync::Arc::clone(&seen);
        async move {
            if read_request_head(&mut s).await.is_some() {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                if read_request_head(&mut s).await.is_some_and(|h| h.starts_with(b"POST")) {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    })
    .await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "orders", up.addr));
    let p = proxy(&source, |c| c.workers = 1).await;
    let c = client();
    let first = c.get(url(&p, "alice", "orders", "/")).send().await.expect("first request");
    assert_eq!(first.status(), 200);
    assert_eq!(first.text().await.expect("body"), "ok");
    let order = c.post(url(&p, "alice", "orders", "/order")).body("hi").send().await.expect("post");
    assert_eq!(order.status(), 502, "{}", order.text().await.unwrap_or_default());
    assert_eq!(posts.load(Ordering::SeqCst), 1, "the POST reached the app once");
    p.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn request_bodies_stream_with_content_length_or_go_to_hyper_when_chunked() {
    let up = Upstream::start("bodies").await;
    let source = MemorySource::new(DOMAIN);
    source.upsert(running("alice", "bodies", up.addr));
    let p = proxy(&source, |_| {}).await;
    let mut c = connection(&p).await;

    // 32 MiB with a Content-Length: far more than the fast path reads with the head.
    let big = Full::new(Bytes::from(vec![7u8; 32 << 20])).map_err(|never| match never {}).boxed_unsync();
    let req = http::Request::post("/spaces/alice/bodies/upload")
        .header("host", "localhost")
        .header("content-length", (32u64 << 20).to_string())
        .body(big)
        .expect("request");
    let (parts, body) = send(&mut c, req).await;
    assert_eq!((parts.status, body.as_str()), (http::StatusCode::OK, "33554432"));

    // A chunked upload on the same connection: handed to hyper, which serves the rest of it.
    let chunks = futures::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(b"0123456789")))),
    );
    let req = http::Request::post("/spaces/alice/bodies/upload")
        .header("host", "localhost")
        .body(StreamBody::new(chunks).boxed_unsync())
        .expect("request");
    let (parts, body) = send(&mut c, req).await;
    assert_eq!((parts.status, body.as_str()), (http::StatusCode::OK, "40"));
    let (parts, body) = get(&mut c, "/spaces/alice/bodies/whoami").await;
    assert_eq!((parts.status, body.as_str()), (http::StatusCode::OK, "bodies"));
    assert_eq!(
        p.metrics_text()
            .matches(r#"hangar_proxy_requests_total{namespace="alice",space="bodies",code="200"} 3"#)
            .count(),
        1
    );
    p.shutdown().await.expect("clean shutdown");
}
