//! One task per Space: build (or reuse) its image, run its container, keep
//! the proxy's route current, put it to sleep when idle and wake it on request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use http::{HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::discover::{LocalSpace, Origin};
use super::metrics::LocalMetrics;
use super::snapshot;
use super::state::{Book, SpaceState, from_unix_ms, unix_ms};
use crate::builder::{BuildRequest, Builder, LogKind};
use crate::proxy::route::{Frozen, FrozenPod};
use crate::proxy::{Access, MemorySource, SpaceKey, SpaceRoute};
use crate::runtime::docker::cpu_limit;
use crate::runtime::{Ensured, RunSpec, Runtime, RuntimeError, space_env};
use crate::space::{AppConfig, GitSource, SleepPolicy, SleepTier, SleepTimes, Stage, Visibility, naming};

/// Label telling which `hangar up` folder a container belongs to (orphans
/// of that folder, Spaces removed from it, are removed at the next start).
pub const UP_DIR_LABEL: &str = "hangar.dev/up-dir";
/// Pause between two readiness probes of a starting app.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// One probe's limit (an app may accept and answer slowly while importing).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an awake Space's idle time is compared with its sleep times.
const SLEEP_CHECK: Duration = Duration::from_millis(500);
/// Between routing a Space's requests to the wake path and pausing it:
/// longer than the activity interval ([`super::ACTIVITY_INTERVAL`]), so a
/// request still in flight on the old route shows as activity and cancels the freeze.
const FREEZE_GRACE: Duration = Duration::from_millis(300);

/// What every supervisor shares.
pub struct Ctx {
    pub builder: Builder,
    pub runtime: Arc<dyn Runtime>,
    pub source: Arc<MemorySource>,
    pub book: Book,
    pub domain: String,
    pub proxy_port: u16,
    pub state_dir: PathBuf,
    pub up_dir: String,
    pub keep_running: bool,
    /// What private Spaces expect (`--token`, keyed with a key of this process).
    pub token: Option<crate::space::access_token::ExpectedToken>,
    /// When `hangar up` started (for the time-to-first-answer line).
    pub started: Instant,
    /// Default freeze times per flavor (a Space's `freezeAfter` wins).
    pub sleep_policy: SleepPolicy,
    /// What the previous `hangar up` with this state directory last recorded, by Space id.
    pub previous: BTreeMap<String, SpaceState>,
    /// `hangar up`'s own metrics (memory held by frozen containers).
    pub metrics: Arc<LocalMetrics>,
}

impl Ctx {
    /// The Space's URL on the proxy: `http://{owner}-{name}.{domain}:{port}/`.
    pub fn url(&self, key: &SpaceKey) -> String {
        let host = naming::host(&key.namespace, &key.name, &self.domain);
        match self.proxy_port {
            80 => format!("http://{host}/"),
            port => format!("http://{host}:{port}/"),
        }
    }
}

/// Prints one progress line on stdout (the machine-readable part of `hangar up`).
fn say(key: &SpaceKey, what: &str) {
    println!("{key}: {what}");
}

struct Supervisor {
    ctx: Arc<Ctx>,
    key: SpaceKey,
    url: String,
}

impl Supervisor {
    fn set_stage(&self, stage: Stage, message: Option<String>) {
        self.ctx.book.update(&self.key.to_string(), &self.url, |s| {
            s.stage = stage;
            s.message = message.clone();
            s.clear_sleep();
        });
        self.ctx.metrics.frozen_memory(&self.key, None);
        self.ctx.source.update(&self.key, |r| {
            r.stage = Some(stage);
            r.message = message;
            r.frozen = None;
            if !stage.is_serving() {
                r.endpoints.clear();
            }
        });
    }

    fn set_running(&self, endpoint: SocketAddr) {
        // The route first: held requests (a thaw's) go out before the state file is written.
        self.ctx.source.update(&self.key, |r| {
            r.stage = Some(Stage::Running);
            r.message = None;
            r.frozen = None;
            r.endpoints = vec![endpoint];
        });
        self.ctx.book.update(&self.key.to_string(), &self.url, |s| {
            s.stage = Stage::Running;
            s.message = None;
            s.clear_sleep();
        });
        self.ctx.metrics.frozen_memory(&self.key, None);
    }

    /// Asleep in `tier`: the route has no endpoint, so requests are held;
    /// a frozen Space's route names its container (`frozen_at`) for the
    /// proxy's thaw, a stopped one's requests signal a wake.
    fn set_sleeping(
        &self,
        tier: SleepTier,
        frozen_at: Option<SocketAddr>,
        idle_since: Option<SystemTime>,
        memory: Option<u64>,
    ) {
        let now = unix_ms(SystemTime::now());
        self.ctx.book.update(&self.key.to_string(), &self.url, |s| {
            if s.stage != Stage::Sleeping || s.tier != Some(tier) {
                s.tier_since_ms = Some(now);
            }
            s.stage = Stage::Sleeping;
            s.message = None;
            s.tier = Some(tier);
            s.idle_since_ms = idle_since.map(unix_ms);
            s.memory_bytes = memory;
        });
        self.ctx.metrics.frozen_memory(&self.key, memory.filter(|_| tier == SleepTier::Frozen));
        self.ctx.source.update(&self.key, |r| {
            r.stage = Some(Stage::Sleeping);
            r.message = None;
            r.endpoints.clear();
            r.frozen = match (tier, frozen_at) {
                // Still the same freeze (e.g. its memory measured now): the same decision.
                (SleepTier::Frozen, Some(addr)) => r.frozen.take().or_else(|| {
                    let pod = FrozenPod { addr, node: None, uid: None };
                    Some(Frozen { decision: i64::try_from(now).unwrap_or(i64::MAX), pods: vec![pod] })
                }),
                _ => None,
            };
        });
    }

    /// Stays in an error stage until `hangar up` stops.
    async fn fail(&self, stage: Stage, message: String, cancel: &CancellationToken) {
        say(&self.key, &format!("{} {}", stage.as_str(), message.lines().next().unwrap_or_default()));
        tracing::warn!(space = %self.key, stage = %stage.as_str(), %message, "Space failed");
        self.set_stage(stage, Some(message));
        cancel.cancelled().await;
    }
}

/// The route a Space starts with: held (building) until it runs.
pub fn initial_route(ctx: &Ctx, space: &LocalSpace) -> SpaceRoute {
    let mut route = SpaceRoute::new(space.key.clone());
    route.stage = Some(Stage::Building);
    route.paused = space.spec.paused;
    if space.spec.visibility == Visibility::Private {
        route.access = Access::Private { token: ctx.token.clone() };
    }
    route
}

/// Runs one Space until `cancel`; `wakes` receives the proxy's wake signals.
pub async fn supervise(ctx: Arc<Ctx>, space: LocalSpace, mut wakes: mpsc::Receiver<()>, cancel: CancellationToken) {
    let key = space.key.clone();
    let sup = Supervisor { url: ctx.url(&key), ctx: Arc::clone(&ctx), key: key.clone() };
    sup.set_stage(Stage::Building, None);

    // 1. The image.
    let prepared = tokio::select! {
        r = prepare(&ctx, &space) => r,
        () = cancel.cancelled() => return,
    };
    let (image, config) = match prepared {
        Ok(p) => p,
        Err((stage, message)) => return sup.fail(stage, message, &cancel).await,
    };
    ctx.book.update(&key.to_string(), &sup.url, |s| s.image = Some(image.clone()));
    let secrets = match secret_env(&space) {
        Ok(s) => s,
        Err(message) => return sup.fail(Stage::ConfigError, message, &cancel).await,
    };
    ctx.source.update(&key, |r| {
        r.base_path = config.base_path.clone();
        r.startup_timeout = config.startup_timeout;
        r.custom_headers = headers(&config.custom_headers);
    });
    if space.spec.paused {
        sup.set_stage(Stage::Paused, None);
        say(&key, "PAUSED (spec.paused)");
        let _ = ctx.runtime.stop(&key).await;
        cancel.cancelled().await;
        return;
    }

    if config.flavor.gpu_count() > 0 {
        // The flavor stays visible to the app (ACCELERATOR...), but no GPU is attached here.
        say(&key, &format!("note: hardware {} has a GPU; local mode runs the Space without one", config.flavor));
    }

    // 2. The container: adopted when one made from the same spec exists.
    let mut env = space_env(&key, &config, &ctx.domain, &space.spec.env);
    env.extend(secrets.clone());
    let run_spec = RunSpec {
        key: key.clone(),
        image: image.clone(),
        app_port: config.app_port,
        env,
        labels: BTreeMap::from([(UP_DIR_LABEL.to_owned(), ctx.up_dir.clone())]),
        cpus: Some(cpu_limit(config.flavor.vcpu)),
        memory_bytes: Some(i64::from(config.flavor.memory_gb) << 30),
    };
    let (instance, ensured) = match ctx.runtime.ensure(&run_spec).await {
        Ok(r) => r,
        Err(e) => return sup.fail(Stage::RuntimeError, e.0, &cancel).await,
    };
    if ensured == Ensured::Adopted {
        let how = match (instance.running, instance.paused) {
            (true, true) => "adopted its frozen container",
            (true, false) => "adopted its running container",
            _ => "adopted its stopped container",
        };
        say(&key, how);
    }
    ctx.book.update(&key.to_string(), &sup.url, |s| s.container = Some(instance.id.clone()));
    let redact: Vec<String> = secrets.into_values().collect();

    // 3. Run, freeze, stop, wake, until cancelled.
    let times = ctx.sleep_policy.for_config(&config);
    let mut state = match instance.endpoint.filter(|_| instance.paused) {
        // A frozen container (left by a crashed or `--keep-running` hangar up):
        // its tier comes from how long it has been idle, so nothing stays frozen for good.
        Some(endpoint) => {
            let now = SystemTime::now();
            let idle_since = adopted_idle_since(ctx.previous.get(&key.to_string()), &times, now);
            match times.tier(now.duration_since(idle_since).unwrap_or_default()).tier {
                Some(SleepTier::Frozen) => {
                    follow_logs(&ctx, &key, &instance.id, redact.clone());
                    sup.frozen(endpoint, idle_since, "SLEEPING (frozen container adopted)").await;
                    State::Frozen { endpoint, idle_since }
                }
                Some(SleepTier::Stopped) => State::Stopping,
                // Not idle long enough to stay frozen: `start` thaws it.
                None => State::Starting { woken_at: None },
            }
        }
        None => State::Starting { woken_at: None },
    };
    loop {
        state = match state {
            State::Starting { woken_at } => {
                sup.set_stage(Stage::AppStarting, None);
                let instance = match ctx.runtime.start(&key).await {
                    Ok(i) => i,
                    Err(e) => return sup.fail(Stage::RuntimeError, e.0, &cancel).await,
                };
                let Some(endpoint) = instance.endpoint else {
                    return sup.fail(Stage::RuntimeError, "the container publishes no port".to_owned(), &cancel).await;
                };
                follow_logs(&ctx, &key, &instance.id, redact.clone());
                let mut exited: BoxFuture<'static, _> = ctx.runtime.wait_stopped(&key);
                let answered = tokio::select! {
                    ok = wait_until_answers(endpoint, config.startup_timeout) => ok,
                    code = &mut exited => {
                        let message = exit_message(&ctx, &key, code.ok().flatten(), "while starting").await;
                        return sup.fail(Stage::RuntimeError, message, &cancel).await;
                    }
                    () = cancel.cancelled() => return stop(&sup).await,
                };
                if !answered {
                    let message = format!(
                        "the app did not answer on port {} within {:?}",
                        config.app_port, config.startup_timeout
                    );
                    let _ = ctx.runtime.stop(&key).await;
                    return sup.fail(Stage::RuntimeError, message, &cancel).await;
                }
                sup.set_running(endpoint);
                match woken_at {
                    Some(at) => say(&key, &format!("RUNNING (woke in {:.2}s)", at.elapsed().as_secs_f64())),
                    None => say(
                        &key,
                        &format!("RUNNING {} ({:.1}s after start)", sup.url, ctx.started.elapsed().as_secs_f64()),
                    ),
                }
                State::Awake { endpoint, since: SystemTime::now(), exited: Some(exited) }
            }

            // Running: until it exits, idles into a sleep tier, or we stop.
            State::Awake { endpoint, since, exited } => {
                let mut exited = exited.unwrap_or_else(|| ctx.runtime.wait_stopped(&key));
                let mut check = tokio::time::interval(SLEEP_CHECK);
                let (tier, idle_since) = loop {
                    tokio::select! {
                        () = cancel.cancelled() => {
                            drop(exited);
                            return stop(&sup).await;
                        }
                        code = &mut exited => {
                            match code {
                                // The wait call itself ended (e.g. the engine's request timeout): wait again.
                                Err(e) if matches!(ctx.runtime.get(&key).await, Ok(Some(i)) if i.running) => {
                                    tracing::debug!(space = %key, error = %e, "waiting for the container again");
                                    exited = ctx.runtime.wait_stopped(&key);
                                }
                                code => {
                                    let message = exit_message(&ctx, &key, code.ok().flatten(), "while running").await;
                                    return sup.fail(Stage::RuntimeError, message, &cancel).await;
                                }
                            }
                        }
                        _ = check.tick() => {
                            let last = last_activity(&ctx, &key, since);
                            let idle = SystemTime::now().duration_since(last).unwrap_or_default();
                            if let Some(tier) = times.tier(idle).tier {
                                break (tier, last);
                            }
                        }
                    }
                };
                // A frozen container's wait stays pending; a stopped one's ends: either way, not needed now.
                drop(exited);
                match tier {
                    SleepTier::Stopped => State::Stopping,
                    SleepTier::Frozen => sup.freeze(endpoint, idle_since, &mut wakes).await,
                }
            }

            // Frozen: thawed by the next request, stopped once idle past the stop time.
            State::Frozen { endpoint, idle_since } => {
                let mut check = tokio::time::interval(SLEEP_CHECK);
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return stop(&sup).await,
                        w = wakes.recv() => {
                            if w.is_none() {
                                return;
                            }
                            break sup.thaw(endpoint).await;
                        }
                        _ = check.tick() => {
                            let idle = SystemTime::now().duration_since(idle_since).unwrap_or_default();
                            if times.tier(idle).tier == Some(SleepTier::Stopped) {
                                break State::Stopping;
                            }
                        }
                    }
                }
            }

            // Stopped: route first (new requests wait and wake it), then the container.
            State::Stopping => {
                while wakes.try_recv().is_ok() {}
                sup.set_sleeping(SleepTier::Stopped, None, None, None);
                if let Err(e) = ctx.runtime.stop(&key).await {
                    tracing::warn!(space = %key, error = %e, "cannot stop the idle container");
                }
                say(&key, "SLEEPING (idle; container stopped)");
                tokio::select! {
                    () = cancel.cancelled() => {
                        sup.set_stage(Stage::Stopped, None);
                        return;
                    }
                    w = wakes.recv() => {
                        if w.is_none() {
                            return;
                        }
                        say(&key, "waking (request received)");
                        State::Starting { woken_at: Some(Instant::now()) }
                    }
                }
            }
        };
    }
}

/// Where a supervised Space stands.
enum State {
    /// To start (or thaw) the container and wait until the app answers.
    Starting { woken_at: Option<Instant> },
    /// Serving at `endpoint`, its idle time counted from `since` at the earliest.
    Awake {
        endpoint: SocketAddr,
        since: SystemTime,
        exited: Option<BoxFuture<'static, Result<Option<i64>, RuntimeError>>>,
    },
    /// Paused, still published at `endpoint`; idle since `idle_since`.
    Frozen { endpoint: SocketAddr, idle_since: SystemTime },
    /// To stop the container and wait for a request.
    Stopping,
}

impl Supervisor {
    /// Freezes an idle Space: route first (new requests wait and signal the
    /// thaw), a grace period for requests that took the old route, then the
    /// container's pause. Activity or a wake meanwhile keeps it awake.
    async fn freeze(&self, endpoint: SocketAddr, idle_since: SystemTime, wakes: &mut mpsc::Receiver<()>) -> State {
        let key = &self.key;
        while wakes.try_recv().is_ok() {}
        self.set_sleeping(SleepTier::Frozen, Some(endpoint), Some(idle_since), None);
        tokio::time::sleep(FREEZE_GRACE).await;
        let woken = wakes.try_recv().is_ok();
        if woken || last_activity(&self.ctx, key, idle_since) > idle_since {
            // A request came in after all: serve it instead of freezing.
            self.set_running(endpoint);
            return State::Awake { endpoint, since: SystemTime::now(), exited: None };
        }
        if let Err(e) = self.ctx.runtime.pause(key).await {
            tracing::warn!(space = %key, error = %e, "cannot freeze the idle container; stopping it");
            return State::Stopping;
        }
        self.frozen(endpoint, idle_since, "SLEEPING (idle; container frozen)").await;
        State::Frozen { endpoint, idle_since }
    }

    /// Records a frozen Space (tier, since, the memory it holds) and says so.
    async fn frozen(&self, endpoint: SocketAddr, idle_since: SystemTime, what: &str) {
        let memory = match self.ctx.runtime.memory_bytes(&self.key).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(space = %self.key, error = %e, "cannot read the frozen container's memory");
                None
            }
        };
        self.set_sleeping(SleepTier::Frozen, Some(endpoint), Some(idle_since), memory);
        let held = memory.map(|m| format!(", {} MiB held", m >> 20)).unwrap_or_default();
        say(&self.key, &format!("{what}{held}"));
    }

    /// Thaws a frozen Space and serves it at once: it answered when it was
    /// frozen and its port did not change, so no readiness probe is needed.
    async fn thaw(&self, endpoint: SocketAddr) -> State {
        let t = Instant::now();
        match self.ctx.runtime.unpause(&self.key).await {
            Ok(()) => {
                self.set_running(endpoint);
                say(&self.key, &format!("RUNNING (thawed in {:.0} ms)", t.elapsed().as_secs_f64() * 1000.0));
                State::Awake { endpoint, since: SystemTime::now(), exited: None }
            }
            Err(e) => {
                // `start` thaws too, and fails with the reason if nothing can be started.
                tracing::warn!(space = %self.key, error = %e, "cannot thaw the container; starting it");
                State::Starting { woken_at: Some(t) }
            }
        }
    }
}

/// When an adopted frozen container went idle: as the previous `hangar up`
/// recorded it, else the latest time consistent with its being frozen (its
/// freeze time ago), so it is stopped at the latest `stop_after - freeze_after` from now.
fn adopted_idle_since(previous: Option<&SpaceState>, times: &SleepTimes, now: SystemTime) -> SystemTime {
    let recorded = previous
        .filter(|p| p.tier == Some(SleepTier::Frozen))
        .and_then(|p| p.idle_since_ms)
        .map(from_unix_ms)
        .filter(|t| *t <= now);
    recorded.unwrap_or_else(|| times.freeze_after.and_then(|f| now.checked_sub(f)).unwrap_or(now))
}

/// On shutdown: stop the container unless told to keep it running.
async fn stop(sup: &Supervisor) {
    if !sup.ctx.keep_running
        && let Err(e) = sup.ctx.runtime.stop(&sup.key).await
    {
        tracing::warn!(space = %sup.key, error = %e, "cannot stop the container");
    }
    sup.set_stage(Stage::Stopped, None);
}

/// The last traffic the Space saw, `since` at the earliest.
fn last_activity(ctx: &Ctx, key: &SpaceKey, since: SystemTime) -> SystemTime {
    ctx.source.last_activity(key).map_or(since, |a| a.max(since))
}

/// The image to run and the Space's configuration, or the stage and message of a failure.
async fn prepare(ctx: &Ctx, space: &LocalSpace) -> Result<(String, AppConfig), (Stage, String)> {
    let key = &space.key;
    let source = match &space.origin {
        Origin::Image(image) => {
            let config = crate::space::resolve(&space.spec, None).map_err(|e| (Stage::ConfigError, e.to_string()))?;
            return Ok((image.clone(), config));
        }
        Origin::Git(source) => source.clone(),
        Origin::Folder(dir) => {
            let repo = ctx.state_dir.join("repos").join(&key.namespace).join(format!("{}.git", key.name));
            let commit = snapshot::snapshot(dir, &repo)
                .await
                .map_err(|e| (Stage::BuildError, format!("cannot snapshot {}: {e}", dir.display())))?;
            GitSource { git: repo.display().to_string(), revision: commit, credentials_secret: None }
        }
    };
    say(key, "BUILDING");
    let mut request = BuildRequest::new(&key.namespace, &key.name, source, space.spec.clone());
    // Offered to the build's secret mounts, and masked in its log.
    request.secrets = secret_env(space).map(|s| s.into_iter().collect()).unwrap_or_default();
    match ctx.builder.build(request).await {
        Ok(out) => {
            let how = if out.reused {
                "image reused (unchanged)".to_owned()
            } else {
                format!("built in {:.1}s", out.duration.as_secs_f64())
            };
            say(key, &how);
            Ok((out.image, out.app_config))
        }
        Err(f) => Err((f.stage, f.message)),
    }
}

/// Local mode has no Kubernetes Secrets: a Space's secret `NAME` takes the
/// value of `hangar up`'s own environment variable `NAME`.
fn secret_env(space: &LocalSpace) -> Result<BTreeMap<String, String>, String> {
    space
        .spec
        .secrets
        .iter()
        .map(|s| match std::env::var(&s.name) {
            Ok(v) => Ok((s.name.clone(), v)),
            Err(_) => Err(format!("secret {}: set the environment variable {} for hangar up", s.name, s.name)),
        })
        .collect()
}

fn headers(map: &BTreeMap<String, String>) -> Vec<(HeaderName, HeaderValue)> {
    map.iter()
        .filter_map(|(k, v)| Some((HeaderName::try_from(k.as_str()).ok()?, HeaderValue::try_from(v.as_str()).ok()?)))
        .collect()
}

/// Keeps the container's output in the run log (`.../logs/run`) while it runs.
fn follow_logs(ctx: &Ctx, key: &SpaceKey, container: &str, redact: Vec<String>) {
    let (engine, logs, id, container) =
        (ctx.builder.engine().clone(), ctx.builder.logs().clone(), key.to_string(), container.to_owned());
    logs.start(&id, LogKind::Run, redact);
    tokio::spawn(async move {
        if let Err(e) = engine.follow_container_logs(&container, &logs, &id).await {
            tracing::debug!(space = %id, error = %e, "run log follower ended");
        }
    });
}

async fn exit_message(ctx: &Ctx, key: &SpaceKey, code: Option<i64>, when: &str) -> String {
    // The log follower may still be reading the last lines.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tail = ctx.builder.logs().tail(&key.to_string(), LogKind::Run, 10);
    let code = code.map_or_else(|| "?".to_owned(), |c| c.to_string());
    let mut message = format!("the container exited with code {code} {when}");
    if !tail.is_empty() {
        message.push_str("\n--- last log lines ---\n");
        message.push_str(&tail.join("\n"));
    }
    message
}

/// Probes until the app answers HTTP (any status) or `timeout` passes. A TCP
/// connect alone proves nothing: the engine's port proxy accepts for a
/// container whose app is not listening yet.
async fn wait_until_answers(endpoint: SocketAddr, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if answers_http(endpoint).await {
            return true;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
    false
}

async fn answers_http(endpoint: SocketAddr) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(endpoint).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: hangar-probe\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await?;
        Ok::<bool, std::io::Error>(&head == b"HTTP/")
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_needs_an_http_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepts and closes at once, like a port proxy in front of a dead app.
        let silent = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        assert!(!answers_http(addr).await);
        silent.abort();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
            }
        });
        assert!(wait_until_answers(addr, Duration::from_secs(2)).await, "any status counts");
    }

    #[test]
    fn an_adopted_frozen_container_keeps_its_idle_time() {
        let s = Duration::from_secs;
        let now = SystemTime::UNIX_EPOCH + s(1_000_000);
        let times = SleepTimes { freeze_after: Some(s(60)), stop_after: Some(s(600)) };
        let record = |tier, idle_since: SystemTime| SpaceState {
            id: "a/b".into(),
            stage: Stage::Sleeping,
            url: String::new(),
            message: None,
            image: None,
            container: None,
            tier: Some(tier),
            tier_since_ms: None,
            idle_since_ms: Some(unix_ms(idle_since)),
            memory_bytes: None,
        };
        let tier_of = |since: SystemTime| times.tier(now.duration_since(since).unwrap_or_default()).tier;
        // Recorded: frozen 2 min ago, stays frozen; 11 min ago: past the stop time.
        let since = adopted_idle_since(Some(&record(SleepTier::Frozen, now - s(120))), &times, now);
        assert_eq!((since, tier_of(since)), (now - s(120), Some(SleepTier::Frozen)));
        let since = adopted_idle_since(Some(&record(SleepTier::Frozen, now - s(660))), &times, now);
        assert_eq!(tier_of(since), Some(SleepTier::Stopped));
        // No usable record (none, another tier, a time in the future): idle for the
        // freeze time at least, so still frozen now and stopped 9 min from now.
        for previous in
            [None, Some(record(SleepTier::Stopped, now - s(660))), Some(record(SleepTier::Frozen, now + s(5)))]
        {
            let since = adopted_idle_since(previous.as_ref(), &times, now);
            assert_eq!((since, tier_of(since)), (now - s(60), Some(SleepTier::Frozen)), "{previous:?}");
        }
        // Freezing turned off since: thawed at once.
        let never = SleepTimes { freeze_after: None, stop_after: Some(s(600)) };
        let since = adopted_idle_since(None, &never, now);
        assert_eq!(never.tier(now.duration_since(since).unwrap_or_default()).tier, None);
    }

    #[test]
    fn bad_headers_are_dropped() {
        let h = headers(&BTreeMap::from([
            ("cross-origin-opener-policy".to_owned(), "same-origin".to_owned()),
            ("bad header".to_owned(), "x".to_owned()),
        ]));
        assert_eq!(h.len(), 1);
    }
}
