//! The Kubernetes controller for `Space`: load -> validate -> render (pure) -> apply -> status.

pub mod applied;
pub mod builds;
pub mod cache;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod private_tokens;
pub mod reconcile;
pub mod render;
pub mod run_logs;
pub mod sleep;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::StreamExt;
use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;

use crate::space::Space;
use crate::space::host_claim::Claim;
use crate::space::naming::SPACE_LABEL;

/// `hangar operator` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// Public domain of Space hosts: a Space is served at `{owner}-{name}.{domain}`.
    #[arg(long, env = "HANGAR_DOMAIN", default_value = "hangar.localhost")]
    pub domain: String,
    /// Scheme of the URLs written to status (`https` behind a TLS ingress).
    #[arg(long, env = "HANGAR_URL_SCHEME", default_value = "https")]
    pub url_scheme: String,
    /// YAML file mapping flavors to node selectors, tolerations and requests
    /// (defaults follow NVIDIA GPU feature discovery labels).
    #[arg(long, env = "HANGAR_HARDWARE_MAPPING")]
    pub hardware_mapping: Option<PathBuf>,
    /// Watch Spaces of this namespace only (default: all namespaces).
    #[arg(long, env = "HANGAR_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Reconcile only the Spaces with these labels (a label selector, e.g.
    /// `team=ml`): operators that share a cluster split its Spaces by label.
    #[arg(long, env = "HANGAR_SPACE_SELECTOR")]
    pub space_selector: Option<String>,
    #[command(flatten)]
    pub sleep: sleep::SleepArgs,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "HANGAR_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Namespace of the leader election Lease; leader election is off without it.
    #[arg(long, env = "HANGAR_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// This replica's identity in leader election (the pod name in a cluster).
    #[arg(long, env = "POD_NAME", default_value = "hangar-operator")]
    pub identity: String,
    /// Reconciles running at once (one per Space at most). They mostly read
    /// caches; the bound keeps a burst of new Spaces from flooding the apiserver.
    #[arg(long, env = "HANGAR_RECONCILE_CONCURRENCY", default_value_t = 16)]
    pub reconcile_concurrency: u16,
    /// File with the key private Spaces' tokens are hashed with for the proxy
    /// (the proxy's `--token-key-file`); without it no private Space can be reached.
    #[arg(long, env = "HANGAR_TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,
    /// How often a private Space's token Secret is read again (a rotated token
    /// takes effect within this time, or at once with any change of the Space's spec).
    #[arg(long, env = "HANGAR_TOKEN_RESYNC", default_value = "30s", value_parser = parse_duration)]
    pub token_resync: std::time::Duration,
    #[command(flatten)]
    pub build: BuildArgs,
    #[command(flatten)]
    pub limits: crate::http_server::Limits,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::space::duration::parse(s).map_err(|e| e.to_string())
}

/// Reads the token key file shared by the operator and the proxy.
pub fn read_token_key(path: &std::path::Path) -> crate::Result<Arc<crate::space::access_token::TokenKey>> {
    let bytes =
        std::fs::read(path).map_err(|e| crate::Error::Invalid(format!("token key file {}: {e}", path.display())))?;
    crate::space::access_token::TokenKey::new(bytes.trim_ascii())
        .map(Arc::new)
        .map_err(|e| crate::Error::Invalid(format!("token key file {}: {e}", path.display())))
}

/// Where the operator builds Space repositories (no `--registry`: no builds).
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// Registry (`host:port`) that built images are pushed to and pulled from.
    #[arg(long, env = "HANGAR_REGISTRY")]
    pub registry: Option<String>,
    #[arg(long, env = "HANGAR_REGISTRY_USERNAME", requires = "registry_password")]
    pub registry_username: Option<String>,
    #[arg(long, env = "HANGAR_REGISTRY_PASSWORD", hide_env_values = true)]
    pub registry_password: Option<String>,
    /// Docker engine the builds run on (default: DOCKER_HOST, else the local socket).
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Python base image of gradio/streamlit Spaces; `{python_version}` is replaced.
    #[arg(long, env = "HANGAR_PYTHON_IMAGE", default_value = "python:{python_version}-slim")]
    pub python_image: String,
    /// Base images by `python_version`, `3.11=IMAGE,3.12=IMAGE`: a Space that sets a
    /// version not listed is a CONFIG_ERROR naming the listed ones (unless
    /// `--python-image` has the `{python_version}` placeholder, which builds any).
    #[arg(long, env = "HANGAR_PYTHON_IMAGES", default_value = "", value_parser = parse_python_images)]
    pub python_images: PythonImages,
    /// Image with busybox httpd that serves static Spaces.
    #[arg(long, env = "HANGAR_STATIC_IMAGE", default_value = "busybox:stable")]
    pub static_image: String,
    /// PEM bundle that images trust for pip (TLS-intercepting proxies).
    #[arg(long, env = "HANGAR_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<PathBuf>,
    /// Builds running at once.
    #[arg(long, env = "HANGAR_BUILD_CONCURRENCY", default_value_t = 2)]
    pub build_concurrency: usize,
    /// Limit of one build, e.g. `30m`.
    #[arg(long, env = "HANGAR_BUILD_TIMEOUT", default_value = "30m")]
    pub build_timeout: String,
    /// Also build `file://` URLs and local paths on the operator's machine (a
    /// single-machine setup whose Space owners are trusted). Off: https, http,
    /// ssh and git URLs only; a Space with another source is a CONFIG_ERROR.
    #[arg(long, env = "HANGAR_ALLOW_LOCAL_GIT")]
    pub allow_local_git: bool,
    /// Network mode of the builds' RUN steps: unset, the engine's default (its bridge,
    /// which reaches whatever the engine's host reaches: package indexes, registries,
    /// and on a cluster node the pod network too); `none` (builds that fetch nothing);
    /// `host`. BuildKit takes only these.
    #[arg(long, env = "HANGAR_BUILD_NETWORK")]
    pub build_network: Option<String>,
}

/// `--python-images`: `python_version` -> base image.
#[derive(Debug, Clone, Default)]
pub struct PythonImages(pub std::collections::BTreeMap<String, String>);

/// Parses `--python-images` (also used by `hangar up`).
pub fn parse_python_images(text: &str) -> Result<PythonImages, String> {
    crate::builder::parse_python_images(text).map(PythonImages)
}

impl BuildArgs {
    /// The builder, when a registry is configured.
    pub async fn builder(&self) -> crate::Result<Option<crate::builder::Builder>> {
        let Some(registry) = &self.registry else { return Ok(None) };
        let mut config = crate::builder::BuilderConfig::new(registry, &self.python_image, &self.static_image);
        config.docker_host = self.docker_host.clone();
        config.extra_ca_file = self.extra_ca_file.clone();
        config.max_concurrent = self.build_concurrency.max(1);
        config.allow_local_sources = self.allow_local_git;
        config.build_network = self.build_network.clone().filter(|n| !n.is_empty() && n != "default");
        config.python_images = self.python_images.0.clone();
        config.timeout = crate::space::duration::parse(&self.build_timeout)
            .map_err(|e| crate::Error::Invalid(format!("--build-timeout: {e}")))?;
        if let (Some(username), Some(password)) = (&self.registry_username, &self.registry_password) {
            config.registry_credentials =
                Some(crate::builder::RegistryCredentials { username: username.clone(), password: password.clone() });
        }
        let builder =
            crate::builder::Builder::new(config).await.map_err(|e| crate::Error::Invalid(format!("builder: {e}")))?;
        Ok(Some(builder))
    }
}

const LEADER_LEASE: &str = "hangar-operator-leader";

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

async fn metrics_handler(State(state): State<HttpState>) -> (StatusCode, String) {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (StatusCode::OK, body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not leading yet")
    }
}

/// The Space an object belongs to by its label (Leases, which the proxy may
/// make first, and pods, which the Space does not own directly).
fn by_space_label<K: kube::Resource>(object: &K) -> Option<ObjectRef<Space>> {
    let space = object.meta().labels.as_ref()?.get(SPACE_LABEL)?;
    Some(ObjectRef::new(space).within(object.meta().namespace.as_deref()?))
}

/// Reconciles the other Spaces whose host name `space` shares: whether each
/// holds it may have changed with `space` coming or going.
fn recheck_host_sharers(
    store: &reflector::Store<Space>,
    space: &Space,
    triggers: &tokio::sync::mpsc::UnboundedSender<ObjectRef<Space>>,
) {
    let me = Claim::of(space);
    let sharing = store.state_filter(|o| {
        let other = Claim::of(o);
        !other.is(&me) && other.same_host(&me)
    });
    for other in sharing {
        let _ = triggers.send(ObjectRef::from_obj(&*other));
    }
}

/// Runs the operator until a shutdown signal or the loss of leadership.
pub async fn run(args: OperatorArgs) -> crate::Result<()> {
    let mapping = match &args.hardware_mapping {
        Some(path) => placement::HardwareMapping::from_yaml(&std::fs::read_to_string(path)?)
            .map_err(|e| crate::Error::Invalid(format!("{}: {e}", path.display())))?,
        None => placement::HardwareMapping::default(),
    };
    let token_key = args.token_key_file.as_deref().map(read_token_key).transpose()?;
    if token_key.is_none() {
        tracing::warn!("no --token-key-file: private Spaces get no token hash, so nobody can reach them");
    }
    let client = Client::try_default().await?;
    let builder = args.build.builder().await?;
    let (triggers, triggered) = tokio::sync::mpsc::unbounded_channel();
    let recheck = triggers.clone();
    let builds = Arc::new(builds::Builds::new(builder, client.clone(), triggers));
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let r = registry.sub_registry_with_prefix("hangar_operator");
    r.register("builds_started", "Builds asked of the builder", builds.started.clone());
    r.register("builds_taken_up", "Builds taken up from a Space's status instead of built", builds.taken_up.clone());
    let ready = Arc::new(AtomicBool::new(false));
    let state = HttpState { registry: Arc::new(registry), ready: ready.clone() };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(state);
    // Build and run logs, shaped like the hub's logs API. A private Space's
    // logs want its token, checked as the proxy checks its traffic.
    let (spaces, writer) = reflector::store::<Space>();
    let access: crate::builder::logs::LogAccess = {
        let (spaces, key) = (spaces.clone(), token_key.clone());
        Arc::new(move |owner: &str, name: &str, headers: &axum::http::HeaderMap| {
            let space = spaces.get(&reflector::ObjectRef::new(name).within(owner))?;
            let access = crate::proxy::kubernetes::access_of(&space, key.as_ref());
            Some(crate::proxy::auth::allowed(&access, headers))
        })
    };
    let app = match builds.builder() {
        Some(builder) => app.merge(crate::builder::logs::router(builder.logs().clone(), access)),
        None => app,
    };
    let listener = tokio::net::TcpListener::bind(args.http_addr).await?;
    tracing::info!(addr = %args.http_addr, "operator health and metrics listening");
    tokio::spawn(async move {
        if let Err(e) = crate::http_server::serve(listener, app, args.limits, std::future::pending()).await {
            tracing::error!(error = %e, "health server failed");
        }
    });

    let elector = args
        .leader_election_namespace
        .as_deref()
        .map(|ns| leader::Elector::new(Api::namespaced(client.clone(), ns), LEADER_LEASE, &args.identity));
    if let Some(elector) = &elector {
        tracing::info!(identity = %args.identity, "waiting for leadership");
        elector.acquire().await;
        tracing::info!(identity = %args.identity, "leading");
    }
    ready.store(true, Ordering::Relaxed);
    // The app's own output for `.../logs/run`, next to the build logs.
    let _run_logs = builds.builder().map(|b| run_logs::spawn(client.clone(), args.namespace.clone(), b.logs().clone()));

    let reporter = Reporter { controller: "hangar-operator".into(), instance: Some(args.identity.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let config = reconcile::OperatorConfig {
        domain: args.domain,
        url_scheme: args.url_scheme,
        mapping,
        sleep_policy: args.sleep.policy(),
        token_key,
        token_resync: args.token_resync,
    };

    fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        ns.map_or_else(|| Api::all(client.clone()), |ns| Api::namespaced(client.clone(), ns))
    }
    let ns = args.namespace.as_deref();
    let (caches, triggers) = cache::watches(
        api::<Deployment>(&client, ns),
        api::<PartialObjectMeta<Service>>(&client, ns),
        api::<Lease>(&client, ns),
        api::<Pod>(&client, ns),
    );
    let ctx =
        Arc::new(reconcile::Context::new(client.clone(), recorder, metrics, config, builds, caches, spaces.clone()));
    let forgetting = ctx.clone();
    let store = spaces.clone();
    let space_watch = match &args.space_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let space_events = watcher(api::<Space>(&client, ns), space_watch)
        .default_backoff()
        .modify(cache::strip_managed_fields)
        .reflect(writer)
        .inspect_ok(move |event| match event {
            watcher::Event::Delete(space) => {
                forgetting.forget(&space.namespace().unwrap_or_default(), &space.name_any());
                recheck_host_sharers(&store, space, &recheck);
            }
            // A Space that appears may hold (or take back) another's host name.
            watcher::Event::Apply(space) => recheck_host_sharers(&store, space, &recheck),
            watcher::Event::InitDone => forgetting.forget_absent(),
            _ => {}
        })
        .applied_objects()
        // The operator's own status writes are no reason to reconcile again:
        // only the spec (generation) and annotations (head-sha) are.
        .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());
    let controller = Controller::for_stream(space_events, spaces)
        .owns_stream(triggers.deployments)
        .owns_stream(triggers.services)
        .watches_stream(triggers.leases, |lease| by_space_label(&lease))
        .watches_stream(triggers.pods, |pod| by_space_label(&pod))
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(triggered))
        // No debounce: a Lease renewal (the wake signal) must reach its reconcile
        // at once, and a reconcile that finds nothing changed only reads caches.
        .with_config(controller::Config::default().concurrency(args.reconcile_concurrency.max(1)))
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile error");
            }
        });
    match &elector {
        Some(elector) => {
            tokio::select! {
                () = controller => {}
                () = elector.hold() => {
                    return Err(crate::Error::Invalid("lost leadership; exiting so a new leader takes over".into()));
                }
            }
        }
        None => controller.await,
    }
    tracing::info!("operator stopped");
    Ok(())
}
