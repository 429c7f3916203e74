//! Cluster tier, real node: the frozen sleep tier (issue #12). `hangar operator`,
//! `hangar proxy` and `hangar node-agent` run as separate processes (the agent on
//! the host, as the DaemonSet would, writing the real pod cgroups); the Space's
//! pod runs on the real node and answers on its pod IP.
//!
//! What is checked from outside: the pod cgroup's `freezer.state` (cgroup v1 on
//! this machine), the pod's phase, node and restarts, the Space's status, the
//! agent's and the proxy's metrics, and HTTP answers through the proxy.

mod support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hangar::space::naming::SPACE_LABEL;
use hangar::space::{SleepTier, Space, Stage};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use support::operator::free_port;
use support::process::{Component, args};
use support::{TestNamespace, run_ok, wait_for};

const DOMAIN: &str = "hf.test";
const TOKEN: &str = "freeze-test-agent-token";
/// `cpu-basic` goes to the real node, where the pod really runs (and freezes).
const MAPPING: &str = "\
requests: {cpu: 10m, memory: 32Mi}
flavors:
  cpu-basic:
    nodeSelector: {hangar.dev/test-node: real}
";

struct Bed {
    ns: TestNamespace,
    operator: Component,
    proxy: Component,
    agent: Component,
    proxy_addr: String,
    proxy_admin: String,
    agent_addr: String,
    image: String,
    marker: String,
}

async fn setup(prefix: &str) -> Bed {
    let ns = TestNamespace::new(
        prefix,
        &["kubelet", "containerd", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "registry"],
    )
    .await;
    assert!(
        Path::new("/sys/fs/cgroup/freezer").is_dir() || Path::new("/sys/fs/cgroup/cgroup.controllers").is_file(),
        "the frozen tier needs a cgroup v1 freezer or a cgroup v2 root at /sys/fs/cgroup"
    );
    ns.install_crd().await;
    let marker = support::unique_name("frozen-app");
    let image = format!("{}/hangar-test/freeze:{}", ns.env.registry, ns.name);
    support::build_python_app(&ns.env, &image, &marker);
    run_ok(ns.env.docker().args(["push", "-q", &image]));

    let dir = ns.env.state.join("freeze-tests").join(&ns.name);
    std::fs::create_dir_all(&dir).expect("test dir");
    let token_file = dir.join("agent-token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let mapping = dir.join("hardware.yaml");
    std::fs::write(&mapping, MAPPING).expect("mapping");
    let env =
        vec![("KUBECONFIG", ns.env.kubeconfig.clone().into_os_string()), ("RUST_LOG", "info,hangar=debug".into())];

    let operator_args = args([
        "operator".into(),
        "--namespace".into(),
        ns.name.clone().into(),
        "--domain".into(),
        DOMAIN.into(),
        "--url-scheme".into(),
        "http".into(),
        "--http-addr".into(),
        format!("127.0.0.1:{}", free_port()).into(),
        "--leader-election-namespace".into(),
        ns.name.clone().into(),
        "--hardware-mapping".into(),
        mapping.into_os_string(),
    ]);
    let operator = Component::start("operator", &dir, &operator_args, &env);

    // Where the proxy looks for the node's agent: the node's InternalIP, at the port it is told.
    let agent = support::node_agent_addr(&ns).await;
    let agent_addr = agent.to_string();
    let (proxy_addr, proxy_admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut proxy_args = args(["proxy", "--namespace", &ns.name, "--domain", DOMAIN, "--listen", &proxy_addr]);
    proxy_args.extend(args(["--admin-listen", &proxy_admin, "--node-agent-port", &agent.port().to_string()]));
    proxy_args.extend(args([OsString::from("--node-agent-token-file"), token_file.clone().into_os_string()]));
    let proxy = Component::start("proxy", &dir, &proxy_args, &env);

    let mut agent_args = args(["node-agent", "--node-name", &ns.env.real_node, "--namespace", &ns.name]);
    agent_args.extend(args(["--listen", &agent_addr, "--token-file"]));
    agent_args.push(token_file.into_os_string());
    let agent = Component::start("node-agent", &dir, &agent_args, &env);
    Bed { ns, operator, proxy, agent, proxy_addr, proxy_admin, agent_addr, image, marker }
}

impl Bed {
    async fn create_space(&self, name: &str, freeze_after: &str, sleep_after: &str) {
        self.create_space_listening_after(name, freeze_after, sleep_after, 0).await;
    }

    /// A Space whose app listens `start_delay` seconds after it starts.
    async fn create_space_listening_after(&self, name: &str, freeze_after: &str, sleep_after: &str, start_delay: u32) {
        let space: Space = serde_json::from_value(json!({
            "apiVersion": "hangar.dev/v1alpha1", "kind": "Space", "metadata": {"name": name},
            "spec": {"image": self.image, "appPort": 7860, "hardware": "cpu-basic",
                     "freezeAfter": freeze_after, "sleepAfter": sleep_after, "startupTimeout": "3m",
                     "env": {"START_DELAY": start_delay.to_string()}},
        }))
        .expect("space");
        let api: Api<Space> = self.ns.api();
        api.create(&PostParams::default(), &space).await.expect("create Space");
    }

    fn url(&self, name: &str) -> String {
        format!("http://{}/spaces/{}/{name}/", self.proxy_addr, self.ns.name)
    }

    async fn space(&self, name: &str) -> Space {
        let api: Api<Space> = self.ns.api();
        api.get(name).await.expect("get Space")
    }

    async fn pods(&self, name: &str) -> Vec<Pod> {
        let api: Api<Pod> = self.ns.api();
        let pods = api.list(&ListParams::default().labels(&format!("{SPACE_LABEL}={name}"))).await.expect("pods");
        pods.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect()
    }

    /// Waits until the Space has served (RUNNING, or SLEEPING: idle time counts
    /// from readiness, so it sleeps only after it served, and its idle time may
    /// run out before this looks) and answers through the proxy (a sleeping
    /// one wakes for it).
    async fn wait_served(&self, name: &str) {
        let client = support::held_client();
        let url = self.url(name);
        wait_for(&format!("{name} to serve through the proxy"), Duration::from_secs(240), || async {
            let stage = self.space(name).await.status.and_then(|s| s.stage);
            if !matches!(stage, Some(Stage::Running | Stage::Sleeping)) {
                return Ok(None);
            }
            let r = client.get(&url).send().await?;
            Ok((r.status() == 200).then_some(()))
        })
        .await;
    }

    /// The Space's stage changes as its Events record them (reason, time), oldest first.
    async fn stage_events(&self, name: &str) -> Vec<(String, Timestamp)> {
        let api: Api<Event> = self.ns.api();
        let mut events: Vec<(String, Timestamp)> = api
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| {
                e.regarding
                    .as_ref()
                    .is_some_and(|r| r.kind.as_deref() == Some("Space") && r.name.as_deref() == Some(name))
            })
            .filter_map(|e| Some((e.reason?, e.event_time?.0)))
            .collect();
        events.sort_by_key(|(_, t)| *t);
        events
    }

    /// `hangar_proxy_wakes_total` of the Space for a tier.
    async fn wakes(&self, name: &str, tier: &str) -> u64 {
        let text = self.metrics(&self.proxy_admin).await;
        let series =
            format!(r#"hangar_proxy_wakes_total{{namespace="{}",space="{name}",tier="{tier}"}}"#, self.ns.name);
        metric(&text, &series)
    }

    /// Waits until the Space's status says Frozen and its pod's cgroup is FROZEN; returns the pod.
    async fn wait_frozen(&self, name: &str, timeout: Duration) -> Pod {
        wait_for(&format!("{name} to be frozen"), timeout, || async {
            let status = self.space(name).await.status.unwrap_or_default();
            let frozen_status = status.stage == Some(Stage::Sleeping)
                && status.sleep.as_ref().is_some_and(|s| s.tier == SleepTier::Frozen);
            let pods = self.pods(name).await;
            let [pod] = pods.as_slice() else { return Ok(None) };
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            Ok((frozen_status && freezer_state(&uid).as_deref() == Some("FROZEN")).then(|| pod.clone()))
        })
        .await
    }

    async fn metrics(&self, addr: &str) -> String {
        support::held_client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// `hangar_node_agent_thaws_total`, by the proxy's request or by a withdrawn decision.
    async fn thaws(&self) -> (u64, u64) {
        let text = self.metrics(&self.agent_addr).await;
        (
            metric(&text, r#"hangar_node_agent_thaws_total{trigger="request"}"#),
            metric(&text, r#"hangar_node_agent_thaws_total{trigger="decision"}"#),
        )
    }
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse::<f64>().unwrap_or(0.0) as u64))
        .unwrap_or(0)
}

/// The pod cgroup's `freezer.state` (v1) or `frozen 0|1` (v2) as FROZEN/THAWED; `None` without a cgroup.
fn freezer_state(uid: &str) -> Option<String> {
    let v1 = Path::new("/sys/fs/cgroup/freezer/kubepods");
    for qos in ["burstable", "besteffort", ""] {
        let dir: PathBuf =
            if qos.is_empty() { v1.join(format!("pod{uid}")) } else { v1.join(qos).join(format!("pod{uid}")) };
        if let Ok(s) = std::fs::read_to_string(dir.join("freezer.state")) {
            return Some(s.trim().to_owned());
        }
    }
    let v2 = Path::new("/sys/fs/cgroup/kubepods.slice");
    let slice = uid.replace('-', "_");
    for qos in ["burstable", "besteffort"] {
        let dir = v2.join(format!("kubepods-{qos}.slice/kubepods-{qos}-pod{slice}.slice"));
        if let Ok(events) = std::fs::read_to_string(dir.join("cgroup.events")) {
            return Some(if events.contains("frozen 1") { "FROZEN" } else { "THAWED" }.to_owned());
        }
    }
    None
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| c.restart_count).sum())
}

async fn get_ok(url: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let r = support::held_client().get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_space_freezes_and_fifty_requests_thaw_it_once_and_restarts_converge() {
    let mut bed = setup("freeze").await;
    let name = "frosty";
    bed.create_space(name, "6s", "30m").await;
    bed.wait_served(name).await;
    let before = bed.pods(name).await;
    let uid = before[0].metadata.uid.clone().expect("pod uid");

    // Idle past freezeAfter: frozen in place, the pod still scheduled and running.
    let pod = bed.wait_frozen(name, Duration::from_secs(60)).await;
    assert_eq!(pod.metadata.uid.as_deref(), Some(uid.as_str()), "the same pod, not a new one");
    assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(bed.ns.env.real_node.as_str()));
    assert_eq!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Running"));
    assert_eq!(restarts(&pod), 0);
    // The status reports the memory the frozen pod holds, as its agent measured it.
    let memory = wait_for("status.sleep.memoryBytes", Duration::from_secs(30), || async {
        let status = bed.space(name).await.status.unwrap_or_default();
        Ok(status.sleep.and_then(|s| s.memory_bytes).filter(|m| *m > 0))
    })
    .await;
    eprintln!("frozen pod holds {memory} bytes");
    let agent_metrics = bed.metrics(&bed.agent_addr).await;
    assert!(agent_metrics.contains("hangar_node_agent_frozen_memory_bytes{"), "{agent_metrics}");

    // 50 concurrent requests: one thaw, all answered by the app.
    let thaws_before = bed.thaws().await;
    let wakes_before = bed.wakes(name, "frozen").await;
    let url = bed.url(name);
    let requests = (0..50).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { get_ok(&url).await })
    });
    let results = futures::future::join_all(requests).await;
    let mut slowest = Duration::ZERO;
    for r in results {
        let (status, body, took) = r.expect("request task");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&bed.marker), "{body}");
        slowest = slowest.max(took);
    }
    eprintln!("50 requests to a frozen Space: slowest answered in {slowest:?}");
    // One thaw: the proxy's (answered once THAWED), or, when the operator withdraws its
    // decision on the renewed Lease before that request reaches the agent, the agent's own.
    let thaws = bed.thaws().await;
    eprintln!("agent thaws (request, decision): {thaws:?}, before: {thaws_before:?}");
    assert_eq!(thaws.0 + thaws.1, thaws_before.0 + thaws_before.1 + 1, "exactly one thaw for 50 requests");
    assert_eq!(bed.wakes(name, "frozen").await, wakes_before + 1, "one wake for 50 requests");
    assert_eq!(freezer_state(&uid).as_deref(), Some("THAWED"));
    // The old decision may still be on the pod for a moment: it must not freeze it again.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(freezer_state(&uid).as_deref(), Some("THAWED"), "re-frozen by the decision the thaw overrode");
    }
    wait_for("the operator to record the Space awake", Duration::from_secs(30), || async {
        let s = bed.space(name).await.status.unwrap_or_default();
        Ok((s.stage == Some(Stage::Running) && s.sleep.is_none()).then_some(()))
    })
    .await;

    // Frozen again, then every component killed: the agent comes back last, and a
    // request held meanwhile is answered once it does.
    bed.wait_frozen(name, Duration::from_secs(60)).await;
    bed.operator.kill();
    bed.proxy.kill();
    bed.agent.kill();
    bed.proxy.restart();
    let admin = bed.proxy_admin.clone();
    wait_for("the restarted proxy", Duration::from_secs(30), || async {
        Ok(support::held_client()
            .get(format!("http://{admin}/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200))
    })
    .await;
    let held = tokio::spawn({
        let url = url.clone();
        async move { get_ok(&url).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!held.is_finished(), "a frozen Space cannot answer before its agent is back");
    assert_eq!(freezer_state(&uid).as_deref(), Some("FROZEN"));
    bed.agent.restart();
    let (status, body, took) = held.await.expect("held request");
    assert_eq!(status, 200, "{body}");
    eprintln!("request held across the agent's restart answered after {took:?}");
    assert_eq!(freezer_state(&uid).as_deref(), Some("THAWED"));

    // The operator comes back last: it sees the renewed Lease and records the Space awake;
    // nothing stays frozen.
    bed.operator.restart();
    wait_for("the restarted operator to record the Space awake", Duration::from_secs(60), || async {
        let s = bed.space(name).await.status.unwrap_or_default();
        Ok((s.stage == Some(Stage::Running) && s.sleep.is_none()).then_some(()))
    })
    .await;
    let pods = bed.pods(name).await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].metadata.uid.as_deref(), Some(uid.as_str()), "the pod survived all of it");
    assert_eq!(restarts(&pods[0]), 0, "a frozen pod is never restarted by a probe");
    assert_eq!(freezer_state(&uid).as_deref(), Some("THAWED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_past_sleep_after_the_frozen_space_is_stopped_and_wakes_the_ordinary_way() {
    let bed = setup("freeze-stop").await;
    let name = "deep";
    bed.create_space(name, "3s", "15s").await;
    bed.wait_served(name).await;
    let uid = bed.pods(name).await[0].metadata.uid.clone().expect("pod uid");
    bed.wait_frozen(name, Duration::from_secs(60)).await;

    // Past sleepAfter: no pod (a frozen pod is thawed to take its SIGTERM and go).
    wait_for("the Space to be stopped with no pod", Duration::from_secs(90), || async {
        let s = bed.space(name).await.status.unwrap_or_default();
        let stopped =
            s.stage == Some(Stage::Sleeping) && s.sleep.as_ref().is_some_and(|s| s.tier == SleepTier::Stopped);
        let api: Api<Pod> = bed.ns.api();
        let all = api.list(&ListParams::default().labels(&format!("{SPACE_LABEL}={name}"))).await?;
        Ok((stopped && all.items.is_empty()).then_some(()))
    })
    .await;
    assert_eq!(freezer_state(&uid), None, "the pod's cgroup is gone");

    // The ordinary wake: a new pod, then the answer.
    let wakes_before = bed.wakes(name, "stopped").await;
    let (status, body, took) = get_ok(&bed.url(name)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&bed.marker), "{body}");
    eprintln!("stopped Space answered after {took:?}");
    assert_eq!(bed.wakes(name, "stopped").await, wakes_before + 1, "one wake");
    let pods = bed.pods(name).await;
    assert_eq!(pods.len(), 1);
    assert_ne!(pods[0].metadata.uid.as_deref(), Some(uid.as_str()), "a new pod");
}

/// Idle time counts from readiness: a Space whose first start takes longer than
/// its freeze and sleep times serves before it sleeps (it was frozen 2 s after
/// `AppStarting` when its idle time counted from creation).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_space_slower_to_start_than_its_idle_times_serves_before_it_sleeps() {
    let bed = setup("freeze-slow").await;
    let name = "slow";
    bed.create_space_listening_after(name, "2s", "6s", 12).await;
    let events = wait_for("the Space's first Sleeping event", Duration::from_secs(240), || async {
        let events = bed.stage_events(name).await;
        Ok(events.iter().any(|(reason, _)| reason == "Sleeping").then_some(events))
    })
    .await;
    let running = events.iter().position(|(reason, _)| reason == "Running");
    let sleeping = events.iter().position(|(reason, _)| reason == "Sleeping");
    assert!(running.is_some_and(|r| Some(r) < sleeping), "RUNNING before SLEEPING: {events:?}");
    let status = bed.space(name).await.status.unwrap_or_default();
    assert!(status.ready_since.is_some(), "the idle clock's start is recorded: {status:?}");

    // A request wakes it (a slow start again): held, then answered.
    let (status, body, took) = get_ok(&bed.url(name)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&bed.marker), "{body}");
    eprintln!("slow Space answered after {took:?}");
}
