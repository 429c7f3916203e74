//! `hangar proxy` as its own process (static routes), so its memory can be
//! measured apart from the test's clients and upstreams.

mod proxy_support;
mod slow_client;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proxy_support::*;

struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl ProxyProcess {
    async fn start(routes: &[String]) -> Self {
        Self::start_with(routes, &[]).await
    }

    /// With more command-line flags, as an admin would pass them.
    async fn start_with(routes: &[String], flags: &[&str]) -> Self {
        let (addr, admin) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hangar"));
        cmd.args(["proxy", "--listen", &addr.to_string(), "--admin-listen", &admin.to_string()]);
        cmd.args(flags);
        for r in routes {
            cmd.args(["--route", r]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("starting hangar proxy");
        let this = Self { child, addr, admin };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(admin).await.is_err() {
            assert!(Instant::now() < deadline, "hangar proxy did not listen on {admin}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        this
    }

    /// Peak resident memory of the proxy process, in MiB.
    fn peak_rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("proc status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kib / 1024
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        // SIGTERM: the graceful path, not a kill.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "hangar proxy did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_through_the_proxy_process() {
    let up = Upstream::start("up").await;
    let proxy = ProxyProcess::start(&[format!("alice/up={}", up.addr)]).await;
    let c = client();
    assert_eq!(
        c.get(format!("http://{}/spaces/alice/up/whoami", proxy.addr))
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("body"),
        "up"
    );
    let idle = proxy.peak_rss_mib();
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 1024; // 1 GiB
    let client: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let uri: http::Uri = format!("http://{}/spaces/alice/up/upload", proxy.addr).parse().expect("uri");
    // Chunked (hyper's path), then with a Content-Length (the HTTP/1.1 fast path's).
    for length in [None, Some(CHUNK * CHUNKS)] {
        let frames = futures::stream::iter(
            (0..CHUNKS)
                .map(|_| Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![7u8; CHUNK])))),
        );
        let mut req = http::Request::post(uri.clone());
        if let Some(n) = length {
            req = req.header("content-length", n);
        }
        let t0 = Instant::now();
        let r = client.request(req.body(StreamBody::new(frames)).expect("request")).await.expect("upload");
        let body = r.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(String::from_utf8_lossy(&body), (CHUNK * CHUNKS).to_string());
        let peak = proxy.peak_rss_mib();
        eprintln!(
            "1 GiB upload ({}) through the proxy in {:?}; proxy peak RSS {idle} MiB idle -> {peak} MiB",
            if length.is_some() { "content-length" } else { "chunked" },
            t0.elapsed()
        );
        assert!(peak < idle + 64, "proxy peak RSS grew from {idle} to {peak} MiB during a 1 GiB upload: it buffered");
    }
    let metrics =
        c.get(format!("http://{}/metrics", proxy.admin)).send().await.expect("metrics").text().await.expect("body");
    assert!(metrics.contains(r#"hangar_proxy_requests_total{namespace="alice",space="up",code="200"} 3"#), "{metrics}");
    assert!(proxy.terminate().success(), "SIGTERM is a clean exit");
}

/// The timeouts an admin sets on the command line bound slow clients on both
/// ports, and of two `--route`s whose names share a host the first keeps it.
#[tokio::test]
async fn command_line_timeouts_and_route_order() {
    let (first, second) = (Upstream::start("first").await, Upstream::start("second").await);
    let routes = [format!("acme-corp/app={}", first.addr), format!("acme/corp-app={}", second.addr)];
    let proxy = ProxyProcess::start_with(&routes, &["--header-read-timeout", "1s", "--idle-timeout", "2s"]).await;
    let timeout = Duration::from_secs(1);
    slow_client::assert_cut_off(proxy.addr, b"GET / HTTP/1.1\r\nHost: acme-corp-app.spaces.localhost\r\nX-", timeout)
        .await;
    slow_client::assert_cut_off(proxy.addr, b"PRI * HTTP/2.0\r\n", timeout).await;
    slow_client::assert_cut_off(proxy.admin, b"GET /metrics HTTP/1.1\r\n", timeout).await;
    let c = client();
    let by_host = c
        .get(format!("http://{}/whoami", proxy.addr))
        .header("host", "acme-corp-app.spaces.localhost")
        .send()
        .await
        .expect("request");
    assert_eq!(by_host.text().await.expect("body"), "first", "the route given first keeps the shared host");
    let by_path = c.get(format!("http://{}/spaces/acme/corp-app/whoami", proxy.addr)).send().await.expect("request");
    assert_eq!(by_path.text().await.expect("body"), "second");
    assert_eq!(c.get(format!("http://{}/metrics", proxy.addr)).send().await.expect("request").status(), 404);
    assert!(proxy.terminate().success(), "SIGTERM is a clean exit");
}
