//! The baseline of the wake benchmarks: a plain Deployment with a Space's own pod
//! template (same image, probes and node) that nothing of hangar sees, scaled by hand.

use std::time::Duration;

use hangar::space::naming::workload_name;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::{TestNamespace, wait_for};

/// Label of the floor Deployments' pods.
pub const FLOOR_LABEL: &str = "bench.hangar.dev/floor";

/// Pods matching `selector` that are not being deleted.
pub async fn pods(ns: &TestNamespace, selector: &str) -> Vec<Pod> {
    let api: Api<Pod> = ns.api();
    let list = api.list(&ListParams::default().labels(selector)).await.map(|l| l.items).unwrap_or_default();
    list.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect()
}

/// The pod's IP once it is Ready.
pub fn ready_ip(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let ready = status.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then(|| status.pod_ip.clone()).flatten()
}

/// The Space's own pod template as a plain Deployment (no hangar labels: no agent or
/// operator sees it), at 0 replicas; returns its name and the app's port.
pub async fn floor_deployment(ns: &TestNamespace, space: &str) -> (String, u16) {
    let deployments: Api<Deployment> = ns.api();
    let source = deployments.get(&workload_name(space)).await.expect("the Space's Deployment");
    let mut template = source.spec.template;
    let port = template.spec.as_ref().and_then(|p| p.containers[0].ports.as_ref()?.first()).map(|p| p.container_port);
    let port = port.and_then(|p| u16::try_from(p).ok()).expect("the app's container port");
    let name = format!("floor-{space}");
    let labels = json!({FLOOR_LABEL: name});
    template.metadata = Some(serde_json::from_value(json!({"labels": labels})).expect("labels"));
    let floor: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 0, "selector": {"matchLabels": labels}, "template": template},
    }))
    .expect("floor deployment");
    deployments.create(&PostParams::default(), &floor).await.expect("create floor deployment");
    (name, port)
}

/// Patches the Deployment's replicas (what `kubectl scale` sends).
pub async fn scale(ns: &TestNamespace, deployment: &str, replicas: i32) {
    let api: Api<Deployment> = ns.api();
    let patch = json!({"spec": {"replicas": replicas}});
    api.patch(deployment, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("scale");
}

/// Polls the floor's pod IP until HTTP 200; returns the pod.
pub async fn floor_answering(ns: &TestNamespace, deployment: &str, port: u16) -> Pod {
    let selector = format!("{FLOOR_LABEL}={deployment}");
    let http = super::held_client();
    wait_for("the floor pod answering", Duration::from_secs(180), || async {
        for pod in pods(ns, &selector).await {
            if let Some(ip) = ready_ip(&pod)
                && let Ok(r) = http.get(format!("http://{ip}:{port}/")).send().await
                && r.status() == 200
            {
                return Ok(Some(pod));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(None)
    })
    .await
}
