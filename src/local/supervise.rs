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
use super::snapshot;
use super::state::Book;
use crate::builder::{BuildRequest, Builder, LogKind};
use crate::proxy::{Access, MemorySource, SpaceKey, SpaceRoute};
use crate::runtime::docker::cpu_limit;
use crate::runtime::{Ensured, RunSpec, Runtime, space_env};
use crate::space::{AppConfig, GitSource, Stage, Visibility, naming};

/// Label telling which `hangar up` folder a container belongs to (orphans
/// of that folder, Spaces removed from it, are removed at the next start).
pub const UP_DIR_LABEL: &str = "hangar.dev/up-dir";
/// Pause between two readiness probes of a starting app.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// One probe's limit (an app may accept and answer slowly while importing).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an awake Space's idle time is compared with its sleep time.
const SLEEP_CHECK: Duration = Duration::from_millis(500);

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
    pub token_sha256: Option<[u8; 32]>,
    /// When `hangar up` started (for the time-to-first-answer line).
    pub started: Instant,
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
        });
        self.ctx.source.update(&self.key, |r| {
            r.stage = Some(stage);
            r.message = message;
            if !stage.is_serving() {
                r.endpoints.clear();
            }
        });
    }

    fn set_running(&self, endpoint: SocketAddr) {
        self.ctx.book.update(&self.key.to_string(), &self.url, |s| {
            s.stage = Stage::Running;
            s.message = None;
        });
        self.ctx.source.update(&self.key, |r| {
            r.stage = Some(Stage::Running);
            r.message = None;
            r.endpoints = vec![endpoint];
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
        route.access = Access::Private { token_sha256: ctx.token_sha256 };
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
        let how = if instance.running { "adopted its running container" } else { "adopted its stopped container" };
        say(&key, how);
    }
    ctx.book.update(&key.to_string(), &sup.url, |s| s.container = Some(instance.id.clone()));
    let redact: Vec<String> = secrets.into_values().collect();

    // 3. Run, sleep, wake, until cancelled.
    let mut woken_at: Option<Instant> = None;
    loop {
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
            let message =
                format!("the app did not answer on port {} within {:?}", config.app_port, config.startup_timeout);
            let _ = ctx.runtime.stop(&key).await;
            return sup.fail(Stage::RuntimeError, message, &cancel).await;
        }
        sup.set_running(endpoint);
        match woken_at.take() {
            Some(at) => say(&key, &format!("RUNNING (woke in {:.2}s)", at.elapsed().as_secs_f64())),
            None => {
                say(&key, &format!("RUNNING {} ({:.1}s after start)", sup.url, ctx.started.elapsed().as_secs_f64()))
            }
        }

        // Running: until it exits, idles past its sleep time, or we stop.
        let running_since = SystemTime::now();
        let mut check = tokio::time::interval(SLEEP_CHECK);
        loop {
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
                    if is_idle(&ctx, &key, running_since, config.sleep_after) {
                        break;
                    }
                }
            }
        }

        // Asleep: route first (new requests wait and wake it), then the container.
        while wakes.try_recv().is_ok() {}
        sup.set_stage(Stage::Sleeping, None);
        drop(exited);
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
                woken_at = Some(Instant::now());
                say(&key, "waking (request received)");
            }
        }
    }
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

/// Whether the Space saw no traffic for its sleep time (never, without one).
fn is_idle(ctx: &Ctx, key: &SpaceKey, running_since: SystemTime, sleep_after: Option<Duration>) -> bool {
    let Some(sleep_after) = sleep_after else {
        return false;
    };
    let last = ctx.source.last_activity(key).map_or(running_since, |a| a.max(running_since));
    SystemTime::now().duration_since(last).is_ok_and(|idle| idle >= sleep_after)
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
    request.redact = secret_env(space).map(|s| s.into_values().collect()).unwrap_or_default();
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
    fn bad_headers_are_dropped() {
        let h = headers(&BTreeMap::from([
            ("cross-origin-opener-policy".to_owned(), "same-origin".to_owned()),
            ("bad header".to_owned(), "x".to_owned()),
        ]));
        assert_eq!(h.len(), 1);
    }
}
