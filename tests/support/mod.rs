//! Support for the cluster and engine test tiers.
//!
//! Both tiers run against the test bed that `scripts/testenv up` starts (a real
//! kube-apiserver/scheduler/controller-manager, a real kubelet + containerd node,
//! kwok-simulated CPU/GPU nodes, dockerd and a local registry). The test command
//! exports its environment with `eval "$(scripts/testenv env)"`.
//!
//! A tier whose environment is missing fails loudly with the reason; it never
//! skips silently. Each cluster test gets a namespace of its own, deleted at the
//! end; when a test panics, the namespace's events and pods and the tail of the
//! relevant component logs (in `$HANGAR_TESTENV_STATE/logs`) are printed.
#![allow(dead_code)]

pub mod chart;
pub mod floor;
pub mod gradio;
pub mod image;
pub mod operator;
pub mod process;
pub mod repo;
pub mod space;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::{Client, Resource};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// The control-plane and node components whose logs `up` keeps.
pub const CLUSTER_LOGS: &[&str] =
    &["kube-apiserver", "kube-scheduler", "kube-controller-manager", "kwok", "kubelet", "containerd"];

/// What `scripts/testenv env` exports.
#[derive(Clone, Debug)]
pub struct TestEnv {
    pub kubeconfig: PathBuf,
    pub state: PathBuf,
    pub bin: PathBuf,
    /// `host:port` of the local registry (plain HTTP, no auth).
    pub registry: String,
    pub docker_host: String,
    pub python_image: String,
    pub static_image: String,
    pub real_node: String,
}

fn required(tier: &str, name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "the {tier} tier needs the test bed: run `scripts/testenv install && scripts/testenv up` \
             and `eval \"$(scripts/testenv env)\"` (or use scripts/test); {name} is unset"
        ),
    }
}

impl TestEnv {
    /// Environment of the cluster tier; panics with the reason when it is missing.
    pub fn cluster() -> Self {
        let env = Self::from_env("cluster");
        assert!(
            env.kubeconfig.is_file(),
            "cluster tier: KUBECONFIG={} does not exist; is `scripts/testenv up` still running?",
            env.kubeconfig.display()
        );
        let kubectl = env.bin.join("kubectl");
        assert!(kubectl.is_file(), "cluster tier: {} missing; run `scripts/testenv install`", kubectl.display());
        env
    }

    /// Environment of the engine tier (Docker + registry); panics with the reason when missing.
    pub fn engine() -> Self {
        Self::from_env("engine")
    }

    fn from_env(tier: &str) -> Self {
        Self {
            kubeconfig: required(tier, "KUBECONFIG").into(),
            state: required(tier, "HANGAR_TESTENV_STATE").into(),
            bin: required(tier, "HANGAR_TESTENV_BIN").into(),
            registry: required(tier, "HANGAR_TEST_REGISTRY"),
            docker_host: required(tier, "DOCKER_HOST"),
            python_image: required(tier, "HANGAR_PYTHON_IMAGE"),
            static_image: required(tier, "HANGAR_STATIC_IMAGE"),
            real_node: required(tier, "HANGAR_REAL_NODE"),
        }
    }

    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin.join("kubectl"));
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    /// `helm` with its caches/config in `home` (hermetic, nothing in $HOME).
    pub fn helm(&self, home: &Path) -> Command {
        let mut c = Command::new(self.bin.join("helm"));
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        for (var, sub) in [("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")] {
            c.env(var, home.join(sub));
        }
        c
    }

    /// `docker` talking to the test bed's engine, with the classic builder.
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", &self.docker_host).env("DOCKER_BUILDKIT", "0").env("DOCKER_CLI_HINTS", "false");
        c
    }

    /// Last `lines` lines of a component's log in the state dir.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let path = self.state.join("logs").join(format!("{component}.log"));
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", path.display()),
        }
    }

    /// Prints the tails of the given component logs to stderr.
    pub fn dump_logs(&self, components: &[&str], lines: usize) {
        for c in components {
            eprintln!("----- tail of {c} log ({}) -----", self.state.join("logs").display());
            eprintln!("{}", self.log_tail(c, lines));
        }
    }
}

/// Runs a command; `Ok(stdout)` on success, otherwise an error carrying the
/// command line, exit status and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    check(cmd, out)
}

fn check(cmd: &Command, out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into())
    }
}

/// Runs a command with `input` on its stdin; `Ok(stdout)` on success.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    child.stdin.take().ok_or("no stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    check(cmd, out)
}

/// Runs a command that must succeed (panics with its output otherwise).
pub fn run_ok(cmd: &mut Command) -> String {
    match run(cmd) {
        Ok(out) => out,
        Err(e) => panic!("{e}"),
    }
}

/// Runs a command that must fail; returns its stderr+stdout.
pub fn run_fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd:?} was expected to fail but succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout))
}

/// A DNS-1123 name unique within this machine and run.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = format!("{prefix}-{}-{n}-{:x}", std::process::id(), nanos % 0xfffff);
    name.truncate(63);
    name.to_lowercase()
}

/// Polls `check` every 200 ms until it yields `Some`, or panics after `timeout`
/// with `what` and the last error seen.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::from("(condition not met yet)");
    loop {
        match check().await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An HTTP client for pod IPs and loopback ports: never goes through a proxy.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(3)).build().expect("building a reqwest client")
}

/// An HTTP client for requests that a Space may hold while it wakes: never goes
/// through a proxy, and waits up to 120 s.
pub fn held_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().expect("building a reqwest client")
}

/// `GET /` through the proxy at `proxy` for the Space served at `host`, held
/// while it wakes or thaws: the time to the response head, which must be 200.
pub async fn first_byte_through_proxy(proxy: &str, host: &str) -> Duration {
    let start = std::time::Instant::now();
    let response = held_client()
        .get(format!("http://{proxy}/"))
        .header("host", host)
        .header("accept", "*/*")
        .send()
        .await
        .expect("request through the proxy");
    let took = start.elapsed();
    assert_eq!(response.status().as_u16(), 200, "{host} through the proxy");
    took
}

/// GET `url`; `Ok((status, body))`.
pub async fn http_get(client: &reqwest::Client, url: &str) -> Result<(u16, String)> {
    let resp = client.get(url).send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

/// Polls `url` until it answers 200 and returns the body; panics after `timeout`
/// naming `what` and the last status or error.
pub async fn body_when_ok(what: &str, url: &str, timeout: Duration) -> String {
    let http = http_client();
    wait_for(what, timeout, || async {
        match http_get(&http, url).await {
            Ok((200, body)) => Ok(Some(body)),
            Ok((status, _)) => Err(format!("HTTP {status}").into()),
            Err(e) => Err(e),
        }
    })
    .await
}

/// A kube client from `KUBECONFIG` (panics with the reason if the cluster is unreachable).
pub async fn client() -> Client {
    let env = TestEnv::cluster();
    let client = Client::try_default().await.unwrap_or_else(|e| {
        panic!("cluster tier: cannot build a client from KUBECONFIG={}: {e}", env.kubeconfig.display())
    });
    if let Err(e) = client.apiserver_version().await {
        env.dump_logs(&["kube-apiserver", "etcd"], 30);
        panic!("cluster tier: kube-apiserver does not answer: {e}");
    }
    client
}

/// Where a node agent run by a test (a host process, as the DaemonSet's agent with the host
/// network) listens: the real node's InternalIP, where the proxy looks for it, and a free
/// port the proxy is told (`--node-agent-port`). The address is the machine's own.
pub async fn node_agent_addr(ns: &TestNamespace) -> std::net::SocketAddr {
    let node = Api::<k8s_openapi::api::core::v1::Node>::all(ns.client.clone())
        .get(&ns.env.real_node)
        .await
        .unwrap_or_else(|e| panic!("the real node {}: {e}", ns.env.real_node));
    let ip = node
        .status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse::<std::net::IpAddr>().ok())
        .unwrap_or_else(|| panic!("the real node {} has no InternalIP", ns.env.real_node));
    let port = std::net::TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).expect("a free port").port();
    std::net::SocketAddr::new(ip, port)
}

/// A namespace of its own for one test: created on `new`, deleted on drop.
/// If the test panics, prints what is in it and the tails of `components`' logs.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
    pub env: TestEnv,
    components: Vec<&'static str>,
}

impl TestNamespace {
    pub async fn new(prefix: &str, components: &[&'static str]) -> Self {
        Self::named(unique_name(prefix), components).await
    }

    /// A namespace of exactly this name (deleted at the end like the others).
    pub async fn named(name: String, components: &[&'static str]) -> Self {
        let env = TestEnv::cluster();
        let client = client().await;
        let mut ns = Namespace::default();
        ns.meta_mut().name = Some(name.clone());
        ns.meta_mut().labels = Some([("hangar.dev/test".to_string(), "true".to_string())].into());
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating test namespace {name}: {e}"));
        let this = Self { name, client, env, components: components.to_vec() };
        // Pods are rejected until the controller-manager made the default service account.
        let sa: Api<ServiceAccount> = this.api();
        wait_for("the namespace's default service account", Duration::from_secs(30), || async {
            Ok(sa.get_opt("default").await?.map(|_| ()))
        })
        .await;
        this
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Applies `crds/` (server-side: concurrent tests may apply it at once) and waits
    /// until the Space CRD is Established.
    pub async fn install_crd(&self) {
        run_ok(
            self.env
                .kubectl()
                .args(["apply", "--server-side", "--force-conflicts", "-f"])
                .arg(repo_root().join("crds")),
        );
        // `kubectl wait` fails outright while a fresh CRD has no conditions yet.
        let jsonpath = r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#;
        wait_for("the Space CRD to be established", Duration::from_secs(30), || async {
            let out = run(self.env.kubectl().args(["get", "crd", "spaces.hangar.dev", "-o", jsonpath]))?;
            Ok((out.trim() == "True").then_some(()))
        })
        .await;
    }

    /// `kubectl` in this namespace.
    pub fn kubectl(&self) -> Command {
        let mut c = self.env.kubectl();
        c.arg("-n").arg(&self.name);
        c
    }

    pub fn dump_diagnostics(&self) {
        eprintln!("===== diagnostics for test namespace {} =====", self.name);
        for args in [
            &["get", "all,endpointslices", "-o", "wide"][..],
            &["get", "events", "--sort-by=.lastTimestamp"][..],
            &["describe", "pods"][..],
        ] {
            match run(self.kubectl().args(args)) {
                Ok(out) => eprintln!("$ kubectl {}\n{out}", args.join(" ")),
                Err(e) => eprintln!("$ kubectl {}: {e}", args.join(" ")),
            }
        }
        self.env.dump_logs(&self.components, 40);
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_diagnostics();
        }
        let _ = self.env.kubectl().args(["delete", "namespace", &self.name, "--wait=false"]).output();
    }
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pinned Kubernetes version, read from scripts/testenv (single source of truth).
pub fn pinned_k8s_version() -> String {
    let script = repo_root().join("scripts/testenv");
    let text = std::fs::read_to_string(&script).unwrap_or_else(|e| panic!("reading {}: {e}", script.display()));
    text.lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no K8S_VERSION= line in {}", script.display()))
}

/// Builds (classic builder) a tiny Python web app `FROM` the local Python base
/// image: a threading `http.server` on 7860 serving an index.html containing
/// `marker`, listening `START_DELAY` seconds (env, default 0) after it starts
/// (a slow first start: a model load, say). Its listen backlog is 128, not `python3 -m http.server`'s 5: a
/// burst of connections to a just-woken app (what the proxy tests send)
/// would otherwise overflow it and stall in SYN retries on a loaded machine,
/// which no real app server (uvicorn, gradio: 2048) does.
pub fn build_python_app(env: &TestEnv, tag: &str, marker: &str) {
    let dir = tempfile::tempdir().expect("tempdir for the build context");
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM {}\nWORKDIR /app\nCOPY index.html /app/index.html\nEXPOSE 7860\n\
             CMD [\"python3\", \"-c\", \"import http.server as h, functools as f, os, time; \
             time.sleep(float(os.environ.get('START_DELAY', '0'))); \
             h.ThreadingHTTPServer.request_queue_size = 128; \
             h.ThreadingHTTPServer(('0.0.0.0', 7860), f.partial(h.SimpleHTTPRequestHandler, directory='/app')).serve_forever()\"]\n",
            env.python_image
        ),
    )
    .expect("writing Dockerfile");
    std::fs::write(
        dir.path().join("index.html"),
        format!("<!doctype html><title>hangar test</title><p>{marker}</p>\n"),
    )
    .expect("writing index.html");
    run_ok(env.docker().args(["build", "-q", "-t", tag]).arg(dir.path()));
}

/// A Docker container removed on drop (its logs printed if the test panicked).
pub struct Container {
    pub id: String,
    env: TestEnv,
}

impl Container {
    /// `docker run -d` with the test label (so `scripts/testenv down` can clean up after a crash).
    pub fn run(env: &TestEnv, args: &[&str]) -> Self {
        let out = run_ok(env.docker().args(["run", "-d", "--label", "hangar.dev/testenv=1"]).args(args));
        Self { id: out.trim().to_string(), env: env.clone() }
    }

    /// The loopback `host:port` published for `container_port` (e.g. "7860/tcp").
    pub fn published(&self, container_port: &str) -> String {
        let out = run_ok(self.env.docker().args(["port", &self.id, container_port]));
        out.lines()
            .find(|l| l.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no loopback port published for {container_port}: {out}"))
            .to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(out) = self.env.docker().args(["logs", "--tail", "50", &self.id]).output()
        {
            eprintln!(
                "----- docker logs {} -----\n{}{}",
                self.id,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = self.env.docker().args(["rm", "-f", &self.id]).output();
    }
}

/// Prints the tails of component logs if the test panics while this guard lives.
pub struct LogsOnPanic {
    env: TestEnv,
    components: Vec<&'static str>,
}

impl LogsOnPanic {
    pub fn new(env: &TestEnv, components: &[&'static str]) -> Self {
        Self { env: env.clone(), components: components.to_vec() }
    }
}

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.env.dump_logs(&self.components, 40);
        }
    }
}
