//! Rendering a Space into Kubernetes objects: a pure function of the Space,
//! its effective configuration, the flavor's placement, the image and the
//! replica count.
//!
//! A Deployment, not a StatefulSet: a Space is a stateless web app without
//! stable identity or volumes, and a Deployment's surge rollout keeps the old
//! version serving until the new one is ready.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, Lifecycle, LifecycleHandler, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Service,
    ServicePort, ServiceSpec, SleepAction, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, MicroTime, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::placement::Placement;
use crate::space::naming::{self, MANAGED_BY, MANAGED_BY_LABEL, SPACE_LABEL};
use crate::space::{AppConfig, Space};

/// Pod template label: a hash of the rendered pod spec, so the operator can
/// tell the pods of the current version from those of the previous one.
pub const TEMPLATE_LABEL: &str = "hangar.dev/template";
/// Pod template annotation: the flavor the pod was made for (`hardware.current`).
pub const HARDWARE_ANNOTATION: &str = "hangar.dev/hardware";
/// The app container's name.
pub const APP_CONTAINER: &str = "app";
/// Spaces run as this user (as on the hub).
const SPACE_UID: i64 = 1000;
/// Probe period while starting: short, because it bounds the wake latency.
const STARTUP_PERIOD_SECONDS: i32 = 1;
/// A terminating pod keeps serving this long before it gets SIGTERM, so routers
/// (the proxy watches EndpointSlices) stop sending to it first: a rollout or a
/// scale-down then drops no request.
const DRAIN_SECONDS: i64 = 3;

/// Everything a Space renders from.
#[derive(Debug, Clone)]
pub struct RenderInput<'a> {
    pub space: &'a Space,
    pub config: &'a AppConfig,
    pub placement: &'a Placement,
    pub image: &'a str,
    pub replicas: i32,
    /// Public domain for `SPACE_HOST` and the status URL.
    pub domain: &'a str,
}

/// The labels every object of a Space carries.
pub fn labels(space: &Space) -> BTreeMap<String, String> {
    BTreeMap::from([(SPACE_LABEL.to_owned(), space.name_any()), (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())])
}

fn metadata(space: &Space, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: space.namespace(),
        labels: Some(labels(space)),
        owner_references: space.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.to_string()), ..Default::default() }
}

/// The Space's environment: the hub's variables first, then its own
/// variables, then its secrets by reference (their values are never copied).
pub fn env_vars(input: &RenderInput) -> Vec<EnvVar> {
    let (namespace, name) = (input.space.namespace().unwrap_or_default(), input.space.name_any());
    let flavor = input.config.flavor;
    let mut vars = vec![
        env("SPACE_ID", naming::space_id(&namespace, &name)),
        env("SPACE_HOST", naming::host(&namespace, &name, input.domain)),
        env("SPACE_AUTHOR_NAME", &namespace),
        env("SPACE_REPO_NAME", &name),
        env("SYSTEM", "spaces"),
        env("ACCELERATOR", flavor.accelerator()),
        env("CPU_CORES", flavor.vcpu),
        env("MEMORY", flavor.memory_quantity()),
    ];
    if let Some(title) = &input.config.title {
        vars.push(env("SPACE_TITLE", title));
    }
    vars.extend(input.space.spec.env.iter().map(|(k, v)| env(k, v)));
    vars.extend(input.space.spec.secrets.iter().map(|s| EnvVar {
        name: s.name.clone(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: s.secret_key_ref.name.clone(),
                key: s.secret_key_ref.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }));
    vars
}

fn resources(input: &RenderInput) -> ResourceRequirements {
    let flavor = input.config.flavor;
    let mut limits = BTreeMap::from([
        ("cpu".to_owned(), Quantity(flavor.vcpu.to_string())),
        ("memory".to_owned(), Quantity(flavor.memory_quantity())),
    ]);
    let mut requests = match &input.placement.requests {
        Some(r) => BTreeMap::from([
            ("cpu".to_owned(), Quantity(r.cpu.clone())),
            ("memory".to_owned(), Quantity(r.memory.clone())),
        ]),
        None => limits.clone(),
    };
    if flavor.gpu_count() > 0 {
        // Extended resources must have requests equal to limits.
        let gpus = Quantity(flavor.gpu_count().to_string());
        limits.insert(input.placement.gpu_resource.clone(), gpus.clone());
        requests.insert(input.placement.gpu_resource.clone(), gpus);
    }
    ResourceRequirements { limits: Some(limits), requests: Some(requests), ..Default::default() }
}

fn tcp_probe(port: u16, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(i32::from(port)), host: None }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

fn pod_spec(input: &RenderInput) -> PodSpec {
    let port = input.config.app_port;
    // The startup probe bounds the start by `startupTimeout`; there is no
    // liveness probe, so a slow model load or a frozen pod is never killed.
    let startup_failures = i32::try_from(input.config.startup_timeout.as_secs().max(1)).unwrap_or(i32::MAX);
    PodSpec {
        containers: vec![Container {
            name: APP_CONTAINER.to_owned(),
            image: Some(input.image.to_owned()),
            image_pull_policy: Some("IfNotPresent".to_owned()),
            ports: Some(vec![ContainerPort {
                name: Some("http".to_owned()),
                container_port: i32::from(port),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            env: Some(env_vars(input)),
            resources: Some(resources(input)),
            startup_probe: Some(tcp_probe(port, STARTUP_PERIOD_SECONDS, startup_failures)),
            readiness_probe: Some(tcp_probe(port, 2, 2)),
            // The kubelet's own sleep action: app images need no `sleep` binary.
            lifecycle: Some(Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction { seconds: DRAIN_SECONDS }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            security_context: Some(SecurityContext {
                run_as_user: Some(SPACE_UID),
                run_as_group: Some(SPACE_UID),
                run_as_non_root: Some(true),
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), add: None }),
                ..Default::default()
            }),
            ..Default::default()
        }],
        security_context: Some(PodSecurityContext {
            run_as_user: Some(SPACE_UID),
            run_as_group: Some(SPACE_UID),
            fs_group: Some(SPACE_UID),
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), localhost_profile: None }),
            ..Default::default()
        }),
        node_selector: Some(input.placement.node_selector.clone()).filter(|s| !s.is_empty()),
        tolerations: Some(input.placement.tolerations.clone()).filter(|t| !t.is_empty()),
        runtime_class_name: input.placement.runtime_class_name.clone(),
        // Untrusted app code gets no API credentials and no service env pollution.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(10 + DRAIN_SECONDS),
        ..Default::default()
    }
}

/// Short, stable hash of a serializable value.
fn short_hash(value: &impl serde::Serialize) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..5])
}

pub fn deployment(input: &RenderInput) -> Deployment {
    let space = input.space;
    let pod = pod_spec(input);
    let mut pod_labels = labels(space);
    pod_labels.insert(TEMPLATE_LABEL.to_owned(), short_hash(&pod));
    Deployment {
        metadata: metadata(space, naming::workload_name(&space.name_any())),
        spec: DeploymentSpec {
            replicas: Some(input.replicas),
            selector: LabelSelector { match_labels: Some(labels(space)), ..Default::default() },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            revision_history_limit: Some(2),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        HARDWARE_ANNOTATION.to_owned(),
                        input.config.flavor.name.to_owned(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        },
        status: None,
    }
}

/// The template hash of the pods `deployment` makes.
pub fn template_hash(deployment: &Deployment) -> Option<&str> {
    deployment.spec.template.metadata.as_ref()?.labels.as_ref()?.get(TEMPLATE_LABEL).map(String::as_str)
}

pub fn service(input: &RenderInput) -> Service {
    let space = input.space;
    Service {
        metadata: metadata(space, naming::workload_name(&space.name_any())),
        spec: Some(ServiceSpec {
            selector: Some(labels(space)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: 80,
                target_port: Some(IntOrString::Int(i32::from(input.config.app_port))),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The activity Lease, as first created: activity "now", so a new Space gets
/// its full sleep time. Afterwards only the proxy writes `renewTime`.
pub fn activity_lease(space: &Space, now: k8s_openapi::jiff::Timestamp) -> Lease {
    Lease {
        metadata: metadata(space, naming::activity_lease_name(&space.name_any())),
        spec: Some(LeaseSpec {
            holder_identity: Some(naming::LEASE_HOLDER.to_owned()),
            renew_time: Some(MicroTime(now)),
            acquire_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::placement::{HardwareMapping, Requests};
    use crate::space::{SpaceSecret, SpaceSpec, resolve};

    fn space(spec: SpaceSpec) -> Space {
        let mut space = Space::new("whisper", spec);
        space.metadata.namespace = Some("alice".into());
        space.metadata.uid = Some("0000-1111".into());
        space
    }

    fn spec(hardware: &str) -> SpaceSpec {
        SpaceSpec { image: Some("reg/app:1".into()), hardware: hardware.into(), ..Default::default() }
    }

    fn render<T>(space: &Space, replicas: i32, f: impl Fn(&RenderInput) -> T) -> T {
        let config = resolve(&space.spec, None).expect("valid spec");
        let placement = HardwareMapping::default().placement(config.flavor);
        f(&RenderInput {
            space,
            config: &config,
            placement: &placement,
            image: "reg/app:1",
            replicas,
            domain: "hf.test",
        })
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.template.spec.as_ref().expect("pod spec")
    }

    #[test]
    fn gpu_flavor_gets_gpu_resources_selector_and_toleration() {
        let d = render(&space(spec("t4-small")), 1, deployment);
        let pod = pod(&d);
        let res = pod.containers[0].resources.as_ref().expect("resources");
        let limits = res.limits.as_ref().expect("limits");
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
        assert_eq!(limits["cpu"], Quantity("4".into()));
        assert_eq!(limits["memory"], Quantity("15Gi".into()));
        assert_eq!(res.requests.as_ref().expect("requests")["nvidia.com/gpu"], Quantity("1".into()));
        assert_eq!(pod.node_selector.as_ref().expect("selector")["nvidia.com/gpu.product"], "Tesla-T4");
        assert_eq!(pod.tolerations.as_ref().expect("tolerations")[0].key.as_deref(), Some("nvidia.com/gpu"));
    }

    #[test]
    fn cpu_flavor_has_no_gpu_and_placement_requests_apply() {
        let s = space(spec("cpu-basic"));
        let config = resolve(&s.spec, None).expect("valid");
        let mut placement = HardwareMapping::default().placement(config.flavor);
        placement.requests = Some(Requests { cpu: "100m".into(), memory: "64Mi".into() });
        let d = deployment(&RenderInput {
            space: &s,
            config: &config,
            placement: &placement,
            image: "i",
            replicas: 1,
            domain: "d",
        });
        let res = pod(&d).containers[0].resources.clone().expect("resources");
        assert_eq!(res.requests.expect("requests")["cpu"], Quantity("100m".into()));
        let limits = res.limits.expect("limits");
        assert_eq!(limits["cpu"], Quantity("2".into()));
        assert!(!limits.contains_key("nvidia.com/gpu"));
        assert!(pod(&d).node_selector.is_none() && pod(&d).tolerations.is_none());
    }

    #[test]
    fn environment_of_a_space() {
        let mut s = spec("t4-medium");
        s.env.insert("MODEL".into(), "small".into());
        s.secrets.push(SpaceSecret {
            name: "HF_TOKEN".into(),
            secret_key_ref: crate::space::SecretKeyRef { name: "creds".into(), key: "token".into() },
        });
        let d = render(&space(s), 1, deployment);
        let env = pod(&d).containers[0].env.clone().expect("env");
        let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
        assert_eq!(value("SPACE_ID").as_deref(), Some("alice/whisper"));
        assert_eq!(value("SPACE_HOST").as_deref(), Some("alice-whisper.hf.test"));
        assert_eq!(value("SPACE_AUTHOR_NAME").as_deref(), Some("alice"));
        assert_eq!(value("SPACE_REPO_NAME").as_deref(), Some("whisper"));
        assert_eq!(value("SYSTEM").as_deref(), Some("spaces"));
        assert_eq!(value("ACCELERATOR").as_deref(), Some("t4"));
        assert_eq!(value("CPU_CORES").as_deref(), Some("8"));
        assert_eq!(value("MEMORY").as_deref(), Some("30Gi"));
        assert_eq!(value("MODEL").as_deref(), Some("small"));
        let secret = env.iter().find(|e| e.name == "HF_TOKEN").expect("secret var");
        assert_eq!(secret.value, None, "secret values are never copied");
        let key_ref = secret.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("secretKeyRef");
        assert_eq!((key_ref.name.as_str(), key_ref.key.as_str()), ("creds", "token"));
    }

    #[test]
    fn hardened_probed_and_scaled() {
        let d = render(&space(spec("cpu-basic")), 0, deployment);
        assert_eq!(d.spec.replicas, Some(0));
        assert_eq!(d.metadata.name.as_deref(), Some("space-whisper"));
        assert_eq!(d.metadata.owner_references.as_ref().map(|o| o[0].controller), Some(Some(true)));
        let pod = pod(&d);
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().expect("container security context");
        assert_eq!(
            (sc.run_as_user, sc.run_as_non_root, sc.allow_privilege_escalation),
            (Some(1000), Some(true), Some(false))
        );
        assert_eq!(sc.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_owned()]));
        let startup = c.startup_probe.as_ref().expect("startup probe");
        assert_eq!(startup.tcp_socket.as_ref().map(|t| t.port.clone()), Some(IntOrString::Int(7860)));
        // 30 minutes of 1 s periods.
        assert_eq!((startup.period_seconds, startup.failure_threshold), (Some(1), Some(1800)));
        assert!(c.readiness_probe.is_some() && c.liveness_probe.is_none());
        assert_eq!(pod.automount_service_account_token, Some(false));
        // Terminating pods drain before SIGTERM, inside their grace period.
        let drain = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).and_then(|h| h.sleep.as_ref());
        assert_eq!(drain.map(|s| s.seconds), Some(DRAIN_SECONDS));
        assert!(pod.termination_grace_period_seconds > Some(DRAIN_SECONDS));
    }

    #[test]
    fn template_hash_follows_the_pod_and_service_targets_the_app_port() {
        let a = render(&space(spec("cpu-basic")), 1, deployment);
        let b = render(&space(spec("cpu-basic")), 0, deployment);
        let c = render(&space(spec("cpu-upgrade")), 1, deployment);
        assert_eq!(template_hash(&a), template_hash(&b), "replicas do not change the template");
        assert_ne!(template_hash(&a), template_hash(&c));
        let svc = render(&space(spec("cpu-basic")), 1, service);
        let port = &svc.spec.as_ref().and_then(|s| s.ports.clone()).expect("ports")[0];
        assert_eq!((port.port, port.target_port.clone()), (80, Some(IntOrString::Int(7860))));
    }
}
