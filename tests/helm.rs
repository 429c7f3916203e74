//! Cluster tier: the Helm chart `charts/hangar` end to end, with the hangar image built from
//! the repository's Dockerfile.
//!
//! The image is built (the Dockerfile around the test's own `hangar` binary, stripped, on the
//! test bed's Debian base) and pushed to the test registry; `helm install` runs all
//! three components as pods on the real node, with the chart's ServiceAccounts, in the node's
//! network (`hostNetwork`) with `KUBERNETES_SERVICE_HOST=127.0.0.1`: the chart values for
//! clusters whose pod network cannot reach the API server (tests/helm_e2e.rs runs the chart
//! on the pod network). The operator watches the test namespace only (`watchNamespace`,
//! RBAC as Roles there), so it never touches other tests' Spaces.

mod support;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use hangar::space::Space;
use hangar::space::naming::{FREEZER_ANNOTATION, HEAD_SHA_ANNOTATION, activity_lease_name};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use support::{TestNamespace, http_client, repo_root, run, run_ok, wait_for};

/// The chart ships the CRD `hangar crd` generates: its copy must match `crds/space.yaml`.
#[test]
fn the_charts_crd_is_the_generated_one() {
    let root = repo_root();
    let chart_copy = std::fs::read_to_string(root.join("charts/hangar/crds/space.yaml")).expect("chart CRD");
    let source = std::fs::read_to_string(root.join("crds/space.yaml")).expect("crds/space.yaml");
    let generated = hangar::space::crd_yaml().expect("crd yaml");
    assert_eq!(
        source, generated,
        "crds/space.yaml is stale: run `cargo run -q -- crd > crds/space.yaml && cp crds/space.yaml charts/hangar/crds/`"
    );
    assert_eq!(chart_copy, source, "charts/hangar/crds/space.yaml is stale: `cp crds/space.yaml charts/hangar/crds/`");
}

fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0").expect("bind").local_addr().expect("addr").port()
}

/// `kubectl auth can-i` as a ServiceAccount: true when allowed. `resource` may name a
/// subresource (`spaces.hangar.dev/status`) or one object (`leases.coordination.k8s.io#name`).
fn can_i(ns: &TestNamespace, sa: &str, verb: &str, resource: &str, namespace: &str) -> bool {
    let mut cmd = ns.env.kubectl();
    cmd.args(["auth", "can-i", verb]);
    if let Some((resource, subresource)) = resource.split_once('/') {
        cmd.args([resource, "--subresource", subresource]);
    } else if let Some((resource, name)) = resource.split_once('#') {
        cmd.arg(format!("{resource}/{name}"));
    } else {
        cmd.arg(resource);
    }
    let out = cmd
        .args(["-n", namespace])
        .arg(format!("--as=system:serviceaccount:{}:{sa}", ns.name))
        .output()
        .expect("kubectl auth can-i");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match answer.as_str() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {verb} {resource}: {other:?} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn stage(space: &Space) -> Option<String> {
    let stage = space.status.as_ref()?.stage?;
    serde_json::to_value(stage).ok()?.as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_runs_hangar_with_the_charts_rbac_and_uninstall_leaves_nothing() {
    let ns = TestNamespace::new("helm", &["kube-apiserver", "kube-scheduler", "kubelet", "kwok"]).await;
    let env = ns.env.clone();
    let helm_home = tempfile::tempdir().expect("helm home");
    let helm = || {
        let mut c = env.helm(helm_home.path());
        c.args(["-n", &ns.name]);
        c
    };
    let chart = repo_root().join("charts/hangar");
    let release = "hgr";

    // The chart lints clean and renders objects the API server accepts, in the default
    // (cluster-wide) mode with every optional part on.
    let lint = run_ok(env.helm(helm_home.path()).args(["lint", "--strict"]).arg(&chart));
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    // values.schema.json catches mistakes before anything reaches the cluster.
    for (bad, why) in [
        ("operator.hardwareMapping.flavors.t5-huge.nodeSelector.pool=gpu", "t5-huge"),
        ("domain=Not_A_Domain", "domain"),
        ("operator.builder.timeout=soon", "timeout"),
        ("proxy.port=0", "port"),
        ("operator.leaderElection=false,operator.replicas=2", "leaderElection"),
        ("nodeAgent.freezeAfter.cpu=soon", "freezeAfter"),
        ("operator.builder.dockerSocketGroup=docker", "dockerSocketGroup"),
    ] {
        let err = support::run_fails(helm().args(["template", "bad"]).arg(&chart).args(["--set", bad]));
        assert!(err.contains(why), "--set {bad}: {err}");
    }
    let everything = run_ok(
        helm()
            .args([
                "template",
                "dry",
                "--set",
                "proxy.ingress.enabled=true",
                "--set",
                "proxy.ingress.tlsSecretName=tls",
            ])
            .args(["--set", "operator.builder.registry=registry.example.com:5000"])
            .args([
                "--set",
                "operator.builder.credentials.username=u",
                "--set",
                "operator.builder.credentials.password=p",
            ])
            .args([
                "--set",
                "operator.builder.dockerHost=tcp://docker:2375",
                "--set",
                "operator.builder.extraCaCert=PEM",
            ])
            .args(["--set", "operator.hardwareMapping.requests.cpu=100m"])
            .args(["--set", "operator.hardwareMapping.requests.memory=128Mi"])
            .arg(&chart),
    );
    for kind in ["ClusterRole", "ClusterRoleBinding", "Ingress", "ConfigMap", "Secret", "Lease", "Deployment"] {
        assert!(everything.contains(&format!("\nkind: {kind}\n")), "helm template renders no {kind}");
    }
    let dry = support::run_with_input(
        env.kubectl().args(["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"]),
        &everything,
    )
    .unwrap_or_else(|e| panic!("the API server rejects the rendered chart: {e}"));
    assert!(dry.contains("(server dry run)"), "{dry}");

    // The image.
    let (image, _) = support::image::build_and_push_hangar(&env, &ns.name);
    let (repository, tag) = image.rsplit_once(':').expect("image tag");

    // Install: all three components on the real node, watching this namespace.
    let apiserver = std::env::var("HANGAR_TEST_APISERVER").expect("HANGAR_TEST_APISERVER (scripts/testenv env)");
    let api_port = apiserver.rsplit(':').next().expect("apiserver port").trim_end_matches('/').to_owned();
    let (operator_port, proxy_port, admin_port, webhook_port) = (free_port(), free_port(), free_port(), free_port());
    let domain = "spaces.helm.test";
    let secret = "helm-test-webhook-secret";
    let values = json!({
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "domain": domain,
        "urlScheme": "http",
        "watchNamespace": ns.name,
        "logFormat": "text",
        "logLevel": "debug",
        "hostNetwork": true,
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
        ],
        "nodeSelector": {"hangar.dev/test-node": "real"},
        // The real node may pose as a GPU node (HANGAR_TESTENV_REAL_GPU): taint tolerated.
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "operator": {
            "httpPort": operator_port,
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
            // Placed on the simulated T4 node (never the real one, even when it poses as a GPU
            // node): proves the chart's hardware ConfigMap reaches the operator.
            "hardwareMapping": {
                "requests": {"cpu": "100m", "memory": "128Mi"},
                "flavors": {"t4-small": {
                    "nodeSelector": {"nvidia.com/gpu.product": "Tesla-T4", "hangar.dev/test-node": "kwok"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                }},
            },
        },
        "proxy": {"port": proxy_port, "adminPort": admin_port, "resources": {"requests": {"cpu": "10m"}}},
        "webhook": {"port": webhook_port, "secret": {"value": secret}, "resources": {"requests": {"cpu": "10m"}}},
    });
    let values_file = helm_home.path().join("values.yaml");
    std::fs::write(&values_file, serde_yaml_ng::to_string(&values).expect("yaml")).expect("write values");
    let installed = Instant::now();
    run_ok(helm().args(["install", release]).arg(&chart).arg("-f").arg(&values_file));

    // The CRD is Established (Helm installs it from the chart's crds/ unless present already).
    run_ok(env.kubectl().args(["wait", "--for=condition=Established", "crd/spaces.hangar.dev", "--timeout=60s"]));

    // The RBAC exists: a ServiceAccount, Role and RoleBinding per component, plus the leader Role.
    let instance = format!("app.kubernetes.io/instance={release}");
    let rbac = run_ok(ns.kubectl().args(["get", "serviceaccounts,roles,rolebindings", "-l", &instance, "-o", "name"]));
    for component in ["operator", "proxy", "webhook"] {
        for kind in ["serviceaccount", "role.rbac.authorization.k8s.io", "rolebinding.rbac.authorization.k8s.io"] {
            let name = format!("{kind}/{release}-hangar-{component}");
            assert!(rbac.lines().any(|l| l == name), "missing {name} in:\n{rbac}");
        }
    }
    assert!(rbac.contains("role.rbac.authorization.k8s.io/hgr-hangar-operator-leader"), "{rbac}");

    // The operator becomes ready (= leads) on the real node, running the pushed image.
    let deployments: Api<Deployment> = ns.api();
    for component in ["operator", "proxy", "webhook"] {
        let name = format!("{release}-hangar-{component}");
        wait_for(&format!("deployment {name} available"), Duration::from_secs(180), || async {
            let d = deployments.get(&name).await?;
            Ok((d.status.and_then(|s| s.available_replicas).unwrap_or(0) >= 1).then_some(()))
        })
        .await;
        if component == "operator" {
            eprintln!("helm install -> operator ready: {:.1}s", installed.elapsed().as_secs_f64());
        }
    }
    let pods: Api<Pod> = ns.api();
    let operator_pods =
        pods.list(&ListParams::default().labels("app.kubernetes.io/component=operator")).await.expect("pods");
    let operator_pod = operator_pods.items.first().expect("an operator pod");
    let spec = operator_pod.spec.as_ref().expect("pod spec");
    assert_eq!(spec.node_name.as_deref(), Some(env.real_node.as_str()));
    assert_eq!(spec.service_account_name.as_deref(), Some("hgr-hangar-operator"));
    assert_eq!(spec.containers[0].image.as_deref(), Some(image.as_str()));
    let leases: Api<Lease> = ns.api();
    let holder = leases.get("hangar-operator-leader").await.expect("leader lease").spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), operator_pod.metadata.name.as_deref(), "POD_NAME is the leader identity");

    // An upgrade that changes the pod template rolls the operator: the new pod takes the lead.
    let rolled = Instant::now();
    run_ok(
        helm()
            .args(["upgrade", release])
            .arg(&chart)
            .arg("-f")
            .arg(&values_file)
            .args(["--set", "podAnnotations.hangar\\.dev/rolled=yes"]),
    );
    let old_pod = operator_pod.metadata.name.clone().expect("pod name");
    let new_leader = wait_for("a new operator pod leading after the upgrade", Duration::from_secs(90), || async {
        let d = deployments.get("hgr-hangar-operator").await?;
        let status = d.status.unwrap_or_default();
        if status.updated_replicas != Some(1) || status.available_replicas != Some(1) || status.replicas != Some(1) {
            return Ok(None);
        }
        let holder = leases.get("hangar-operator-leader").await?.spec.and_then(|s| s.holder_identity);
        Ok(holder.filter(|h| *h != old_pod))
    })
    .await;
    eprintln!("helm upgrade -> new operator pod {new_leader} leading: {:.1}s", rolled.elapsed().as_secs_f64());

    // Least privilege: what each ServiceAccount may and may not do.
    let n = ns.name.as_str();
    for (sa, verb, resource, allowed) in [
        ("hgr-hangar-operator", "patch", "spaces.hangar.dev/status", true),
        ("hgr-hangar-operator", "patch", "deployments.apps", true),
        ("hgr-hangar-operator", "get", "secrets", true),
        ("hgr-hangar-operator", "create", "events.events.k8s.io", true),
        ("hgr-hangar-operator", "update", "spaces.hangar.dev", false),
        ("hgr-hangar-operator", "patch", "spaces.hangar.dev", false),
        ("hgr-hangar-operator", "delete", "deployments.apps", false),
        ("hgr-hangar-operator", "list", "secrets", false),
        ("hgr-hangar-operator", "create", "pods", false),
        ("hgr-hangar-operator", "delete", "leases.coordination.k8s.io", false),
        ("hgr-hangar-proxy", "watch", "endpointslices.discovery.k8s.io", true),
        ("hgr-hangar-proxy", "patch", "leases.coordination.k8s.io", true),
        // The internet-facing proxy reads no Secret (private Spaces' token hashes are in their status).
        ("hgr-hangar-proxy", "get", "secrets", false),
        ("hgr-hangar-proxy", "list", "secrets", false),
        ("hgr-hangar-proxy", "watch", "secrets", false),
        ("hgr-hangar-proxy", "patch", "spaces.hangar.dev", false),
        ("hgr-hangar-proxy", "create", "deployments.apps", false),
        ("hgr-hangar-proxy", "delete", "leases.coordination.k8s.io", false),
        ("hgr-hangar-webhook", "patch", "spaces.hangar.dev", true),
        ("hgr-hangar-webhook", "delete", "spaces.hangar.dev", false),
        ("hgr-hangar-webhook", "patch", "spaces.hangar.dev/status", false),
        ("hgr-hangar-webhook", "get", "secrets", false),
    ] {
        assert_eq!(can_i(&ns, sa, verb, resource, n), allowed, "{sa} {verb} {resource} in {n}");
    }
    // Roles, not ClusterRoles: nothing outside the watched namespace.
    assert!(!can_i(&ns, "hgr-hangar-operator", "list", "spaces.hangar.dev", "default"));
    assert!(!can_i(&ns, "hgr-hangar-operator", "update", "leases.coordination.k8s.io", "default"));
    // The same refusal, for real, with the operator's own token.
    let token = run_ok(ns.kubectl().args(["create", "token", "hgr-hangar-operator", "--duration=10m"]));
    let refused = run(ns.kubectl().args(["--token", token.trim(), "delete", "deployment", "hgr-hangar-proxy"]))
        .expect_err("the operator's token must not delete Deployments");
    assert!(refused.to_string().contains("forbidden"), "{refused}");
    let allowed = run_ok(ns.kubectl().args(["--token", token.trim(), "get", "pods", "-o", "name"]));
    assert!(allowed.contains("pod/"), "{allowed}");

    // The examples: the GPU Space lands on a (simulated) T4 node; the built ones wait for a
    // builder (none configured); `kubectl get spaces` shows Stage, Hardware and URL.
    run_ok(ns.kubectl().arg("apply").arg("-f").arg(repo_root().join("examples/k8s")));
    let spaces: Api<Space> = ns.api();
    // (kwok's simulated pods flap between ready and not: APP_STARTING and RUNNING both count.)
    let gpu_stage = wait_for("the GPU Space scheduled on a T4 node", Duration::from_secs(120), || async {
        let space = spaces.get("whisper-t4").await?;
        let list = pods.list(&ListParams::default().labels("hangar.dev/space=whisper-t4")).await?;
        let Some(node) = list.items.iter().find_map(|p| p.spec.as_ref()?.node_name.clone()) else { return Ok(None) };
        Ok(stage(&space).filter(|s| s == "RUNNING" || s == "APP_STARTING").map(|s| (s, node)))
    })
    .await;
    let nodes: Api<Node> = Api::all(ns.client.clone());
    let node = nodes.get(&gpu_stage.1).await.expect("node");
    let labels = node.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("nvidia.com/gpu.product").map(String::as_str), Some("Tesla-T4"), "{}", gpu_stage.1);
    assert_eq!(labels.get("hangar.dev/test-node").map(String::as_str), Some("kwok"), "the mapping's selector");
    for name in ["hello-gradio", "internal-dashboard"] {
        let space = wait_for(&format!("{name} reaching a stage"), Duration::from_secs(60), || async {
            let space = spaces.get(name).await?;
            Ok(stage(&space).is_some().then_some(space))
        })
        .await;
        assert_eq!(stage(&space).as_deref(), Some("BUILDING"), "{name}: {:?}", space.status);
    }
    let table = run_ok(ns.kubectl().args(["get", "spaces"]));
    eprintln!("{table}");
    let header: Vec<&str> = table.lines().next().expect("header").split_whitespace().collect();
    assert_eq!(header, ["NAME", "STAGE", "HARDWARE", "URL", "AGE"], "{table}");
    let row = table.lines().find(|l| l.starts_with("whisper-t4 ")).expect("whisper-t4 row");
    let url = format!("http://{n}-whisper-t4.{domain}/");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cells[0], cells[2], cells[3]), ("whisper-t4", "t4-small", url.as_str()), "{row}");
    assert!(["RUNNING", "APP_STARTING"].contains(&cells[1]), "{row}");
    // Stage changes were recorded as Events (events.k8s.io create).
    let events =
        run_ok(ns.kubectl().args(["get", "events", "--field-selector", "involvedObject.kind=Space", "-o", "name"]));
    assert!(!events.trim().is_empty(), "no Events on Spaces");

    // The proxy (synced: it only listens after listing Spaces, EndpointSlices and Secrets)
    // refuses the private Space without its token; the webhook moves a Space's head sha.
    let http = http_client();
    let (status, _) = support::http_get(&http, &format!("http://127.0.0.1:{admin_port}/healthz")).await.expect("proxy");
    assert_eq!(status, 200);
    let private = http
        .get(format!("http://127.0.0.1:{proxy_port}/"))
        .header("host", format!("{n}-internal-dashboard.{domain}"))
        .send()
        .await
        .expect("proxy request");
    assert_eq!(private.status().as_u16(), 401, "a private Space without a token");
    // A request to a Space renews its activity Lease (the proxy's server-side apply, a patch).
    let _ = http
        .get(format!("http://127.0.0.1:{proxy_port}/"))
        .header("host", format!("{n}-whisper-t4.{domain}"))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    wait_for("the proxy renewing the GPU Space's activity Lease", Duration::from_secs(30), || async {
        let lease = leases.get(&activity_lease_name("whisper-t4")).await?;
        let managers = lease.metadata.managed_fields.unwrap_or_default();
        Ok(managers.iter().any(|m| m.manager.as_deref() == Some("hangar-proxy")).then_some(()))
    })
    .await;
    let sha = "3".repeat(40);
    let delivery = json!({
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "space", "name": format!("{n}/hello-gradio"), "id": "1", "private": false,
                 "subdomain": "x", "url": {"web": "w", "api": "a"}, "headSha": sha, "owner": {"id": "o"}},
        "updatedRefs": [{"ref": "refs/heads/main", "oldSha": "f".repeat(40), "newSha": sha}],
        "webhook": {"id": "w", "version": 3}
    });
    let posted = http
        .post(format!("http://127.0.0.1:{webhook_port}/webhooks/hub"))
        .header("X-Webhook-Secret", secret)
        .json(&delivery)
        .send()
        .await
        .expect("webhook delivery");
    assert_eq!(posted.status().as_u16(), 202);
    let annotations = spaces.get("hello-gradio").await.expect("space").metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get(HEAD_SHA_ANNOTATION), Some(&sha));

    // No component was refused anything it tried.
    for component in ["operator", "proxy", "webhook"] {
        let logs = run_ok(ns.kubectl().args(["logs", &format!("deployment/{release}-hangar-{component}")]));
        assert!(!logs.to_lowercase().contains("forbidden"), "{component} was refused something:\n{logs}");
    }

    // kubectl delete cleans up the Spaces and what the operator made for them.
    run_ok(ns.kubectl().args(["delete", "--wait=true", "--timeout=60s", "-f"]).arg(repo_root().join("examples/k8s")));
    wait_for("the Spaces' workloads gone", Duration::from_secs(60), || async {
        let left = deployments.list(&ListParams::default().labels("hangar.dev/space")).await?;
        Ok(left.items.is_empty().then_some(()))
    })
    .await;

    // helm uninstall leaves nothing of the release (the CRD stays, as Helm does with crds/).
    run_ok(helm().args(["uninstall", release, "--wait", "--timeout", "120s"]));
    let left = run_ok(ns.kubectl().args([
        "get",
        "deployments,replicasets,services,endpointslices,configmaps,secrets,serviceaccounts,roles,rolebindings,leases,ingresses",
        "-l",
        &instance,
        "-o",
        "name",
    ]));
    assert_eq!(left.trim(), "", "left behind by helm uninstall");
    let cluster_left =
        run_ok(env.kubectl().args(["get", "clusterroles,clusterrolebindings", "-l", &instance, "-o", "name"]));
    assert!(!cluster_left.lines().any(|l| l.contains(&format!("{n}-"))), "{cluster_left}");
    // Their pods go with their ReplicaSets (after their grace period).
    let uninstalled = Instant::now();
    wait_for("the release's pods gone", Duration::from_secs(90), || async {
        let left = pods.list(&ListParams::default().labels(&instance)).await?;
        Ok(left.items.is_empty().then_some(()))
    })
    .await;
    eprintln!("helm uninstall -> pods gone: {:.1}s", uninstalled.elapsed().as_secs_f64());
    let _ = env.docker().args(["rmi", &image]).output();
}

/// The default mode (`watchNamespace` empty): ClusterRoles, so the components serve Spaces in
/// every namespace, still with only the verbs they use. Nothing runs (replicas 0): this
/// checks the RBAC the chart grants cluster-wide, and that uninstall removes it.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_wide_rbac_grants_only_what_each_component_uses() {
    let ns = TestNamespace::new("helm-crb", &["kube-apiserver"]).await;
    let env = ns.env.clone();
    let helm_home = tempfile::tempdir().expect("helm home");
    let helm = || {
        let mut c = env.helm(helm_home.path());
        c.args(["-n", &ns.name]);
        c
    };
    let release = "wide";
    run_ok(helm().args(["install", release]).arg(repo_root().join("charts/hangar")).args([
        "--set",
        "operator.replicas=0",
        "--set",
        "proxy.replicas=0",
        "--set",
        "webhook.replicas=0",
    ]));
    let instance = format!("app.kubernetes.io/instance={release}");
    let cluster_rbac =
        || run_ok(env.kubectl().args(["get", "clusterroles,clusterrolebindings", "-l", &instance, "-o", "name"]));
    let prefix = format!("{}-{release}-hangar", ns.name);
    let made = cluster_rbac();
    for component in ["operator", "proxy", "webhook"] {
        for kind in ["clusterrole", "clusterrolebinding"] {
            let name = format!("{kind}.rbac.authorization.k8s.io/{prefix}-{component}");
            assert!(made.lines().any(|l| l == name), "missing {name} in:\n{made}");
        }
    }
    // Another namespace than the release's: cluster-wide rules apply there too.
    let elsewhere = "default";
    for (sa, verb, resource, allowed) in [
        ("wide-hangar-operator", "watch", "spaces.hangar.dev", true),
        ("wide-hangar-operator", "patch", "spaces.hangar.dev/status", true),
        ("wide-hangar-operator", "create", "deployments.apps", true),
        ("wide-hangar-operator", "create", "leases.coordination.k8s.io", true),
        ("wide-hangar-operator", "delete", "deployments.apps", false),
        ("wide-hangar-operator", "update", "leases.coordination.k8s.io", false),
        ("wide-hangar-operator", "list", "secrets", false),
        ("wide-hangar-operator", "create", "secrets", false),
        ("wide-hangar-operator", "list", "nodes", false),
        ("wide-hangar-proxy", "get", "secrets", false),
        ("wide-hangar-proxy", "list", "secrets", false),
        ("wide-hangar-proxy", "watch", "secrets", false),
        ("wide-hangar-operator", "watch", "secrets", false),
        ("wide-hangar-proxy", "patch", "leases.coordination.k8s.io", true),
        ("wide-hangar-proxy", "create", "leases.coordination.k8s.io", false),
        ("wide-hangar-proxy", "list", "pods", false),
        // The frozen tier: the operator records decisions on pods, the node agent acts on them
        // (its own node's, by admission policy); the proxy finds it at its Node's InternalIP.
        ("wide-hangar-operator", "patch", "pods", true),
        ("wide-hangar-node-agent", "watch", "pods", true),
        ("wide-hangar-node-agent", "patch", "pods", true),
        ("wide-hangar-node-agent", "patch", "nodes", false),
        ("wide-hangar-node-agent", "get", "nodes", false),
        ("wide-hangar-node-agent", "delete", "pods", false),
        ("wide-hangar-node-agent", "get", "secrets", false),
        ("wide-hangar-proxy", "get", "nodes", true),
        ("wide-hangar-proxy", "patch", "nodes", false),
        ("wide-hangar-webhook", "patch", "spaces.hangar.dev", true),
        ("wide-hangar-webhook", "list", "spaces.hangar.dev", false),
        ("wide-hangar-webhook", "create", "spaces.hangar.dev", false),
    ] {
        assert_eq!(can_i(&ns, sa, verb, resource, elsewhere), allowed, "{sa} {verb} {resource} in {elsewhere}");
    }
    // Leader election: `update` on the one Lease named hangar-operator-leader, in the release namespace.
    assert!(can_i(
        &ns,
        "wide-hangar-operator",
        "update",
        "leases.coordination.k8s.io#hangar-operator-leader",
        &ns.name
    ));
    assert!(!can_i(&ns, "wide-hangar-operator", "update", "leases.coordination.k8s.io#another", &ns.name));
    assert!(!can_i(
        &ns,
        "wide-hangar-operator",
        "update",
        "leases.coordination.k8s.io#hangar-operator-leader",
        elsewhere
    ));
    run_ok(helm().args(["uninstall", release, "--wait", "--timeout", "60s"]));
    assert_eq!(cluster_rbac().trim(), "", "ClusterRoles left behind by helm uninstall");
}

/// A node agent's token (bound to its node, as a DaemonSet pod's is) may change the one
/// annotation it writes on the Space pods of its own node, and nothing else: not a pod on
/// another node, not another field, not a Node (the chart's ValidatingAdmissionPolicy and
/// RBAC). A token bound to no node may change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_agents_token_reaches_only_its_own_nodes_space_pods() {
    let ns = TestNamespace::new("helm-agent", &["kube-apiserver"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    support::chart::install(&ns, "confined", dir.path(), json!({}));
    let sa = "confined-hangar-node-agent";
    let kwok_node = {
        let nodes: Api<Node> = Api::all(ns.client.clone());
        let list = nodes.list(&ListParams::default().labels("hangar.dev/test-node=kwok")).await.expect("nodes");
        list.items.into_iter().find_map(|n| n.metadata.name).expect("a kwok node")
    };
    let pods: Api<Pod> = ns.api();
    let real = ns.env.real_node.clone();
    for (name, node, space) in [("own", &real, true), ("other", &kwok_node, true), ("not-a-space", &real, false)] {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": if space { json!({"hangar.dev/space": "s"}) } else { json!({}) }},
            // Never started: bound to the node by name, no image pulled.
            "spec": {"nodeName": node, "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "app", "image": ns.env.static_image, "imagePullPolicy": "Never"}]},
        }))
        .expect("pod");
        pods.create(&Default::default(), &pod).await.expect("create pod");
    }
    let bound = run_ok(
        ns.kubectl()
            .args(["create", "token", sa, "--duration=10m", "--bound-object-kind=Node"])
            .arg(format!("--bound-object-name={}", ns.env.real_node)),
    );
    let agent =
        support::chart::client_from(&support::chart::token_kubeconfig(&ns, "agent", bound.trim(), dir.path())).await;
    let as_agent: Api<Pod> = Api::namespaced(agent.clone(), &ns.name);
    let annotate = |key: &str| json!({"metadata": {"annotations": {key: "{\"state\":\"Thawed\"}"}}});
    let patch = |api: &Api<Pod>, name: &str, body: serde_json::Value| {
        let (api, name) = (api.clone(), name.to_owned());
        async move { api.patch(&name, &PatchParams::default(), &Patch::Merge(body)).await.map(|_| ()) }
    };
    // The API server loads a new policy within about a second: until then the patch passes.
    wait_for("the admission policy refusing a pod on another node", Duration::from_secs(30), || async {
        match patch(&as_agent, "other", annotate(FREEZER_ANNOTATION)).await {
            Err(kube::Error::Api(e)) if e.code == 403 => Ok(Some(())),
            Err(e) => Err(e.into()),
            Ok(()) => Ok(None),
        }
    })
    .await;
    patch(&as_agent, "own", annotate(FREEZER_ANNOTATION))
        .await
        .expect("the agent records its freezer state on its own node's pod");
    for (pod, body, why) in [
        ("other", annotate(FREEZER_ANNOTATION), "a pod on another node"),
        ("own", annotate("hangar.dev/freeze"), "the operator's annotation"),
        ("own", json!({"metadata": {"labels": {"hangar.dev/space": "another"}}}), "a label"),
        ("not-a-space", annotate(FREEZER_ANNOTATION), "a pod that is no Space's"),
    ] {
        let refused = patch(&as_agent, pod, body).await.expect_err(why);
        assert!(matches!(&refused, kube::Error::Api(e) if e.code == 403), "{why}: {refused}");
    }
    let nodes: Api<Node> = Api::all(agent);
    let advertise = json!({"metadata": {"annotations": {"hangar.dev/node-agent": "http://elsewhere:1"}}});
    let refused = nodes
        .patch(&ns.env.real_node, &PatchParams::default(), &Patch::Merge(advertise))
        .await
        .expect_err("an agent may not patch its Node");
    assert!(matches!(&refused, kube::Error::Api(e) if e.code == 403), "{refused}");
    // A token that names no node (not a DaemonSet pod's) may change nothing.
    let unbound = run_ok(ns.kubectl().args(["create", "token", sa, "--duration=10m"]));
    let unbound =
        support::chart::client_from(&support::chart::token_kubeconfig(&ns, "unbound", unbound.trim(), dir.path()))
            .await;
    let refused = patch(&Api::namespaced(unbound, &ns.name), "own", annotate(FREEZER_ANNOTATION))
        .await
        .expect_err("a token bound to no node");
    assert!(matches!(&refused, kube::Error::Api(e) if e.code == 403), "{refused}");
    run_ok(ns.env.helm(&dir.path().join("helm")).args(["uninstall", "confined", "-n", &ns.name, "--wait"]));
}

/// The chart's NetworkPolicies render and the API server accepts them: Space pods take
/// traffic from the proxy only and reach neither each other nor the cluster's private
/// ranges; each hangar component accepts only its own ports, the node agent only the proxy.
/// (Whether a cluster enforces them is its network plugin's business.)
#[tokio::test(flavor = "multi_thread")]
async fn network_policies_render_and_the_api_server_accepts_them() {
    let ns = TestNamespace::new("helm-netpol", &["kube-apiserver"]).await;
    let helm_home = tempfile::tempdir().expect("helm home");
    let rendered = run_ok(
        ns.env
            .helm(helm_home.path())
            .args(["template", "np", "-n", &ns.name])
            .arg(repo_root().join("charts/hangar"))
            .args([
                "--set",
                &format!("watchNamespace={}", ns.name),
                "--set",
                "networkPolicies.proxyCIDRs={10.1.2.3/32}",
            ]),
    );
    let policies: Vec<serde_json::Value> = rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml_ng::from_str::<serde_json::Value>(doc).ok())
        .filter(|v| v["kind"] == "NetworkPolicy")
        .collect();
    let named = |name: &str| {
        policies.iter().find(|p| p["metadata"]["name"] == name).unwrap_or_else(|| panic!("no NetworkPolicy {name}"))
    };
    let spaces = &named("np-hangar-spaces")["spec"];
    assert_eq!(spaces["podSelector"]["matchExpressions"][0]["key"], "hangar.dev/space");
    assert_eq!(spaces["policyTypes"], json!(["Ingress", "Egress"]));
    let from = spaces["ingress"][0]["from"].as_array().expect("ingress sources");
    assert_eq!(from.len(), 2, "the proxy's pods and the extra CIDR, nothing else: {from:?}");
    assert_eq!(from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "proxy");
    assert_eq!(from[1]["ipBlock"]["cidr"], "10.1.2.3/32");
    let egress = serde_json::to_string(&spaces["egress"]).expect("json");
    for private in ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"] {
        assert!(egress.contains(private), "Space egress must except {private}: {egress}");
    }
    let agent = &named("np-hangar-node-agent")["spec"]["ingress"][0];
    assert_eq!(agent["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "proxy");
    assert_eq!(agent["ports"], json!([{"port": 9450, "protocol": "TCP"}]));
    for component in ["operator", "proxy", "webhook"] {
        let ingress = &named(&format!("np-hangar-{component}"))["spec"]["ingress"];
        assert!(ingress[0].get("from").is_none() && ingress[0]["ports"].is_array(), "{component}: its ports only");
    }
    let dry = support::run_with_input(
        ns.env.kubectl().args(["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"]),
        &rendered,
    )
    .unwrap_or_else(|e| panic!("the API server rejects the rendered chart: {e}"));
    for name in ["spaces", "operator", "proxy", "webhook", "node-agent"] {
        assert!(
            dry.contains(&format!("networkpolicy.networking.k8s.io/np-hangar-{name} created (server dry run)")),
            "{dry}"
        );
    }
}
