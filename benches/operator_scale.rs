//! Operator scale benchmark against the real test cluster (not a timed test).
//!
//! One run measures, each in a fresh namespace (deleted, and waited for,
//! before the next step):
//!
//! 1. the floor: `kubectl apply --server-side` of N Spaces that no operator watches;
//! 2. `paused`: N paused image Spaces with `hangar operator` running (a status
//!    each and nothing else: a Space that never ran gets no Deployment, Service
//!    or Lease while paused; the bench counts them, expecting none);
//! 3. `running`: N image Spaces whose pods run on a kwok node made for the run
//!    (big enough for all of them, tainted so nothing else lands there);
//! 4. the floor again (how much the machine drifted during the run).
//!
//! For each operator variant: the time from the start of `kubectl apply` until
//! every Space has `status.observedGeneration == metadata.generation` and a
//! stage (the issue's measure), until every Space has its Deployment and Service
//! (the operator's writes done), for `running` until every Space is `RUNNING`;
//! the operator's peak RSS and its reconciles and API calls from `/metrics`.
//!
//! ```sh
//! eval "$(scripts/testenv env)"; HANGAR_BENCH_SPACES=1000 cargo bench --bench operator_scale
//! ```
//! `HANGAR_BENCH_VARIANTS=paused` (or `running`) runs one variant;
//! `HANGAR_BENCH_OPERATOR_ARGS` passes extra operator arguments;
//! `HANGAR_BENCH_BASELINE_BIN=/path/to/older/hangar` also runs each variant with
//! that binary, right before this build's, for a before/after in one run.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use hangar::space::{Space, Stage};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Longest wait for one variant.
const LIMIT: Duration = Duration::from_secs(1800);

fn kubectl() -> Command {
    let bin = std::env::var("HANGAR_TESTENV_BIN").unwrap_or_default();
    Command::new(std::path::Path::new(&bin).join("kubectl"))
}

fn kubectl_quiet(args: &[&str]) -> Result<()> {
    let out = kubectl().args(args).stdout(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn manifests(namespace: &str, n: usize, paused: bool) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {{name: s{i}, namespace: {namespace}}}\n\
                 spec: {{image: registry.invalid/demo:1, hardware: cpu-basic, sleepAfter: never, paused: {paused}}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Creates the namespace, then times `kubectl apply --server-side` of N Spaces into it.
fn apply(namespace: &str, n: usize, paused: bool, dir: &std::path::Path) -> Result<Duration> {
    let file = dir.join(format!("{namespace}.yaml"));
    std::fs::write(&file, manifests(namespace, n, paused))?;
    kubectl_quiet(&["create", "namespace", namespace])?;
    let start = Instant::now();
    let out = kubectl().args(["apply", "--server-side", "-f"]).arg(&file).stdout(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
    }
    Ok(start.elapsed())
}

/// Deletes a namespace and waits until it is gone, so the next step starts on a quiet apiserver.
fn delete_namespace(namespace: &str) {
    let _ = kubectl()
        .args(["delete", "namespace", namespace, "--wait=true", "--timeout=600s"])
        .stdout(Stdio::null())
        .status();
}

/// A kwok node for the `running` variant: room for every pod, tainted for this run only.
fn bench_node(name: &str, pods: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations: {{kwok.x-k8s.io/node: fake}}\n  labels:\n    \
         kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\n    kubernetes.io/arch: amd64\n    \
         hangar.dev/bench-node: {name}\nspec:\n  taints:\n  - {{key: hangar.dev/bench, value: {name}, effect: NoSchedule}}\n\
         status:\n  capacity: &cap {{cpu: \"10000\", memory: 100Ti, pods: \"{pods}\"}}\n  allocatable: *cap\n"
    )
}

fn mapping(node: &str) -> String {
    format!(
        "requests: {{cpu: 1m, memory: 1Mi}}\nflavors:\n  cpu-basic:\n    nodeSelector: {{hangar.dev/bench-node: {node}}}\n    \
         tolerations: [{{key: hangar.dev/bench, operator: Equal, value: {node}, effect: NoSchedule}}]\n"
    )
}

fn peak_rss_kib(child: &Child) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) the process used so far.
fn cpu_seconds(child: &Child) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).ok()?;
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// When each milestone was reached, counted from the start of `kubectl apply`.
#[derive(Default)]
struct Progress {
    status: HashSet<String>,
    running: HashSet<String>,
    deployments: HashSet<String>,
    services: HashSet<String>,
    at_status: Option<Duration>,
    at_running: Option<Duration>,
    at_objects: Option<Duration>,
}

impl Progress {
    fn mark(&mut self, n: usize, start: Instant) {
        let now = start.elapsed();
        if self.status.len() >= n {
            self.at_status.get_or_insert(now);
        }
        if self.running.len() >= n {
            self.at_running.get_or_insert(now);
        }
        if self.deployments.len() >= n && self.services.len() >= n {
            self.at_objects.get_or_insert(now);
        }
    }
}

/// Follows the namespace through watches (no polling lists: those would load
/// the apiserver being measured) and records the milestones.
fn follow(client: &Client, namespace: &str, n: usize, start: Instant, progress: &Arc<Mutex<Progress>>) {
    let spaces: Api<Space> = Api::namespaced(client.clone(), namespace);
    let p = progress.clone();
    tokio::spawn(watcher(spaces, watcher::Config::default()).applied_objects().try_for_each(move |s| {
        let status = s.status.clone().unwrap_or_default();
        if let Ok(mut p) = p.lock() {
            if status.stage.is_some() && status.observed_generation == s.metadata.generation {
                p.status.insert(s.name_any());
            }
            if status.stage == Some(Stage::Running) {
                p.running.insert(s.name_any());
            }
            p.mark(n, start);
        }
        futures::future::ready(Ok(()))
    }));
    let deployments: Api<PartialObjectMeta<Deployment>> = Api::namespaced(client.clone(), namespace);
    let p = progress.clone();
    tokio::spawn(watcher(deployments, watcher::Config::default()).applied_objects().try_for_each(move |d| {
        if let Ok(mut p) = p.lock() {
            p.deployments.insert(d.name_any());
            p.mark(n, start);
        }
        futures::future::ready(Ok(()))
    }));
    let services: Api<PartialObjectMeta<Service>> = Api::namespaced(client.clone(), namespace);
    let p = progress.clone();
    tokio::spawn(watcher(services, watcher::Config::default()).applied_objects().try_for_each(move |s| {
        if let Ok(mut p) = p.lock() {
            p.services.insert(s.name_any());
            p.mark(n, start);
        }
        futures::future::ready(Ok(()))
    }));
}

/// `hangar_operator_<name>` samples from the operator's /metrics, summed per label set.
async fn scrape(addr: &str) -> Vec<(String, f64)> {
    let Ok(body) = http_get(addr, "/metrics").await else { return Vec::new() };
    body.lines()
        .filter(|l| l.starts_with("hangar_operator_") && !l.contains("_bucket"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim_start_matches("hangar_operator_").to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A plain HTTP/1.0 GET on loopback (the bench needs no HTTP client for two requests).
async fn http_get(addr: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    if !body.starts_with("HTTP/1.0 200") && !body.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", body.lines().next().unwrap_or_default()).into());
    }
    Ok(body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

struct Outcome {
    applied: Duration,
    status: Option<Duration>,
    objects: Option<Duration>,
    /// Deployments and Services seen in the namespace.
    made: (usize, usize),
    running: Option<Duration>,
    rss_kib: u64,
    cpu_seconds: f64,
    metrics: Vec<(String, f64)>,
}

async fn run_variant(
    client: &Client,
    variant: &str,
    bin: &str,
    namespace: &str,
    n: usize,
    dir: &std::path::Path,
    mapping_file: &std::path::Path,
) -> Result<Outcome> {
    let paused = variant == "paused";
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let extra = std::env::var("HANGAR_BENCH_OPERATOR_ARGS").unwrap_or_default();
    let log = std::fs::File::create(dir.join(format!("{variant}.log")))?;
    let mut operator = Command::new(bin)
        .args(["operator", "--namespace", namespace, "--http-addr", &addr])
        .arg("--hardware-mapping")
        .arg(mapping_file)
        .args(extra.split_whitespace())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let ready = Instant::now();
    while http_get(&addr, "/readyz").await.is_err() && ready.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let progress = Arc::new(Mutex::new(Progress::default()));
    let start = Instant::now();
    follow(client, namespace, n, start, &progress);
    let outcome = async {
        let applied = apply(namespace, n, paused, dir)?;
        loop {
            let done = {
                let p = progress.lock().map_err(|_| "progress lock")?;
                p.at_status.is_some() && (paused || (p.at_objects.is_some() && p.at_running.is_some()))
            };
            if done || start.elapsed() > LIMIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if paused {
            // Objects written after the last status would still show up now.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let metrics = scrape(&addr).await;
        let p = progress.lock().map_err(|_| "progress lock")?;
        Ok::<_, Box<dyn std::error::Error>>(Outcome {
            applied,
            status: p.at_status,
            objects: p.at_objects,
            made: (p.deployments.len(), p.services.len()),
            running: p.at_running.filter(|_| !paused),
            rss_kib: peak_rss_kib(&operator).unwrap_or(0),
            cpu_seconds: cpu_seconds(&operator).unwrap_or(0.0),
            metrics,
        })
    }
    .await;
    let _ = operator.kill();
    let _ = operator.wait();
    outcome
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "not reached".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn report(variant: &str, build: &str, n: usize, floor: Duration, o: &Outcome) {
    let ratio = |d: Option<Duration>| {
        d.map_or_else(String::new, |d| format!(" ({:.2}x the floor)", d.as_secs_f64() / floor.as_secs_f64()))
    };
    println!("== {variant} ({build}): {n} Spaces");
    println!("  kubectl apply (operator running):            {:.1} s", o.applied.as_secs_f64());
    println!("  all with stage + observedGeneration:         {}{}", secs(o.status), ratio(o.status));
    println!("  Deployments / Services made:                 {} / {}", o.made.0, o.made.1);
    println!("  all with Deployment + Service:               {}{}", secs(o.objects), ratio(o.objects));
    if variant == "running" {
        println!("  all RUNNING:                                 {}{}", secs(o.running), ratio(o.running));
    }
    println!("  operator peak RSS:                           {:.1} MiB", o.rss_kib as f64 / 1024.0);
    println!("  operator CPU time:                           {:.1} s", o.cpu_seconds);
    let get = |name: &str| o.metrics.iter().filter(|(k, _)| k.starts_with(name)).map(|(_, v)| v).sum::<f64>();
    let reconciles = get("reconciles_total");
    println!("  reconciles: {reconciles} ({:.2} per Space)", reconciles / n as f64);
    let calls = get("api_calls_total");
    println!(
        "  API calls by reconciles: {calls} ({:.2} per Space, {:.2} per reconcile)",
        calls / n as f64,
        calls / reconciles.max(1.0)
    );
    for (name, value) in o.metrics.iter().filter(|(k, _)| k.starts_with("api_calls_total{")) {
        println!("    {name}: {value}");
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` (which
    // passes `--bench`) should spend minutes creating thousands of Spaces.
    if !std::env::args().any(|a| a == "--bench") {
        println!("operator scale benchmark: run with `cargo bench --bench operator_scale` against the test bed");
        return Ok(());
    }
    let n: usize = std::env::var("HANGAR_BENCH_SPACES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let variants = std::env::var("HANGAR_BENCH_VARIANTS").unwrap_or_else(|_| "paused,running".into());
    let client =
        Client::try_default().await.map_err(|e| format!("the benchmark needs the test bed (KUBECONFIG): {e}"))?;
    let dir = tempfile::tempdir()?;
    let stamp = std::process::id();
    let node = format!("bench-node-{stamp}");
    let mapping_file = dir.path().join("mapping.yaml");
    std::fs::write(&mapping_file, mapping(&node))?;

    let floor_ns = format!("bench-floor-{stamp}");
    let floor = apply(&floor_ns, n, true, dir.path());
    delete_namespace(&floor_ns);
    let floor = floor?;
    println!("floor: kubectl apply of {n} Spaces, no operator: {:.1} s", floor.as_secs_f64());

    let mut builds = Vec::new();
    if let Ok(bin) = std::env::var("HANGAR_BENCH_BASELINE_BIN") {
        builds.push(("baseline".to_owned(), bin));
    }
    builds.push(("this build".to_owned(), env!("CARGO_BIN_EXE_hangar").to_owned()));
    let mut failed = None;
    let runs =
        variants.split(',').map(str::trim).filter(|v| !v.is_empty()).flat_map(|v| builds.iter().map(move |b| (v, b)));
    for (i, (variant, (build, bin))) in runs.enumerate() {
        let namespace = format!("bench-{variant}-{stamp}-{i}");
        if variant == "running" {
            let file = dir.path().join("node.yaml");
            std::fs::write(&file, bench_node(&node, n + 10))?;
            kubectl_quiet(&["apply", "-f", &file.to_string_lossy()])?;
            kubectl_quiet(&["wait", "--for=condition=Ready", &format!("node/{node}"), "--timeout=60s"])?;
        }
        let outcome = run_variant(&client, variant, bin, &namespace, n, dir.path(), &mapping_file).await;
        let cleanup = Instant::now();
        delete_namespace(&namespace);
        if variant == "running" {
            let _ = kubectl().args(["delete", "node", &node, "--wait=true"]).stdout(Stdio::null()).status();
        }
        match outcome {
            Ok(o) => {
                report(variant, build, n, floor, &o);
                if o.status.is_none() || (variant == "running" && (o.objects.is_none() || o.running.is_none())) {
                    failed = Some(format!("{variant} ({build}): not every Space got there within {LIMIT:?}"));
                }
                if variant == "paused" && build == "this build" && o.made != (0, 0) {
                    failed = Some(format!("paused: Spaces that never ran got objects: {:?}", o.made));
                }
            }
            Err(e) => failed = Some(format!("{variant} ({build}): {e}")),
        }
        println!("  (namespace deleted in {:.1} s)", cleanup.elapsed().as_secs_f64());
    }

    let again_ns = format!("bench-floor2-{stamp}");
    let again = apply(&again_ns, n, true, dir.path());
    delete_namespace(&again_ns);
    let again = again?;
    println!("floor again at the end: {:.1} s", again.as_secs_f64());
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
