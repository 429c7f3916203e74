//! End-to-end builder benchmark against the engine tier of the test bed:
//! cold build and no-op rebuild of the static fixture Space, and the time
//! from a webhook delivery to the rebuild trigger (the head-sha write).
//!
//! `eval "$(scripts/testenv env)"; cargo bench --bench builder --profile dev`
//! (the work is Docker's and git's, so an optimized build changes nothing).
//! Under `cargo test` (no `--bench` argument) it only says how to run it.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar::builder::{BuildRequest, Builder, BuilderConfig};
use hangar::space::{GitSource, SpaceSpec};
use hangar::webhook::{HeadUpdate, SpaceDirectory};

const ROUNDS: usize = 10;

fn need(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("the builder benchmark needs the test bed: `eval \"$(scripts/testenv env)\"` ({var} is unset)")
    })
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "b")
        .env("GIT_AUTHOR_EMAIL", "b@example.com")
        .env("GIT_COMMITTER_NAME", "b")
        .env("GIT_COMMITTER_EMAIL", "b@example.com")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn stats(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<40} n={:<3} min {:>9.1} ms  median {:>9.1} ms  max {:>9.1} ms",
        samples.len(),
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1])
    );
}

/// Records when the head sha was written.
#[derive(Clone, Default)]
struct Stamp(Arc<Mutex<Option<Instant>>>);

impl SpaceDirectory for Stamp {
    async fn set_head_sha(&self, _: &str, _: &str, _: Option<&str>, _: &str) -> Result<HeadUpdate, String> {
        *self.0.lock().map_err(|e| e.to_string())? = Some(Instant::now());
        Ok(HeadUpdate::Updated)
    }
}

async fn builds() {
    let registry = need("HANGAR_TEST_REGISTRY");
    let mut cfg = BuilderConfig::new(registry, need("HANGAR_PYTHON_IMAGE"), need("HANGAR_STATIC_IMAGE"));
    cfg.docker_host = Some(need("DOCKER_HOST"));
    cfg.allow_local_sources = true;
    let builder = Builder::new(cfg).await.expect("builder");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spaces/static");
    let mut cold = Vec::new();
    let mut noop = Vec::new();
    let run = std::process::id();
    for round in 0..ROUNDS.min(5) {
        let repo = tempfile::tempdir().expect("tempdir");
        for f in ["README.md", "index.html", "style.css"] {
            std::fs::copy(fixture.join(f), repo.path().join(f)).expect("copy fixture");
        }
        // A unique commit so the cold build really is cold.
        std::fs::write(repo.path().join("round.txt"), format!("{run}-{round}")).expect("write");
        git(repo.path(), &["init", "-q", "-b", "main"]);
        git(repo.path(), &["add", "-A"]);
        git(repo.path(), &["commit", "-q", "-m", "bench"]);
        let source = GitSource {
            git: format!("file://{}", repo.path().display()),
            revision: "main".into(),
            credentials_secret: None,
        };
        let spec = SpaceSpec { source: Some(source.clone()), hardware: "cpu-basic".into(), ..Default::default() };
        let req = BuildRequest::new(format!("bench-{run}"), format!("static-{round}"), source, spec);
        let t = Instant::now();
        let out = builder.build(req.clone()).await.unwrap_or_else(|f| panic!("{}", f.message));
        assert!(!out.reused);
        cold.push(t.elapsed());
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let again = builder.build(req.clone()).await.unwrap_or_else(|f| panic!("{}", f.message));
            assert!(again.reused);
            noop.push(t.elapsed());
        }
    }
    stats("static: cold build (checkout..push)", cold);
    stats("static: no-op rebuild (reuse)", noop);
}

async fn webhook() {
    let stamp = Stamp::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/webhooks/hub", listener.local_addr().expect("addr"));
    let app = hangar::webhook::router("bench-secret", stamp.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::builder().no_proxy().build().expect("client");
    let body = serde_json::json!({
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "space", "name": "alice/demo", "headSha": "1".repeat(40)},
        "updatedRefs": [{"ref": "refs/heads/main", "newSha": "1".repeat(40)}],
        "webhook": {"version": 3}
    })
    .to_string();
    let mut samples = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        let resp = http.post(&url).header("X-Webhook-Secret", "bench-secret").body(body.clone()).send().await;
        let status = resp.expect("POST").status();
        assert_eq!(status, 202);
        let written = stamp.0.lock().expect("lock").take().expect("trigger written");
        if i >= 20 {
            samples.push(written - t);
        }
    }
    stats("webhook: delivery -> rebuild trigger", samples);
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("builder benchmark: run with `cargo bench --bench builder` against the test bed");
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        webhook().await;
        builds().await;
    });
}
