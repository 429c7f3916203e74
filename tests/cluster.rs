//! Cluster tier: runs against the test bed of `scripts/testenv up` (real
//! control plane, a real kubelet node, kwok GPU nodes, local registry).
//! Without that environment every test here fails with the reason.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::{
    LogsOnPanic, TestEnv, TestNamespace, http_client, http_get, pinned_k8s_version, repo_root, run_fails, run_ok,
    run_with_input, unique_name, wait_for,
};

const SPACE_CRD: &str = "spaces.hangar.dev";

fn deployment(value: serde_json::Value) -> Deployment {
    serde_json::from_value(value).expect("test Deployment is valid")
}

async fn pods_of(ns: &TestNamespace, app: &str) -> Vec<Pod> {
    let pods: Api<Pod> = ns.api();
    pods.list(&ListParams::default().labels(&format!("app={app}"))).await.expect("listing pods").items
}

#[tokio::test]
async fn server_reports_the_pinned_version() {
    let env = TestEnv::cluster();
    let _logs = LogsOnPanic::new(&env, &["kube-apiserver", "etcd"]);
    let pinned = pinned_k8s_version();
    let out = run_ok(env.kubectl().args(["version", "-o", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("kubectl version -o json");
    assert_eq!(v["serverVersion"]["gitVersion"], pinned.as_str(), "{out}");
    assert_eq!(v["clientVersion"]["gitVersion"], pinned.as_str(), "{out}");
    let info = support::client().await.apiserver_version().await.expect("/version");
    assert_eq!(info.git_version, pinned);
    assert!(!info.git_version.contains("master"), "{info:?}");
}

#[tokio::test]
async fn space_crd_is_established_and_validates() {
    let ns = TestNamespace::new("crd", &["kube-apiserver"]).await;
    let env = &ns.env;
    run_ok(env.kubectl().args(["apply", "-f"]).arg(repo_root().join("crds")));
    run_ok(env.kubectl().args(["wait", "--for=condition=Established", &format!("crd/{SPACE_CRD}"), "--timeout=30s"]));

    let space = |name: &str, spec: serde_json::Value| {
        json!({
            "apiVersion": "hangar.dev/v1alpha1",
            "kind": "Space",
            "metadata": {"name": name},
            "spec": spec,
        })
        .to_string()
    };
    // Accepted: a git source on a known flavor.
    let good = space(
        "demo",
        json!({
            "source": {"git": "https://git.example.invalid/demo.git", "revision": "main"},
            "hardware": "cpu-basic",
        }),
    );
    run_with_input(ns.kubectl().args(["create", "-f", "-"]), &good)
        .unwrap_or_else(|e| panic!("a valid Space was rejected: {e}"));
    let got = run_ok(ns.kubectl().args(["get", "space", "demo", "-o", "json"]));
    let got: serde_json::Value = serde_json::from_str(&got).expect("Space JSON");
    assert_eq!(got["spec"]["hardware"], "cpu-basic");

    // An image-only Space is accepted too.
    let image_only = space("prebuilt", json!({"image": "registry.example.invalid/demo:1", "hardware": "t4-small"}));
    run_with_input(ns.kubectl().args(["create", "-f", "-"]), &image_only)
        .unwrap_or_else(|e| panic!("a valid image Space was rejected: {e}"));

    // Rejected: both source and image.
    let both = space(
        "both",
        json!({
            "source": {"git": "https://git.example.invalid/demo.git", "revision": "main"},
            "image": "registry.example.invalid/demo:1",
            "hardware": "cpu-basic",
        }),
    );
    let err = run_fails(ns.kubectl().args(["create", "-f", "-"]).stdin(piped(&both)));
    assert!(
        err.contains("is invalid") || err.contains("Invalid value"),
        "expected a validation error for source+image, got: {err}"
    );

    // Rejected: a value outside an enum (`sdk`). (`hardware` is deliberately a
    // free string so an unknown flavor becomes a CONFIG_ERROR status instead.)
    let bad_enum = space("bad-sdk", json!({"image": "registry.example.invalid/demo:1", "sdk": "flask"}));
    let err = run_fails(ns.kubectl().args(["create", "-f", "-"]).stdin(piped(&bad_enum)));
    assert!(err.contains("Unsupported value") && err.contains("flask"), "expected an enum violation, got: {err}");

    let listed = run_ok(ns.kubectl().args(["get", "spaces", "-o", "name"]));
    let mut names: Vec<&str> = listed.lines().collect();
    names.sort();
    assert_eq!(names, ["space.hangar.dev/demo", "space.hangar.dev/prebuilt"], "only the valid Spaces exist");
}

/// A child stdin fed from a temp file (for `run_fails`, which takes no input).
fn piped(input: &str) -> std::process::Stdio {
    let mut f = tempfile::tempfile().expect("temp file");
    std::io::Write::write_all(&mut f, input.as_bytes()).expect("write temp file");
    std::io::Seek::rewind(&mut f).expect("rewind temp file");
    std::process::Stdio::from(f)
}

#[tokio::test]
async fn gpu_pods_are_placed_on_kwok_gpu_nodes() {
    let ns = TestNamespace::new("gpu", &["kube-scheduler", "kwok"]).await;
    let deployments: Api<Deployment> = ns.api();
    let gpu_deployment = |name: &str, gpus: u32, product: Option<&str>| {
        let mut spec = json!({
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{
                "name": "app",
                // kwok nodes run nothing: the image is never pulled.
                "image": "hangar/static:1",
                "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}},
            }],
        });
        if let Some(p) = product {
            spec["nodeSelector"] = json!({"nvidia.com/gpu.product": p});
        }
        deployment(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
            },
        }))
    };
    let pp = PostParams::default();
    deployments.create(&pp, &gpu_deployment("t4", 1, Some("Tesla-T4"))).await.expect("create t4 Deployment");
    deployments.create(&pp, &gpu_deployment("too-many", 64, None)).await.expect("create too-many Deployment");

    let node_name = wait_for("the T4 pod to be Running", Duration::from_secs(60), || async {
        let pods = pods_of(&ns, "t4").await;
        Ok(pods.into_iter().find_map(|p| {
            let status = p.status?;
            (status.phase.as_deref() == Some("Running")).then_some(p.spec?.node_name)?
        }))
    })
    .await;
    let node = Api::<Node>::all(ns.client.clone()).get(&node_name).await.expect("the T4 pod's node");
    let labels = node.metadata.labels.unwrap_or_default();
    let annotations = node.metadata.annotations.unwrap_or_default();
    assert_eq!(labels.get("nvidia.com/gpu.product").map(String::as_str), Some("Tesla-T4"));
    assert_eq!(
        annotations.get("kwok.x-k8s.io/node").map(String::as_str),
        Some("fake"),
        "{node_name} should be a kwok node"
    );

    let message = wait_for("the scheduler to report Insufficient nvidia.com/gpu", Duration::from_secs(60), || async {
        let pods = pods_of(&ns, "too-many").await;
        Ok(pods.into_iter().find_map(|p| {
            let conds = p.status?.conditions?;
            conds
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
                .message
                .filter(|m| m.contains("Insufficient nvidia.com/gpu"))
        }))
    })
    .await;
    println!("too-many-GPU pod: {message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for p in pods_of(&ns, "too-many").await {
        let status = p.status.unwrap_or_default();
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        assert!(p.spec.and_then(|s| s.node_name).is_none());
    }
}

/// The ready addresses in the EndpointSlices of `service`.
async fn ready_endpoint_ips(ns: &TestNamespace, service: &str) -> kube::Result<Vec<String>> {
    let slices: Api<EndpointSlice> = ns.api();
    let list = slices.list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}"))).await?;
    Ok(list
        .items
        .into_iter()
        .flat_map(|s| s.endpoints.unwrap_or_default())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses)
        .collect())
}

#[tokio::test]
async fn python_image_runs_on_the_real_node_and_wakes_from_zero() {
    let ns =
        TestNamespace::new("real", &["kubelet", "containerd", "kube-scheduler", "kube-controller-manager", "registry"])
            .await;
    let env = ns.env.clone();
    let marker = unique_name("served-by-pod");
    let image = format!("{}/hangar-test/pyhttp:{}", env.registry, ns.name);
    support::build_python_app(&env, &image, &marker);
    run_ok(env.docker().args(["push", "-q", &image]));

    let app = "pyhttp";
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(
            &PostParams::default(),
            &deployment(json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": app},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": app}},
                    "template": {
                        "metadata": {"labels": {"app": app}},
                        "spec": {
                            "nodeSelector": {"hangar.dev/test-node": "real"},
                            "terminationGracePeriodSeconds": 1,
                            "containers": [{
                                "name": "app",
                                "image": image,
                                "ports": [{"containerPort": 7860, "name": "http"}],
                                "readinessProbe": {
                                    "httpGet": {"path": "/", "port": 7860},
                                    "periodSeconds": 1,
                                    "failureThreshold": 1,
                                },
                            }],
                        },
                    },
                },
            })),
        )
        .await
        .expect("create Deployment");
    let services: Api<Service> = ns.api();
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": app},
                "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 7860}]},
            }))
            .expect("Service"),
        )
        .await
        .expect("create Service");

    // The kubelet pulls the image from the local registry; readiness passes.
    let (pod_ip, node) = wait_for("the pod to be Ready on the real node", Duration::from_secs(180), || async {
        let pods = pods_of(&ns, app).await;
        Ok(pods.into_iter().find_map(|p| {
            let status = p.status?;
            let ready = status.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some((status.pod_ip?, p.spec?.node_name?))
        }))
    })
    .await;
    assert_eq!(node, env.real_node);
    let ips = wait_for("the EndpointSlice to list the pod", Duration::from_secs(30), || async {
        let ips = ready_endpoint_ips(&ns, app).await?;
        Ok((!ips.is_empty()).then_some(ips))
    })
    .await;
    assert_eq!(ips, std::slice::from_ref(&pod_ip));
    let http = http_client();
    let (status, body) =
        http_get(&http, &format!("http://{pod_ip}:7860/")).await.expect("HTTP to the pod IP from the host");
    assert_eq!(status, 200);
    assert!(body.contains(&marker), "{body}");

    // Scale to zero ...
    let scale = |n: i32| {
        let deployments = deployments.clone();
        async move {
            deployments
                .patch(app, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": n}})))
                .await
                .expect("scale Deployment")
        }
    };
    scale(0).await;
    wait_for("the pods and endpoints to be gone", Duration::from_secs(60), || async {
        let gone = pods_of(&ns, app).await.is_empty() && ready_endpoint_ips(&ns, app).await?.is_empty();
        Ok(gone.then_some(()))
    })
    .await;
    // ... and back to one: time to the first HTTP 200 through the EndpointSlice address.
    let start = Instant::now();
    scale(1).await;
    let (ip, body) = wait_for("the woken pod to answer HTTP", Duration::from_secs(60), || async {
        for ip in ready_endpoint_ips(&ns, app).await? {
            if let Ok((200, body)) = http_get(&http, &format!("http://{ip}:7860/")).await {
                return Ok(Some((ip, body)));
            }
        }
        Ok(None)
    })
    .await;
    let wake = start.elapsed();
    assert!(body.contains(&marker));
    let line = format!("wake floor: scale 0 -> 1 to first HTTP 200 from {ip}: {wake:.2?}");
    eprintln!("{line}");
    // Kept with the test bed's logs (they survive `scripts/testenv down`).
    let log = env.state.join("logs/measurements.log");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
    assert!(wake < Duration::from_secs(60));
    let _ = support::run(env.docker().args(["rmi", &image]));
}

#[tokio::test]
async fn helm_installs_a_small_chart() {
    let ns = TestNamespace::new("helm", &["kube-apiserver", "kwok"]).await;
    let env = ns.env.clone();
    let home = tempfile::tempdir().expect("helm home");
    let chart = repo_root().join("scripts/testenv.d/chart");
    let greeting = format!("hello {}", ns.name);
    run_ok(
        env.helm(home.path())
            .args(["install", "smoke"])
            .arg(&chart)
            .args(["-n", &ns.name, "--wait", "--timeout", "90s"])
            .args(["--set", &format!("greeting={greeting}")]),
    );
    let status = run_ok(env.helm(home.path()).args(["status", "smoke", "-n", &ns.name, "-o", "json"]));
    let status: serde_json::Value = serde_json::from_str(&status).expect("helm status JSON");
    assert_eq!(status["info"]["status"], "deployed", "{status}");

    let cm = run_ok(ns.kubectl().args(["get", "configmap", "smoke-greeting", "-o", "json"]));
    let cm: serde_json::Value = serde_json::from_str(&cm).expect("ConfigMap JSON");
    assert_eq!(cm["data"]["greeting"], greeting.as_str());
    assert_eq!(cm["data"]["kubeVersion"], pinned_k8s_version().as_str());
    let deployments: Api<Deployment> = ns.api();
    let d = deployments.get("smoke-web").await.expect("chart Deployment");
    assert_eq!(d.status.and_then(|s| s.ready_replicas), Some(1));

    run_ok(env.helm(home.path()).args(["uninstall", "smoke", "-n", &ns.name, "--wait"]));
    assert!(deployments.get_opt("smoke-web").await.expect("get").is_none());
}
