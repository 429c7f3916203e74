//! `hangar up`: Space manifests from a folder, the Docker runtime and the proxy in one process.
//!
//! * [`discover`]: which Spaces a folder holds (manifests and/or repositories).
//! * [`snapshot`]: a folder's working tree as a reproducible git commit, for the builder.
//! * [`state`]: the state file `hangar ls` reads.
//! * [`supervise`]: one task per Space: build, run, freeze, stop, thaw, wake.
//! * [`metrics`]: `hangar up`'s own metrics (memory held by frozen containers).
//!
//! The builder builds on the local engine without pushing (no registry
//! needed), the [`DockerRuntime`] runs one container per Space published on a
//! random loopback port, and the proxy serves every Space at
//! `http://{owner}-{name}.localhost:8080/` (browsers and curl resolve
//! `*.localhost` to loopback) and at `http://127.0.0.1:8080/spaces/{owner}/{name}/`.
//!
//! Containers carry their Space in a label and their spec's hash in another:
//! a restarted `hangar up` (after a crash, or with `--keep-running`) adopts
//! them as they are, and unchanged Spaces are not rebuilt (same files, same
//! build key, same image). Ctrl-C stops the containers (kept for a fast
//! start next time) unless `--keep-running`.
//!
//! Idle Spaces sleep in two tiers: past `freezeAfter` the container is
//! paused (cgroup freezer: memory kept, no CPU) and its route names it as
//! frozen, so the proxy's thaw (one per freeze, however many requests wait)
//! asks its supervisor to unpause it and forwards as soon as it serves; past
//! `sleepAfter` it is stopped and woken by a start. A paused container found
//! at start-up gets its tier from the idle time the previous `hangar up`
//! recorded, so none stays frozen for good.

pub mod discover;
pub mod metrics;
pub mod snapshot;
pub mod state;
pub mod supervise;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::builder::{Builder, BuilderConfig, LogStore};
use crate::proxy::{MemorySource, ProxyConfig, RouteSource, RouteTable, SourceError, SpaceKey, WakeHandler};
use crate::runtime::{DockerRuntime, Runtime};
use crate::space::SleepPolicy;
use state::{Book, UpState};
use supervise::{Ctx, UP_DIR_LABEL};

/// Prefix of local image names (`hangar.local/<owner>/<name>:<tag>`); never pushed.
pub const IMAGE_PREFIX: &str = "hangar.local";
/// Activity goes to memory here, not to Leases: a fine grain is cheap and
/// keeps short sleep and freeze times exact.
pub const ACTIVITY_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Folder of Space manifests (`*.yaml`, `*/space.yaml`) and/or Space
    /// repositories (folders with a README.md front matter), or one Space repository.
    #[arg(default_value = "examples/spaces")]
    pub dir: PathBuf,
    /// Address of the proxy that serves the Spaces.
    #[arg(long, env = "HANGAR_UP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Spaces are served at `{owner}-{name}.{domain}` (and at `/spaces/{owner}/{name}/`).
    #[arg(long, env = "HANGAR_UP_DOMAIN", default_value = "localhost")]
    pub domain: String,
    /// Owner (namespace) of Spaces whose manifest names none, and of repository folders.
    #[arg(long, env = "HANGAR_UP_OWNER", default_value = "local")]
    pub owner: String,
    /// Where the state file and the folders' snapshot repositories live
    /// (default `$XDG_STATE_HOME/hangar`, else `~/.local/state/hangar`).
    #[arg(long, env = "HANGAR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Show the stage of each Space of the running `hangar up` and exit (as `hangar ls`).
    #[arg(long)]
    pub status: bool,
    /// On exit, leave the containers running (the next `hangar up` adopts them).
    #[arg(long)]
    pub keep_running: bool,
    /// Python base image of gradio and streamlit Spaces (made by `scripts/up`).
    #[arg(long, env = "HANGAR_PYTHON_IMAGE", default_value = "hangar/python:3.11")]
    pub python_image: String,
    /// Base images by `python_version` (`3.11=IMAGE,3.12=IMAGE`): a Space that sets a
    /// version not listed is a CONFIG_ERROR naming the listed ones; one that sets none
    /// gets `--python-image`. `scripts/up` makes 3.11 only (Debian bookworm's Python).
    #[arg(
        long,
        env = "HANGAR_PYTHON_IMAGES",
        default_value = "3.11=hangar/python:3.11",
        value_parser = crate::operator::parse_python_images
    )]
    pub python_images: crate::operator::PythonImages,
    /// Static file server image of static Spaces (made by `scripts/up`).
    #[arg(long, env = "HANGAR_STATIC_IMAGE", default_value = "hangar/static:1")]
    pub static_image: String,
    /// PEM bundle builds trust besides the base image's (pip behind a TLS-intercepting proxy).
    #[arg(long, env = "HANGAR_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<PathBuf>,
    /// Docker engine (`unix://...`, `tcp://...`; default `DOCKER_HOST` or the local socket).
    #[arg(long)]
    pub docker_host: Option<String>,
    /// Token private Spaces require (`Authorization: Bearer ...`); without one they refuse everybody.
    #[arg(long, env = "HANGAR_UP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Builds running at once.
    #[arg(long, default_value_t = 2)]
    pub max_builds: usize,
    /// Address of the logs API (`/api/spaces/{owner}/{name}/logs/{build|run}`, SSE as on the hub);
    /// port 0: any free port (printed).
    #[arg(long, env = "HANGAR_UP_LOGS_LISTEN", default_value = "127.0.0.1:0")]
    pub logs_listen: SocketAddr,
    /// Idle time before a Space's container is frozen (paused: memory kept, woken in
    /// milliseconds) when its manifest sets no `freezeAfter`; `never` turns the tier off.
    /// Applies to GPU flavors too: no GPU is attached locally, so a frozen one holds none.
    #[arg(long, env = "HANGAR_UP_FREEZE_AFTER", default_value = "5m", value_parser = parse_freeze_after)]
    pub freeze_after: FreezeDefault,
}

/// `--freeze-after`: a duration, or `None` for `never`.
#[derive(Debug, Clone, Copy)]
pub struct FreezeDefault(pub Option<Duration>);

fn parse_freeze_after(s: &str) -> Result<FreezeDefault, String> {
    crate::space::duration::parse_sleep(s).map(FreezeDefault).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, clap::Args)]
pub struct LsArgs {
    /// State directory of the `hangar up` to show (as given to it).
    #[arg(long, env = "HANGAR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print the state as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The default state directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("hangar");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/hangar"),
        None => std::env::temp_dir().join("hangar-state"),
    }
}

/// `hangar ls` / `hangar up --status`.
pub fn ls(args: &LsArgs) -> crate::Result<()> {
    let dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let state = match UpState::read(&dir) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no hangar up is running (no state in {})", dir.display());
            return Ok(());
        }
        Err(e) => return Err(crate::Error::Invalid(format!("{}: {e}", dir.join(state::FILE).display()))),
    };
    let alive = state.writer_alive();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else {
        print!("{}", state::render_table(&state, alive, state::unix_ms(std::time::SystemTime::now())));
        if !alive {
            eprintln!("(hangar up (pid {}) is not running: this is its last state)", state.pid);
        }
    }
    Ok(())
}

/// `http://127.0.0.1:8080/spaces/{owner}/{name}/`: the path route, which
/// every HTTP client reaches (no `*.localhost` name to resolve); an
/// unspecified listen address is shown as loopback.
pub fn path_url(proxy: SocketAddr, key: &SpaceKey) -> String {
    let ip = match proxy.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}/spaces/{}/{}/", SocketAddr::new(ip, proxy.port()), key.namespace, key.name)
}

/// Runs `hangar up` until SIGINT/SIGTERM.
pub async fn run(args: UpArgs) -> crate::Result<()> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    if args.status {
        return ls(&LsArgs { state_dir: Some(state_dir), json: false });
    }
    let started = Instant::now();
    std::fs::create_dir_all(&state_dir)?;
    let dir = args.dir.canonicalize().map_err(|e| crate::Error::Invalid(format!("{}: {e}", args.dir.display())))?;
    let spaces = discover::discover(&dir, &args.owner).map_err(|e| crate::Error::Invalid(e.0))?;
    if spaces.is_empty() {
        return Err(crate::Error::Invalid(format!(
            "no Spaces in {}: expected *.yaml manifests, folders with space.yaml, or folders with a README.md front matter",
            dir.display()
        )));
    }

    let mut config = BuilderConfig::new(IMAGE_PREFIX, &args.python_image, &args.static_image);
    config.push = false;
    // Local mode builds folders (snapshots in the state dir) and local paths.
    config.allow_local_sources = true;
    config.python_images = args.python_images.0.clone();
    config.docker_host = args.docker_host.clone();
    config.extra_ca_file = args.extra_ca_file.clone();
    config.max_concurrent = args.max_builds;
    let logs = LogStore::default();
    let builder = Builder::with_logs(config, logs.clone())
        .await
        .map_err(|e| crate::Error::Invalid(format!("{e} (is Docker installed and running? scripts/up sets it up)")))?;
    let runtime: Arc<dyn Runtime> = Arc::new(DockerRuntime::new(builder.engine().docker().clone()));
    let up_dir = dir.display().to_string();
    remove_orphans(runtime.as_ref(), &up_dir, &spaces.iter().map(|s| s.key.clone()).collect()).await;

    let source = MemorySource::new(&args.domain);
    let proxy_config = ProxyConfig {
        listen: args.listen,
        // Its /metrics: on loopback, apart from the Spaces' port.
        admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        drain_timeout: Duration::from_secs(5),
        activity_interval: ACTIVITY_INTERVAL,
        ..ProxyConfig::default()
    };
    let routes: Arc<dyn RouteSource> = source.clone();
    let proxy = crate::proxy::start(proxy_config, routes).await.map_err(|e| {
        crate::Error::Invalid(format!(
            "cannot serve on {}: {e} (another hangar up? choose one with --listen)",
            args.listen
        ))
    })?;
    let metrics = Arc::new(metrics::LocalMetrics::new());
    // Read before the new book overwrites it: frozen containers' idle times.
    let previous = UpState::read(&state_dir)
        .map(|s| s.spaces.into_iter().map(|s| (s.id.clone(), s)).collect())
        .unwrap_or_default();
    let book = Book::new(&state_dir, dir.clone(), proxy.addr.to_string());
    // The token is checked against its keyed hash, as in the cluster (one check for both).
    let token = match &args.token {
        Some(t) => {
            let key = Arc::new(crate::space::access_token::TokenKey::random().map_err(crate::Error::Invalid)?);
            Some(crate::space::access_token::ExpectedToken::new(&key, t.as_bytes()))
        }
        None => None,
    };
    let ctx = Arc::new(Ctx {
        builder,
        runtime,
        source: Arc::clone(&source),
        book,
        domain: args.domain.clone(),
        proxy_port: proxy.addr.port(),
        state_dir: state_dir.clone(),
        up_dir,
        keep_running: args.keep_running,
        token,
        started,
        // The cluster skips freezing GPU flavors (a frozen pod keeps its GPU);
        // local containers get no GPU, so every flavor freezes alike.
        sleep_policy: SleepPolicy { cpu_freeze_after: args.freeze_after.0, gpu_freeze_after: args.freeze_after.0 },
        previous,
        metrics: Arc::clone(&metrics),
    });

    let logs_listener = tokio::net::TcpListener::bind(args.logs_listen)
        .await
        .map_err(|e| crate::Error::Invalid(format!("cannot serve the logs API on {}: {e}", args.logs_listen)))?;
    let logs_addr = logs_listener.local_addr()?;
    let logs_routes = source.routes();
    let logs_task = tokio::spawn(async move {
        // Private Spaces' logs want their token, as their traffic does: the proxy's own check.
        let routes = logs_routes;
        let access: crate::builder::logs::LogAccess =
            Arc::new(move |owner: &str, name: &str, headers: &http::HeaderMap| {
                let table = routes.borrow();
                table.get(&SpaceKey::new(owner, name)).map(|r| crate::proxy::auth::allowed(&r.access, headers))
            });
        let router = crate::builder::logs::router(logs, access)
            .route("/metrics", axum::routing::get(move || async move { metrics.encode() }));
        let limits = crate::http_server::Limits::default();
        if let Err(e) = crate::http_server::serve(logs_listener, router, limits, std::future::pending()).await {
            tracing::warn!(error = %e, "the logs API stopped");
        }
    });

    // One wake channel per Space; the proxy signals once per wake, so one slot is enough.
    let mut senders = HashMap::new();
    let mut receivers = Vec::new();
    println!("hangar up: {} Space(s) from {}, proxy on http://{}", spaces.len(), dir.display(), proxy.addr);
    for space in &spaces {
        let (tx, rx) = mpsc::channel(1);
        senders.insert(space.key.clone(), tx);
        receivers.push(rx);
        source.upsert(supervise::initial_route(&ctx, space));
        ctx.book.update(&space.key.to_string(), &ctx.url(&space.key), |_| {});
        println!("  {}  {}  {}", space.key, ctx.url(&space.key), path_url(proxy.addr, &space.key));
    }
    println!(
        "  (the first URL is for browsers and curl; from code (Python's requests, httpx, gradio_client) \
         use the second: *.{} names do not resolve there)",
        args.domain
    );
    // Names that collide into one host: the Space given first keeps it.
    let table = source.table();
    for space in &spaces {
        if let Some(holder) = table.host_holder(&space.key) {
            println!(
                "  {}: no host route: {} is {holder}'s (given first); served at {}",
                space.key,
                crate::space::naming::host(&space.key.namespace, &space.key.name, &ctx.domain),
                path_url(proxy.addr, &space.key)
            );
        }
    }
    println!("logs: http://{logs_addr}/api/spaces/<owner>/<name>/logs/build (or /run)");
    println!(
        "metrics: http://{logs_addr}/metrics (memory held by frozen Spaces; the proxy's at http://{}/metrics)",
        proxy.admin_addr.unwrap_or(proxy.addr)
    );
    let senders = Arc::new(senders);
    let handler: WakeHandler = Arc::new(move |key: SpaceKey| {
        let tx = senders.get(&key).cloned();
        Box::pin(async move {
            if let Some(tx) = tx {
                // Full: a wake is already pending, which is all this one asks for.
                let _ = tx.try_send(());
            }
            Ok(())
        })
    });
    source.set_wake_handler(Arc::clone(&handler));
    // A frozen Space's supervisor thaws it on the wake signal and publishes its
    // route ready: the proxy's thaw resolves then and forwards at once.
    let routes = source.routes();
    let thaw: WakeHandler = Arc::new(move |key: SpaceKey| {
        let (wake, routes) = (handler(key.clone()), routes.clone());
        Box::pin(async move {
            wake.await?;
            thawed(routes, &key).await
        })
    });
    source.set_thaw_handler(thaw);

    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (space, rx) in spaces.into_iter().zip(receivers) {
        tasks.spawn(supervise::supervise(Arc::clone(&ctx), space, rx, cancel.clone()));
    }

    crate::shutdown::signal().await;
    // A second Ctrl-C while stopping: leave at once.
    tokio::spawn(async {
        crate::shutdown::signal().await;
        eprintln!("hangar up: interrupted again, exiting without waiting");
        std::process::exit(130);
    });
    eprintln!("hangar up: stopping (Ctrl-C again to leave at once)");
    proxy.shutdown().await?;
    logs_task.abort();
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    ctx.book.remove_file();
    let what = if args.keep_running { "left running" } else { "stopped" };
    println!("hangar up: stopped; containers {what}");
    Ok(())
}

/// Resolves once `key`'s route is no longer frozen: `Ok` if it serves, an
/// error if it went elsewhere (stopped meanwhile: the proxy then wakes it the ordinary way).
async fn thawed(mut routes: watch::Receiver<Arc<RouteTable>>, key: &SpaceKey) -> Result<(), SourceError> {
    loop {
        {
            let table = routes.borrow_and_update();
            match table.get(key) {
                None => return Err(SourceError::Other(format!("{key} is gone"))),
                Some(r) if r.frozen.is_some() => {}
                Some(r) if r.is_ready() => return Ok(()),
                Some(_) => return Err(SourceError::Other(format!("{key} was not thawed (no longer frozen)"))),
            }
        }
        routes.changed().await.map_err(|_| SourceError::Other("hangar up is stopping".to_owned()))?;
    }
}

/// Removes the containers of Spaces that left this folder.
async fn remove_orphans(runtime: &dyn Runtime, up_dir: &str, keep: &BTreeSet<SpaceKey>) {
    let instances = match runtime.list().await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list containers");
            return;
        }
    };
    for i in instances {
        if i.labels.get(UP_DIR_LABEL).map(String::as_str) == Some(up_dir) && !keep.contains(&i.key) {
            tracing::info!(space = %i.key, "removing the container of a Space no longer in the folder");
            if let Err(e) = runtime.remove(&i.key).await {
                tracing::warn!(space = %i.key, error = %e, "cannot remove the container");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::SpaceRoute;
    use crate::proxy::route::{Frozen, FrozenPod};
    use crate::space::Stage;

    #[tokio::test]
    async fn a_thaw_ends_when_the_route_serves_or_goes_elsewhere() {
        let source = MemorySource::new("d");
        let key = SpaceKey::new("a", "b");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        let frozen = |r: &mut SpaceRoute| {
            r.stage = Some(Stage::Sleeping);
            r.endpoints.clear();
            r.frozen = Some(Frozen { decision: 1, pods: vec![FrozenPod { addr, node: None, uid: None }] });
        };
        let mut route = SpaceRoute::new(key.clone());
        frozen(&mut route);
        source.upsert(route);
        let (routes, k) = (source.routes(), key.clone());
        let waiter = tokio::spawn(async move { thawed(routes, &k).await });
        // Frozen still (its memory measured, say): keeps waiting.
        source.update(&key, |r| r.message = None);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        source.update(&key, |r| {
            r.stage = Some(Stage::Running);
            r.frozen = None;
            r.endpoints = vec![addr];
        });
        assert!(waiter.await.expect("task").is_ok(), "thawed and serving");
        // Stopped instead of thawed: an error, so the proxy wakes it the ordinary way.
        source.update(&key, frozen);
        let (routes, k) = (source.routes(), key.clone());
        let waiter = tokio::spawn(async move { thawed(routes, &k).await });
        source.update(&key, |r| r.frozen = None);
        assert!(waiter.await.expect("task").is_err());
        source.remove(&key);
        assert!(thawed(source.routes(), &key).await.is_err(), "gone");
    }
}
