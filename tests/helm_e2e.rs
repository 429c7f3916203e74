//! Cluster and engine tiers together: what `helm install` ships, and nothing else, takes a
//! Space from git to serving (issue #24).
//!
//! The hangar image is built from the repository's Dockerfile around this checkout's binary
//! and pushed to the test registry; the chart runs every component as pods of that image on
//! the real node, on the pod network, with the values README.md's Kubernetes section gives:
//! - the API server: the pods' in-cluster config, i.e. the `kubernetes` Service (the test bed
//!   routes it as kube-proxy would: scripts/testenv.d/README.md),
//! - the Docker engine: the node's socket (`operator.builder.dockerSocketHostPath`) and its
//!   group (`dockerSocketGroup`), so that the non-root operator may use it,
//! - the registry: `operator.builder.registry` (the node's containerd pulls from it),
//! - the git remote: the Space's own `source.git`, served here over plain HTTP on the host's
//!   pod-network address.
//!
//! The operator pod clones, builds and pushes the example Gradio Space and runs it on the real
//! node (and the static example from a private repository: Basic auth from the Space's
//! `source.credentialsSecret`); the real `gradio_client` gets predictions through the proxy pod by host and by path
//! route; a webhook delivery to the webhook pod rebuilds and rolls out a new commit while a
//! client sends without pause.

mod support;

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hangar::space::naming::{SPACE_LABEL, workload_name};
use hangar::space::{Space, Stage};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;
use support::gradio::{assert_streamed, gradio_client, push_delivery, steady_client};
use support::repo::{bare_clone, commit_file, copy_dir, git, publish, serve_dumb_http_on};
use support::space::stage_of;
use support::{TestNamespace, repo_root, run_ok, wait_for};

const DOMAIN: &str = "hf.test";
const RELEASE: &str = "hangar";
const WEBHOOK_SECRET: &str = "helm-e2e-webhook-secret";
/// The Space: examples/k8s/cpu-space.yaml, its `source.git` pointed at the local remote.
const SPACE: &str = "hello-gradio";

/// The host's address on the pod network (the `cni0` bridge's): where pods reach the host.
fn pod_network_host_address() -> Ipv4Addr {
    let out = run_ok(Command::new("ip").args(["-4", "-o", "addr", "show", "dev", "cni0"]));
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address on cni0: {out}"))
}

/// The IP of the ready pod of the release's `component` (one ready pod).
async fn ready_pod_ip(pods: &Api<Pod>, component: &str) -> String {
    let selector = format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}");
    wait_for(&format!("a ready {component} pod"), Duration::from_secs(180), || async {
        let list = pods.list(&ListParams::default().labels(&selector)).await?;
        Ok(list.items.into_iter().find_map(|p| {
            let status = p.status?;
            let ready = status.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(status.pod_ip?)
        }))
    })
    .await
}

/// Prints the release's pod logs if the test panics while this guard lives.
struct ReleaseLogsOnPanic<'a>(&'a TestNamespace);

impl Drop for ReleaseLogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // (the node agents on simulated nodes have no logs to show)
            let selector =
                format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component in (operator,proxy,webhook)");
            let logs = support::run(self.0.kubectl().args(["logs", "-l", &selector, "--prefix", "--tail=80"]));
            eprintln!("----- logs of the release's pods -----\n{}", logs.unwrap_or_else(|e| e.to_string()));
        }
    }
}

/// Waits until the Space `name` runs `revision` (RUNNING, a current status); panics at once
/// with the status when its build or start failed (e.g. no git in the image), instead of
/// waiting out the timeout.
async fn wait_running(spaces: &Api<Space>, name: &str, revision: &str) -> Space {
    wait_for(&format!("{name} RUNNING at {revision}"), Duration::from_secs(600), || async {
        let Some((stage, space)) = stage_of(spaces, name).await else { return Ok(None) };
        let status = space.status.as_ref();
        if matches!(stage, Stage::BuildError | Stage::RuntimeError | Stage::ConfigError) {
            panic!("{name} is {stage:?}: {:?}", status.and_then(|s| s.message.as_deref()));
        }
        let built = status.and_then(|s| s.build.as_ref()).and_then(|b| b.revision.as_deref());
        Ok((stage == Stage::Running && built == Some(revision)).then_some(space))
    })
    .await
}

async fn deployment_generation(deployments: &Api<Deployment>) -> Option<i64> {
    deployments.get(&workload_name(SPACE)).await.expect("the Space's Deployment").metadata.generation
}

async fn space_pods(ns: &TestNamespace) -> Vec<Pod> {
    let pods: Api<Pod> = ns.api();
    pods.list(&ListParams::default().labels(&format!("{SPACE_LABEL}={SPACE}"))).await.expect("list pods").items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_charts_own_pods_build_a_space_from_git_serve_it_and_roll_it_out() {
    let test_started = Instant::now();
    let ns =
        TestNamespace::new("helm-e2e", &["kubelet", "containerd", "kube-scheduler", "kube-controller-manager"]).await;
    let env = ns.env.clone();
    let n = ns.name.clone();
    let dir = tempfile::tempdir().expect("tempdir");

    // The image, as README.md builds it.
    let (image, image_size) = support::image::build_and_push_hangar(&env, &n);
    let (repository, tag) = image.rsplit_once(':').expect("image tag");

    // The chart, with the values an admin sets (README.md), plus what this test bed needs:
    // this namespace only, the real node, small requests, the locally made base images (no
    // registry to pull them from) and the CA of the machine's TLS-intercepting proxy.
    let socket = env.docker_host.strip_prefix("unix://").expect("DOCKER_HOST is a unix socket").to_owned();
    let socket_group = std::fs::metadata(&socket).unwrap_or_else(|e| panic!("{socket}: {e}")).gid();
    let extra_ca = std::env::var("HANGAR_EXTRA_CA_FILE")
        .ok()
        .filter(|f| !f.is_empty())
        .map(|f| std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{f}: {e}")))
        .unwrap_or_default();
    let small = json!({"requests": {"cpu": "10m", "memory": "32Mi"}});
    let values = json!({
        "image": {"repository": repository, "tag": tag},
        "domain": DOMAIN,
        "urlScheme": "http",
        "watchNamespace": n,
        "nodeSelector": {"hangar.dev/test-node": "real"},
        // The real node may pose as a GPU node (HANGAR_TESTENV_REAL_GPU): taint tolerated.
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "operator": {
            "replicas": 2,
            "resources": small,
            "hardwareMapping": {
                "requests": {"cpu": "10m", "memory": "64Mi"},
                "flavors": {"cpu-basic": {"nodeSelector": {"hangar.dev/test-node": "real"}}},
            },
            "builder": {
                "registry": format!("{}/spaces", env.registry),
                "dockerSocketHostPath": socket,
                "dockerSocketGroup": socket_group,
                "pythonImage": env.python_image,
                "staticImage": env.static_image,
                "extraCaCert": extra_ca,
            },
        },
        "proxy": {"ingress": {"enabled": true}, "resources": small},
        "webhook": {"secret": {"value": WEBHOOK_SECRET}, "resources": small},
        "nodeAgent": {"resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}},
    });
    let values_file = dir.path().join("values.yaml");
    std::fs::write(&values_file, serde_yaml_ng::to_string(&values).expect("values yaml")).expect("write values");
    let helm_home = dir.path().join("helm");
    let helm = || {
        let mut c = env.helm(&helm_home);
        c.args(["-n", &n]);
        c
    };
    // Helm installs the chart's CRD only when missing and never upgrades it: as on an upgrade
    // (charts/hangar/README.md), the current one first (the shared test cluster may hold an
    // older checkout's).
    ns.install_crd().await;
    let installed = Instant::now();
    let _logs = ReleaseLogsOnPanic(&ns);
    run_ok(helm().args(["install", RELEASE]).arg(repo_root().join("charts/hangar")).arg("-f").arg(&values_file));
    let deployments: Api<Deployment> = ns.api();
    for component in ["operator", "proxy", "webhook"] {
        let name = format!("{RELEASE}-{component}");
        wait_for(&format!("deployment {name} available"), Duration::from_secs(180), || async {
            let d = deployments.get(&name).await?;
            Ok((d.status.and_then(|s| s.available_replicas).unwrap_or(0) >= 1).then_some(()))
        })
        .await;
    }
    eprintln!("helm install -> components ready: {:.1}s", installed.elapsed().as_secs_f64());
    let pods: Api<Pod> = ns.api();
    let proxy = format!("{}:8080", ready_pod_ip(&pods, "proxy").await);
    let webhook = format!("http://{}:8080/webhooks/hub", ready_pod_ip(&pods, "webhook").await);

    // The example Gradio Space in a git remote the operator pod reaches. A commit of this
    // run's own: the operator really builds (Docker's layer cache keeps the pip step fast).
    let work = dir.path().join("work");
    copy_dir(&repo_root().join("examples/spaces/gradio-hello"), &work);
    let app = std::fs::read_to_string(work.join("app.py")).expect("app.py");
    std::fs::write(work.join("app.py"), format!("# helm e2e run {n}\n{app}")).expect("write app.py");
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "gradio-hello"]);
    let first = git(&work, &["rev-parse", "HEAD"]);
    let remotes = dir.path().join("remotes");
    let remote = remotes.join("gradio-hello.git");
    bare_clone(&work, &remote);
    let host = pod_network_host_address();
    let git_url = format!("{}/gradio-hello.git", serve_dumb_http_on(host, remotes.clone(), None).await);
    let example = std::fs::read_to_string(repo_root().join("examples/k8s/cpu-space.yaml")).expect("cpu-space.yaml");
    let manifest = example.replace("https://huggingface.co/spaces/gradio/hello_world", &git_url);
    assert_ne!(manifest, example, "examples/k8s/cpu-space.yaml names no git URL to replace");
    let manifest_file = dir.path().join("space.yaml");
    std::fs::write(&manifest_file, manifest).expect("write manifest");

    // A private repository (Basic auth, `source.credentialsSecret`): the static-site example.
    let private_work = dir.path().join("static-site");
    copy_dir(&repo_root().join("examples/spaces/static-site"), &private_work);
    git(&private_work, &["init", "-q", "-b", "main"]);
    git(&private_work, &["add", "-A"]);
    git(&private_work, &["commit", "-q", "-m", "static-site"]);
    let private_commit = git(&private_work, &["rev-parse", "HEAD"]);
    let private_remotes = dir.path().join("private");
    bare_clone(&private_work, &private_remotes.join("static-site.git"));
    let private_server = serve_dumb_http_on(host, private_remotes, Some("hub-user:hub-password")).await;
    let private_manifest = dir.path().join("private.yaml");
    std::fs::write(
        &private_manifest,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: static-site-git}}\n\
             stringData: {{username: hub-user, password: hub-password}}\n---\n\
             apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {{name: static-site}}\n\
             spec:\n  source: {{git: \"{private_server}/static-site.git\", revision: main, credentialsSecret: static-site-git}}\n  \
             hardware: cpu-basic\n"
        ),
    )
    .expect("write private manifest");

    // kubectl apply -> built by the operator pod, pushed, RUNNING on the real node.
    let applied = Instant::now();
    run_ok(ns.kubectl().arg("apply").arg("-f").arg(&manifest_file).arg("-f").arg(&private_manifest));
    let spaces: Api<Space> = ns.api();
    let running = wait_running(&spaces, SPACE, &first).await;
    eprintln!("kubectl apply -> RUNNING through the chart's pods: {:.1}s", applied.elapsed().as_secs_f64());
    let status = running.status.clone().expect("status");
    let built = status.image.clone().expect("status.image");
    assert!(built.starts_with(&format!("{}/spaces/{n}/{SPACE}", env.registry)), "{built}");
    let space_pod = space_pods(&ns).await;
    assert_eq!(space_pod.len(), 1, "one pod");
    assert_eq!(space_pod[0].spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(env.real_node.as_str()));

    // The real client through the proxy pod, by host route and by path route.
    let proxy_ip = proxy.split(':').next().expect("proxy ip");
    let by_host = gradio_client(&format!("http://{n}-{SPACE}.{DOMAIN}:8080/"), 5, DOMAIN, proxy_ip).await;
    assert_eq!(by_host.greet, "Hello e2e, from a Space on hangar!");
    assert_streamed(&by_host, 5);
    let by_path = gradio_client(&format!("http://{proxy}/spaces/{n}/{SPACE}/"), 5, DOMAIN, proxy_ip).await;
    assert_eq!(by_path.greet, "Hello e2e, from a Space on hangar!");
    assert_streamed(&by_path, 5);

    // The private repository's Space, served by the proxy pod.
    wait_running(&spaces, "static-site", &private_commit).await;
    let page = support::held_client()
        .get(format!("http://{proxy}/"))
        .header("host", format!("{n}-static-site.{DOMAIN}"))
        .send()
        .await
        .expect("static-site through the proxy");
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.expect("body").contains("Hello from a static Space"));

    // A push and its webhook delivery through the webhook pod: rebuilt and rolled out while
    // the old version serves; a client sending without pause sees no failure.
    let app = std::fs::read_to_string(work.join("app.py")).expect("app.py");
    let second = commit_file(&work, "app.py", &app.replace("from a Space on hangar!", "from a Space on hangar, v2!"));
    publish(&work, &remote);
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, steady) = steady_client(&proxy, format!("{n}-{SPACE}.{DOMAIN}"), stop.clone());
    let posted = support::held_client()
        .post(&webhook)
        .header("X-Webhook-Secret", WEBHOOK_SECRET)
        .json(&push_delivery(&n, SPACE, &first, &second))
        .send()
        .await
        .expect("webhook delivery");
    assert_eq!(posted.status().as_u16(), 202, "{:?}", posted.text().await);
    let pushed = Instant::now();
    let rolled = wait_running(&spaces, SPACE, &second).await;
    wait_for("the old pod gone", Duration::from_secs(60), || async {
        Ok((space_pods(&ns).await.len() == 1).then_some(()))
    })
    .await;
    eprintln!("webhook -> new commit RUNNING: {:.1}s", pushed.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    let failures = steady.await.expect("steady client");
    let total = sent.load(Ordering::Relaxed);
    eprintln!("rollout: {total} requests through the proxy pod, {} failed", failures.len());
    assert!(failures.is_empty(), "{} of {total} requests failed during the rollout: {failures:?}", failures.len());
    assert!(total >= 20, "the steady client sent only {total} requests");
    assert_ne!(rolled.status.as_ref().and_then(|s| s.image.clone()), Some(built), "a new image");
    let v2 = gradio_client(&format!("http://{proxy}/spaces/{n}/{SPACE}/"), 2, DOMAIN, proxy_ip).await;
    assert_eq!(v2.greet, "Hello e2e, from a Space on hangar, v2!");

    // Failover (operator.replicas 2): the leading operator pod is deleted while a client
    // sends without pause. The standby takes the lead and finds the Space's build in the
    // cluster: no request fails, the Space keeps its pod, nothing is rebuilt or scaled.
    let leases: Api<Lease> = ns.api();
    let holder = || async {
        let lease = leases.get("hangar-operator-leader").await?;
        Ok::<_, support::Error>(lease.spec.and_then(|s| s.holder_identity).filter(|h| !h.is_empty()))
    };
    let leader = holder().await.expect("leader lease").expect("a leader");
    let recorded = spaces.get(SPACE).await.expect("space").status.and_then(|s| s.built).map(|b| b.revision);
    assert_eq!(recorded.as_deref(), Some(second.as_str()), "status.built (pruned by an older CRD?)");
    let serving = space_pods(&ns).await;
    assert_eq!(serving.len(), 1, "one pod");
    let (pod_uid, build) = (serving[0].metadata.uid.clone(), rolled.status.as_ref().and_then(|s| s.build.clone()));
    let generation = deployment_generation(&deployments).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, steady) = steady_client(&proxy, format!("{n}-{SPACE}.{DOMAIN}"), stop.clone());
    let deleted = Instant::now();
    run_ok(ns.kubectl().args(["delete", "pod", &leader, "--wait=false"]));
    let successor = wait_for("the standby operator leading", Duration::from_secs(120), || async {
        Ok(holder().await?.filter(|h| *h != leader))
    })
    .await;
    let successor_ip = wait_for("the new leader's pod IP", Duration::from_secs(30), || async {
        Ok(pods.get(&successor).await?.status.and_then(|s| s.pod_ip))
    })
    .await;
    // Once the new leader has reconciled both Spaces (its gauge counts them RUNNING), whatever
    // it was going to do to them is done or under way: watch a little longer, then compare.
    let metrics = format!("http://{successor_ip}:8080/metrics");
    wait_for("the new leader reconciling the Spaces", Duration::from_secs(120), || async {
        let text = support::http_client().get(&metrics).send().await?.text().await?;
        let running = text
            .lines()
            .find(|l| l.starts_with("hangar_operator_spaces{stage=\"RUNNING\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        Ok((running == Some(2.0)).then_some(()))
    })
    .await;
    eprintln!("leader pod deleted -> {successor} leading and reconciled: {:.1}s", deleted.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = steady.await.expect("steady client");
    let total = sent.load(Ordering::Relaxed);
    eprintln!("failover: {total} requests through the proxy pod, {} failed", failures.len());
    assert!(failures.is_empty(), "{} of {total} requests failed during the failover: {failures:?}", failures.len());
    let serving = space_pods(&ns).await;
    assert_eq!(serving.iter().map(|p| p.metadata.uid.clone()).collect::<Vec<_>>(), vec![pod_uid], "the same pod");
    assert_eq!(deployment_generation(&deployments).await, generation, "the Space's Deployment was not changed");
    let after = spaces.get(SPACE).await.expect("space").status;
    assert_eq!(after.as_ref().and_then(|s| s.build.clone()), build, "no new build");
    assert_eq!(after.and_then(|s| s.stage), Some(Stage::Running));

    // The chart's RBAC let every component do what it tried.
    for component in ["operator", "proxy", "webhook"] {
        let selector = format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}");
        let logs = run_ok(ns.kubectl().args(["logs", "-l", &selector, "--tail=-1"]));
        assert!(!logs.to_lowercase().contains("forbidden"), "{component} was refused something:\n{logs}");
    }

    // Deleting the Space, then uninstalling, leaves nothing of either.
    run_ok(
        ns.kubectl()
            .args(["delete", "--wait=true", "--timeout=60s", "-f"])
            .arg(&manifest_file)
            .arg("-f")
            .arg(&private_manifest),
    );
    wait_for("the Space's workload gone", Duration::from_secs(60), || async {
        let left = deployments.list(&ListParams::default().labels(SPACE_LABEL)).await?;
        Ok(left.items.is_empty().then_some(()))
    })
    .await;
    run_ok(helm().args(["uninstall", RELEASE, "--wait", "--timeout", "120s"]));
    let _ = env.docker().args(["rmi", &image]).output();
    eprintln!(
        "hangar image: {:.1} MB; the whole test: {:.1}s",
        image_size as f64 / 1e6,
        test_started.elapsed().as_secs_f64()
    );
}
