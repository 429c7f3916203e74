//! From a Space's git repository to a pushed image: checkout, build plan,
//! bollard build, push, logs.
//!
//! # Use (the operator's view)
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use hangar::builder::{Builder, BuilderConfig, BuildRequest, LogKind};
//! let mut config = BuilderConfig::new("registry.local:5000", "python:{python_version}-slim", "hangar/static:1");
//! config.extra_ca_file = Some("/etc/ssl/certs/ca-certificates.crt".into());
//! let builder = Builder::new(config).await?;
//! # let (spec, source) = (hangar::space::SpaceSpec::default(), hangar::space::GitSource { git: "file:///r".into(), revision: "main".into(), credentials_secret: None });
//! let mut request = BuildRequest::new("alice", "demo", source, spec); // variables = spec.env
//! // The values of spec.secrets, by name: mounted at build time, masked in logs.
//! request.secrets = [("HF_TOKEN".to_owned(), "<value>".to_owned())].into_iter().collect();
//! match builder.build(request).await {
//!     // status.image = out.image (digest-pinned), status.build.revision = out.commit
//!     Ok(out) => println!("image {} (reused: {})", out.image, out.reused),
//!     // status.stage = failure.stage (NO_APP_FILE, CONFIG_ERROR or BUILD_ERROR),
//!     // status.build.message = failure.message (never holds a secret)
//!     Err(failure) => println!("{:?}: {}", failure.stage, failure.message),
//! }
//! // The build's lines, live: builder.logs().subscribe("alice/demo", LogKind::Build),
//! // over HTTP: hangar::builder::logs::router(builder.logs().clone(), access) (hub-shaped SSE);
//! // run logs: logs::pump_lines(pod log stream) or Engine::follow_container_logs.
//! # Ok(()) }
//! ```
//!
//! * Checkout: the git CLI (see [`source`] for why), shallow at the revision
//!   (branch, tag or sha), https with Basic credentials, `file://` or a path.
//! * Plan ([`plan`], pure): the front matter and the spec decide the SDK;
//!   gradio/streamlit/static get a generated Dockerfile (uid 1000, 0.0.0.0 on
//!   the app port, pinned `sdk_version`, `requirements.txt`, `packages.txt`,
//!   the extra CA for pip); docker uses the repository's Dockerfile.
//! * Builds are keyed by (commit, sdk, generated Dockerfile, variables, base
//!   image, extra CA): a key whose image is already pushed is reused without
//!   building (`BuildOutput::reused`; asked of the registry, or of the engine
//!   when `push` is off).
//! * Images are `<registry>/<namespace>/<space>:<commit>-<key16>` (the build)
//!   and `:<commit>` (the newest build of that commit); `BuildOutput::image`
//!   pins the digest.
//! * At most `max_concurrent` builds run at once, the rest wait in FIFO order;
//!   a build over `timeout`, whose `cancel` token fires, or superseded by a
//!   newer build of the same Space, is stopped (the engine cancels a build
//!   whose client goes away) and fails as `BUILD_ERROR`.
//! * Secrets ([`BuildRequest::secrets`]): builds run on the engine's BuildKit
//!   ([`buildkit`]), whose session answers them to `RUN --mount=type=secret,id=NAME`
//!   steps (a docker Space's own Dockerfile; the generated Dockerfiles mount
//!   them on their `pip install` steps as environment variables). They reach
//!   no layer, image config or history, and their values are masked in every
//!   log line and message. An engine without BuildKit builds classic, without
//!   secrets, and the build log says so.

pub mod buildkit;
pub mod context;
pub mod engine;
pub mod key;
pub mod logs;
pub mod plan;
pub mod source;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::space::naming::space_id;
use crate::space::{AppConfig, GitSource, SpaceSpec, Stage};

pub use engine::{Engine, EngineError, RegistryCredentials};
pub use logs::{LogKind, LogLine, LogStore, LogWriter};
pub use plan::{BuildPlan, PlanError, PlanSettings, StaticServer};
pub use source::GitCredentials;

/// Lines of the build log kept in [`BuildFailure::log_tail`] and the message.
pub const FAILURE_TAIL_LINES: usize = 20;

/// How the builder reaches its engine and registry, and what it builds on.
#[derive(Debug, Clone)]
pub struct BuilderConfig {
    /// `unix:///run/docker.sock`, `tcp://host:2375`; `None`: `DOCKER_HOST`.
    pub docker_host: Option<String>,
    /// `host:port` of the registry images are pushed to (with `push` off:
    /// just the prefix of the local image names).
    pub registry: String,
    /// Push images to `registry`. Off for one engine that both builds and
    /// runs (local mode): images stay local, reuse looks at the engine only,
    /// and `BuildOutput::image` is `<repository>:<tag>` without a digest.
    pub push: bool,
    pub registry_credentials: Option<RegistryCredentials>,
    /// Python base image of gradio/streamlit Spaces; `{python_version}` is
    /// replaced by the Space's (e.g. `python:{python_version}-slim`).
    pub python_base_image: String,
    /// Static file server image and how to run it.
    pub static_server: StaticServer,
    /// PEM bundle generated images trust in addition to the base's (for pip
    /// behind a TLS-intercepting proxy).
    pub extra_ca_file: Option<PathBuf>,
    /// Builds running at once; more wait in a queue.
    pub max_concurrent: usize,
    /// Limit of one build, checkout to push (queueing not included).
    pub timeout: Duration,
    /// Where checkouts and contexts are made (removed after each build).
    pub work_dir: PathBuf,
}

impl BuilderConfig {
    /// Defaults: `DOCKER_HOST`, no registry login, busybox httpd static
    /// server, no extra CA, 2 concurrent builds, 30 min limit, the system temp dir.
    pub fn new(
        registry: impl Into<String>,
        python_base_image: impl Into<String>,
        static_image: impl Into<String>,
    ) -> Self {
        Self {
            docker_host: None,
            registry: registry.into(),
            push: true,
            registry_credentials: None,
            python_base_image: python_base_image.into(),
            static_server: StaticServer::busybox(static_image),
            extra_ca_file: None,
            max_concurrent: 2,
            timeout: Duration::from_secs(30 * 60),
            work_dir: std::env::temp_dir(),
        }
    }
}

/// One build of one Space.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The Space's namespace (its owner) and name.
    pub namespace: String,
    pub name: String,
    /// Repository and revision (branch, tag or commit sha) to build.
    pub source: GitSource,
    /// From `source.credentials_secret`, read by the caller.
    pub git_credentials: Option<GitCredentials>,
    /// The Space's spec: its sdk, versions, app_file, app_port override the front matter.
    pub spec: SpaceSpec,
    /// The Space's variables: build args of the image (and part of its key).
    pub variables: BTreeMap<String, String>,
    /// The Space's secrets (name -> value), offered to the build's secret
    /// mounts; their values are never shown in logs or messages.
    pub secrets: BuildSecrets,
    /// More values never to show in logs or messages.
    pub redact: Vec<String>,
    /// Fires to stop the build (e.g. a newer revision arrived).
    pub cancel: CancellationToken,
}

impl BuildRequest {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, source: GitSource, spec: SpaceSpec) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            source,
            git_credentials: None,
            variables: spec.env.clone(),
            spec,
            secrets: BuildSecrets::default(),
            redact: Vec::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// `owner/name`: the key of the Space's logs.
    pub fn space_id(&self) -> String {
        space_id(&self.namespace, &self.name)
    }
}

/// Secret values by name; `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BuildSecrets(pub BTreeMap<String, String>);

impl std::fmt::Debug for BuildSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl FromIterator<(String, String)> for BuildSecrets {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// A built (or reused) image.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOutput {
    /// `<repository>:<tag>@sha256:...`: what a pod should run.
    pub image: String,
    /// `<registry>/<namespace>/<space>`.
    pub repository: String,
    /// `<commit>-<key16>`; the image is also tagged `<commit>`.
    pub tag: String,
    /// `sha256:...` of the pushed manifest (with `push` off: the local image id).
    pub digest: String,
    /// The resolved commit sha (for `status.build.revision`).
    pub commit: String,
    /// The build key (hex sha256).
    pub key: String,
    pub app_config: AppConfig,
    /// The image already existed: nothing was built.
    pub reused: bool,
    /// Time from the start of the checkout to the pushed image.
    pub duration: Duration,
}

/// Why a build failed, ready for the Space's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildFailure {
    /// `NO_APP_FILE`, `CONFIG_ERROR` or `BUILD_ERROR`.
    pub stage: Stage,
    pub kind: FailureKind,
    /// For `status.build.message` / `status.message`: what failed, then the
    /// last lines of the log. Never holds a secret.
    pub message: String,
    /// The commit, when the checkout got that far.
    pub commit: Option<String>,
    /// The last lines of the build log.
    pub log_tail: Vec<String>,
}

/// The part of the pipeline that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    NoAppFile,
    Config,
    Checkout,
    Build,
    Push,
    Timeout,
    Cancelled,
    /// The engine or the builder's own I/O failed (not the Space's fault).
    Internal,
}

impl FailureKind {
    pub fn stage(self) -> Stage {
        match self {
            FailureKind::NoAppFile => Stage::NoAppFile,
            FailureKind::Config => Stage::ConfigError,
            _ => Stage::BuildError,
        }
    }
}

/// The builder could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error("Docker engine: {0}")]
    Engine(#[from] EngineError),
    #[error("extra CA file {path}: {source}")]
    ExtraCa { path: PathBuf, source: std::io::Error },
}

/// Builds Space images; cheap to clone (clones share the queue and logs).
#[derive(Clone)]
pub struct Builder {
    inner: Arc<Inner>,
}

struct Inner {
    config: BuilderConfig,
    engine: Engine,
    logs: LogStore,
    queue: Semaphore,
    extra_ca: Option<(Vec<u8>, String)>,
    /// The running or queued build of each Space, to supersede.
    in_flight: std::sync::Mutex<HashMap<String, (u64, CancellationToken)>>,
    tickets: std::sync::atomic::AtomicU64,
}

impl Builder {
    /// Connects to the engine and reads the extra CA bundle.
    pub async fn new(config: BuilderConfig) -> Result<Self, BuilderError> {
        Self::with_logs(config, LogStore::default()).await
    }

    /// Like [`Builder::new`], writing build logs into `logs` (shared with the
    /// logs endpoint and the run-log producers).
    pub async fn with_logs(config: BuilderConfig, logs: LogStore) -> Result<Self, BuilderError> {
        // Engine calls must outlive the longest build.
        let engine = Engine::connect(
            config.docker_host.as_deref(),
            config.timeout + Duration::from_secs(60),
            config.registry_credentials.as_ref(),
        )
        .await?;
        let extra_ca = match &config.extra_ca_file {
            Some(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|source| BuilderError::ExtraCa { path: path.clone(), source })?;
                let digest = hex::encode(Sha256::digest(&bytes));
                Some((bytes, digest))
            }
            None => None,
        };
        let queue = Semaphore::new(config.max_concurrent.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                engine,
                logs,
                queue,
                extra_ca,
                in_flight: Default::default(),
                tickets: Default::default(),
            }),
        })
    }

    /// The build and run logs.
    pub fn logs(&self) -> &LogStore {
        &self.inner.logs
    }

    /// The engine connection.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Builds waiting for a slot right now is not tracked; this is the number of free slots.
    pub fn free_slots(&self) -> usize {
        self.inner.queue.available_permits()
    }

    /// Checks out, plans, builds (or reuses) and pushes the Space's image.
    /// The log (`LogKind::Build` of `owner/name`) restarts with this build.
    /// A build of the same Space still queued or running is superseded: it is
    /// cancelled (its failure says so) and writes nothing more to the log.
    pub async fn build(&self, req: BuildRequest) -> Result<BuildOutput, BuildFailure> {
        let id = req.space_id();
        let redactions: Vec<String> = req.redact.iter().chain(req.secrets.0.values()).cloned().collect();
        let log = self.inner.logs.start(&id, LogKind::Build, redactions.clone());
        let superseded = CancellationToken::new();
        let ticket = self.inner.tickets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let previous = self.in_flight().insert(id.clone(), (ticket, superseded.clone()));
        if let Some((_, previous)) = previous {
            previous.cancel();
        }
        let result = self.queued_build(&req, &log, &superseded).await;
        {
            let mut in_flight = self.in_flight();
            // Only forget our own entry: a newer build may have replaced it.
            if in_flight.get(&id).is_some_and(|(t, _)| *t == ticket) {
                in_flight.remove(&id);
            }
        }
        let result = result.map_err(|(kind, what, commit)| {
            log.line(&format!("[hangar] build failed: {what}"));
            let log_tail = log.tail(FAILURE_TAIL_LINES);
            let mut message = redact(&what, &redactions);
            // The tail helps when the engine's message alone does not say why.
            if matches!(kind, FailureKind::Build) && !log_tail.is_empty() {
                message.push_str("\n--- last build log lines ---\n");
                message.push_str(&log_tail.join("\n"));
            }
            BuildFailure { stage: kind.stage(), kind, message, commit, log_tail }
        });
        log.close();
        result
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, CancellationToken)>> {
        // The map holds plain tokens: after a panic elsewhere it is still usable.
        self.inner.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn queued_build(
        &self,
        req: &BuildRequest,
        log: &LogWriter,
        superseded: &CancellationToken,
    ) -> Result<BuildOutput, (FailureKind, String, Option<String>)> {
        if self.inner.queue.available_permits() == 0 {
            log.line("[hangar] waiting for a free build slot");
        }
        let _permit = tokio::select! {
            permit = self.inner.queue.acquire() => permit.map_err(|_| (FailureKind::Internal, "the builder is shutting down".to_owned(), None))?,
            () = req.cancel.cancelled() => return Err((FailureKind::Cancelled, "cancelled while queued".to_owned(), None)),
            () = superseded.cancelled() => return Err((FailureKind::Cancelled, "superseded by a newer build of this Space while queued".to_owned(), None)),
        };
        let timeout = self.inner.config.timeout;
        // The commit, once known, is part of every failure after the checkout.
        let commit = std::sync::Mutex::new(None);
        let seen = || commit.lock().map(|c| c.clone()).unwrap_or_default();
        // Dropping the work future on timeout/cancel closes the engine
        // connection, and the engine then stops the build.
        tokio::select! {
            r = tokio::time::timeout(timeout, self.run(req, log, &commit)) => match r {
                Ok(r) => r.map_err(|(k, m)| (k, m, seen())),
                Err(_) => Err((FailureKind::Timeout, format!("timed out after {}s", timeout.as_secs()), seen())),
            },
            () = req.cancel.cancelled() => Err((FailureKind::Cancelled, "cancelled".to_owned(), seen())),
            () = superseded.cancelled() => Err((FailureKind::Cancelled, "superseded by a newer build of this Space".to_owned(), seen())),
        }
    }

    async fn run(
        &self,
        req: &BuildRequest,
        log: &LogWriter,
        commit_out: &std::sync::Mutex<Option<String>>,
    ) -> Result<BuildOutput, (FailureKind, String)> {
        let started = Instant::now();
        let cfg = &self.inner.config;
        let id = req.space_id();
        let log = |line: &str| log.line(line);
        let work = tempfile::Builder::new().prefix("hangar-build-").tempdir_in(&cfg.work_dir).map_err(|e| {
            (FailureKind::Internal, format!("cannot make a work directory in {}: {e}", cfg.work_dir.display()))
        })?;
        let checkout_dir = work.path().join("src");

        log(&format!("[hangar] fetching {} at {}", source::redact_url(&req.source.git), req.source.revision));
        let commit =
            source::checkout(&req.source.git, &req.source.revision, req.git_credentials.as_ref(), &checkout_dir)
                .await
                .map_err(|e| (FailureKind::Checkout, e.0))?;
        if let Ok(mut c) = commit_out.lock() {
            *c = Some(commit.clone());
        }
        log(&format!("[hangar] commit {commit}"));

        let dir = checkout_dir.clone();
        let repo = tokio::task::spawn_blocking(move || source::read_repo(&dir))
            .await
            .map_err(|e| (FailureKind::Internal, format!("reading the checkout: {e}")))?
            .map_err(|e| (FailureKind::Internal, format!("reading the checkout: {e}")))?;
        let settings = PlanSettings {
            python_base_image: cfg.python_base_image.clone(),
            static_server: cfg.static_server.clone(),
            extra_ca: self.inner.extra_ca.is_some(),
            buildkit: self.inner.engine.buildkit().is_ok(),
        };
        let build_plan = plan::plan(&req.spec, &repo, &req.variables, &settings).map_err(|e| match e {
            PlanError::NoAppFile(m) => (FailureKind::NoAppFile, m),
            PlanError::Config(m) => (FailureKind::Config, m),
        })?;
        let ca_digest = self.inner.extra_ca.as_ref().map(|(_, d)| d.as_str());
        let build_key = key::build_key(&commit, &build_plan, ca_digest);
        let repository = key::repository(&cfg.registry, &req.namespace, &req.name);
        let tag = key::keyed_tag(&commit, &build_key);
        let engine = &self.inner.engine;

        let existing = if cfg.push {
            engine.pushed_digest(&repository, &tag).await.map(|d| (format!("{repository}:{tag}@{d}"), d))
        } else {
            engine.local_image_id(&format!("{repository}:{tag}")).await.map(|id| (format!("{repository}:{tag}"), id))
        };
        if let Some((image, digest)) = existing {
            log(&format!("[hangar] {repository}:{tag} is already built ({digest}): reusing it"));
            return Ok(BuildOutput {
                image,
                repository,
                tag,
                digest,
                commit,
                key: build_key,
                app_config: build_plan.app_config,
                reused: true,
                duration: started.elapsed(),
            });
        }

        log(&format!("[hangar] building {repository}:{tag} (sdk {})", build_plan.app_config.sdk.as_str()));
        // Only the secrets the plan offers (all of the Space's, with BuildKit) that have a value.
        let offered: BTreeMap<String, String> = req
            .secrets
            .0
            .iter()
            .filter(|(k, _)| build_plan.secrets.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match engine.buildkit() {
            Ok(()) if !build_plan.secrets.is_empty() => {
                let (with, without): (Vec<&str>, Vec<&str>) =
                    build_plan.secrets.iter().map(String::as_str).partition(|n| offered.contains_key(*n));
                log(&format!("[hangar] BuildKit: secrets for secret mounts: {}", with.join(", ")));
                if !without.is_empty() {
                    log(&format!("[hangar] secrets without a value (not offered): {}", without.join(", ")));
                }
            }
            Ok(()) => {}
            Err(why) => log(&format!(
                "[hangar] the engine has no BuildKit ({why}): classic builder, secrets are not available at build time"
            )),
        }
        if let Some(d) = &build_plan.dockerfile {
            log("[hangar] generated Dockerfile:");
            for line in d.lines() {
                log(&format!("    {line}"));
            }
        }
        let tar = work.path().join("context.tar");
        let (dir, p, ca, t) =
            (checkout_dir, build_plan.clone(), self.inner.extra_ca.as_ref().map(|(b, _)| b.clone()), tar.clone());
        tokio::task::spawn_blocking(move || context::write_context(&dir, &p, ca.as_deref(), &t))
            .await
            .map_err(|e| (FailureKind::Internal, format!("writing the build context: {e}")))?
            .map_err(|e| (FailureKind::Internal, format!("writing the build context: {e}")))?;

        let build_args: HashMap<String, String> = build_plan.build_args.clone().into_iter().collect();
        let labels: HashMap<String, String> = [
            ("hangar.dev/space".to_owned(), id.clone()),
            ("hangar.dev/commit".to_owned(), commit.clone()),
            ("hangar.dev/build-key".to_owned(), build_key.clone()),
        ]
        .into();
        let full_tag = format!("{repository}:{tag}");
        let image_id = engine
            .build(&tar, &build_plan.dockerfile_path, &full_tag, &build_args, &labels, &offered, log)
            .await
            .map_err(|f| {
                let msg = match f.step {
                    Some(step) => format!("{step} failed: {}", f.message),
                    None => f.message,
                };
                (FailureKind::Build, msg)
            })?;
        engine
            .tag(&full_tag, &repository, &commit)
            .await
            .map_err(|e| (FailureKind::Internal, format!("tagging {repository}:{commit}: {e}")))?;
        if !cfg.push {
            log(&format!("[hangar] built {full_tag} ({image_id}) in {:.1}s", started.elapsed().as_secs_f64()));
            return Ok(BuildOutput {
                image: full_tag,
                repository,
                tag,
                digest: image_id,
                commit,
                key: build_key,
                app_config: build_plan.app_config,
                reused: false,
                duration: started.elapsed(),
            });
        }
        log(&format!("[hangar] pushing {full_tag}"));
        let digest = engine.push(&repository, &tag, log).await.map_err(|e| (FailureKind::Push, e.0))?;
        engine.push(&repository, &commit, log).await.map_err(|e| (FailureKind::Push, e.0))?;
        log(&format!("[hangar] pushed {full_tag}@{digest} in {:.1}s", started.elapsed().as_secs_f64()));
        Ok(BuildOutput {
            image: format!("{full_tag}@{digest}"),
            repository,
            tag,
            digest,
            commit,
            key: build_key,
            app_config: build_plan.app_config,
            reused: false,
            duration: started.elapsed(),
        })
    }
}

fn redact(text: &str, secrets: &[String]) -> String {
    secrets.iter().filter(|s| !s.is_empty()).fold(text.to_owned(), |t, s| t.replace(s.as_str(), "***"))
}
