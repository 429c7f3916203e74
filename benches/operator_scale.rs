//! Operator scale benchmark against the real test cluster (not a timed test).
//!
//! Baseline: `kubectl apply` of N Space objects with no operator running (the
//! apiserver's floor). Measured: `kubectl apply` of the same N Spaces with
//! `hangar operator` running, until every Space has
//! `status.observedGeneration == metadata.generation` and a stage; plus the
//! operator's peak RSS. Run with the test bed up:
//!
//! ```sh
//! eval "$(scripts/testenv env)"; HANGAR_BENCH_SPACES=1000 cargo bench --bench operator_scale
//! ```

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hangar::space::Space;
use kube::api::ListParams;
use kube::{Api, Client};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const MAPPING: &str = "requests: {cpu: 1m, memory: 1Mi}\nflavors:\n  cpu-basic:\n    nodeSelector: {type: kwok}\n";

fn kubectl() -> Command {
    let bin = std::env::var("HANGAR_TESTENV_BIN").unwrap_or_default();
    Command::new(std::path::Path::new(&bin).join("kubectl"))
}

fn manifests(namespace: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {{name: s{i}, namespace: {namespace}}}\n\
                 spec: {{image: registry.invalid/demo:1, hardware: cpu-basic, sleepAfter: never}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn apply(namespace: &str, n: usize, dir: &std::path::Path) -> Result<Duration> {
    let file = dir.join(format!("{namespace}.yaml"));
    std::fs::write(&file, manifests(namespace, n))?;
    let status = kubectl().args(["create", "namespace", namespace]).stdout(Stdio::null()).status()?;
    if !status.success() {
        return Err(format!("create namespace {namespace}").into());
    }
    let start = Instant::now();
    let out = kubectl().args(["apply", "--server-side", "-f"]).arg(&file).stdout(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
    }
    Ok(start.elapsed())
}

fn peak_rss_kib(child: &Child) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn all_reconciled(client: &Client, namespace: &str, n: usize) -> Result<usize> {
    let api: Api<Space> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&ListParams::default()).await?;
    let done = list
        .items
        .iter()
        .filter(|s| {
            let status = s.status.as_ref();
            status.and_then(|s| s.stage).is_some()
                && status.and_then(|s| s.observed_generation) == s.metadata.generation
        })
        .count();
    Ok(n.saturating_sub(done))
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` (which
    // passes `--bench`) should spend minutes creating a thousand Spaces.
    if !std::env::args().any(|a| a == "--bench") {
        println!("operator scale benchmark: run with `cargo bench --bench operator_scale` against the test bed");
        return Ok(());
    }
    let n: usize = std::env::var("HANGAR_BENCH_SPACES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let bin = env!("CARGO_BIN_EXE_hangar");
    let client =
        Client::try_default().await.map_err(|e| format!("the benchmark needs the test bed (KUBECONFIG): {e}"))?;
    let dir = tempfile::tempdir()?;
    let stamp = std::process::id();
    let (floor_ns, op_ns) = (format!("bench-floor-{stamp}"), format!("bench-op-{stamp}"));

    let floor = apply(&floor_ns, n, dir.path())?;
    println!("baseline: kubectl apply of {n} Spaces, no operator: {floor:.2?}");

    let mapping = dir.path().join("mapping.yaml");
    std::fs::write(&mapping, MAPPING)?;
    let mut operator = Command::new(bin)
        .args(["operator", "--namespace", &op_ns, "--http-addr", "127.0.0.1:0"])
        .arg("--hardware-mapping")
        .arg(&mapping)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("start {bin}: {e}"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let applied = apply(&op_ns, n, dir.path())?;
    let mut left = n;
    while left > 0 && start.elapsed() < Duration::from_secs(1200) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = all_reconciled(&client, &op_ns, n).await?;
    }
    let reconciled = start.elapsed();
    let rss = peak_rss_kib(&operator).unwrap_or(0);
    let _ = operator.kill();
    let _ = operator.wait();
    for ns in [&floor_ns, &op_ns] {
        let _ = kubectl().args(["delete", "namespace", ns, "--wait=false"]).stdout(Stdio::null()).status();
    }
    if left > 0 {
        return Err(format!("{left} of {n} Spaces not reconciled after {reconciled:?}").into());
    }
    println!(
        "hangar operator: {n} Spaces applied in {applied:.2?}, all reconciled (stage + observedGeneration) in {reconciled:.2?}"
    );
    println!("ratio to the floor: {:.2}x", reconciled.as_secs_f64() / floor.as_secs_f64());
    println!("operator peak RSS: {:.1} MiB", rss as f64 / 1024.0);
    Ok(())
}
