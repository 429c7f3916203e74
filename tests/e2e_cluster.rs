//! A Space's whole life in the cluster, on the real node (issue #11): push, build, run,
//! route, roll out, sleep, wake, private and paused, component restarts, deletion.
//!
//! Nothing is simulated but DNS (the Python client resolves `*.hf.test` to loopback, where
//! the proxy listens). The operator, the proxy and the webhook run as separate `hangar`
//! processes with the chart's ServiceAccount permissions: the chart is installed with its
//! RBAC (components scaled to 0) and each process gets a kubeconfig holding its
//! ServiceAccount's token. The example Gradio Space (`examples/spaces/gradio-hello`) is
//! served from a git remote on loopback, built by the operator on the Docker engine,
//! pushed to the test registry and pulled by the real node; clients are the real
//! `gradio_client` from PyPI (the test bed's venv) and plain HTTP.

mod support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hangar::space::naming::{SPACE_LABEL, activity_lease_name, workload_name};
use hangar::space::{Space, Stage};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use support::gradio::{ClientRun, assert_streamed, push_delivery};
use support::process::{Component, args};
use support::repo::{bare_clone, commit_file, copy_dir, git, publish, serve_dumb_http};
use support::space::{stage_of, wait_stage};
use support::{TestNamespace, repo_root, run, run_ok, wait_for};

const DOMAIN: &str = "hf.test";
const RELEASE: &str = "e2e";
const WEBHOOK_SECRET: &str = "e2e-webhook-secret";
/// `cpu-basic` goes to the real node (the Space's pod really runs and answers).
const MAPPING: &str = "\
requests: {cpu: 10m, memory: 64Mi}
flavors:
  cpu-basic:
    nodeSelector: {hangar.dev/test-node: real}
";

/// The three components, as processes, and where they listen.
struct Hangar {
    operator: Component,
    proxy: Component,
    webhook: Component,
    /// `127.0.0.1:port` of the proxy's Spaces listener.
    proxy_addr: String,
    proxy_admin: String,
    webhook_url: String,
    /// `host:port` of the operator's /metrics and logs API.
    operator_http: String,
}

fn free_port() -> u16 {
    support::operator::free_port()
}

/// Installs the chart's RBAC for this namespace (no component pods) and starts the three
/// components as processes under their ServiceAccounts.
fn start_hangar(ns: &TestNamespace, dir: &Path) -> Hangar {
    let helm_home = dir.join("helm");
    let values = json!({
        "domain": DOMAIN, "urlScheme": "http", "watchNamespace": ns.name,
        "operator": {"replicas": 0},
        "proxy": {"replicas": 0},
        "webhook": {"replicas": 0, "secret": {"value": WEBHOOK_SECRET}},
    });
    let values_file = dir.join("values.yaml");
    std::fs::write(&values_file, serde_yaml_ng::to_string(&values).expect("values yaml")).expect("write values");
    run_ok(
        ns.env
            .helm(&helm_home)
            .args(["install", RELEASE, "-n", &ns.name, "--skip-crds"])
            .arg(repo_root().join("charts/hangar"))
            .arg("-f")
            .arg(&values_file),
    );
    let kubeconfig = |component: &str| {
        let path = support::chart::service_account_kubeconfig(ns, &format!("{RELEASE}-hangar-{component}"), dir);
        vec![("KUBECONFIG", path.into_os_string()), ("RUST_LOG", OsString::from("info,hangar=debug"))]
    };

    let mapping = dir.join("hardware.yaml");
    std::fs::write(&mapping, MAPPING).expect("write mapping");
    let operator_http = format!("127.0.0.1:{}", free_port());
    let mut operator_args = args([
        "operator",
        "--namespace",
        &ns.name,
        "--domain",
        DOMAIN,
        "--url-scheme",
        "http",
        "--http-addr",
        &operator_http,
        "--leader-election-namespace",
        &ns.name,
        "--identity",
        "e2e-operator",
    ]);
    operator_args.extend(args(support::operator::builder_args(&ns.env)));
    operator_args.extend(args([OsString::from("--hardware-mapping"), mapping.into_os_string()]));
    // The key private Spaces' token hashes are made with, shared with the proxy.
    let token_key = support::chart::token_key_file(dir);
    operator_args.extend(args([OsString::from("--token-key-file"), token_key.clone().into_os_string()]));
    let operator = Component::start("operator", dir, &operator_args, &kubeconfig("operator"));

    let (proxy_addr, proxy_admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let proxy_args = args([
        "proxy",
        "--namespace",
        &ns.name,
        "--domain",
        DOMAIN,
        "--listen",
        &proxy_addr,
        "--admin-listen",
        &proxy_admin,
    ]);
    let mut proxy_args = proxy_args;
    proxy_args.extend(args([OsString::from("--token-key-file"), token_key.into_os_string()]));
    let proxy = Component::start("proxy", dir, &proxy_args, &kubeconfig("proxy"));

    let secret_file = dir.join("webhook-secret");
    std::fs::write(&secret_file, WEBHOOK_SECRET).expect("write webhook secret");
    let webhook_addr = format!("127.0.0.1:{}", free_port());
    let webhook_args = args([OsString::from("webhook"), "--listen".into(), webhook_addr.clone().into()])
        .into_iter()
        .chain(args([OsString::from("--secret-file"), secret_file.into_os_string()]))
        .collect::<Vec<_>>();
    let webhook = Component::start("webhook", dir, &webhook_args, &kubeconfig("webhook"));
    Hangar {
        operator,
        proxy,
        webhook,
        proxy_addr,
        proxy_admin,
        webhook_url: format!("http://{webhook_addr}/webhooks/hub"),
        operator_http,
    }
}

/// The real `gradio_client` through the proxy; `*.hf.test` resolves to loopback.
async fn gradio_client(url: &str, count: u32) -> ClientRun {
    support::gradio::gradio_client(url, count, DOMAIN, "127.0.0.1").await
}

async fn space_pods(ns: &TestNamespace, name: &str) -> Vec<Pod> {
    let pods: Api<Pod> = ns.api();
    pods.list(&ListParams::default().labels(&format!("{SPACE_LABEL}={name}"))).await.expect("list pods").items
}

/// Waits until the Space is `SLEEPING` and none of its pods is left.
async fn wait_asleep(ns: &TestNamespace, spaces: &Api<Space>, name: &str) {
    wait_stage(spaces, name, Stage::Sleeping, Duration::from_secs(120)).await;
    wait_for(&format!("{name}'s pods gone"), Duration::from_secs(60), || async {
        Ok(space_pods(ns, name).await.is_empty().then_some(()))
    })
    .await;
}

/// Sum of the proxy's `wakes` counter for one Space (all label sets, e.g. tiers).
async fn proxy_wakes(h: &Hangar, ns: &str, name: &str) -> u64 {
    let text = support::held_client()
        .get(format!("http://{}/metrics", h.proxy_admin))
        .send()
        .await
        .expect("proxy metrics")
        .text()
        .await
        .expect("metrics body");
    let (ns_label, space_label) = (format!("namespace=\"{ns}\""), format!("space=\"{name}\""));
    text.lines()
        .filter(|l| l.starts_with("hangar_proxy_wakes_total{") && l.contains(&ns_label) && l.contains(&space_label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

async fn deployment_generation(ns: &TestNamespace, name: &str) -> i64 {
    let deployments: Api<Deployment> = ns.api();
    deployments.get(&workload_name(name)).await.expect("deployment").metadata.generation.expect("generation")
}

/// A request through the proxy by host route.
fn via_host(h: &Hangar, ns: &str, name: &str, path: &str) -> reqwest::RequestBuilder {
    support::held_client().get(format!("http://{}{path}", h.proxy_addr)).header("host", format!("{ns}-{name}.{DOMAIN}"))
}

/// Sends requests through the proxy without pause until `stop`; counts sent and failed.
fn steady_client(
    h: &Hangar,
    ns: &str,
    name: &str,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, tokio::task::JoinHandle<Vec<String>>) {
    support::gradio::steady_client(&h.proxy_addr, format!("{ns}-{name}.{DOMAIN}"), stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gradio_space_lives_its_whole_life_in_the_cluster() {
    let ns = TestNamespace::new("e2e", &["kubelet", "containerd", "kube-controller-manager", "kube-scheduler"]).await;
    let n = ns.name.clone();
    ns.install_crd().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = start_hangar(&ns, dir.path());
    let spaces: Api<Space> = ns.api();

    // 1. The example Gradio Space in a git remote served on loopback.
    let work = dir.path().join("work");
    copy_dir(&repo_root().join("examples/spaces/gradio-hello"), &work);
    // A commit of this run's own: the operator really builds (Docker's layer cache keeps
    // the pip step fast) instead of finding an image of an earlier run under the same key.
    let app = std::fs::read_to_string(work.join("app.py")).expect("app.py");
    std::fs::write(work.join("app.py"), format!("# e2e run {n}\n{app}")).expect("write app.py");
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "gradio-hello"]);
    let first = git(&work, &["rev-parse", "HEAD"]);
    let remotes = dir.path().join("remotes");
    bare_clone(&work, &remotes.join("gradio-hello.git"));
    let git_url = format!("{}/gradio-hello.git", serve_dumb_http(remotes.clone(), None).await);
    let manifest = format!(
        "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {{name: hello}}\n\
         spec:\n  source: {{git: \"{git_url}\", revision: main}}\n  hardware: cpu-basic\n  sleepAfter: 1h\n"
    );
    run_ok(ns.kubectl().args(["apply", "-f"]).arg(write(dir.path(), "hello.yaml", &manifest)));

    // 2. Built, pushed, rolled out on the real node; kubectl shows it; clients get answers.
    let started = Instant::now();
    let running = wait_stage(&spaces, "hello", Stage::Running, Duration::from_secs(600)).await;
    eprintln!("push -> RUNNING: {:.1}s", started.elapsed().as_secs_f64());
    let status = running.status.clone().expect("status");
    let image = status.image.clone().expect("status.image");
    assert!(image.starts_with(&format!("{}/{n}/hello:", ns.env.registry)), "{image}");
    assert_eq!(status.build.as_ref().and_then(|b| b.revision.as_deref()), Some(first.as_str()));
    let pods = space_pods(&ns, "hello").await;
    assert_eq!(pods.len(), 1, "one pod");
    assert_eq!(pods[0].spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(ns.env.real_node.as_str()));
    let table = run_ok(ns.kubectl().args(["get", "spaces"]));
    let row: Vec<&str> =
        table.lines().find(|l| l.starts_with("hello ")).expect("hello row").split_whitespace().collect();
    assert_eq!(&row[..4], ["hello", "RUNNING", "cpu-basic", &format!("http://{n}-hello.{DOMAIN}/")], "{table}");

    let proxy_port = h.proxy_addr.rsplit(':').next().expect("port").to_owned();
    let by_host = gradio_client(&format!("http://{n}-hello.{DOMAIN}:{proxy_port}/"), 5).await;
    assert_eq!(by_host.greet, "Hello e2e, from a Space on hangar!");
    assert_streamed(&by_host, 5);
    let by_path = gradio_client(&format!("http://{}/spaces/{n}/hello/", h.proxy_addr), 5).await;
    assert_eq!(by_path.greet, "Hello e2e, from a Space on hangar!");
    assert_streamed(&by_path, 5);

    // 3. A push and its webhook delivery: RUNNING_BUILDING while the old version serves,
    // then the new version; a client sending without pause sees no failure.
    let app = std::fs::read_to_string(work.join("app.py")).expect("app.py");
    let second = commit_file(&work, "app.py", &app.replace("from a Space on hangar!", "from a Space on hangar, v2!"));
    publish(&work, &remotes.join("gradio-hello.git"));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, steady) = steady_client(&h, &n, "hello", stop.clone());
    let posted = support::held_client()
        .post(&h.webhook_url)
        .header("X-Webhook-Secret", WEBHOOK_SECRET)
        .json(&push_delivery(&n, "hello", &first, &second))
        .send()
        .await
        .expect("webhook delivery");
    assert_eq!(posted.status().as_u16(), 202, "{:?}", posted.text().await);
    wait_stage(&spaces, "hello", Stage::RunningBuilding, Duration::from_secs(60)).await;
    let rollout = Instant::now();
    let rolled = wait_for("the new commit running", Duration::from_secs(600), || async {
        let Some((stage, space)) = stage_of(&spaces, "hello").await else { return Ok(None) };
        let revision = space.status.as_ref().and_then(|s| s.build.as_ref()).and_then(|b| b.revision.clone());
        Ok((stage == Stage::Running && revision.as_deref() == Some(second.as_str())).then_some(space))
    })
    .await;
    wait_for("the old pod gone", Duration::from_secs(60), || async {
        Ok((space_pods(&ns, "hello").await.len() == 1).then_some(()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = steady.await.expect("steady client");
    let total = sent.load(Ordering::Relaxed);
    eprintln!(
        "rollout: {total} requests during build + rollout ({:.1}s after RUNNING_BUILDING), {} failed",
        rollout.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{} of {total} requests failed during the rollout: {failures:?}", failures.len());
    assert!(total >= 50, "the steady client sent only {total} requests");
    assert_ne!(rolled.status.as_ref().and_then(|s| s.image.clone()), Some(image.clone()), "a new image");
    let v2 = gradio_client(&format!("http://{}/spaces/{n}/hello/", h.proxy_addr), 2).await;
    assert_eq!(v2.greet, "Hello e2e, from a Space on hangar, v2!");

    // 4. Idle past sleepAfter: SLEEPING with no pod. One request wakes it (held, answered),
    // with exactly one scale-up; later 50 concurrent requests, one wake.
    spaces
        .patch("hello", &PatchParams::default(), &Patch::Merge(json!({"spec": {"sleepAfter": "20s"}})))
        .await
        .expect("sleepAfter: 20s");
    wait_asleep(&ns, &spaces, "hello").await;
    let (wakes, generation) = (proxy_wakes(&h, &n, "hello").await, deployment_generation(&ns, "hello").await);
    let woke = Instant::now();
    let answer = via_host(&h, &n, "hello", "/config").header("accept", "application/json").send().await.expect("held");
    assert_eq!(answer.status().as_u16(), 200);
    eprintln!("wake through the proxy, request -> answer: {:.2}s", woke.elapsed().as_secs_f64());
    assert_eq!(proxy_wakes(&h, &n, "hello").await, wakes + 1, "exactly one wake");
    assert_eq!(deployment_generation(&ns, "hello").await, generation + 1, "exactly one scale-up");

    wait_asleep(&ns, &spaces, "hello").await;
    let wakes = proxy_wakes(&h, &n, "hello").await;
    let burst: Vec<_> = (0..50)
        .map(|_| {
            let req = via_host(&h, &n, "hello", "/config").header("accept", "application/json");
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()).map_err(|e| e.to_string()) })
        })
        .collect();
    for request in burst {
        assert_eq!(request.await.expect("join"), Ok(200));
    }
    assert_eq!(proxy_wakes(&h, &n, "hello").await, wakes + 1, "50 concurrent requests, one wake");

    // A long stream (Gradio 6's queue streams over SSE) keeps the Space awake past
    // sleepAfter: 75 values at 0.4 s = 30 s, against 20 s of sleepAfter.
    let (watching, watcher_stop) = (spaces.clone(), Arc::new(AtomicBool::new(false)));
    let seen_stop = watcher_stop.clone();
    let watcher = tokio::spawn(async move {
        let mut stages = Vec::new();
        while !seen_stop.load(Ordering::Relaxed) {
            if let Some((stage, _)) = stage_of(&watching, "hello").await {
                stages.push(stage);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stages
    });
    let long = gradio_client(&format!("http://{}/spaces/{n}/hello/", h.proxy_addr), 75).await;
    assert_eq!(long.stream.len(), 75);
    watcher_stop.store(true, Ordering::Relaxed);
    let stages = watcher.await.expect("stage watcher");
    assert!(stages.iter().all(|s| *s == Stage::Running), "the stream kept it awake: {stages:?}");
    assert!(long.stream[74].1 > 25.0, "the stream outlasted sleepAfter: {:?}", long.stream.last());

    // 5. A private Space (the built image, by digest) answers 401 without its token, 200
    // with it; a paused one answers 503, keeps no pod and does not wake.
    let token = "e2e-private-token";
    let private = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: space-private-token, labels: {{hangar.dev/space: private}}}}\nstringData: {{token: {token}}}\n---\n\
         apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {{name: private}}\n\
         spec: {{image: \"{image}\", sdk: gradio, hardware: cpu-basic, visibility: private}}\n---\n\
         apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {{name: paused}}\n\
         spec: {{image: \"{image}\", sdk: gradio, hardware: cpu-basic, paused: true}}\n"
    );
    run_ok(ns.kubectl().args(["apply", "-f"]).arg(write(dir.path(), "more.yaml", &private)));
    wait_stage(&spaces, "private", Stage::Running, Duration::from_secs(180)).await;
    wait_stage(&spaces, "paused", Stage::Paused, Duration::from_secs(60)).await;
    let without = via_host(&h, &n, "private", "/config").send().await.expect("private");
    assert_eq!(without.status().as_u16(), 401);
    let wrong = via_host(&h, &n, "private", "/config").bearer_auth("nope").send().await.expect("private");
    assert_eq!(wrong.status().as_u16(), 401);
    let with = via_host(&h, &n, "private", "/config").bearer_auth(token).send().await.expect("private");
    assert_eq!(with.status().as_u16(), 200);
    let paused = via_host(&h, &n, "paused", "/config").send().await.expect("paused");
    assert_eq!(paused.status().as_u16(), 503);
    assert!(paused.text().await.expect("body").contains("paused"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(space_pods(&ns, "paused").await.is_empty(), "a paused Space keeps no pod");
    assert_eq!(proxy_wakes(&h, &n, "paused").await, 0, "a paused Space does not wake");
    assert_eq!(stage_of(&spaces, "paused").await.map(|(s, _)| s), Some(Stage::Paused));

    // 6. Kill the operator and the proxy (SIGKILL); while they are down a user unpauses a
    // Space. Started again: routes come back from the watch, the missed change converges,
    // no duplicate objects, no lost status, requests succeed.
    let before = spaces.get("private").await.expect("private").status;
    h.operator.kill();
    h.proxy.kill();
    assert!(via_host(&h, &n, "private", "/").send().await.is_err(), "the proxy is down");
    let unpause = json!({"spec": {"paused": false}});
    spaces.patch("paused", &PatchParams::default(), &Patch::Merge(&unpause)).await.expect("unpause");
    h.operator.restart();
    h.proxy.restart();
    wait_stage(&spaces, "paused", Stage::Running, Duration::from_secs(180)).await;
    let unpaused = via_host(&h, &n, "paused", "/config").send().await.expect("unpaused");
    assert_eq!(unpaused.status().as_u16(), 200, "the unpaused Space serves after the restart");
    let with = wait_for("the restarted proxy serving the private Space", Duration::from_secs(60), || async {
        match via_host(&h, &n, "private", "/config").bearer_auth(token).send().await {
            Ok(r) if r.status() == 200 => Ok(Some(r)),
            Ok(r) => Err(format!("HTTP {}", r.status()).into()),
            Err(e) => Err(e.into()),
        }
    })
    .await;
    assert_eq!(with.status().as_u16(), 200);
    assert_eq!(via_host(&h, &n, "private", "/config").send().await.expect("private").status().as_u16(), 401);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(spaces.get("private").await.expect("private").status, before, "the status survived the restart");
    for name in ["hello", "private", "paused"] {
        let selector = ListParams::default().labels(&format!("{SPACE_LABEL}={name}"));
        let deployments: Api<Deployment> = ns.api();
        let services: Api<Service> = ns.api();
        assert_eq!(deployments.list(&selector).await.expect("list").items.len(), 1, "{name}: one Deployment");
        assert_eq!(services.list(&selector).await.expect("list").items.len(), 1, "{name}: one Service");
    }
    let leases: Api<Lease> = ns.api();
    let all = leases.list(&ListParams::default()).await.expect("leases").items;
    for name in ["hello", "private", "paused"] {
        let count = all.iter().filter(|l| l.metadata.name.as_deref() == Some(&activity_lease_name(name))).count();
        assert_eq!(count, 1, "{name}: one activity Lease");
    }

    // 7. Deleting the Space removes its workload, Service and Lease, and the operator's
    // records of its builds (the build log); the proxy says 404.
    let build_log = format!("http://{}/api/spaces/{n}/hello/logs/build", h.operator_http);
    let kept = support::held_client().get(&build_log).timeout(Duration::from_secs(10)).send().await.expect("build log");
    assert_eq!(kept.status().as_u16(), 200, "the build log is kept while the Space lives");
    drop(kept);
    run_ok(ns.kubectl().args(["delete", "space", "hello", "--wait=true", "--timeout=60s"]));
    wait_for("hello's objects gone", Duration::from_secs(90), || async {
        let selector = ListParams::default().labels(&format!("{SPACE_LABEL}=hello"));
        let deployments: Api<Deployment> = ns.api();
        let services: Api<Service> = ns.api();
        let left = deployments.list(&selector).await?.items.len()
            + services.list(&selector).await?.items.len()
            + leases.get_opt(&activity_lease_name("hello")).await?.map_or(0, |_| 1)
            + space_pods(&ns, "hello").await.len();
        Ok((left == 0).then_some(()))
    })
    .await;
    let gone = wait_for("the proxy forgetting hello", Duration::from_secs(30), || async {
        let status = via_host(&h, &n, "hello", "/").send().await?.status().as_u16();
        Ok((status == 404).then_some(status))
    })
    .await;
    assert_eq!(gone, 404);
    wait_for("the operator forgetting hello's builds", Duration::from_secs(30), || async {
        let status = support::held_client().get(&build_log).send().await?.status().as_u16();
        Ok((status == 404).then_some(()))
    })
    .await;

    // The chart's RBAC let every component do what it tried.
    for component in [&h.operator, &h.proxy, &h.webhook] {
        let log = std::fs::read_to_string(&component.log).expect("component log");
        assert!(!log.to_lowercase().contains("forbidden"), "refused by RBAC:\n{}", component.log_tail(40));
    }
    let _ = run(ns.env.helm(&dir.path().join("helm")).args(["uninstall", RELEASE, "-n", &n]));
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write manifest");
    path
}
