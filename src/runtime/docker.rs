//! Spaces as containers on one Docker engine (local mode).
//!
//! One container per Space, named `hangar_<owner>_<name>` (owners and names
//! are DNS labels, so the name is unique and the engine itself refuses a
//! duplicate) and labelled `hangar.dev/space=<owner>/<name>`. The app port is
//! published on a random loopback port: nothing is reachable from outside the
//! machine but through the proxy. Containers run as their image's user (the
//! generated images use uid 1000, as on the hub).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, ContainerMemoryStats, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StatsOptionsBuilder,
    StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use futures::future::BoxFuture;

use super::{Ensured, Instance, RUN_SPEC_LABEL, RunSpec, Runtime, RuntimeError};
use crate::proxy::SpaceKey;
use crate::space::naming::{MANAGED_BY, MANAGED_BY_LABEL, SPACE_LABEL};

/// Seconds a stopping container gets between SIGTERM and SIGKILL.
const STOP_GRACE_SECS: i32 = 10;

/// The Docker engine as a [`Runtime`]; cheap to clone.
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Arc<Docker>,
}

impl DockerRuntime {
    /// Uses an engine connection made elsewhere (e.g. the builder's).
    pub fn new(docker: Docker) -> Self {
        Self { docker: Arc::new(docker) }
    }

    /// `hangar_<owner>_<name>`.
    pub fn container_name(key: &SpaceKey) -> String {
        format!("hangar_{}_{}", key.namespace, key.name)
    }

    async fn inspect(docker: &Docker, key: &SpaceKey) -> Result<Option<Instance>, RuntimeError> {
        match docker.inspect_container(&Self::container_name(key), None).await {
            Ok(c) => Ok(Some(instance(key, &c))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(err("inspecting", key, e)),
        }
    }

    async fn create(docker: &Docker, spec: &RunSpec) -> Result<Instance, RuntimeError> {
        let key = &spec.key;
        let port = format!("{}/tcp", spec.app_port);
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.insert(SPACE_LABEL.to_owned(), key.to_string());
        labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
        labels.insert(RUN_SPEC_LABEL.to_owned(), spec.fingerprint());
        let bindings = HashMap::from([(
            port.clone(),
            // Port "" (or 0): the engine picks a free one at every start.
            Some(vec![PortBinding { host_ip: Some(Ipv4Addr::LOCALHOST.to_string()), host_port: Some(String::new()) }]),
        )]);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            exposed_ports: Some(vec![port]),
            host_config: Some(HostConfig {
                port_bindings: Some(bindings),
                // Reaps zombies and forwards signals for apps that run as PID 1.
                init: Some(true),
                nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
                memory: spec.memory_bytes,
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&Self::container_name(key)).build();
        docker.create_container(Some(options), body).await.map_err(|e| err("creating a container for", key, e))?;
        Self::inspect(docker, key).await?.ok_or_else(|| RuntimeError(format!("the container of {key} vanished")))
    }

    /// Thaws the container if it is frozen. The engine refuses to unpause a
    /// container that is not paused (409, or 500 on Engine 20.10, for "not
    /// paused" and "not running" alike): then its state tells whether it runs.
    async fn thaw(docker: &Docker, key: &SpaceKey) -> Result<(), RuntimeError> {
        match docker.unpause_container(&Self::container_name(key)).await {
            Ok(()) => Ok(()),
            Err(e) => match Self::inspect(docker, key).await? {
                Some(i) if i.running && !i.paused => Ok(()),
                _ => Err(err("unpausing the container of", key, e)),
            },
        }
    }

    async fn remove_container(docker: &Docker, key: &SpaceKey) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match docker.remove_container(&Self::container_name(key), Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(err("removing the container of", key, e)),
        }
    }
}

impl Runtime for DockerRuntime {
    fn ensure(&self, spec: &RunSpec) -> BoxFuture<'static, Result<(Instance, Ensured), RuntimeError>> {
        let (docker, spec) = (Arc::clone(&self.docker), spec.clone());
        Box::pin(async move {
            let fingerprint = spec.fingerprint();
            if let Some(existing) = Self::inspect(&docker, &spec.key).await? {
                if existing.fingerprint.as_deref() == Some(fingerprint.as_str()) {
                    return Ok((existing, Ensured::Adopted));
                }
                tracing::info!(space = %spec.key, "replacing the container of an older version");
                Self::remove_container(&docker, &spec.key).await?;
            }
            Ok((Self::create(&docker, &spec).await?, Ensured::Created))
        })
    }

    fn start(&self, key: &SpaceKey) -> BoxFuture<'static, Result<Instance, RuntimeError>> {
        let (docker, key) = (Arc::clone(&self.docker), key.clone());
        Box::pin(async move {
            match docker.start_container(&Self::container_name(&key), None).await {
                Ok(()) => {}
                // 304: already running.
                Err(BollardError::DockerResponseServerError { status_code: 304, .. }) => {}
                // "cannot start a paused container" (409, or 500 on Engine 20.10): it runs, frozen; thaw it.
                Err(BollardError::DockerResponseServerError { status_code: 409 | 500, .. })
                    if Self::inspect(&docker, &key).await?.is_some_and(|i| i.paused) =>
                {
                    Self::thaw(&docker, &key).await?;
                }
                Err(e) => return Err(err("starting the container of", &key, e)),
            }
            Self::inspect(&docker, &key).await?.ok_or_else(|| RuntimeError(format!("the container of {key} vanished")))
        })
    }

    fn pause(&self, key: &SpaceKey) -> BoxFuture<'static, Result<(), RuntimeError>> {
        let (docker, key) = (Arc::clone(&self.docker), key.clone());
        Box::pin(async move {
            match docker.pause_container(&Self::container_name(&key)).await {
                Ok(()) => Ok(()),
                // Already paused (fine) or not running (an error): the state tells.
                Err(e) => match Self::inspect(&docker, &key).await? {
                    Some(i) if i.paused => Ok(()),
                    _ => Err(err("pausing the container of", &key, e)),
                },
            }
        })
    }

    fn unpause(&self, key: &SpaceKey) -> BoxFuture<'static, Result<(), RuntimeError>> {
        let (docker, key) = (Arc::clone(&self.docker), key.clone());
        Box::pin(async move { Self::thaw(&docker, &key).await })
    }

    fn memory_bytes(&self, key: &SpaceKey) -> BoxFuture<'static, Result<Option<u64>, RuntimeError>> {
        let (docker, key) = (Arc::clone(&self.docker), key.clone());
        Box::pin(async move {
            let options = StatsOptionsBuilder::default().stream(false).one_shot(true).build();
            let mut stream = docker.stats(&Self::container_name(&key), Some(options));
            match stream.next().await {
                Some(Ok(stats)) => Ok(stats.memory_stats.as_ref().and_then(working_set)),
                Some(Err(e)) if is_not_found(&e) => Ok(None),
                Some(Err(e)) => Err(err("reading the memory of", &key, e)),
                None => Ok(None),
            }
        })
    }

    fn stop(&self, key: &SpaceKey) -> BoxFuture<'static, Result<(), RuntimeError>> {
        let (docker, key) = (Arc::clone(&self.docker), key.clone());
        Box::pin(async move {
            // A frozen app cannot handle SIGTERM: the engine would wait out
            // the whole grace period and kill it. Thawed, it exits cleanly.
            if Self::inspect(&docker, &key).await?.is_some_and(|i| i.paused) {
                Self::thaw(&docker, &key).await?;
            }
            let options = StopContainerOptionsBuilder::default().t(STOP_GRACE_SECS).build();
            match docker.stop_container(&Self::container_name(&key), Some(options)).await {
                Ok(()) => Ok(()),
                Err(BollardError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(err("stopping the container of", &key, e)),
            }
        })
    }

    fn remove(&self, key: &SpaceKey) -> BoxFuture<'static, Result<(), RuntimeError>> {
        let (docker, key) = (Arc::clone(&self.docker), key.clone());
        Box::pin(async move { Self::remove_container(&docker, &key).await })
    }

    fn get(&self, key: &SpaceKey) -> BoxFuture<'static, Result<Option<Instance>, RuntimeError>> {
        let (docker, key) = (Arc::clone(&self.docker), key.clone());
        Box::pin(async move { Self::inspect(&docker, &key).await })
    }

    fn list(&self) -> BoxFuture<'static, Result<Vec<Instance>, RuntimeError>> {
        let docker = Arc::clone(&self.docker);
        Box::pin(async move {
            let filters =
                HashMap::from([("label", vec![format!("{MANAGED_BY_LABEL}={MANAGED_BY}"), SPACE_LABEL.to_owned()])]);
            let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
            let summaries = docker
                .list_containers(Some(options))
                .await
                .map_err(|e| RuntimeError(format!("listing containers: {e}")))?;
            let mut out = Vec::new();
            for s in summaries {
                let Some(key) = s.labels.as_ref().and_then(|l| l.get(SPACE_LABEL)).and_then(|id| parse_key(id)) else {
                    continue;
                };
                if let Some(instance) = Self::inspect(&docker, &key).await? {
                    out.push(instance);
                }
            }
            Ok(out)
        })
    }

    fn wait_stopped(&self, key: &SpaceKey) -> BoxFuture<'static, Result<Option<i64>, RuntimeError>> {
        let (docker, key) = (Arc::clone(&self.docker), key.clone());
        Box::pin(async move {
            let options = WaitContainerOptionsBuilder::default().condition("not-running").build();
            let mut stream = docker.wait_container(&Self::container_name(&key), Some(options));
            match stream.next().await {
                Some(Ok(r)) => Ok(Some(r.status_code)),
                // bollard reports a non-zero exit as an error carrying the code.
                Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(Some(code)),
                Some(Err(e)) if is_not_found(&e) => Ok(None),
                Some(Err(e)) => Err(err("waiting for the container of", &key, e)),
                None => Ok(None),
            }
        })
    }
}

fn parse_key(id: &str) -> Option<SpaceKey> {
    let (ns, name) = id.split_once('/')?;
    Some(SpaceKey::new(ns, name))
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code: 404, .. })
}

fn err(what: &str, key: &SpaceKey, e: BollardError) -> RuntimeError {
    RuntimeError(format!("{what} {key}: {e}"))
}

fn instance(key: &SpaceKey, c: &ContainerInspectResponse) -> Instance {
    let state = c.state.as_ref();
    let running = state.and_then(|s| s.running).unwrap_or(false);
    let paused = running && state.and_then(|s| s.paused).unwrap_or(false);
    let labels: BTreeMap<String, String> =
        c.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default().into_iter().collect();
    let endpoint = if running { published_endpoint(c) } else { None };
    Instance {
        key: key.clone(),
        id: c.id.clone().unwrap_or_default(),
        running,
        paused,
        endpoint,
        fingerprint: labels.get(RUN_SPEC_LABEL).cloned(),
        exit_code: if running { None } else { state.and_then(|s| s.exit_code) },
        labels,
    }
}

/// The loopback address the engine published the container's (only) port on.
fn published_endpoint(c: &ContainerInspectResponse) -> Option<SocketAddr> {
    let ports = c.network_settings.as_ref()?.ports.as_ref()?;
    ports.values().flatten().flatten().find_map(|b| {
        let port: u16 = b.host_port.as_deref()?.parse().ok()?;
        let ip = b.host_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "0.0.0.0").unwrap_or("127.0.0.1");
        Some(SocketAddr::new(ip.parse().ok()?, port))
    })
}

/// The memory a container holds as `docker stats` shows it: usage without
/// the inactive page cache the kernel may reclaim at once (`total_inactive_file`
/// on cgroup v1, `inactive_file` on v2). `None` when the engine reports no usage
/// (a stopped container).
fn working_set(m: &ContainerMemoryStats) -> Option<u64> {
    let usage = m.usage?;
    let stats = m.stats.as_ref();
    let inactive =
        stats.and_then(|s| s.get("total_inactive_file").or_else(|| s.get("inactive_file"))).copied().unwrap_or(0);
    Some(usage.saturating_sub(inactive))
}

/// CPU limit for a flavor on this machine: the engine refuses more CPUs than it has.
pub fn cpu_limit(vcpu: u32) -> f64 {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    f64::from(vcpu).min(available as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys() {
        let key = SpaceKey::new("alice", "demo");
        assert_eq!(DockerRuntime::container_name(&key), "hangar_alice_demo");
        // Owners and names with dashes cannot collide.
        assert_ne!(
            DockerRuntime::container_name(&SpaceKey::new("a-b", "c")),
            DockerRuntime::container_name(&SpaceKey::new("a", "b-c"))
        );
        assert_eq!(parse_key("alice/demo"), Some(key));
        assert_eq!(parse_key("nope"), None);
    }

    #[test]
    fn working_set_leaves_out_reclaimable_cache() {
        let stats = |usage, kv: &[(&str, u64)]| ContainerMemoryStats {
            usage,
            stats: Some(kv.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()),
            ..Default::default()
        };
        // cgroup v1
        assert_eq!(working_set(&stats(Some(100), &[("total_inactive_file", 30), ("cache", 50)])), Some(70));
        // cgroup v2
        assert_eq!(working_set(&stats(Some(100), &[("inactive_file", 40)])), Some(60));
        assert_eq!(working_set(&stats(Some(100), &[])), Some(100));
        assert_eq!(working_set(&stats(Some(10), &[("inactive_file", 40)])), Some(0));
        assert_eq!(working_set(&stats(None, &[])), None, "a stopped container reports nothing");
    }

    #[test]
    fn cpu_limit_is_capped() {
        assert!(cpu_limit(192) <= std::thread::available_parallelism().map_or(1, |n| n.get()) as f64);
        assert!((cpu_limit(1) - 1.0).abs() < f64::EPSILON);
    }
}
