//! Two-tier wake benchmark on the test cluster's real node (issue #12; not a timed test).
//!
//! In one run, for the static and the Gradio example Spaces (built by the operator from a
//! git remote on loopback), time to the first byte of a request:
//!
//! - **frozen, through hangar**: the Space idle past `freezeAfter` (its pod cgroup FROZEN by
//!   `hangar node-agent`), a request through `hangar proxy` (which asks the agent to thaw,
//!   then forwards to the pod IP).
//! - **frozen floor**: the same pod template as a plain Deployment; its cgroup frozen by
//!   hand, then `THAWED` written by hand and the pod IP asked at once.
//! - **stopped, through hangar**: the Space idle past `sleepAfter` (no pod), a request
//!   through the proxy (Lease renewed, operator scales to 1, request held until ready).
//! - **stopped floor**: the plain Deployment scaled 0 -> 1, until its pod answers HTTP 200.
//!
//! ```sh
//! eval "$(scripts/testenv env)"; HANGAR_BENCH_SAMPLES=5 cargo bench --bench freeze_wake
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hangar::space::naming::SPACE_LABEL;
use hangar::space::{SleepTier, Space, Stage};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::floor::{FLOOR_LABEL, floor_answering, floor_deployment, pods, scale};
use support::process::{Component, args};
use support::repo::serve_examples;
use support::{TestNamespace, wait_for};

const DOMAIN: &str = "hf.test";
const MAPPING: &str =
    "requests: {cpu: 10m, memory: 64Mi}\nflavors:\n  cpu-basic:\n    nodeSelector: {hangar.dev/test-node: real}\n";
const TOKEN: &str = "freeze-bench-token";

/// The pod's cgroup v1 freezer directory (this machine), or its v2 directory.
fn freezer_dir(uid: &str) -> Option<(PathBuf, bool)> {
    let v1 = Path::new("/sys/fs/cgroup/freezer/kubepods");
    for qos in ["burstable", "besteffort", ""] {
        let dir = if qos.is_empty() { v1.join(format!("pod{uid}")) } else { v1.join(qos).join(format!("pod{uid}")) };
        if dir.join("freezer.state").is_file() {
            return Some((dir, true));
        }
    }
    let slice = uid.replace('-', "_");
    for qos in ["burstable", "besteffort"] {
        let dir = Path::new("/sys/fs/cgroup/kubepods.slice")
            .join(format!("kubepods-{qos}.slice/kubepods-{qos}-pod{slice}.slice"));
        if dir.join("cgroup.freeze").is_file() {
            return Some((dir, false));
        }
    }
    None
}

fn is_frozen(dir: &Path, v1: bool) -> bool {
    if v1 {
        std::fs::read_to_string(dir.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN")
    } else {
        std::fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|s| s.contains("frozen 1"))
    }
}

fn set_frozen(dir: &Path, v1: bool, frozen: bool) {
    let (file, value) = match (v1, frozen) {
        (true, true) => ("freezer.state", "FROZEN"),
        (true, false) => ("freezer.state", "THAWED"),
        (false, true) => ("cgroup.freeze", "1"),
        (false, false) => ("cgroup.freeze", "0"),
    };
    std::fs::write(dir.join(file), value).unwrap_or_else(|e| panic!("writing {file} in {}: {e}", dir.display()));
}

/// Until the floor has no pod but terminating ones (a loaded kubelet can take minutes
/// to finish those; they do not change what the next scale-up measures).
async fn floor_gone(ns: &TestNamespace, deployment: &str) {
    let selector = format!("{FLOOR_LABEL}={deployment}");
    wait_for("the floor pod terminating", Duration::from_secs(300), || async {
        Ok(pods(ns, &selector).await.is_empty().then_some(()))
    })
    .await;
}

/// Stopped floor: scale 0 -> 1 until the pod is Ready and answers HTTP 200.
async fn floor_scale_sample(ns: &TestNamespace, deployment: &str, port: u16) -> Duration {
    let start = Instant::now();
    scale(ns, deployment, 1).await;
    floor_answering(ns, deployment, port).await;
    let took = start.elapsed();
    scale(ns, deployment, 0).await;
    floor_gone(ns, deployment).await;
    took
}

/// Frozen floor: freeze the running floor pod's cgroup by hand, then thaw it by hand and
/// ask its IP at once, until the response's first byte.
async fn floor_thaw_sample(pod: &Pod, port: u16) -> Duration {
    let uid = pod.metadata.uid.as_deref().expect("pod uid");
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("pod IP");
    let (dir, v1) = freezer_dir(uid).expect("the floor pod's cgroup");
    set_frozen(&dir, v1, true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_frozen(&dir, v1) {
        assert!(Instant::now() < deadline, "the floor pod did not freeze");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = support::held_client();
    let start = Instant::now();
    set_frozen(&dir, v1, false);
    let response = http.get(format!("http://{ip}:{port}/")).send().await.expect("floor request");
    let took = start.elapsed();
    assert_eq!(response.status().as_u16(), 200);
    took
}

async fn space_status(spaces: &Api<Space>, name: &str) -> hangar::space::SpaceStatus {
    spaces.get(name).await.ok().and_then(|s| s.status).unwrap_or_default()
}

async fn through_proxy(ns: &TestNamespace, proxy: &str, space: &str) -> Duration {
    support::first_byte_through_proxy(proxy, &format!("{}-{space}.{DOMAIN}", ns.name)).await
}

/// A request through the proxy to the frozen Space (status Frozen, cgroup FROZEN).
async fn frozen_sample(ns: &TestNamespace, spaces: &Api<Space>, proxy: &str, space: &str) -> Duration {
    wait_for(&format!("{space} frozen"), Duration::from_secs(120), || async {
        let status = space_status(spaces, space).await;
        let tier = status.sleep.map(|s| s.tier);
        let pods = pods(ns, &format!("{SPACE_LABEL}={space}")).await;
        let frozen = pods.iter().all(|p| {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            freezer_dir(&uid).is_some_and(|(dir, v1)| is_frozen(&dir, v1))
        });
        Ok((tier == Some(SleepTier::Frozen) && pods.len() == 1 && frozen).then_some(()))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    through_proxy(ns, proxy, space).await
}

/// A request through the proxy to the stopped Space (no pod).
async fn stopped_sample(ns: &TestNamespace, spaces: &Api<Space>, proxy: &str, space: &str) -> Duration {
    wait_for(&format!("{space} stopped"), Duration::from_secs(300), || async {
        let status = space_status(spaces, space).await;
        let api: Api<Pod> = ns.api();
        let all = api.list(&ListParams::default().labels(&format!("{SPACE_LABEL}={space}"))).await?;
        let stopped = status.stage == Some(Stage::Sleeping)
            && status.sleep.map(|s| s.tier) == Some(SleepTier::Stopped)
            && all.items.is_empty();
        Ok(stopped.then_some(()))
    })
    .await;
    through_proxy(ns, proxy, space).await
}

fn summary(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "not measured (timed out)".to_owned();
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    format!("{:.0} / **{:.0}** / {:.0} (n={})", ms[0], ms[ms.len() / 2], ms[ms.len() - 1], ms.len())
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` passes `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("freeze wake benchmark: run with `cargo bench --bench freeze_wake` against the test bed");
        return;
    }
    let samples: usize = std::env::var("HANGAR_BENCH_SAMPLES").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let ns = TestNamespace::new("freeze-bench", &["kubelet", "containerd"]).await;
    ns.install_crd().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).expect("token");
    let builder = support::operator::builder_args(&ns.env);
    let builder: Vec<&str> = builder.iter().map(String::as_str).collect();
    let _operator = support::operator::Operator::start(&ns, MAPPING, &builder);
    let env = [("KUBECONFIG", OsString::from(&ns.env.kubeconfig))];
    let proxy_addr = format!("127.0.0.1:{}", support::operator::free_port());
    let admin = format!("127.0.0.1:{}", support::operator::free_port());
    // The proxy finds the agent at the node's InternalIP and the port it is told.
    let agent = support::node_agent_addr(&ns).await;
    let agent_addr = agent.to_string();
    let mut proxy_args =
        args(["proxy", "--namespace", &ns.name, "--domain", DOMAIN, "--listen", &proxy_addr, "--admin-listen", &admin]);
    proxy_args.extend(args(["--node-agent-port", &agent.port().to_string()]));
    proxy_args.extend(args([OsString::from("--node-agent-token-file"), token_file.clone().into_os_string()]));
    let _proxy = Component::start("bench-proxy", dir.path(), &proxy_args, &env);
    let mut agent_args =
        args(["node-agent", "--node-name", &ns.env.real_node, "--namespace", &ns.name, "--listen", &agent_addr]);
    agent_args.extend(args([OsString::from("--token-file"), token_file.into_os_string()]));
    let mut agent = Component::start("bench-node-agent", dir.path(), &agent_args, &env);

    // The examples, from a git remote on loopback, built by the operator.
    let spaces: Api<Space> = ns.api();
    let examples = ["static-site", "gradio-hello"];
    let base = serve_examples(dir.path(), &examples).await;
    for example in examples {
        let space: Space = serde_json::from_value(json!({
            "apiVersion": "hangar.dev/v1alpha1", "kind": "Space", "metadata": {"name": example},
            "spec": {"source": {"git": format!("{base}/{example}.git")}, "hardware": "cpu-basic",
                     "freezeAfter": "never", "sleepAfter": "1h"},
        }))
        .expect("Space");
        spaces.create(&PostParams::default(), &space).await.expect("create Space");
    }
    let mut rows = Vec::new();
    let budget = Duration::from_secs(240);
    for example in examples {
        wait_for(&format!("{example} running"), Duration::from_secs(900), || async {
            Ok((space_status(&spaces, example).await.stage == Some(Stage::Running)).then_some(()))
        })
        .await;
        let (floor, port) = floor_deployment(&ns, example).await;

        // hangar, frozen tier: idle 3 s -> frozen; each request thaws it, it refreezes.
        let patch = json!({"spec": {"freezeAfter": "3s"}});
        spaces.patch(example, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("freezeAfter");
        let mut frozen = Vec::new();
        for _ in 0..samples {
            frozen.push(frozen_sample(&ns, &spaces, &proxy_addr, example).await);
        }
        eprintln!("{example}: frozen {frozen:?}");

        // Frozen floor, on the very pod: the tier off and the agent stopped (so nothing
        // of hangar touches the cgroup), frozen and thawed by hand.
        let patch = json!({"spec": {"freezeAfter": "never"}});
        spaces.patch(example, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("freezeAfter");
        wait_for(&format!("{example} awake"), Duration::from_secs(60), || async {
            let status = space_status(&spaces, example).await;
            Ok((status.stage == Some(Stage::Running) && status.sleep.is_none()).then_some(()))
        })
        .await;
        agent.kill();
        let pod = pods(&ns, &format!("{SPACE_LABEL}={example}")).await.into_iter().next().expect("the Space's pod");
        let mut floor_thaw = Vec::new();
        for _ in 0..samples {
            floor_thaw.push(floor_thaw_sample(&pod, port).await);
        }
        agent.restart();
        eprintln!("{example}: floor thaw {floor_thaw:?}");

        // Floor of the stopped tier: needs the controller-manager (Deployment -> ReplicaSet
        // -> pod), which other runs on this test bed may swamp: bounded, reported if cut.
        let mut floor_scale = Vec::new();
        for _ in 0..samples {
            match tokio::time::timeout(budget, floor_scale_sample(&ns, &floor, port)).await {
                Ok(d) => floor_scale.push(d),
                Err(_) => break,
            }
        }
        scale(&ns, &floor, 0).await;
        eprintln!("{example}: floor scale {floor_scale:?}");
        // hangar, stopped tier: no freeze, stopped after 10 s idle (longer than a Gradio
        // start on a loaded machine, so a wake is not overtaken by the next stop).
        let patch = json!({"spec": {"freezeAfter": "never", "sleepAfter": "10s"}});
        spaces.patch(example, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("sleepAfter");
        let mut stopped = Vec::new();
        for _ in 0..samples {
            match tokio::time::timeout(budget, stopped_sample(&ns, &spaces, &proxy_addr, example)).await {
                Ok(d) => stopped.push(d),
                Err(_) => break,
            }
        }
        eprintln!("{example}: stopped {stopped:?}");
        rows.push(format!(
            "| {example} | {} | {} | {} | {} |",
            summary(&floor_thaw),
            summary(&frozen),
            summary(&floor_scale),
            summary(&stopped)
        ));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\ntime to first byte, {samples} samples each (ms, min / **median** / max); load average: {}",
        load.trim()
    );
    println!(
        "| Space | frozen floor: THAWED by hand -> pod IP | frozen: request through hangar | stopped floor: scale 0 -> 1 -> pod IP | stopped: request through hangar |"
    );
    println!("|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
