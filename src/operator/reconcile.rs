//! One reconciliation of a Space: load -> validate -> render (pure) -> apply -> status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::builds::{BuildState, Builds};
use super::metrics::Metrics;
use super::placement::HardwareMapping;
use super::render::{self, RenderInput};
use super::sleep;
use super::status::{self, BuildView, Facts};
use crate::space::app_config::runtime_spec;
use crate::space::naming::{self, CUSTOM_HEADERS_ANNOTATION, SPACE_LABEL};
use crate::space::{AppConfig, BuildStatus, ConfigError, Space, SpaceStatus, Stage, resolve};
use crate::{Error, Result};

/// Field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "hangar-operator";
/// Even a Space at rest is looked at this often (reads only, no writes).
const RESYNC: Duration = Duration::from_secs(600);

/// Operator settings.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Public domain of Space hosts (`{owner}-{name}.{domain}`).
    pub domain: String,
    /// Scheme of the status URL (`https` behind a TLS ingress).
    pub url_scheme: String,
    pub mapping: HardwareMapping,
    /// Default freeze times per flavor kind (the frozen sleep tier).
    pub sleep_policy: crate::space::SleepPolicy,
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub config: OperatorConfig,
    pub builds: Arc<Builds>,
    /// Consecutive failures per Space, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Metrics,
        config: OperatorConfig,
        builds: Arc<Builds>,
    ) -> Self {
        Self { client, recorder, metrics, config, builds, failures: Mutex::new(HashMap::new()) }
    }
}

fn key(space: &Space) -> String {
    format!("{}/{}", space.namespace().unwrap_or_default(), space.name_any())
}

/// Whole seconds: the apiserver stores times at that precision, and a status
/// carrying nanoseconds would differ from its stored self on every pass.
fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// The Lease the proxy renews; made here on first sight, never updated here.
async fn ensure_lease(api: &Api<Lease>, space: &Space, now: Timestamp) -> Result<Lease> {
    let name = naming::activity_lease_name(&space.name_any());
    if let Some(lease) = api.get_opt(&name).await? {
        return Ok(lease);
    }
    match api.create(&PostParams::default(), &render::activity_lease(space, now)).await {
        Ok(lease) => Ok(lease),
        // The proxy (or a previous operator) was first: use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(api.get(&name).await?),
        Err(e) => Err(e.into()),
    }
}

/// What the Space runs: its configuration, image, build view and build record.
struct Runnable {
    /// `None` until a build has read the repository's front matter.
    config: Option<std::result::Result<AppConfig, (Stage, String)>>,
    image: Option<String>,
    build: BuildView,
    record: Option<BuildStatus>,
}

fn config_error(e: ConfigError) -> (Stage, String) {
    (Stage::ConfigError, e.to_string())
}

/// Validates the Space and finds its image: given, built, or being built.
fn runnable(space: &Space, builds: &Arc<Builds>) -> Runnable {
    let spec = &space.spec;
    if let Some(image) = &spec.image {
        let config = Some(resolve(spec, None).map_err(config_error));
        return Runnable { config, image: Some(image.clone()), build: BuildView::Idle, record: None };
    }
    if spec.source.is_none() {
        // The CRD's CEL rule forbids this; say so if it happens anyway.
        let error = (Stage::ConfigError, "spec: set exactly one of source or image".to_owned());
        return Runnable { config: Some(Err(error)), image: None, build: BuildView::Idle, record: None };
    }
    let previous_record = space.status.as_ref().and_then(|s| s.build.clone());
    // While a build runs or after it failed, the last good build keeps serving.
    let serving = |build: BuildView, record: Option<BuildStatus>| match builds.last_success(space) {
        Some(out) => Runnable {
            config: Some(out.app_config.with_runtime_spec(spec).map_err(config_error)),
            image: Some(out.image),
            build,
            record,
        },
        // Nothing built yet: only the spec's own fields can be judged.
        None => {
            let config = match runtime_spec(spec) {
                Err(e) => Some(Err(config_error(e))),
                Ok(_) => None,
            };
            Runnable { config, image: None, build, record }
        }
    };
    match builds.ensure(space) {
        BuildState::Unavailable => serving(
            BuildView::Building { message: "no builder configured: start the operator with --registry".into() },
            previous_record,
        ),
        BuildState::Running { .. } => {
            let revision = space.annotations().get(naming::HEAD_SHA_ANNOTATION).cloned();
            let target = revision.or_else(|| spec.source.as_ref().map(|s| s.revision.clone())).unwrap_or_default();
            serving(BuildView::Building { message: format!("building {target}") }, previous_record)
        }
        BuildState::Failed { failure, record } => {
            serving(BuildView::Failed { stage: failure.stage, message: failure.message }, Some(record))
        }
        BuildState::Built { output, record } => Runnable {
            config: Some(output.app_config.with_runtime_spec(spec).map_err(config_error)),
            image: Some(output.image),
            build: BuildView::Idle,
            record: Some(record),
        },
    }
}

pub async fn reconcile(space: Arc<Space>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&space, &ctx).await;
    ctx.metrics.observe(started.elapsed());
    if result.is_ok()
        && let Ok(mut failures) = ctx.failures.lock()
    {
        failures.remove(&key(&space));
    }
    result
}

async fn reconcile_inner(space: &Space, ctx: &Context) -> Result<Action> {
    let namespace = space.namespace().unwrap_or_default();
    let name = space.name_any();
    if space.meta().deletion_timestamp.is_some() {
        // Owned objects go with the Space through their ownerReferences.
        ctx.metrics.set_stage(&key(space), None);
        ctx.builds.forget(&namespace, &name);
        return Ok(Action::await_change());
    }
    let client = ctx.client.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let now = now();

    // Load and validate.
    let lease = ensure_lease(&leases, space, now).await?;
    let Runnable { config, image, build, record } = runnable(space, &ctx.builds);
    let sleep_times = config.as_ref().and_then(|c| c.as_ref().ok()).map(|c| ctx.config.sleep_policy.for_config(c));
    let decision = sleep::decide_tier(sleep::last_activity(&lease), sleep_times, now);
    let runnable = matches!(config, Some(Ok(_))) && image.is_some() && !space.spec.paused;
    let replicas = i32::from(runnable && !decision.stopped());
    // Frozen: the pods stay, their node agents freeze them on this decision.
    let freeze_decision = decision.freeze_decision().filter(|_| runnable);

    // Render and apply.
    let workload = naming::workload_name(&name);
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let (deployment, template_hash) = match (&config, &image) {
        (Some(Ok(config)), Some(image)) => {
            let placement = ctx.config.mapping.placement(config.flavor);
            let input =
                RenderInput { space, config, placement: &placement, image, replicas, domain: &ctx.config.domain };
            let desired = render::deployment(&input);
            let hash = render::template_hash(&desired).map(str::to_owned);
            let applied = deployments.patch(&workload, &apply, &Patch::Apply(&desired)).await?;
            services.patch(&workload, &apply, &Patch::Apply(&render::service(&input))).await?;
            (Some(applied), hash)
        }
        // Nothing valid to run: stop what may still run, keep the objects.
        _ => {
            let existing = deployments.get_opt(&workload).await?;
            let existing = match existing {
                Some(d) if d.spec.replicas != Some(0) => {
                    let scale = json!({"spec": {"replicas": 0}});
                    Some(deployments.patch(&workload, &PatchParams::default(), &Patch::Merge(&scale)).await?)
                }
                other => other,
            };
            (existing, None)
        }
    };

    // Status from the facts.
    let pod_list = pods.list(&ListParams::default().labels(&format!("{SPACE_LABEL}={name}"))).await?.items;
    sleep::record_decision(&ctx.client, &namespace, &pod_list, freeze_decision).await?;
    let url = format!("{}://{}/", ctx.config.url_scheme, naming::host(&namespace, &name, &ctx.config.domain));
    let desired = status::derive(&Facts {
        generation: space.meta().generation,
        config_error: config.as_ref().and_then(|c| c.as_ref().err()).cloned(),
        paused: space.spec.paused,
        asleep: decision.stopped(),
        sleep: if runnable { sleep::status(&decision, &pod_list) } else { None },
        build,
        image,
        hardware_requested: &space.spec.hardware,
        replicas_requested: replicas,
        url: Some(url),
        deployment: deployment.as_ref(),
        template_hash: template_hash.as_deref(),
        pods: &pod_list,
        previous: space.status.as_ref(),
        build_record: record,
        now,
    });
    if let Some(Ok(config)) = &config {
        publish_custom_headers(space, ctx, config).await?;
    }
    write_status(space, ctx, &desired).await?;
    ctx.metrics.set_stage(&key(space), desired.stage);

    Ok(Action::requeue(decision.recheck_in.map_or(RESYNC, |d| d.min(RESYNC))))
}

/// The proxy adds the front matter's `custom_headers` to responses; it learns
/// them from this annotation (it never reads repositories). Written only when
/// it changes, with the operator's field manager owning just this key.
async fn publish_custom_headers(space: &Space, ctx: &Context, config: &AppConfig) -> Result<()> {
    let current = space.annotations().get(CUSTOM_HEADERS_ANNOTATION);
    let desired = (!config.custom_headers.is_empty()).then(|| json!(config.custom_headers).to_string());
    if current == desired.as_ref() {
        return Ok(());
    }
    let api: Api<Space> = Api::namespaced(ctx.client.clone(), &space.namespace().unwrap_or_default());
    let annotations = desired.map_or_else(|| json!({}), |h| json!({CUSTOM_HEADERS_ANNOTATION: h}));
    let patch = json!({"apiVersion": "hangar.dev/v1alpha1", "kind": "Space", "metadata": {"annotations": annotations}});
    api.patch(&space.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Writes the status only when it changed, and records stage changes as Events.
async fn write_status(space: &Space, ctx: &Context, desired: &SpaceStatus) -> Result<()> {
    let previous = space.status.as_ref();
    if previous == Some(desired) {
        return Ok(());
    }
    let api: Api<Space> = Api::namespaced(ctx.client.clone(), &space.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "hangar.dev/v1alpha1", "kind": "Space", "status": desired});
    api.patch_status(&space.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.metrics.status_writes.inc();
    let old_stage = previous.and_then(|s| s.stage);
    if let Some(stage) = desired.stage.filter(|s| Some(*s) != old_stage) {
        let event = Event {
            type_: if stage.is_error() { EventType::Warning } else { EventType::Normal },
            reason: stage_reason(stage),
            note: desired.message.clone(),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        // An Event is informational: failing to record one must not fail the reconcile.
        if let Err(e) = ctx.recorder.publish(&event, &space.object_ref(&())).await {
            tracing::warn!(space = %key(space), error = %e, "could not record event");
        }
    }
    Ok(())
}

/// `APP_STARTING` -> `AppStarting`: Events want CamelCase reasons.
fn stage_reason(stage: Stage) -> String {
    stage
        .as_str()
        .split('_')
        .map(|w| {
            let mut chars = w.chars();
            chars.next().map_or(String::new(), |c| c.to_string() + &chars.as_str().to_lowercase())
        })
        .collect()
}

/// Backs off exponentially per Space on errors: 1 s, 2 s, 4 s ... 5 min.
pub fn error_policy(space: Arc<Space>, error: &Error, ctx: Arc<Context>) -> Action {
    let reason = match error {
        Error::Kube(kube::Error::Api(e)) => e.reason.clone(),
        Error::Kube(_) => "kube".to_owned(),
        other => format!("{other:?}").split(['(', ' ']).next().unwrap_or("other").to_owned(),
    };
    ctx.metrics.error(&reason);
    let attempts = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key(&space)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = Duration::from_secs(1u64 << attempts.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    tracing::warn!(space = %key(&space), %error, attempts, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_reasons_are_camel_case() {
        assert_eq!(stage_reason(Stage::AppStarting), "AppStarting");
        assert_eq!(stage_reason(Stage::Running), "Running");
        assert_eq!(stage_reason(Stage::NoAppFile), "NoAppFile");
    }
}
