//! Cluster tier: `hangar operator` as a separate process against the real
//! control plane, with kwok GPU nodes for placement.

mod support;

use std::time::Duration;

use hangar::space::naming;
use hangar::space::{Space, SpaceSpec, Stage};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::operator::Operator;
use support::{TestNamespace, wait_for};

/// Test mapping: tiny requests so every flavor fits the simulated nodes, and
/// CPU flavors on the kwok CPU nodes (the real node is for the end-to-end tier).
const MAPPING: &str = "\
requests: {cpu: 10m, memory: 16Mi}
flavors:
  cpu-basic:
    nodeSelector: {type: kwok}
  cpu-upgrade:
    nodeSelector: {type: kwok}
";

async fn setup(prefix: &str) -> (TestNamespace, Operator) {
    let ns = TestNamespace::new(prefix, &["kube-scheduler", "kube-controller-manager", "kwok"]).await;
    ns.install_crd().await;
    let operator = Operator::start(&ns, MAPPING, &[]);
    (ns, operator)
}

fn image_space(name: &str, hardware: &str) -> Space {
    Space::new(
        name,
        SpaceSpec { image: Some("registry.invalid/demo:1".into()), hardware: hardware.into(), ..Default::default() },
    )
}

async fn create(ns: &TestNamespace, space: &Space) {
    let api: Api<Space> = ns.api();
    api.create(&PostParams::default(), space).await.unwrap_or_else(|e| panic!("create space: {e}"));
}

/// Waits until the Space reports `stage` for its current generation.
async fn wait_stage(ns: &TestNamespace, name: &str, stage: Stage, timeout: Duration) -> Space {
    let api: Api<Space> = ns.api();
    wait_for(&format!("space {name} in stage {stage:?}"), timeout, || async {
        let space = api.get(name).await?;
        let status = space.status.clone().unwrap_or_default();
        let current = status.observed_generation == space.metadata.generation;
        Ok((current && status.stage == Some(stage)).then_some(space))
    })
    .await
}

/// The node the Space's ready pod of `flavor` runs on.
async fn node_of(ns: &TestNamespace, name: &str, flavor: &str) -> String {
    let pods: Api<Pod> = ns.api();
    wait_for(&format!("a running {flavor} pod of {name}"), Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default().labels(&format!("{}={name}", naming::SPACE_LABEL))).await?;
        Ok(list.items.into_iter().find_map(|p| {
            let hw = p.annotations().get("hangar.dev/hardware").cloned();
            let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            (running && hw.as_deref() == Some(flavor) && p.metadata.deletion_timestamp.is_none())
                .then(|| p.spec.and_then(|s| s.node_name))
                .flatten()
        }))
    })
    .await
}

async fn gpu_limit(ns: &TestNamespace, name: &str) -> Option<String> {
    let deployments: Api<Deployment> = ns.api();
    let d = deployments.get(&naming::workload_name(name)).await.ok()?;
    let container = d.spec.template.spec?.containers.into_iter().next()?;
    container.resources?.limits?.get("nvidia.com/gpu").map(|q| q.0.clone())
}

#[tokio::test]
async fn gpu_and_cpu_spaces_land_on_the_right_nodes_and_move_with_their_hardware() {
    let (ns, _operator) = setup("op-placement").await;
    create(&ns, &image_space("cpu", "cpu-basic")).await;
    create(&ns, &image_space("gpu", "t4-small")).await;

    let cpu = wait_stage(&ns, "cpu", Stage::Running, Duration::from_secs(60)).await;
    assert!(node_of(&ns, "cpu", "cpu-basic").await.starts_with("kwok-cpu-"));
    let status = cpu.status.expect("status");
    assert_eq!(status.url.as_deref(), Some(&*format!("http://{}-cpu.hf.test/", ns.name)));
    assert_eq!(gpu_limit(&ns, "cpu").await, None);

    let gpu = wait_stage(&ns, "gpu", Stage::Running, Duration::from_secs(60)).await;
    assert_eq!(node_of(&ns, "gpu", "t4-small").await, "kwok-gpu-t4-0");
    assert_eq!(gpu_limit(&ns, "gpu").await.as_deref(), Some("1"));
    let hw = gpu.status.and_then(|s| s.hardware).expect("hardware status");
    assert_eq!((hw.requested.as_deref(), hw.current.as_deref()), (Some("t4-small"), Some("t4-small")));

    // Move it: t4-small -> a10g-large lands on the A10G node; `current` follows once it serves there.
    let spaces: Api<Space> = ns.api();
    spaces
        .patch("gpu", &PatchParams::default(), &Patch::Merge(json!({"spec": {"hardware": "a10g-large"}})))
        .await
        .expect("change hardware");
    assert_eq!(node_of(&ns, "gpu", "a10g-large").await, "kwok-gpu-a10g-0");
    let moved = wait_for("hardware.current = a10g-large", Duration::from_secs(60), || async {
        let s = spaces.get("gpu").await?;
        let hw = s.status.clone().and_then(|s| s.hardware).unwrap_or_default();
        Ok((hw.current.as_deref() == Some("a10g-large")
            && s.status.as_ref().and_then(|s| s.stage) == Some(Stage::Running))
        .then_some(s))
    })
    .await;
    assert_eq!(moved.status.and_then(|s| s.hardware).and_then(|h| h.requested).as_deref(), Some("a10g-large"));

    // No free GPU: 8 A100s are asked for, the node has 4. The scheduler's reason reaches the status.
    create(&ns, &image_space("big", "a100x8")).await;
    let big = wait_for("big to be reported unschedulable", Duration::from_secs(60), || async {
        let s = spaces.get("big").await?;
        let status = s.status.clone().unwrap_or_default();
        let scheduled = status.conditions.iter().find(|c| c.type_ == "Scheduled").cloned();
        Ok(scheduled.filter(|c| c.status == "False").map(|c| (status, c)))
    })
    .await;
    assert_eq!(big.0.stage, Some(Stage::AppStarting));
    assert_eq!(big.1.reason, "Unschedulable");
    assert!(big.1.message.contains("Insufficient nvidia.com/gpu"), "scheduler message: {}", big.1.message);
}

#[tokio::test]
async fn invalid_flavor_is_a_config_error_naming_the_field() {
    let (ns, _operator) = setup("op-config").await;
    create(&ns, &image_space("typo", "h100-mega")).await;
    let space = wait_stage(&ns, "typo", Stage::ConfigError, Duration::from_secs(30)).await;
    let message = space.status.and_then(|s| s.message).expect("a message");
    assert!(message.starts_with("spec.hardware: unknown hardware flavor \"h100-mega\""), "{message}");
    let deployments: Api<Deployment> = ns.api();
    assert!(deployments.get_opt(&naming::workload_name("typo")).await.expect("get").is_none());
}

async fn renew(ns: &TestNamespace, name: &str) {
    let leases: Api<Lease> = ns.api();
    let now = k8s_openapi::jiff::Timestamp::now();
    let patch = json!({"spec": {"renewTime": MicroTime(now)}});
    leases
        .patch(&naming::activity_lease_name(name), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("renew the activity lease");
}

/// What a user's `kubectl patch` of `spec.paused` sends.
async fn set_paused(ns: &TestNamespace, name: &str, paused: bool) {
    let spaces: Api<Space> = ns.api();
    let patch = Patch::Merge(json!({"spec": {"paused": paused}}));
    spaces.patch(name, &PatchParams::default(), &patch).await.unwrap_or_else(|e| panic!("paused: {paused}: {e}"));
}

async fn replicas(ns: &TestNamespace, name: &str) -> Option<i32> {
    let deployments: Api<Deployment> = ns.api();
    deployments.get(&naming::workload_name(name)).await.ok()?.spec.replicas
}

#[tokio::test]
async fn idle_spaces_sleep_and_wake_on_lease_renewal_but_paused_ones_do_not() {
    let (ns, _operator) = setup("op-sleep").await;
    let mut space = image_space("nap", "cpu-basic");
    space.spec.sleep_after = Some("5s".into());
    create(&ns, &space).await;
    // Served, then asleep: idle time counts from readiness, so the status
    // records when it began to serve (waiting for RUNNING itself would race
    // its 5 s of idle time on a busy machine).
    let asleep = wait_stage(&ns, "nap", Stage::Sleeping, Duration::from_secs(90)).await;
    let served = asleep.status.as_ref().and_then(|s| s.ready_since.clone());
    assert!(served.is_some(), "asleep only after it served: {:?}", asleep.status);
    assert_eq!(replicas(&ns, "nap").await, Some(0));
    assert_eq!(asleep.status.and_then(|s| s.replicas).map(|r| r.requested), Some(0));

    let woken_at = std::time::Instant::now();
    renew(&ns, "nap").await;
    wait_for("replicas 1 after the wake", Duration::from_secs(10), || async {
        Ok((replicas(&ns, "nap").await == Some(1)).then_some(()))
    })
    .await;
    let scale_up = woken_at.elapsed();
    let spaces: Api<Space> = ns.api();
    wait_for("nap to serve again after the wake", Duration::from_secs(30), || async {
        let status = spaces.get("nap").await?.status;
        Ok((status.and_then(|s| s.ready_since) > served).then_some(()))
    })
    .await;
    eprintln!("wake: lease renewal -> replicas 1 in {scale_up:?}, -> RUNNING in {:?}", woken_at.elapsed());

    set_paused(&ns, "nap", true).await;
    wait_stage(&ns, "nap", Stage::Paused, Duration::from_secs(30)).await;
    renew(&ns, "nap").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let paused = spaces.get("nap").await.expect("get");
    assert_eq!(paused.status.and_then(|s| s.stage), Some(Stage::Paused), "traffic must not wake a paused Space");
    assert_eq!(replicas(&ns, "nap").await, Some(0));
}

#[tokio::test]
async fn a_space_created_paused_gets_its_objects_only_once_unpaused() {
    let (ns, _operator) = setup("op-dormant").await;
    let mut space = image_space("later", "cpu-basic");
    space.spec.paused = true;
    create(&ns, &space).await;
    wait_stage(&ns, "later", Stage::Paused, Duration::from_secs(60)).await;
    // Settled (the stage is written alongside the workload): nothing was made.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let workload = naming::workload_name("later");
    let (deployments, services, leases): (Api<Deployment>, Api<Service>, Api<Lease>) = (ns.api(), ns.api(), ns.api());
    assert!(deployments.get_opt(&workload).await.expect("get").is_none(), "no Deployment while never run");
    assert!(services.get_opt(&workload).await.expect("get").is_none(), "no Service while never run");
    let lease = naming::activity_lease_name("later");
    assert!(leases.get_opt(&lease).await.expect("get").is_none(), "no Lease while never run");

    set_paused(&ns, "later", false).await;
    wait_stage(&ns, "later", Stage::Running, Duration::from_secs(60)).await;
    assert_eq!(replicas(&ns, "later").await, Some(1));
    assert!(services.get_opt(&workload).await.expect("get").is_some(), "Service made on unpause");
    assert!(leases.get_opt(&lease).await.expect("get").is_some(), "Lease made on unpause");
}

#[tokio::test]
async fn restart_converges_without_duplicates_deletion_leaves_nothing_and_rest_means_no_writes() {
    let (ns, mut operator) = setup("op-life").await;
    for i in 0..5 {
        create(&ns, &image_space(&format!("s{i}"), "cpu-basic")).await;
    }
    // Kill the operator while it works, start another.
    tokio::time::sleep(Duration::from_millis(700)).await;
    operator.kill();
    let _operator = Operator::start(&ns, MAPPING, &[]);
    for i in 0..5 {
        wait_stage(&ns, &format!("s{i}"), Stage::Running, Duration::from_secs(60)).await;
    }
    let deployments: Api<Deployment> = ns.api();
    let services: Api<Service> = ns.api();
    let leases: Api<Lease> = ns.api();
    assert_eq!(deployments.list(&ListParams::default()).await.expect("list").items.len(), 5);
    assert_eq!(services.list(&ListParams::default()).await.expect("list").items.len(), 5);
    assert_eq!(leases.list(&ListParams::default()).await.expect("list").items.len(), 5);

    // At rest (running, its replica counted ready): no further writes to the
    // Space, so its resourceVersion stays.
    let spaces: Api<Space> = ns.api();
    wait_for("s0 to settle with its replica ready", Duration::from_secs(30), || async {
        let s = spaces.get("s0").await?;
        let ready = s.status.as_ref().and_then(|s| s.replicas.as_ref()).map(|r| r.current);
        Ok((ready == Some(1)).then_some(()))
    })
    .await;
    let before = spaces.get("s0").await.expect("get").resource_version();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = spaces.get("s0").await.expect("get").resource_version();
    assert_eq!(before, after, "a Space at rest must cause no status writes");
    let metrics = support::http_get(&support::http_client(), &format!("http://{}/metrics", _operator.http))
        .await
        .expect("operator /metrics");
    assert_eq!(metrics.0, 200);
    assert!(metrics.1.contains("hangar_operator_spaces{stage=\"RUNNING\"} 5"), "{}", metrics.1);
    assert!(metrics.1.contains("hangar_operator_reconcile_duration_seconds_count"), "{}", metrics.1);

    // Deleting a Space removes everything it owned (garbage collection through ownerReferences).
    spaces.delete("s0", &DeleteParams::default()).await.expect("delete");
    let workload = naming::workload_name("s0");
    wait_for("s0's objects to be gone", Duration::from_secs(60), || async {
        let gone = deployments.get_opt(&workload).await?.is_none()
            && services.get_opt(&workload).await?.is_none()
            && leases.get_opt(&naming::activity_lease_name("s0")).await?.is_none();
        Ok(gone.then_some(()))
    })
    .await;
    // And the operator forgets it at once (not at its next restart): the
    // Spaces-by-stage gauge counts the four left.
    wait_for("the stage gauge to drop the deleted Space", Duration::from_secs(10), || async {
        let (_, body) =
            support::http_get(&support::http_client(), &format!("http://{}/metrics", _operator.http)).await?;
        Ok(body.contains("hangar_operator_spaces{stage=\"RUNNING\"} 4").then_some(()))
    })
    .await;
}
