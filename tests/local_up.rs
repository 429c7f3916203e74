//! Engine tier: `hangar up` as a real process on a real Docker engine.
//!
//! Needs the test bed's Docker engine and base images (`scripts/testenv up`,
//! `eval "$(scripts/testenv env)"`); fails with the reason when they are missing.
//! Each test uses an owner of its own, so its containers are told apart by
//! name and label and removed at the end, whatever happens.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use support::{TestEnv, run_ok, unique_name};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A running `hangar up` and everything it printed.
struct Up {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
}

impl Up {
    fn start(env: &TestEnv, dir: &Path, owner: &str, state: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hangar"))
            .arg("up")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--owner", owner, "--state-dir"])
            .arg(state)
            .env("DOCKER_HOST", &env.docker_host)
            .env("HANGAR_PYTHON_IMAGE", &env.python_image)
            .env("HANGAR_STATIC_IMAGE", &env.static_image)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hangar up");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (out, err) = (child.stdout.take().expect("stdout"), child.stderr.take().expect("stderr"));
        for (pipe, sink) in [(Box::new(out) as Box<dyn std::io::Read + Send>, &lines), (Box::new(err), &stderr)] {
            let sink = Arc::clone(sink);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().expect("lines").push(line);
                }
            });
        }
        let mut up = Self { child: Some(child), lines, stderr, addr: SocketAddr::from(([127, 0, 0, 1], 0)) };
        let first = up.wait_line("the proxy address", Duration::from_secs(60), |l| l.contains("proxy on http://"));
        let addr = first.rsplit("http://").next().and_then(|a| a.trim().parse().ok());
        up.addr = addr.unwrap_or_else(|| panic!("no proxy address in {first:?}"));
        // `hangar up: N Space(s) from ...`, then one URL line per Space.
        let n: usize = first.split_whitespace().nth(2).and_then(|n| n.parse().ok()).expect("Space count");
        let start = Instant::now();
        while up.urls().len() < n {
            assert!(start.elapsed() < Duration::from_secs(10), "{n} URL lines expected\n{}", up.output());
            std::thread::sleep(Duration::from_millis(20));
        }
        up
    }

    /// Waits for a printed line matching `pred` (any time since the start).
    fn wait_line(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines.lock().expect("lines").iter().find(|l| pred(l)) {
                return l.clone();
            }
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `n` printed lines match `pred`.
    fn wait_count(&self, what: &str, n: usize, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let start = Instant::now();
        while self.count(&pred) < n {
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines.lock().expect("lines").iter().filter(|l| pred(l)).count()
    }

    fn output(&self) -> String {
        let out = self.lines.lock().expect("lines").join("\n");
        let err = self.stderr.lock().expect("stderr");
        let err = err[err.len().saturating_sub(40)..].join("\n");
        format!("--- hangar up stdout ---\n{out}\n--- hangar up stderr (tail) ---\n{err}")
    }

    /// The URLs `hangar up` printed, by Space id.
    fn urls(&self) -> Vec<(String, String)> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                let (id, url) = (parts.next()?, parts.next()?);
                (l.starts_with("  ") && url.starts_with("http://")).then(|| (id.to_owned(), url.to_owned()))
            })
            .collect()
    }

    /// The path URL printed for Space `id` (`owner/name`), after its host URL.
    fn path_url(&self, id: &str) -> String {
        // A copy: the guard must be gone before a panic (Drop prints the lines).
        let line = self.lines.lock().expect("lines").iter().find(|l| l.starts_with(&format!("  {id} "))).cloned();
        let line = line.unwrap_or_default();
        match line.split_whitespace().nth(2) {
            Some(url) if url.starts_with("http://") => url.to_owned(),
            _ => panic!("no path URL printed for {id}: {line:?}"),
        }
    }

    /// A client that resolves the printed `*.localhost` host names to the proxy.
    fn client(&self, hosts: &[&str]) -> reqwest::Client {
        let mut b = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120));
        for h in hosts {
            b = b.resolve(h, self.addr);
        }
        b.build().expect("client")
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        run_ok(Command::new("kill").args([sig, &pid]));
    }

    /// Waits for the process to exit; returns its status.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if start.elapsed() > timeout {
                panic!("hangar up did not exit within {timeout:?}\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

/// Removes the test's containers (by name prefix) when the test ends.
struct Containers {
    env: TestEnv,
    owner: String,
}

impl Containers {
    /// `(name, running)` of the owner's containers that carry the Space label.
    fn list(&self) -> Vec<(String, bool)> {
        let out = run_ok(self.env.docker().args([
            "ps",
            "-a",
            "--filter",
            &format!("name=hangar_{}_", self.owner),
            "--filter",
            "label=hangar.dev/space",
            "--format",
            "{{.Names}} {{.State}}",
        ]));
        out.lines().filter_map(|l| l.split_once(' ').map(|(n, s)| (n.to_owned(), s == "running"))).collect()
    }

    fn id(&self, name: &str) -> String {
        run_ok(self.env.docker().args(["inspect", "-f", "{{.Id}}", name])).trim().to_owned()
    }

    fn running(&self, name: &str) -> bool {
        run_ok(self.env.docker().args(["inspect", "-f", "{{.State.Running}}", name])).trim() == "true"
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for (name, _) in self.list() {
            let _ = self.env.docker().args(["rm", "-f", &name]).output();
        }
    }
}

fn hangar_ls(state: &Path) -> String {
    run_ok(Command::new(env!("CARGO_BIN_EXE_hangar")).args(["ls", "--state-dir"]).arg(state))
}

fn host_of(url: &str) -> &str {
    url.trim_start_matches("http://").split([':', '/']).next().unwrap_or_default()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

fn examples() -> PathBuf {
    support::repo_root().join("examples/spaces")
}

/// The bundled examples: every printed URL answers through the proxy with its
/// app; `hangar ls` shows the stages; SIGINT stops the containers and exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn examples_are_served_and_sigint_stops_cleanly() {
    let env = TestEnv::engine();
    let owner = unique_name("ex");
    let containers = Containers { env: env.clone(), owner: owner.clone() };
    let state = tempfile::tempdir().expect("state dir");
    // A copy: a folder's containers of other owners count as its orphans, and
    // the examples may be served by a `scripts/up` of their own meanwhile.
    let dir = tempfile::tempdir().expect("dir");
    copy_dir(&examples(), dir.path());
    let t0 = Instant::now();
    let mut up = Up::start(&env, dir.path(), &owner, state.path());
    let urls = up.urls();
    let ids: Vec<&str> = urls.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            format!("{owner}/echo"),
            format!("{owner}/gradio-hello"),
            format!("{owner}/static-site"),
            format!("{owner}/streamlit-hello")
        ],
        "{}",
        up.output()
    );
    let hosts: Vec<&str> = urls.iter().map(|(_, u)| host_of(u)).collect();
    let client = up.client(&hosts);

    // Requests sent before the Spaces are built are held, then answered.
    let static_url = &urls[2].1;
    let resp = client.get(static_url).send().await.expect("static Space answers");
    let first_answer = t0.elapsed();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.expect("body").contains("hangar-example-static"));
    eprintln!("time to the first URL answering (static, held while building): {first_answer:?}");

    up.wait_line("echo RUNNING", Duration::from_secs(300), |l| l.starts_with(&format!("{owner}/echo: RUNNING")));
    let echo: serde_json::Value =
        client.get(&urls[0].1).send().await.expect("echo answers").json().await.expect("echo JSON");
    assert_eq!(echo["env"]["SPACE_ID"], format!("{owner}/echo"));
    assert_eq!(echo["env"]["SYSTEM"], "spaces");
    assert_eq!(echo["env"]["GREETING"], "hello from a manifest", "the manifest's env reaches the app");
    assert_eq!(echo["env"]["SPACE_HOST"], format!("{owner}-echo.localhost"));
    assert_eq!(echo["uid"], 1000, "runs as the image's user");
    // The app sees the public host name (as Host, or X-Forwarded-Host when the proxy sets Host to the upstream).
    let headers = echo["headers"].as_object().expect("headers");
    assert!(
        headers.iter().any(|(k, v)| (k.eq_ignore_ascii_case("host") || k.eq_ignore_ascii_case("x-forwarded-host"))
            && v.as_str().is_some_and(|h| h.starts_with(&format!("{owner}-echo.localhost")))),
        "{echo}"
    );

    up.wait_line("gradio RUNNING", Duration::from_secs(600), |l| {
        l.starts_with(&format!("{owner}/gradio-hello: RUNNING"))
    });
    let resp = client.get(&urls[1].1).send().await.expect("gradio answers");
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.expect("body").to_lowercase().contains("gradio"));
    // Streamlit: the page's WebSocket passes through the proxy, by host and by path route.
    up.wait_line("streamlit RUNNING", Duration::from_secs(600), |l| {
        l.starts_with(&format!("{owner}/streamlit-hello: RUNNING"))
    });
    let health = client.get(format!("{}_stcore/health", urls[3].1)).send().await.expect("streamlit health");
    assert_eq!(health.status(), 200);
    let mut by_host = format!("ws://{}/_stcore/stream", up.addr).into_client_request().expect("ws request");
    by_host.headers_mut().insert("host", host_of(&urls[3].1).parse().expect("host header"));
    streamlit_runs_its_script(by_host, &owner).await;
    let by_path = format!("ws://{}/spaces/{owner}/streamlit-hello/_stcore/stream", up.addr);
    streamlit_runs_its_script(by_path.into_client_request().expect("ws request"), &owner).await;

    // Path routing reaches the same app.
    let path_url = format!("http://{}/spaces/{owner}/static-site/", up.addr);
    let body = client.get(&path_url).send().await.expect("path route").text().await.expect("body");
    assert!(body.contains("hangar-example-static"));

    let ls = hangar_ls(state.path());
    for name in ["echo", "gradio-hello", "static-site", "streamlit-hello"] {
        assert!(
            ls.lines().any(|l| l.starts_with(&format!("{owner}/{name} ")) && l.contains("RUNNING")),
            "hangar ls:\n{ls}"
        );
    }
    let list = containers.list();
    assert_eq!(list.len(), 4, "one container per Space: {list:?}");
    assert!(list.iter().all(|(_, running)| *running), "{list:?}");

    up.signal("-INT");
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}\n{}", up.output());
    let list = containers.list();
    assert_eq!(list.len(), 4, "containers are kept (stopped) for a fast start: {list:?}");
    assert!(list.iter().all(|(_, running)| !running), "SIGINT stops every container: {list:?}");
    assert!(hangar_ls(state.path()).contains("no hangar up is running"));
}

/// Speaks to the example Streamlit app as its page does: opens `/_stcore/stream`, asks for a
/// run (a `BackMsg` whose `rerun_script` (field 11) is an empty `ClientState`) and reads the
/// `ForwardMsg`s (protobuf) until the app's title and greeting arrive.
async fn streamlit_runs_its_script(request: tokio_tungstenite::tungstenite::handshake::client::Request, owner: &str) {
    let (mut ws, resp) =
        tokio_tungstenite::connect_async(request).await.expect("streamlit WebSocket through the proxy");
    assert_eq!(resp.status().as_u16(), 101);
    ws.send(Message::Binary(vec![0x5a, 0x00].into())).await.expect("send rerun_script");
    let greeting = format!("This is {owner}/streamlit-hello.");
    let (mut title, mut greeted) = (false, false);
    let read = async {
        while let Some(msg) = ws.next().await {
            let Message::Binary(bytes) = msg.expect("WebSocket message") else { continue };
            let text = String::from_utf8_lossy(&bytes);
            title |= text.contains("hangar-example-streamlit");
            greeted |= text.contains(&greeting);
            if title && greeted {
                return;
            }
        }
        panic!("the WebSocket closed before the app's output (title {title}, greeting {greeted})");
    };
    tokio::time::timeout(Duration::from_secs(120), read).await.expect("the app's output over the WebSocket");
}

/// A Space with a 3 s sleep time: its container stops when idle, the next
/// request is held and answered after a wake; a crashed `hangar up`'s running
/// container is adopted by the next one (no duplicate, no rebuild).
#[tokio::test(flavor = "multi_thread")]
async fn sleeps_wakes_and_a_restart_adopts_the_running_container() {
    let env = TestEnv::engine();
    let owner = unique_name("sl");
    let containers = Containers { env: env.clone(), owner: owner.clone() };
    let dir = tempfile::tempdir().expect("dir");
    let state = tempfile::tempdir().expect("state dir");
    copy_dir(&examples().join("echo"), &dir.path().join("nap"));
    std::fs::write(
        dir.path().join("nap/space.yaml"),
        "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata:\n  name: nap\nspec:\n  sleepAfter: 3s\n  env:\n    GREETING: zzz\n",
    )
    .expect("manifest");
    let id = format!("{owner}/nap");
    let name = format!("hangar_{owner}_nap");

    let mut up = Up::start(&env, dir.path(), &owner, state.path());
    let url = up.urls().pop().map(|(_, u)| u).unwrap_or_else(|| panic!("no URL\n{}", up.output()));
    let client = up.client(&[host_of(&url)]);
    up.wait_line("RUNNING", Duration::from_secs(300), |l| l.starts_with(&format!("{id}: RUNNING")));
    let first_id = containers.id(&name);
    let resp = client.get(&url).send().await.expect("answers");
    assert_eq!(resp.status(), 200);

    // The build log, over the logs API (SSE lines as on the hub).
    let logs = up.wait_line("logs API", Duration::from_secs(5), |l| l.starts_with("logs: http://"));
    let logs_base = logs.trim_start_matches("logs: ").split("/api/").next().expect("logs base").to_owned();
    let build_log = client
        .get(format!("{logs_base}/api/spaces/{id}/logs/build"))
        .send()
        .await
        .expect("logs API")
        .text()
        .await
        .expect("log body");
    assert!(build_log.contains("data: {") && build_log.contains("[hangar] built"), "{build_log}");

    // Idle for 3 s: asleep, container stopped.
    up.wait_line("SLEEPING", Duration::from_secs(30), |l| l.starts_with(&format!("{id}: SLEEPING")));
    assert!(!containers.running(&name), "a sleeping Space's container is stopped");
    assert!(hangar_ls(state.path()).contains("SLEEPING"));

    // The next request is held through the wake and answered.
    let t = Instant::now();
    let resp = client.get(&url).send().await.expect("held and answered");
    let wake = t.elapsed();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("JSON");
    assert_eq!(body["env"]["GREETING"], "zzz");
    eprintln!("wake from a stopped container to the answered request: {wake:?}");
    assert!(containers.running(&name));
    assert_eq!(containers.list().len(), 1);
    assert_eq!(up.count(|l| l.starts_with(&format!("{id}: waking"))), 1, "one wake");

    // A crash (SIGKILL) leaves the container running; the next `hangar up` adopts it.
    up.signal("-KILL");
    up.wait_exit(Duration::from_secs(10));
    assert!(containers.running(&name), "the container outlives a crashed hangar up");
    assert!(hangar_ls(state.path()).contains("STOPPED"), "ls tells a dead hangar up's Spaces are not served");
    let mut up = Up::start(&env, dir.path(), &owner, state.path());
    up.wait_line("RUNNING", Duration::from_secs(120), |l| l.starts_with(&format!("{id}: RUNNING")));
    assert_eq!(up.count(|l| l.contains("adopted its running container")), 1, "{}", up.output());
    assert_eq!(up.count(|l| l.contains("image reused")), 1, "unchanged: not rebuilt\n{}", up.output());
    assert_eq!(containers.list().len(), 1, "no duplicate");
    assert_eq!(containers.id(&name), first_id, "the same container, not a new one");
    let client = up.client(&[host_of(&url)]);
    let url = up.urls().pop().map(|(_, u)| u).expect("URL");
    assert_eq!(client.get(&url).send().await.expect("answers").status(), 200);

    up.signal("-INT");
    assert!(up.wait_exit(Duration::from_secs(60)).success(), "{}", up.output());
    assert!(!containers.running(&name));

    // A changed file: rebuilt, and the container replaced (still one).
    let app = dir.path().join("nap/app.py");
    let text = std::fs::read_to_string(&app).expect("app.py");
    std::fs::write(&app, format!("{text}\n# changed\n")).expect("write");
    let mut up = Up::start(&env, dir.path(), &owner, state.path());
    up.wait_line("RUNNING", Duration::from_secs(300), |l| l.starts_with(&format!("{id}: RUNNING")));
    assert_eq!(up.count(|l| l.starts_with(&format!("{id}: built in"))), 1, "{}", up.output());
    assert_eq!(containers.list().len(), 1, "replaced, not duplicated");
    assert_ne!(containers.id(&name), first_id, "a new container for the new image");
    up.signal("-INT");
    assert!(up.wait_exit(Duration::from_secs(60)).success(), "{}", up.output());
}

/// A Space that cannot build shows its stage in `hangar ls` and in the proxy's
/// answer, while the other Spaces run. A Space folder whose `.dockerignore`
/// and app file link to a file outside it is a BUILD_ERROR naming the file,
/// and that file is served by no one (issue 18). The printed path URL is
/// reached by clients that resolve no `*.localhost` names (issue 24).
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_space_reports_its_stage_and_the_others_run() {
    let env = TestEnv::engine();
    let owner = unique_name("br");
    let _containers = Containers { env: env.clone(), owner: owner.clone() };
    let dir = tempfile::tempdir().expect("dir");
    let state = tempfile::tempdir().expect("state dir");
    copy_dir(&examples().join("static-site"), &dir.path().join("fine"));
    std::fs::create_dir_all(dir.path().join("noapp")).expect("mkdir");
    std::fs::write(dir.path().join("noapp/README.md"), "---\nsdk: gradio\n---\nno app.py here\n").expect("readme");
    // The issue's reproduction: a static Space whose .dockerignore links out of its folder.
    let outside = tempfile::tempdir().expect("outside");
    let secret = unique_name("outside-secret");
    std::fs::write(outside.path().join("secret.txt"), &secret).expect("secret");
    copy_dir(&examples().join("static-site"), &dir.path().join("leaky"));
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), dir.path().join("leaky/.dockerignore"))
        .expect("symlink");
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), dir.path().join("leaky/secret.html"))
        .expect("symlink");
    // A Python version this machine has no base image for (issue 24).
    std::fs::create_dir_all(dir.path().join("py312")).expect("mkdir");
    std::fs::write(dir.path().join("py312/README.md"), "---\nsdk: gradio\npython_version: \"3.12\"\n---\n")
        .expect("readme");
    std::fs::write(dir.path().join("py312/app.py"), "print('never built')\n").expect("app");
    // Headers that would reframe responses on shared connections: refused, named.
    copy_dir(&examples().join("static-site"), &dir.path().join("framing"));
    let readme = std::fs::read_to_string(dir.path().join("framing/README.md")).expect("readme");
    let framing = "custom_headers:\n  content-length: \"0\"\n  transfer-encoding: chunked\n  connection: close\n---";
    std::fs::write(dir.path().join("framing/README.md"), readme.replacen("\n---", &format!("\n{framing}"), 1))
        .expect("readme");
    let mut up = Up::start(&env, dir.path(), &owner, state.path());
    up.wait_line("NO_APP_FILE", Duration::from_secs(120), |l| l.starts_with(&format!("{owner}/noapp: NO_APP_FILE")));
    let settled = |name: &str| {
        let prefix = format!("{owner}/{name}: ");
        move |l: &str| l.starts_with(&prefix) && !l.starts_with(&format!("{prefix}BUILDING"))
    };
    let py312 = up.wait_line("py312's stage", Duration::from_secs(120), settled("py312"));
    assert!(
        py312.starts_with(&format!(
            "{owner}/py312: CONFIG_ERROR python_version \"3.12\" is not available here (available: 3.11)"
        )),
        "{py312}\n{}",
        up.output()
    );
    let leaky = up.wait_line("leaky's stage", Duration::from_secs(120), settled("leaky"));
    assert!(
        leaky.starts_with(&format!("{owner}/leaky: BUILD_ERROR .dockerignore is a symlink to ")),
        "{leaky}\n{}",
        up.output()
    );
    let refused = up.wait_line("CONFIG_ERROR", Duration::from_secs(120), |l| {
        l.starts_with(&format!("{owner}/framing: CONFIG_ERROR"))
    });
    assert!(refused.contains("custom_headers") && refused.contains("\"connection\" is not allowed"), "{refused}");
    up.wait_line("fine RUNNING", Duration::from_secs(120), |l| l.starts_with(&format!("{owner}/fine: RUNNING")));
    let urls = up.urls();
    // The path URL, as printed, with a client that resolves names the ordinary way.
    let path_url = up.path_url(&format!("{owner}/fine"));
    assert_eq!(path_url, format!("http://{}/spaces/{owner}/fine/", up.addr));
    let plain = reqwest::Client::builder().no_proxy().build().expect("client");
    let body = plain.get(&path_url).send().await.expect("path URL").text().await.expect("body");
    assert!(body.contains("hangar-example-static"), "{body}");
    let leaky_url = up.path_url(&format!("{owner}/leaky"));
    for path in [".dockerignore", "secret.html"] {
        let resp = plain.get(format!("{leaky_url}{path}")).send().await.expect("answer");
        let status = resp.status();
        assert!(!resp.text().await.expect("body").contains(&secret), "{path} served the outside file ({status})");
    }
    // Python's httpx (what gradio_client uses) on the printed URL, when the test bed has it.
    if let Ok(python) = std::env::var("HANGAR_GRADIO_CLIENT_PYTHON") {
        let code = "import sys, httpx; r = httpx.get(sys.argv[1]); r.raise_for_status(); print(r.text)";
        let out = run_ok(Command::new(python).args(["-c", code, &path_url]));
        assert!(out.contains("hangar-example-static"), "{out}");
    }
    let client = up.client(&urls.iter().map(|(_, u)| host_of(u)).collect::<Vec<_>>());
    let broken = &urls.iter().find(|(i, _)| i.ends_with("/noapp")).expect("noapp URL").1;
    let resp = client.get(broken).send().await.expect("answer");
    assert_eq!(resp.status(), 503, "an unavailable Space says so");
    let framing = &urls.iter().find(|(i, _)| i.ends_with("/framing")).expect("framing URL").1;
    let resp = client.get(framing).send().await.expect("answer");
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.expect("body").contains("CONFIG_ERROR"));
    let ls = hangar_ls(state.path());
    assert!(ls.contains("NO_APP_FILE") && ls.contains("app.py"), "{ls}");
    up.signal("-TERM");
    assert!(up.wait_exit(Duration::from_secs(60)).success());
}

/// Without a Docker engine `hangar up` fails at once and says why.
#[test]
fn without_docker_it_says_why() {
    let state = tempfile::tempdir().expect("state dir");
    let out = Command::new(env!("CARGO_BIN_EXE_hangar"))
        .arg("up")
        .arg(examples())
        .args(["--listen", "127.0.0.1:0", "--docker-host", "unix:///nonexistent/docker.sock", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Docker") && err.contains("scripts/up"), "{err}");
}

/// A copy of the echo example as Space `name`, with the given freeze and sleep times.
fn napping_echo(dir: &Path, name: &str, freeze_after: &str, sleep_after: &str) {
    copy_dir(&examples().join("echo"), &dir.join(name));
    // http.server listens with a backlog of 5: a burst of 50 connections would
    // wait out SYN retries (seconds) whether or not the app was ever frozen.
    let app = dir.join(name).join("app.py");
    let text = std::fs::read_to_string(&app).expect("app.py");
    let text = text.replace(
        "if __name__ == \"__main__\":",
        "http.server.ThreadingHTTPServer.request_queue_size = 128\n\nif __name__ == \"__main__\":",
    );
    assert!(text.contains("request_queue_size"), "the echo example changed: {text}");
    std::fs::write(&app, text).expect("app.py");
    std::fs::write(
        dir.join(name).join("space.yaml"),
        format!(
            "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata:\n  name: {name}\nspec:\n  \
             freezeAfter: {freeze_after}\n  sleepAfter: {sleep_after}\n  env:\n    GREETING: brr\n"
        ),
    )
    .expect("manifest");
}

/// A client of the test bed's engine.
async fn docker_api(env: &TestEnv) -> bollard::Docker {
    bollard::Docker::connect_with_unix(env.docker_host.trim_start_matches("unix://"), 60, bollard::API_DEFAULT_VERSION)
        .expect("docker client")
        .negotiate_version()
        .await
        .expect("docker API version")
}

/// `(running, paused)` of a container, as the Docker API reports its state.
async fn docker_state(env: &TestEnv, name: &str) -> (bool, bool) {
    let c = docker_api(env).await.inspect_container(name, None).await.expect("inspect");
    let state = c.state.expect("state");
    (state.running.unwrap_or(false), state.paused.unwrap_or(false))
}

/// The Docker runtime's freeze calls on a real engine, whose answers for the
/// odd cases differ by version (Engine 20.10 answers 500 to an unpause of a
/// running container, 409 to a pause of a paused one or a start of a paused one).
#[tokio::test(flavor = "multi_thread")]
async fn docker_runtime_pauses_and_thaws() {
    use hangar::proxy::SpaceKey;
    use hangar::runtime::{DockerRuntime, RunSpec, Runtime};
    let env = TestEnv::engine();
    let owner = unique_name("rt");
    let _containers = Containers { env: env.clone(), owner: owner.clone() };
    let runtime = DockerRuntime::new(docker_api(&env).await);
    let key = SpaceKey::new(owner.as_str(), "still");
    let name = format!("hangar_{owner}_still");
    let spec = RunSpec {
        key: key.clone(),
        image: env.static_image.clone(),
        app_port: 8080,
        env: Default::default(),
        labels: Default::default(),
        cpus: None,
        memory_bytes: None,
    };
    runtime.ensure(&spec).await.expect("created");
    assert!(runtime.pause(&key).await.is_err(), "a container that does not run cannot be frozen");
    assert!(runtime.unpause(&key).await.is_err(), "a container that does not run cannot be thawed");
    let running = runtime.start(&key).await.expect("started");
    let endpoint = running.endpoint.expect("published");
    assert!(!running.paused);
    assert!(runtime.unpause(&key).await.is_ok(), "running, not frozen: nothing to thaw");

    runtime.pause(&key).await.expect("frozen");
    runtime.pause(&key).await.expect("frozen twice: a no-op");
    let frozen = runtime.get(&key).await.expect("get").expect("exists");
    assert!(frozen.running && frozen.paused, "{frozen:?}");
    assert_eq!(frozen.endpoint, Some(endpoint), "a frozen container keeps its port");
    assert_eq!(docker_state(&env, &name).await, (true, true));
    let held = runtime.memory_bytes(&key).await.expect("stats").expect("a frozen container holds memory");
    assert!(held > 0, "{held}");

    // A start thaws it (a restarted hangar up that wants it awake), same port.
    let thawed = runtime.start(&key).await.expect("start thaws");
    assert_eq!((thawed.paused, thawed.endpoint), (false, Some(endpoint)));
    assert_eq!(docker_state(&env, &name).await, (true, false));

    // A stop while frozen thaws first: the app takes SIGTERM instead of a 10 s kill.
    runtime.pause(&key).await.expect("frozen");
    let t = Instant::now();
    runtime.stop(&key).await.expect("stopped");
    assert!(t.elapsed() < Duration::from_secs(8), "stopping a frozen container took {:?}", t.elapsed());
    assert_eq!(docker_state(&env, &name).await, (false, false));
    assert_eq!(runtime.memory_bytes(&key).await.expect("stats"), None, "a stopped container holds nothing");
    // Killed while frozen: the thaw says so (the supervisor then starts it anew).
    runtime.start(&key).await.expect("started");
    runtime.pause(&key).await.expect("frozen");
    run_ok(env.docker().args(["kill", &name]));
    assert!(runtime.unpause(&key).await.is_err(), "a killed container is not thawed");
    runtime.remove(&key).await.expect("removed");
}

/// How many times the engine unpaused `name` since `since` (its event log).
fn unpauses_since(env: &TestEnv, name: &str, since: SystemTime) -> usize {
    let since = since.duration_since(UNIX_EPOCH).expect("clock").as_secs_f64() - 1.0;
    let until = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64() + 1.0;
    let out = run_ok(env.docker().args([
        "events",
        "--since",
        &format!("{since:.3}"),
        "--until",
        &format!("{until:.3}"),
        "--filter",
        &format!("container={name}"),
        "--filter",
        "event=unpause",
        "--format",
        "{{.Action}}",
    ]));
    out.lines().filter(|l| l.trim() == "unpause").count()
}

/// Idle time counts from readiness: a Space whose app listens only after its
/// freeze and sleep times have passed is RUNNING (and answers) before it sleeps.
#[tokio::test(flavor = "multi_thread")]
async fn a_space_slower_to_start_than_its_idle_times_serves_before_it_sleeps() {
    let env = TestEnv::engine();
    let owner = unique_name("slow");
    let _containers = Containers { env: env.clone(), owner: owner.clone() };
    let dir = tempfile::tempdir().expect("dir");
    let state = tempfile::tempdir().expect("state dir");
    napping_echo(dir.path(), "slow", "2s", "4s");
    let app = dir.path().join("slow").join("app.py");
    let text = std::fs::read_to_string(&app).expect("app.py");
    std::fs::write(
        &app,
        text.replace(
            "if __name__ == \"__main__\":",
            "if __name__ == \"__main__\":\n    import time\n    time.sleep(8)",
        ),
    )
    .expect("app.py");
    let id = format!("{owner}/slow");
    let up = Up::start(&env, dir.path(), &owner, state.path());
    up.wait_line("SLEEPING", Duration::from_secs(300), |l| l.starts_with(&format!("{id}: SLEEPING")));
    let out = up.output();
    let running = out.find(&format!("{id}: RUNNING"));
    let sleeping = out.find(&format!("{id}: SLEEPING"));
    assert!(running.is_some() && running < sleeping, "RUNNING before SLEEPING:\n{out}");
}

/// Two-tier sleep: idle past `freezeAfter` the container is paused (the Docker
/// API says so) and `hangar ls` shows the tier; 50 concurrent requests thaw it
/// with exactly one unpause and are all answered; idle past `sleepAfter` it is
/// stopped and wakes by the ordinary path; killed while frozen it is started
/// anew by the next request; Ctrl-C while frozen stops it cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn freezes_when_idle_thaws_once_for_many_and_stops_later() {
    let env = TestEnv::engine();
    let owner = unique_name("fz");
    let containers = Containers { env: env.clone(), owner: owner.clone() };
    let dir = tempfile::tempdir().expect("dir");
    let state = tempfile::tempdir().expect("state dir");
    napping_echo(dir.path(), "ice", "2s", "10s");
    let id = format!("{owner}/ice");
    let name = format!("hangar_{owner}_ice");
    let frozen_line = format!("{id}: SLEEPING (idle; container frozen");

    let mut up = Up::start(&env, dir.path(), &owner, state.path());
    let url = up.urls().pop().map(|(_, u)| u).unwrap_or_else(|| panic!("no URL\n{}", up.output()));
    let client = up.client(&[host_of(&url)]);
    up.wait_line("RUNNING", Duration::from_secs(300), |l| l.starts_with(&format!("{id}: RUNNING")));
    assert_eq!(client.get(&url).send().await.expect("answers").status(), 200);

    // Idle for 2 s: frozen in place.
    up.wait_line("frozen", Duration::from_secs(30), |l| l.starts_with(&frozen_line));
    assert_eq!(docker_state(&env, &name).await, (true, true), "a frozen Space's container is paused");
    let ls = hangar_ls(state.path());
    assert!(
        ls.lines().any(|l| l.starts_with(&id) && l.contains("SLEEPING") && l.contains("frozen ") && l.contains(" MiB")),
        "{ls}"
    );
    let local_metrics = up.wait_line("metrics", Duration::from_secs(5), |l| l.starts_with("metrics: http://"));
    let proxy_metrics = local_metrics.split("the proxy's at ").nth(1).expect("the proxy's metrics URL");
    let proxy_metrics = proxy_metrics.trim_end_matches(')').to_owned();
    let local_metrics = local_metrics.split_whitespace().nth(1).expect("metrics URL").to_owned();
    let text = client.get(&local_metrics).send().await.expect("metrics").text().await.expect("text");
    let held = format!(r#"hangar_up_frozen_memory_bytes{{namespace="{owner}",space="ice"}} "#);
    let bytes: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&held))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("memory held while frozen:\n{text}"));
    assert!(bytes > 0, "{text}");

    // 50 requests at once: one thaw, all answered.
    let since = SystemTime::now();
    let t = Instant::now();
    let requests = (0..50).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let resp = client.get(&url).send().await.expect("answered");
            (resp.status().as_u16(), resp.text().await.expect("body"))
        })
    });
    for r in futures::future::join_all(requests).await {
        let (status, body) = r.expect("task");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("brr"), "{body}");
    }
    eprintln!("50 requests to a frozen Space, all answered in {:?}", t.elapsed());
    assert_eq!(docker_state(&env, &name).await, (true, false), "thawed");
    assert_eq!(up.count(|l| l.starts_with(&format!("{id}: RUNNING (thawed"))), 1, "one thaw\n{}", up.output());
    assert_eq!(unpauses_since(&env, &name, since), 1, "exactly one unpause for 50 requests");
    let text = client.get(&local_metrics).send().await.expect("metrics").text().await.expect("text");
    assert!(!text.contains(&held), "thawed: no memory held frozen\n{text}");
    let metrics = client.get(&proxy_metrics).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("metrics text");
    let wakes = format!(r#"hangar_proxy_wakes_total{{namespace="{owner}",space="ice",tier="frozen"}} 1"#);
    assert!(metrics.contains(&wakes), "one wake, of a frozen Space:\n{metrics}");
    assert!(!metrics.contains(r#"tier="stopped""#), "no cold start:\n{metrics}");
    let thaw_count =
        format!(r#"hangar_proxy_wake_duration_seconds_count{{namespace="{owner}",space="ice",tier="frozen"}} 1"#);
    assert!(metrics.contains(&thaw_count), "the thaw's latency, by tier:\n{metrics}");

    // Frozen again, then idle past 10 s: stopped; the next request wakes it the ordinary way.
    up.wait_line("stopped", Duration::from_secs(40), |l| {
        l.starts_with(&format!("{id}: SLEEPING (idle; container stopped"))
    });
    assert_eq!(up.count(|l| l.starts_with(&frozen_line)), 2, "frozen before stopped\n{}", up.output());
    assert_eq!(docker_state(&env, &name).await, (false, false), "a stopped Space's container is not running");
    let ls = hangar_ls(state.path());
    assert!(ls.lines().any(|l| l.starts_with(&id) && l.contains("SLEEPING") && l.contains("stopped")), "{ls}");
    let resp = client.get(&url).send().await.expect("woken and answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(up.count(|l| l.starts_with(&format!("{id}: waking"))), 1, "{}", up.output());
    assert_eq!(up.count(|l| l.starts_with(&format!("{id}: RUNNING (woke in"))), 1, "{}", up.output());
    assert_eq!(containers.list().len(), 1, "one container throughout");
    let metrics = client.get(&proxy_metrics).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("metrics text");
    let woken = format!(r#"hangar_proxy_wakes_total{{namespace="{owner}",space="ice",tier="stopped"}} 1"#);
    assert!(metrics.contains(&woken), "then one wake of a stopped Space:\n{metrics}");

    // Ctrl-C while frozen: thawed, then stopped at once (a frozen app cannot take SIGTERM).
    // Killed behind hangar up's back while frozen: the next request starts it anew.
    up.wait_count("frozen a third time", 3, Duration::from_secs(30), |l| l.starts_with(&frozen_line));
    run_ok(env.docker().args(["kill", &name]));
    let resp = client.get(&url).send().await.expect("restarted and answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(docker_state(&env, &name).await, (true, false));

    up.wait_count("frozen a fourth time", 4, Duration::from_secs(30), |l| l.starts_with(&frozen_line));
    let t = Instant::now();
    up.signal("-INT");
    assert!(up.wait_exit(Duration::from_secs(60)).success(), "{}", up.output());
    assert!(t.elapsed() < Duration::from_secs(8), "stopping a frozen Space took {:?}", t.elapsed());
    assert_eq!(docker_state(&env, &name).await, (false, false));
}

/// A `hangar up` killed while a Space is frozen: the container stays paused,
/// the next `hangar up` adopts it (no duplicate) and a request thaws it; and
/// without traffic a frozen container adopted after a crash is still stopped
/// once idle past `sleepAfter` (even with the state file gone): nothing stays frozen.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_up_thaws_its_frozen_container_and_stops_it_in_time() {
    let env = TestEnv::engine();
    let owner = unique_name("fr");
    let containers = Containers { env: env.clone(), owner: owner.clone() };
    let dir = tempfile::tempdir().expect("dir");
    let state = tempfile::tempdir().expect("state dir");
    napping_echo(dir.path(), "berg", "2s", "12s");
    let id = format!("{owner}/berg");
    let name = format!("hangar_{owner}_berg");
    let frozen_line = format!("{id}: SLEEPING (idle; container frozen");

    let mut up = Up::start(&env, dir.path(), &owner, state.path());
    let url = up.urls().pop().map(|(_, u)| u).unwrap_or_else(|| panic!("no URL\n{}", up.output()));
    up.wait_line("RUNNING", Duration::from_secs(300), |l| l.starts_with(&format!("{id}: RUNNING")));
    assert_eq!(up.client(&[host_of(&url)]).get(&url).send().await.expect("answers").status(), 200);
    up.wait_line("frozen", Duration::from_secs(30), |l| l.starts_with(&frozen_line));
    let first_id = containers.id(&name);
    up.signal("-KILL");
    up.wait_exit(Duration::from_secs(10));
    assert_eq!(docker_state(&env, &name).await, (true, true), "the container stays frozen without hangar up");

    // Restarted: adopted frozen, and a request thaws it.
    let mut up = Up::start(&env, dir.path(), &owner, state.path());
    up.wait_line("adopted frozen", Duration::from_secs(120), |l| {
        l.starts_with(&format!("{id}: SLEEPING (frozen container adopted"))
    });
    assert_eq!(up.count(|l| l.contains("adopted its frozen container")), 1, "{}", up.output());
    assert_eq!(docker_state(&env, &name).await, (true, true), "adopted as it is: still frozen");
    let client = up.client(&[host_of(&url)]);
    let url = up.urls().pop().map(|(_, u)| u).expect("URL");
    let resp = client.get(&url).send().await.expect("thawed and answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(up.count(|l| l.starts_with(&format!("{id}: RUNNING (thawed"))), 1, "{}", up.output());
    assert_eq!(docker_state(&env, &name).await, (true, false));
    assert_eq!(containers.list().len(), 1, "no duplicate");
    assert_eq!(containers.id(&name), first_id, "the same container");

    // Frozen again, killed again, and the state file lost: the next hangar up
    // sees no traffic and still stops the container by sleepAfter.
    up.wait_line("frozen", Duration::from_secs(30), |l| l.starts_with(&frozen_line));
    up.signal("-KILL");
    up.wait_exit(Duration::from_secs(10));
    std::fs::remove_file(state.path().join("up.json")).expect("state file");
    let t = Instant::now();
    let mut up = Up::start(&env, dir.path(), &owner, state.path());
    up.wait_line("adopted frozen", Duration::from_secs(120), |l| {
        l.starts_with(&format!("{id}: SLEEPING (frozen container adopted"))
    });
    up.wait_line("stopped", Duration::from_secs(40), |l| {
        l.starts_with(&format!("{id}: SLEEPING (idle; container stopped"))
    });
    eprintln!("an adopted frozen container without a record was stopped after {:?}", t.elapsed());
    assert_eq!(docker_state(&env, &name).await, (false, false), "stopped, not left frozen");
    assert_eq!(up.count(|l| l.contains("thawed")), 0, "no traffic, no thaw\n{}", up.output());
    up.signal("-INT");
    assert!(up.wait_exit(Duration::from_secs(60)).success(), "{}", up.output());
}
