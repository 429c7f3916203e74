//! Engine tier: the builder against the test bed's real Docker engine and
//! registry. Fixture Space repos (tests/fixtures/spaces) are committed into
//! real git repositories in temp dirs and built from `file://` URLs.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hangar::builder::{
    BuildFailure, BuildOutput, BuildRequest, Builder, BuilderConfig, FailureKind, LogKind, StaticServer,
};
use hangar::space::{GitSource, SpaceSpec, Stage};
use support::repo::{commit_file, fixture_repo, git};
use support::{Container, TestEnv, body_when_ok, http_client, http_get, run_ok, unique_name, wait_for};

fn config(env: &TestEnv) -> BuilderConfig {
    let mut c = BuilderConfig::new(&env.registry, &env.python_image, &env.static_image);
    c.docker_host = Some(env.docker_host.clone());
    c.static_server = StaticServer::busybox(&env.static_image);
    c.extra_ca_file = std::env::var("HANGAR_EXTRA_CA_FILE").ok().filter(|s| !s.is_empty()).map(Into::into);
    c.timeout = Duration::from_secs(600);
    c
}

fn request(namespace: &str, name: &str, repo: &Path) -> BuildRequest {
    let source =
        GitSource { git: format!("file://{}", repo.display()), revision: "main".into(), credentials_secret: None };
    let spec = SpaceSpec { source: Some(source.clone()), hardware: "cpu-basic".into(), ..Default::default() };
    BuildRequest::new(namespace, name, source, spec)
}

async fn builder(env: &TestEnv) -> Builder {
    Builder::new(config(env)).await.unwrap_or_else(|e| panic!("engine tier: cannot start the builder: {e}"))
}

fn ok(result: Result<BuildOutput, BuildFailure>) -> BuildOutput {
    result.unwrap_or_else(|f| panic!("build failed ({:?}, {:?}): {}", f.stage, f.kind, f.message))
}

/// Serves `port` of a container of `image` and returns the body of `GET /`.
async fn serve(env: &TestEnv, image: &str, port: u16) -> (Container, String) {
    let c = Container::run(env, &["-p", &format!("127.0.0.1::{port}"), image]);
    let addr = c.published(&format!("{port}/tcp"));
    let body =
        body_when_ok("the Space's container to answer HTTP", &format!("http://{addr}/"), Duration::from_secs(60)).await;
    (c, body)
}

fn image_ids(env: &TestEnv, repository: &str) -> String {
    run_ok(env.docker().args(["images", "-q", "--no-trunc", repository]))
}

#[tokio::test(flavor = "multi_thread")]
async fn static_space_builds_pushes_serves_and_is_reused() {
    let env = TestEnv::engine();
    let marker = unique_name("static-marker");
    let repo = fixture_repo("static", &marker);
    let ns = unique_name("alice");
    let b = builder(&env).await;

    let t0 = Instant::now();
    let out = ok(b.build(request(&ns, "site", repo.path())).await);
    let cold = t0.elapsed();
    eprintln!("static cold build: {cold:?}");
    assert!(!out.reused);
    assert_eq!(out.repository, format!("{}/{ns}/site", env.registry));
    assert_eq!(out.commit, git(repo.path(), &["rev-parse", "HEAD"]));
    assert!(out.tag.starts_with(&out.commit), "{}", out.tag);
    assert!(out.digest.starts_with("sha256:"), "{}", out.digest);
    assert_eq!(out.image, format!("{}:{}@{}", out.repository, out.tag, out.digest));
    assert_eq!(out.app_config.app_port, 7860);

    // Both tags are in the registry.
    let http = http_client();
    let (status, tags) =
        http_get(&http, &format!("http://{}/v2/{ns}/site/tags/list", env.registry)).await.expect("tags list");
    assert_eq!(status, 200, "{tags}");
    assert!(tags.contains(&out.tag) && tags.contains(&format!("\"{}\"", out.commit)), "{tags}");

    // The pushed image serves the site as uid 1000 on the app port.
    let (c, body) = serve(&env, &out.image, 7860).await;
    assert!(body.contains(&marker), "{body}");
    let user = run_ok(env.docker().args(["inspect", "-f", "{{.Config.User}}", &out.image]));
    assert_eq!(user.trim(), "1000");
    drop(c);

    // Unchanged repo: no new image, under a second.
    let ids_before = image_ids(&env, &out.repository);
    let t1 = Instant::now();
    let again = ok(b.build(request(&ns, "site", repo.path())).await);
    let noop = t1.elapsed();
    eprintln!("static no-op rebuild: {noop:?}");
    assert!(again.reused);
    assert_eq!((again.image.as_str(), again.key.as_str()), (out.image.as_str(), out.key.as_str()));
    assert!(noop < Duration::from_secs(1), "no-op rebuild took {noop:?}");
    assert_eq!(image_ids(&env, &out.repository), ids_before, "no new image");
    assert!(b.logs().tail(&format!("{ns}/site"), LogKind::Build, 5).iter().any(|l| l.contains("reusing")));

    // Another builder whose engine lost the image finds it in the registry.
    run_ok(env.docker().args([
        "rmi",
        &format!("{}:{}", out.repository, out.tag),
        &format!("{}:{}", out.repository, out.commit),
    ]));
    let other = builder(&env).await;
    let from_registry = ok(other.build(request(&ns, "site", repo.path())).await);
    assert!(from_registry.reused);
    assert_eq!(from_registry.image, out.image);

    // A new commit builds a new image that serves the new content.
    let new_marker = unique_name("static-v2");
    let sha2 = commit_file(repo.path(), "index.html", &format!("<p>{new_marker}</p>\n"));
    let v2 = ok(b.build(request(&ns, "site", repo.path())).await);
    assert!(!v2.reused);
    assert_eq!(v2.commit, sha2);
    assert_ne!(v2.digest, out.digest);
    let (_c, body) = serve(&env, &v2.image, 7860).await;
    assert!(body.contains(&new_marker), "{body}");
}

/// The docker fixture's Dockerfile plus a step that needs secret `API_TOKEN`
/// at build time (a BuildKit secret mount, written as the hub documents it):
/// it fails without it, prints it (the log must mask it) and keeps only its
/// sha256 in the image.
const SECRET_STEP: &str = "RUN --mount=type=secret,id=API_TOKEN,mode=0444,required=true test -s /run/secrets/API_TOKEN \
    && echo \"token: $(cat /run/secrets/API_TOKEN)\" \
    && sha256sum /run/secrets/API_TOKEN | cut -d' ' -f1 > secret.sha256\n";

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_space_gets_variables_as_build_args_and_secrets_as_mounts_that_leave_no_trace() {
    use sha2::Digest;
    let env = TestEnv::engine();
    let marker = unique_name("docker-marker");
    let repo = fixture_repo("docker", &marker);
    let dockerfile = std::fs::read_to_string(repo.path().join("Dockerfile")).expect("Dockerfile");
    let dockerfile = dockerfile.replacen("USER 1000\n", &format!("{SECRET_STEP}USER 1000\n"), 1);
    commit_file(repo.path(), "Dockerfile", &dockerfile);
    let ns = unique_name("bob");
    let b = builder(&env).await;
    assert_eq!(b.engine().buildkit(), Ok(()), "the test bed's engine builds with BuildKit");
    let secret = format!("s3cr3t-{}", unique_name("v"));
    let request = || {
        let mut req = request(&ns, "app", repo.path());
        req.variables = BTreeMap::from([
            ("BASE_IMAGE".to_owned(), env.python_image.clone()),
            ("GREETING".to_owned(), "bonjour-from-variables".to_owned()),
        ]);
        req.spec.secrets = vec![
            serde_json::from_value(serde_json::json!({
                "name": "API_TOKEN", "secretKeyRef": {"name": "app-secrets", "key": "token"}
            }))
            .expect("secret ref"),
        ];
        req
    };

    // Without its value the step finds no secret and the build fails: the mount is real.
    let f = b.build(request()).await.expect_err("no secret value");
    assert_eq!((f.stage, f.kind), (Stage::BuildError, FailureKind::Build), "{}", f.message);
    assert!(f.message.contains("RUN --mount=type=secret,id=API_TOKEN"), "{}", f.message);
    assert!(f.message.contains("secret API_TOKEN not found"), "{}", f.message);
    let log = b.logs().tail(&format!("{ns}/app"), LogKind::Build, 10_000).join("\n");
    assert!(log.contains("secrets without a value (not offered): API_TOKEN"), "{log}");
    assert!(log.contains("GREETING=bonjour-from-variables"), "the log shows the build's env: {log}");

    let mut req = request();
    req.secrets = [("API_TOKEN".to_owned(), secret.clone())].into_iter().collect();
    assert!(!format!("{req:?}").contains(&secret), "a request's Debug shows no secret value");
    let out = ok(b.build(req).await);
    assert!(!out.reused);

    let (c, body) = serve(&env, &out.image, 7860).await;
    assert!(body.contains(&marker), "{body}");
    assert!(body.contains("bonjour-from-variables"), "variables are build args: {body}");
    assert!(body.contains("<p id=\"uid\">1000</p>"), "runs as uid 1000: {body}");
    // The step saw the secret: its hash is in the image.
    let hash = run_ok(env.docker().args(["exec", &c.id, "cat", "/home/user/app/secret.sha256"]));
    assert_eq!(hash.trim(), hex::encode(sha2::Sha256::digest(secret.as_bytes())));
    // The app's own output reaches the run log.
    let follow = {
        let (b, id, space) = (b.clone(), c.id.clone(), format!("{ns}/app"));
        tokio::spawn(async move { b.engine().follow_container_logs(&id, b.logs(), &space).await })
    };
    wait_for("the app's output in the run log", Duration::from_secs(10), || {
        let lines = b.logs().tail(&format!("{ns}/app"), LogKind::Run, 100);
        async move { Ok(lines.iter().any(|l| l == "listening on 0.0.0.0:7860").then_some(())) }
    })
    .await;
    drop(c);
    tokio::time::timeout(Duration::from_secs(10), follow)
        .await
        .expect("following ends with the container")
        .expect("join")
        .expect("follow");

    // The secret is nowhere: not in the build log (the step printed it: masked),
    // not in any layer, the image config or its history.
    let log = b.logs().tail(&format!("{ns}/app"), LogKind::Build, 10_000).join("\n");
    assert!(log.contains("token: ***"), "the printed secret is masked: {log}");
    assert!(log.contains("BuildKit: secrets for secret mounts: API_TOKEN"), "{log}");
    assert!(!log.contains(&secret), "secret in the build log");
    let image = format!("{}:{}", out.repository, out.tag);
    let saved = Command::new("docker")
        .env("DOCKER_HOST", &env.docker_host)
        .args(["save", &image])
        .output()
        .expect("docker save");
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    assert!(saved.stdout.len() > 1_000_000, "docker save produced {} bytes", saved.stdout.len());
    // Layers and config are plain tar entries (no compression): a byte search finds any content.
    assert!(!contains(&saved.stdout, &secret), "secret found in the saved image");
    assert!(contains(&saved.stdout, "bonjour-from-variables"), "the grep works: the variable is in the saved image");
    assert!(
        contains(&saved.stdout, "test -s /run/secrets/API_TOKEN"),
        "the grep works: the history is in the saved image"
    );
    let history = run_ok(env.docker().args(["history", "--no-trunc", &image]));
    let inspect = run_ok(env.docker().args(["inspect", &image]));
    assert!(!history.contains(&secret) && !inspect.contains(&secret), "secret in the image's history or config");
    assert!(history.contains("test -s /run/secrets/API_TOKEN"), "{history}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_builds_missing_app_files_and_bad_front_matter_fail_with_their_stage() {
    let env = TestEnv::engine();
    let b = builder(&env).await;
    let ns = unique_name("carol");

    let broken = fixture_repo("docker-broken", "x");
    let mut req = request(&ns, "broken", broken.path());
    req.variables = BTreeMap::from([("BASE_IMAGE".to_owned(), env.python_image.clone())]);
    let f = b.build(req).await.expect_err("the Dockerfile fails");
    assert_eq!((f.stage, f.kind), (Stage::BuildError, FailureKind::Build));
    // BuildKit names the step by its stage position: `[3/4] RUN ...`.
    assert!(f.message.starts_with("[3/4] RUN echo \"this step fails on purpose\" && exit 3 failed: "), "{}", f.message);
    assert!(f.message.contains("exit code: 3"), "{}", f.message);
    assert!(f.log_tail.iter().any(|l| l.contains("this step fails on purpose")), "{:?}", f.log_tail);
    assert_eq!(f.commit.as_deref(), Some(git(broken.path(), &["rev-parse", "HEAD"]).as_str()));

    let no_app = fixture_repo("static", "x");
    git(no_app.path(), &["rm", "-q", "index.html"]);
    git(no_app.path(), &["commit", "-q", "-m", "remove index.html"]);
    let f = b.build(request(&ns, "noapp", no_app.path())).await.expect_err("no index.html");
    assert_eq!((f.stage, f.kind), (Stage::NoAppFile, FailureKind::NoAppFile));
    assert!(f.message.contains("\"index.html\" not found"), "{}", f.message);

    let bad = fixture_repo("static", "x");
    commit_file(bad.path(), "README.md", "---\nsdk: [static\n---\n");
    let f = b.build(request(&ns, "bad", bad.path())).await.expect_err("bad YAML");
    assert_eq!((f.stage, f.kind), (Stage::ConfigError, FailureKind::Config));
    assert!(f.message.contains("README.md front matter is not valid YAML at line 3"), "{}", f.message);

    let mut req = request(&ns, "gone", Path::new("/nonexistent/hangar-repo"));
    req.source.revision = "main".into();
    let f = b.build(req).await.expect_err("no repository");
    assert_eq!((f.stage, f.kind), (Stage::BuildError, FailureKind::Checkout));
}

/// A repository whose Dockerfile sleeps `secs` in a RUN step.
fn sleepy_repo(env: &TestEnv, secs: u32, marker: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("README.md"), "---\nsdk: docker\n---\n").expect("write");
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {}\nRUN echo {marker} && sleep {secs}\n", env.python_image),
    )
    .expect("write");
    git(dir.path(), &["init", "-q", "-b", "main"]);
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-q", "-m", "sleepy"]);
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn builds_queue_time_out_and_cancel() {
    let env = TestEnv::engine();
    let mut cfg = config(&env);
    cfg.max_concurrent = 1;
    cfg.timeout = Duration::from_secs(4);
    let b = Builder::new(cfg).await.expect("builder");
    let ns = unique_name("dave");

    // A build over the limit is stopped, and the engine stops running it.
    let marker = unique_name("sleeper");
    let slow = sleepy_repo(&env, 120, &marker);
    let t0 = Instant::now();
    let f = b.build(request(&ns, "slow", slow.path())).await.expect_err("times out");
    assert_eq!((f.stage, f.kind), (Stage::BuildError, FailureKind::Timeout));
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(f.message.contains("timed out after 4s"), "{}", f.message);
    wait_for("the engine to stop the cancelled build's container", Duration::from_secs(30), || {
        let env = env.clone();
        let marker = marker.clone();
        async move {
            let ps = support::run(env.docker().args(["ps", "-a", "--no-trunc", "--format", "{{.Command}}"]))?;
            Ok((!ps.contains(&marker)).then_some(()))
        }
    })
    .await;

    // One slot: the second build waits for the first, both succeed.
    let mut cfg = config(&env);
    cfg.max_concurrent = 1;
    let b = Builder::new(cfg).await.expect("builder");
    let a = sleepy_repo(&env, 2, &unique_name("a"));
    let c = sleepy_repo(&env, 2, &unique_name("c"));
    let (ra, rc) = tokio::join!(b.build(request(&ns, "first", a.path())), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.build(request(&ns, "second", c.path())).await
    });
    ok(ra);
    ok(rc);
    let second_log = b.logs().tail(&format!("{ns}/second"), LogKind::Build, 1000);
    assert_eq!(
        second_log.first().map(String::as_str),
        Some("[hangar] waiting for a free build slot"),
        "{second_log:?}"
    );

    // Cancelling stops a running build at once.
    let long = sleepy_repo(&env, 120, &unique_name("cx"));
    let req = request(&ns, "cancelled", long.path());
    let cancel = req.cancel.clone();
    let t1 = Instant::now();
    let (r, ()) = tokio::join!(b.build(req), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cancel.cancel();
    });
    let f = r.expect_err("cancelled");
    assert_eq!(f.kind, FailureKind::Cancelled);
    assert!(t1.elapsed() < Duration::from_secs(4), "{:?}", t1.elapsed());

    // A newer build of the same Space supersedes the running one; the log is the newer build's.
    let old = sleepy_repo(&env, 120, &unique_name("old"));
    let new_marker = unique_name("newer");
    let new = sleepy_repo(&env, 0, &new_marker);
    let (r_old, r_new) = tokio::join!(b.build(request(&ns, "busy", old.path())), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        b.build(request(&ns, "busy", new.path())).await
    });
    let f = r_old.expect_err("superseded");
    assert_eq!(f.kind, FailureKind::Cancelled);
    assert!(f.message.contains("superseded by a newer build"), "{}", f.message);
    let out = ok(r_new);
    assert_eq!(out.commit, git(new.path(), &["rev-parse", "HEAD"]));
    let log = b.logs().tail(&format!("{ns}/busy"), LogKind::Build, 1000).join("\n");
    assert!(log.contains(&new_marker), "{log}");
    assert!(!log.contains("superseded") && !log.contains("sleep 120"), "the old build wrote into the new log: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn build_logs_stream_over_sse_like_the_hub() {
    let env = TestEnv::engine();
    let b = builder(&env).await;
    let ns = unique_name("erin");
    let repo = fixture_repo("static", &unique_name("sse"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Every Space public here (the access check has tests of its own).
    let app =
        hangar::builder::logs::router(b.logs().clone(), std::sync::Arc::new(|_: &str, _: &str, _: &_| Some(true)));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/api/spaces/{ns}/site/logs/build");
    let http = reqwest::Client::builder().no_proxy().build().expect("client");
    assert_eq!(http.get(&url).send().await.expect("GET").status(), 404, "no build yet");

    let build = tokio::spawn({
        let b = b.clone();
        let req = request(&ns, "site", repo.path());
        async move { b.build(req).await }
    });
    // Connect while the build runs; the stream ends when the build does.
    let resp = wait_for("the build log to exist", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let resp = http.get(&url).send().await?;
            Ok((resp.status() == 200).then_some(resp))
        }
    })
    .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = tokio::time::timeout(Duration::from_secs(120), resp.text()).await.expect("stream ends").expect("body");
    let out = ok(build.await.expect("join"));
    let events: Vec<serde_json::Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("each event is JSON"))
        .collect();
    assert!(events.len() > 5, "{body}");
    for e in &events {
        assert!(e["data"].is_string(), "{e}");
        let ts = e["timestamp"].as_str().expect("timestamp");
        assert!(ts.parse::<k8s_openapi::jiff::Timestamp>().is_ok(), "RFC 3339: {ts}");
    }
    let lines: Vec<&str> = events.iter().filter_map(|e| e["data"].as_str()).collect();
    assert!(lines.iter().any(|l| l.starts_with("#1 ")), "BuildKit's numbered steps: {lines:?}");
    assert!(lines.last().is_some_and(|l| l.contains(&format!("pushed {}", out.repository))), "{lines:?}");

    // Run logs: whatever the operator appends, followed live.
    let run_url = format!("http://{addr}/api/spaces/{ns}/site/logs/run");
    b.logs().append(&format!("{ns}/site"), LogKind::Run, "app started");
    let mut resp = http.get(&run_url).send().await.expect("GET run");
    assert_eq!(resp.status(), 200);
    b.logs().append(&format!("{ns}/site"), LogKind::Run, "GET / 200");
    let mut seen = String::new();
    while !seen.contains("GET / 200") {
        let chunk =
            tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await.expect("live line").expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("open stream")));
    }
    assert!(seen.contains("app started"), "{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gradio_space_builds_and_serves_a_gradio_app() {
    let env = TestEnv::engine();
    let b = builder(&env).await;
    let ns = unique_name("frank");
    let repo = fixture_repo("gradio", "x");
    let t0 = Instant::now();
    let out = ok(b.build(request(&ns, "demo", repo.path())).await);
    eprintln!("gradio cold build: {:?}", t0.elapsed());
    assert_eq!(out.app_config.app_port, 7860);
    let (_c, body) = serve(&env, &out.image, 7860).await;
    assert!(body.contains("gradio"), "{}", &body[..body.len().min(2000)]);
    assert!(body.contains("hangar gradio fixture"), "{}", &body[..body.len().min(2000)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn streamlit_space_builds_and_serves_a_streamlit_app() {
    let env = TestEnv::engine();
    let b = builder(&env).await;
    let ns = unique_name("grace");
    let repo = fixture_repo("streamlit", "x");
    let t0 = Instant::now();
    let out = ok(b.build(request(&ns, "dash", repo.path())).await);
    eprintln!("streamlit cold build: {:?}", t0.elapsed());
    assert_eq!(out.app_config.app_port, 8501);
    let c = Container::run(&env, &["-p", "127.0.0.1::8501", &out.image]);
    let addr = c.published("8501/tcp");
    let http = http_client();
    let health = wait_for("streamlit's health endpoint", Duration::from_secs(60), || async {
        match http_get(&http, &format!("http://{addr}/_stcore/health")).await {
            Ok((200, body)) => Ok(Some(body)),
            Ok((status, _)) => Err(format!("HTTP {status}").into()),
            Err(e) => Err(e),
        }
    })
    .await;
    assert_eq!(health.trim(), "ok");
    let (status, page) = http_get(&http, &format!("http://{addr}/")).await.expect("GET /");
    assert_eq!(status, 200);
    assert!(page.to_lowercase().contains("streamlit"), "{}", &page[..page.len().min(500)]);
}

/// A registry of its own with htpasswd auth (user `pusher`), stopped on drop.
struct AuthRegistry {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl AuthRegistry {
    async fn start(password: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let hash = bcrypt::hash(password, 4).expect("bcrypt");
        std::fs::write(dir.path().join("htpasswd"), format!("pusher:{hash}\n")).expect("htpasswd");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let addr = format!("127.0.0.1:{port}");
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\n\
                 http:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: hangar-test\n    path: {htpasswd}\n",
                root = dir.path().join("data").display(),
                htpasswd = dir.path().join("htpasswd").display()
            ),
        )
        .expect("config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("engine tier: docker-registry (Debian's docker-registry package) must be installed");
        let http = http_client();
        wait_for("the auth registry to answer", Duration::from_secs(15), || async {
            let (status, _) = http_get(&http, &format!("http://{addr}/v2/")).await?;
            Ok((status == 401).then_some(()))
        })
        .await;
        Self { child, addr, _dir: dir }
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_to_a_registry_that_needs_credentials() {
    let env = TestEnv::engine();
    let registry = AuthRegistry::start("push-secret").await;
    let repo = fixture_repo("static", &unique_name("auth"));
    let ns = unique_name("heidi");

    let mut anonymous = config(&env);
    anonymous.registry = registry.addr.clone();
    let f = Builder::new(anonymous.clone())
        .await
        .expect("builder")
        .build(request(&ns, "site", repo.path()))
        .await
        .expect_err("push without credentials");
    assert_eq!((f.stage, f.kind), (Stage::BuildError, FailureKind::Push));
    assert!(f.message.contains("no basic auth credentials") || f.message.contains("unauthorized"), "{}", f.message);

    let mut with_login = anonymous;
    with_login.registry_credentials =
        Some(hangar::builder::RegistryCredentials { username: "pusher".into(), password: "push-secret".into() });
    let b = Builder::new(with_login).await.expect("builder");
    let out = ok(b.build(request(&ns, "site", repo.path())).await);
    assert!(out.image.starts_with(&format!("{}/{ns}/site:", registry.addr)), "{}", out.image);
    let log = b.logs().tail(&format!("{ns}/site"), LogKind::Build, 1000).join("\n");
    assert!(!log.contains("push-secret"), "{log}");
    // The registry has it: its manifest answers with the recorded digest.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .head(format!("http://{}/v2/{ns}/site/manifests/{}", registry.addr, out.tag))
        .basic_auth("pusher", Some("push-secret"))
        .header("Accept", "application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .await
        .expect("HEAD manifest");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"], out.digest.as_str());
}
