//! Wake benchmark on the test cluster's real node (issue #11; not a timed test).
//!
//! Floor: a plain Deployment with the very pod template of a Space (same image, probes and
//! node), scaled 0 -> 1 with a replicas patch (what `kubectl scale` sends), timed until its
//! pod is Ready and answers HTTP at its IP. Measured: a request through `hangar proxy` to
//! the same Space while it sleeps (0 replicas), timed until the response's first byte (the
//! proxy renews the Lease, the operator scales to 1, the proxy holds the request until the
//! endpoint is ready). For the static and the Gradio example Spaces. Run with the test bed
//! up:
//!
//! ```sh
//! eval "$(scripts/testenv env)"; HANGAR_BENCH_SAMPLES=5 cargo bench --bench cluster_wake
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::ffi::OsString;
use std::time::{Duration, Instant};

use hangar::space::naming::SPACE_LABEL;
use hangar::space::{Space, Stage};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::floor::{FLOOR_LABEL, floor_answering, floor_deployment, pods, scale};
use support::process::{Component, args};
use support::repo::serve_examples;
use support::space::stage_of;
use support::{TestNamespace, wait_for};

const DOMAIN: &str = "hf.test";
const MAPPING: &str =
    "requests: {cpu: 10m, memory: 64Mi}\nflavors:\n  cpu-basic:\n    nodeSelector: {hangar.dev/test-node: real}\n";

/// Scale 0 -> 1 until the pod is Ready and answers HTTP 200 on `port`.
async fn floor_sample(ns: &TestNamespace, deployment: &str, port: u16) -> Duration {
    let selector = format!("{FLOOR_LABEL}={deployment}");
    let start = Instant::now();
    scale(ns, deployment, 1).await;
    floor_answering(ns, deployment, port).await;
    let took = start.elapsed();
    scale(ns, deployment, 0).await;
    wait_for("the floor pod gone", Duration::from_secs(60), || async {
        Ok(pods(ns, &selector).await.is_empty().then_some(()))
    })
    .await;
    took
}

/// A request through the proxy to the sleeping Space, until its first byte.
async fn hangar_sample(ns: &TestNamespace, spaces: &Api<Space>, proxy: &str, space: &str) -> Duration {
    wait_for(&format!("{space} asleep"), Duration::from_secs(120), || async {
        let asleep = stage_of(spaces, space).await.map(|(s, _)| s) == Some(Stage::Sleeping)
            && pods(ns, &format!("{SPACE_LABEL}={space}")).await.is_empty();
        Ok(asleep.then_some(()))
    })
    .await;
    support::first_byte_through_proxy(proxy, &format!("{}-{space}.{DOMAIN}", ns.name)).await
}

fn summary(samples: &[Duration]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    (ms[0], ms[ms.len() / 2], ms[ms.len() - 1])
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` passes `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("cluster wake benchmark: run with `cargo bench --bench cluster_wake` against the test bed");
        return;
    }
    let samples: usize = std::env::var("HANGAR_BENCH_SAMPLES").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let ns = TestNamespace::new("wake-bench", &["kubelet", "containerd"]).await;
    ns.install_crd().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let builder = support::operator::builder_args(&ns.env);
    let builder: Vec<&str> = builder.iter().map(String::as_str).collect();
    let _operator = support::operator::Operator::start(&ns, MAPPING, &builder);
    let proxy_addr = format!("127.0.0.1:{}", support::operator::free_port());
    let admin = format!("127.0.0.1:{}", support::operator::free_port());
    let _proxy = Component::start(
        "bench-proxy",
        dir.path(),
        &args([
            "proxy",
            "--namespace",
            &ns.name,
            "--domain",
            DOMAIN,
            "--listen",
            &proxy_addr,
            "--admin-listen",
            &admin,
        ]),
        &[("KUBECONFIG", OsString::from(&ns.env.kubeconfig))],
    );

    // The examples, from a git remote on loopback, built by the operator.
    let spaces: Api<Space> = ns.api();
    let examples = ["static-site", "gradio-hello"];
    let base = serve_examples(dir.path(), &examples).await;
    for example in examples {
        let space: Space = serde_json::from_value(json!({
            "apiVersion": "hangar.dev/v1alpha1", "kind": "Space", "metadata": {"name": example},
            "spec": {"source": {"git": format!("{base}/{example}.git")}, "hardware": "cpu-basic", "sleepAfter": "1h"},
        }))
        .expect("Space");
        spaces.create(&PostParams::default(), &space).await.expect("create Space");
    }
    let mut rows = Vec::new();
    for example in examples {
        wait_for(&format!("{example} running"), Duration::from_secs(900), || async {
            Ok((stage_of(&spaces, example).await.map(|(s, _)| s) == Some(Stage::Running)).then_some(()))
        })
        .await;
        let (floor, port) = floor_deployment(&ns, example).await;
        let mut floor_samples = Vec::new();
        for _ in 0..samples {
            floor_samples.push(floor_sample(&ns, &floor, port).await);
        }
        let patch = json!({"spec": {"sleepAfter": "5s"}});
        spaces.patch(example, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("sleepAfter");
        let mut hangar_samples = Vec::new();
        for _ in 0..samples {
            hangar_samples.push(hangar_sample(&ns, &spaces, &proxy_addr, example).await);
        }
        let (f, h) = (summary(&floor_samples), summary(&hangar_samples));
        eprintln!("{example}: floor {floor_samples:?}\n{example}: hangar {hangar_samples:?}");
        rows.push(format!(
            "| {example} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:+.0} |",
            f.0,
            f.1,
            f.2,
            h.0,
            h.1,
            h.2,
            h.1 - f.1
        ));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nwake, {samples} samples each (ms, min / median / max); load average: {}", load.trim());
    println!(
        "| Space | floor: scale 0 -> 1, pod Ready + HTTP 200 | hangar: request -> first byte | median difference |"
    );
    println!("|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
