//! One reconciliation of a Space: load -> validate -> render (pure) -> apply -> status.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::applied;
use super::builds::{BuildState, Builds};
use super::cache::{self, Caches};
use super::metrics::Metrics;
use super::placement::HardwareMapping;
use super::render::{self, RenderInput};
use super::sleep;
use super::status::{self, BuildView, Facts};
use crate::space::app_config::runtime_spec;
use crate::space::host_claim::{self, Claim};
use crate::space::naming::{self, BASE_PATH_ANNOTATION, CUSTOM_HEADERS_ANNOTATION};
use crate::space::{AppConfig, BuildStatus, BuiltStatus, ConfigError, Space, SpaceStatus, Stage, resolve};
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
    /// Key of private Spaces' published token hashes (`None`: none published).
    pub token_key: Option<Arc<crate::space::access_token::TokenKey>>,
    /// How often a private Space's token Secret is read again.
    pub token_resync: Duration,
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub config: OperatorConfig,
    pub builds: Arc<Builds>,
    /// What reconciles read instead of asking the apiserver.
    pub caches: Caches,
    /// Private Spaces' published token MACs.
    pub tokens: super::private_tokens::PrivateTokens,
    /// The controller's own store of Spaces: a Space missing from it is gone.
    spaces: Store<Space>,
    /// Consecutive failures per Space, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Spaces this process holds state for (stage gauge, build, failures).
    known: Mutex<Known>,
}

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Metrics,
        config: OperatorConfig,
        builds: Arc<Builds>,
        caches: Caches,
        spaces: Store<Space>,
    ) -> Self {
        let tokens = super::private_tokens::PrivateTokens::new(config.token_key.clone(), config.token_resync);
        Self {
            client,
            recorder,
            metrics,
            config,
            builds,
            caches,
            tokens,
            spaces,
            failures: Mutex::new(HashMap::new()),
            known: Mutex::new(Known::default()),
        }
    }

    /// Drops what this process keeps for a deleted Space: its entry in the
    /// stage gauge, its build (cancelled if running) and its failure count.
    /// Called on the watch's delete event: without a finalizer, nothing else
    /// would tell (owned objects go through their ownerReferences).
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        self.metrics.set_stage(&key, None);
        self.builds.forget(namespace, name);
        self.tokens.forget(namespace, name);
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&key);
        }
        if let Ok(mut known) = self.known.lock() {
            known.remove(&key);
        }
    }

    /// After the Space watch relisted: forgets the Spaces deleted while it was
    /// down (their delete events were never seen).
    pub fn forget_absent(&self) {
        let present: HashSet<String> = self.spaces.state().iter().map(|s| key(s)).collect();
        let gone = self.known.lock().map(|k| k.absent_from(&present)).unwrap_or_default();
        for key in gone {
            if let Some((namespace, name)) = key.split_once('/') {
                self.forget(namespace, name);
            }
        }
    }
}

/// The keys (`namespace/name`) of the Spaces this process holds state for.
#[derive(Debug, Default)]
struct Known(HashSet<String>);

impl Known {
    fn insert(&mut self, key: &str) {
        if !self.0.contains(key) {
            self.0.insert(key.to_owned());
        }
    }

    fn remove(&mut self, key: &str) {
        self.0.remove(key);
    }

    fn absent_from(&self, present: &HashSet<String>) -> Vec<String> {
        self.0.iter().filter(|k| !present.contains(*k)).cloned().collect()
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

/// The Lease the proxy renews: made here when the cache has none, never updated here.
async fn create_lease(ctx: &Context, space: &Space, now: Timestamp) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &space.namespace().unwrap_or_default());
    ctx.metrics.call("create_lease");
    match api.create(&PostParams::default(), &render::activity_lease(space, now)).await {
        // The proxy (or this operator, not yet seen by the watch) was first: the
        // watch brings that one, and with it another reconcile.
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
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
    /// The build that `image` comes from (source Spaces), for `status.built`.
    built: Option<BuiltStatus>,
}

fn config_error(e: ConfigError) -> (Stage, String) {
    (Stage::ConfigError, e.to_string())
}

/// Validates the Space and finds its image: given, built, or being built.
fn runnable(space: &Space, builds: &Arc<Builds>) -> Runnable {
    let spec = &space.spec;
    if let Some(image) = &spec.image {
        let config = Some(resolve(spec, None).map_err(config_error));
        return Runnable { config, image: Some(image.clone()), build: BuildView::Idle, record: None, built: None };
    }
    if spec.source.is_none() {
        // The CRD's CEL rule forbids this; say so if it happens anyway.
        let error = (Stage::ConfigError, "spec: set exactly one of source or image".to_owned());
        return Runnable { config: Some(Err(error)), image: None, build: BuildView::Idle, record: None, built: None };
    }
    let previous_record = space.status.as_ref().and_then(|s| s.build.clone());
    // While a build runs or after it failed, the last good build keeps serving.
    let serving = |build: BuildView, record: Option<BuildStatus>| match builds.last_success(space) {
        Some(built) => Runnable {
            config: Some(AppConfig::from_built(&built.config, spec).map_err(config_error)),
            image: Some(built.image.clone()),
            build,
            record,
            built: Some(built),
        },
        // Nothing built yet: only the spec's own fields can be judged.
        None => {
            let config = match runtime_spec(spec) {
                Err(e) => Some(Err(config_error(e))),
                Ok(_) => None,
            };
            Runnable { config, image: None, build, record, built: None }
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
        BuildState::Built { built, record } => Runnable {
            config: Some(AppConfig::from_built(&built.config, spec).map_err(config_error)),
            image: Some(built.image.clone()),
            build: BuildView::Idle,
            record: Some(record),
            built: Some(*built),
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
        ctx.forget(&namespace, &name);
        return Ok(Action::await_change());
    }
    ctx.caches.ready().await?;
    if let Ok(mut known) = ctx.known.lock() {
        known.insert(&key(space));
    }
    let now = now();

    // Load (from the caches) and validate.
    let lease = ctx.caches.lease(&namespace, &naming::activity_lease_name(&name));
    let Runnable { config, image, build, record, built } = runnable(space, &ctx.builds);
    let valid_config = config.as_ref().and_then(|c| c.as_ref().ok());
    let sleep_times = valid_config.map(|c| ctx.config.sleep_policy.for_config(c));
    let startup_timeout = valid_config.map_or(crate::space::app_config::DEFAULT_STARTUP_TIMEOUT, |c| c.startup_timeout);
    // No Lease yet: the one made below records activity now.
    let last_activity = lease.as_deref().map_or(Some(now), sleep::last_activity);
    // Idle time counts from readiness: the pods of this pass, the stage of the last.
    let pods = ctx.caches.pods(&namespace, &name);
    let recorded_stage = space.status.as_ref().and_then(|s| s.stage);
    let phase = sleep::phase(recorded_stage, &pods);
    let recorded_ready = sleep::recorded_ready_since(space.status.as_ref());
    let ready_since = sleep::ready_since(phase, recorded_stage, recorded_ready, now);
    let idle_since = sleep::idle_since(phase, last_activity, ready_since, startup_timeout);
    let decision = sleep::decide_tier(idle_since, sleep_times, now);
    let runnable = matches!(config, Some(Ok(_))) && image.is_some() && !space.spec.paused;
    let replicas = i32::from(runnable && !decision.stopped());
    // Frozen: the pods stay, their node agents freeze them on this decision.
    let freeze_decision = decision.freeze_decision().filter(|_| runnable);

    // Render (pure).
    let workload = naming::workload_name(&name);
    let rendered = match (&config, &image) {
        (Some(Ok(config)), Some(image)) => {
            let placement = ctx.config.mapping.placement(config.flavor);
            let input =
                RenderInput { space, config, placement: &placement, image, replicas, domain: &ctx.config.domain };
            Some((render::deployment(&input), render::service(&input)))
        }
        _ => None,
    };
    let template_hash = rendered.as_ref().and_then(|(d, _)| render::template_hash(d)).map(str::to_owned);
    let deployment = ctx.caches.deployment(&namespace, &workload);
    let dormant = without_objects(
        space.spec.paused,
        deployment.is_some() || ctx.caches.written.contains(cache::DEPLOYMENT, (&namespace, &workload)),
    );

    // Status from the facts at hand, written alongside the workload rather
    // than after it: a new or changed Space shows where it stands at once.
    let host = naming::host(&namespace, &name, &ctx.config.domain);
    let host_holder = host_holder(space, &ctx.spaces);
    let url = match host_holder {
        None => format!("{}://{host}/", ctx.config.url_scheme),
        // Served by its path route only.
        Some(_) => {
            format!("{}://{}{}/", ctx.config.url_scheme, ctx.config.domain, naming::path_prefix(&namespace, &name))
        }
    };
    let token_hmac = ctx.tokens.published(&ctx.client, space).await;
    let facts = Facts {
        generation: space.meta().generation,
        config_error: config.as_ref().and_then(|c| c.as_ref().err()).cloned(),
        paused: space.spec.paused,
        asleep: decision.stopped(),
        sleep: if runnable { sleep::status(&decision, &pods) } else { None },
        build,
        image,
        hardware_requested: &space.spec.hardware,
        replicas_requested: replicas,
        url: Some(url),
        template_hash: template_hash.as_deref(),
        pods: &pods,
        previous: space.status.as_ref(),
        build_record: record,
        token_hmac,
        now,
    };
    let mut desired = SpaceStatus { built, ready_since: ready_since.map(Time), ..status::derive(&facts) };
    if let Some(holder) = &host_holder {
        status::host_taken(&mut desired, &host, holder, &facts);
    }
    let status = async {
        if let Some(Ok(config)) = &config {
            publish_route_config(space, ctx, config).await?;
        }
        write_status(space, ctx, &desired).await
    };
    let writes = async {
        if lease.is_none() && !dormant {
            create_lease(ctx, space, now).await?;
        }
        sleep::record_decision(&ctx.client, &namespace, &pods, freeze_decision).await?;
        match rendered {
            Some(_) if dormant => Ok(()),
            Some((deployment_desired, service_desired)) => {
                apply_workload(ctx, &namespace, deployment.as_deref(), deployment_desired, service_desired).await
            }
            // Nothing valid to run: stop what may still run, keep the objects.
            None => match deployment.as_deref() {
                Some(d) if d.spec.replicas != Some(0) => {
                    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
                    let scale = json!({"spec": {"replicas": 0}});
                    ctx.metrics.call("scale_to_zero");
                    api.patch(&workload, &PatchParams::default(), &Patch::Merge(&scale)).await?;
                    Ok(())
                }
                _ => Ok(()),
            },
        }
    };
    let (status, writes) = tokio::join!(status, writes);
    status?;
    writes?;

    // A Space deleted while this ran must not come back into the gauge or the builds.
    if ctx.spaces.get(&ObjectRef::from_obj(space)).is_some() {
        ctx.metrics.set_stage(&key(space), desired.stage);
    } else {
        ctx.forget(&namespace, &name);
    }
    let recheck = [decision.recheck_in, ctx.tokens.recheck_in(space)].into_iter().flatten().min();
    Ok(Action::requeue(recheck.map_or(RESYNC, |d| d.min(RESYNC))))
}

/// A paused Space that has never run needs nothing but its status: no
/// Deployment, Service or Lease until it is unpaused. Each would be a write,
/// and a Deployment sets off the controller-manager's own (ReplicaSet, status).
/// A Space that ran keeps its objects while paused (scaled to 0).
fn without_objects(paused: bool, has_workload: bool) -> bool {
    paused && !has_workload
}

/// Server-side applies the Service and the Deployment, each only when the
/// cache does not already hold it as rendered now (or someone scaled it).
async fn apply_workload(
    ctx: &Context,
    namespace: &str,
    cached: Option<&Deployment>,
    mut deployment: Deployment,
    mut service: Service,
) -> Result<()> {
    let name = deployment.name_any();
    let key = (namespace, name.as_str());
    let written = &ctx.caches.written;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let hash = applied::stamp(&mut service);
    let cached_service = ctx.caches.service(namespace, &name);
    if written.needs_apply(cache::SERVICE, cached_service.as_ref().map(|s| &s.metadata), key, &hash, false) {
        let api: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
        ctx.metrics.call("apply_service");
        api.patch(&name, &apply, &Patch::Apply(&service)).await?;
        written.record(cache::SERVICE, key, hash);
    }
    // The Deployment last: it sets off the most follow-up events (ReplicaSet,
    // pods), and their reconciles then find the Service cached already.
    let hash = applied::stamp(&mut deployment);
    // Someone scaled it (the hash covers only what the operator rendered).
    let scaled = cached.is_some_and(|c| c.spec.replicas != deployment.spec.replicas);
    if written.needs_apply(cache::DEPLOYMENT, cached.map(|c| &c.metadata), key, &hash, scaled) {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
        ctx.metrics.call("apply_deployment");
        api.patch(&name, &apply, &Patch::Apply(&deployment)).await?;
        written.record(cache::DEPLOYMENT, key, hash);
    }
    Ok(())
}

/// The older Space (`owner/name`) that holds this one's host name, if another
/// does ([`host_claim`]: the same rule the proxy routes by).
fn host_holder(space: &Space, spaces: &Store<Space>) -> Option<String> {
    let me = Claim::of(space);
    let sharing = spaces.state_filter(|o| {
        let other = Claim::of(o);
        !other.is(&me) && other.same_host(&me)
    });
    let holder = host_claim::holder(&me, sharing.iter().map(|s| Claim::of(s)))?;
    Some(naming::space_id(holder.namespace, holder.name))
}

/// The proxy adds the front matter's `custom_headers` to responses and
/// redirects a Space's root to its `base_path`; it learns both from these
/// annotations (it never reads repositories). Written only when they change,
/// with the operator's field manager owning just these keys.
async fn publish_route_config(space: &Space, ctx: &Context, config: &AppConfig) -> Result<()> {
    let headers = (!config.custom_headers.is_empty()).then(|| json!(config.custom_headers).to_string());
    let base_path = (config.base_path != "/").then(|| config.base_path.clone());
    let current = space.annotations();
    if current.get(CUSTOM_HEADERS_ANNOTATION) == headers.as_ref()
        && current.get(BASE_PATH_ANNOTATION) == base_path.as_ref()
    {
        return Ok(());
    }
    let api: Api<Space> = Api::namespaced(ctx.client.clone(), &space.namespace().unwrap_or_default());
    let mut annotations = serde_json::Map::new();
    if let Some(h) = headers {
        annotations.insert(CUSTOM_HEADERS_ANNOTATION.to_owned(), h.into());
    }
    if let Some(p) = base_path {
        annotations.insert(BASE_PATH_ANNOTATION.to_owned(), p.into());
    }
    let patch = json!({"apiVersion": "hangar.dev/v1alpha1", "kind": "Space", "metadata": {"annotations": annotations}});
    ctx.metrics.call("annotate_space");
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
    // The whole status in one JSON patch operation: it replaces what is there
    // (fields gone from `desired` go too, whatever the cache last showed) and
    // costs the apiserver far less than a server-side apply of a custom
    // resource's status. The operator is the status's only writer.
    let patch: json_patch::Patch = serde_json::from_value(json!([{"op": "add", "path": "/status", "value": desired}]))?;
    ctx.metrics.call("write_status");
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() };
    api.patch_status(&space.name_any(), &params, &Patch::Json::<()>(patch)).await?;
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
        ctx.metrics.call("publish_event");
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
    fn spaces_gone_during_a_relist_are_found() {
        let mut known = Known::default();
        known.insert("a/x");
        known.insert("a/y");
        known.insert("b/x");
        known.remove("a/y");
        let present = HashSet::from(["a/x".to_owned()]);
        assert_eq!(known.absent_from(&present), ["b/x"]);
    }

    #[test]
    fn only_a_paused_space_that_never_ran_goes_without_objects() {
        assert!(without_objects(true, false));
        assert!(!without_objects(true, true), "paused after running: kept, scaled to 0");
        assert!(!without_objects(false, false), "to run: made");
        assert!(!without_objects(false, true));
    }

    #[test]
    fn event_reasons_are_camel_case() {
        assert_eq!(stage_reason(Stage::AppStarting), "AppStarting");
        assert_eq!(stage_reason(Stage::Running), "Running");
        assert_eq!(stage_reason(Stage::NoAppFile), "NoAppFile");
    }
}
