//! Where Spaces run, behind one trait. Kubernetes workloads are the
//! operator's (it renders Deployments, see `operator::render`); this module
//! holds the [`Runtime`] trait local mode drives and its Docker
//! implementation, [`docker::DockerRuntime`].
//!
//! A runtime keeps at most one instance per Space, found again by label after
//! a restart of its caller, so a restarted `hangar up` adopts what runs
//! instead of starting duplicates.

pub mod docker;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::proxy::SpaceKey;
use crate::space::{AppConfig, naming};

pub use docker::DockerRuntime;

/// Label carrying the hash of the [`RunSpec`] an instance was made from.
pub const RUN_SPEC_LABEL: &str = "hangar.dev/run-spec";

/// What to run for one Space.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub key: SpaceKey,
    pub image: String,
    /// Port the app listens on inside its container.
    pub app_port: u16,
    /// The complete environment (see [`space_env`]), secrets included.
    pub env: BTreeMap<String, String>,
    /// Extra labels (e.g. which `hangar up` owns the instance).
    pub labels: BTreeMap<String, String>,
    /// CPU and memory limits (from the hardware flavor); `None`: unlimited.
    pub cpus: Option<f64>,
    pub memory_bytes: Option<i64>,
}

impl RunSpec {
    /// Hash of everything that shapes the instance: an instance with another
    /// fingerprint is replaced, one with the same is adopted as it is.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |v: &str| {
            h.update(v.len().to_string().as_bytes());
            h.update(b":");
            h.update(v.as_bytes());
        };
        field(&self.key.to_string());
        field(&self.image);
        field(&self.app_port.to_string());
        for (k, v) in self.env.iter().chain(&self.labels) {
            field(k);
            field(v);
        }
        field(&format!("{:?}/{:?}", self.cpus, self.memory_bytes));
        hex::encode(&h.finalize()[..12])
    }
}

/// One Space's instance as the runtime sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub key: SpaceKey,
    /// The runtime's id (a container id).
    pub id: String,
    pub running: bool,
    /// Frozen (cgroup freezer): still `running`, holding its memory, using no CPU.
    pub paused: bool,
    /// Where the app answers, while running (also while paused: the port stays published).
    pub endpoint: Option<SocketAddr>,
    /// [`RunSpec::fingerprint`] it was made from.
    pub fingerprint: Option<String>,
    /// Exit code of a stopped instance.
    pub exit_code: Option<i64>,
    pub labels: BTreeMap<String, String>,
}

/// Whether [`Runtime::ensure`] found the instance or made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    /// An instance with the same fingerprint existed (running or not).
    Adopted,
    /// Made now (nothing existed, or an outdated one was replaced).
    Created,
}

/// A runtime call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuntimeError(pub String);

/// Where Spaces run.
pub trait Runtime: Send + Sync + 'static {
    /// Makes sure the Space has exactly one instance made from `spec`: adopts
    /// a matching one as it is (running or stopped), replaces an outdated
    /// one, or creates one (not started).
    fn ensure(&self, spec: &RunSpec) -> BoxFuture<'static, Result<(Instance, Ensured), RuntimeError>>;

    /// Starts the instance (a no-op when it runs; thaws it when frozen) and
    /// returns it with its endpoint.
    fn start(&self, key: &SpaceKey) -> BoxFuture<'static, Result<Instance, RuntimeError>>;

    /// Freezes the running instance's processes (memory kept, no CPU); a
    /// no-op when already frozen, an error when it does not run.
    fn pause(&self, key: &SpaceKey) -> BoxFuture<'static, Result<(), RuntimeError>>;

    /// Thaws a frozen instance; a no-op when it runs unfrozen, an error when
    /// it does not run (e.g. killed while frozen).
    fn unpause(&self, key: &SpaceKey) -> BoxFuture<'static, Result<(), RuntimeError>>;

    /// Memory the running (or frozen) instance holds, in bytes (its working
    /// set, without reclaimable page cache); `None` when it does not run.
    fn memory_bytes(&self, key: &SpaceKey) -> BoxFuture<'static, Result<Option<u64>, RuntimeError>>;

    /// Stops the instance (thawing it first if frozen), keeping it for a fast start later.
    fn stop(&self, key: &SpaceKey) -> BoxFuture<'static, Result<(), RuntimeError>>;

    /// Removes the instance, running or not; a no-op when there is none.
    fn remove(&self, key: &SpaceKey) -> BoxFuture<'static, Result<(), RuntimeError>>;

    /// The Space's instance, if any.
    fn get(&self, key: &SpaceKey) -> BoxFuture<'static, Result<Option<Instance>, RuntimeError>>;

    /// Every instance this runtime manages.
    fn list(&self) -> BoxFuture<'static, Result<Vec<Instance>, RuntimeError>>;

    /// Resolves when the running instance stops, with its exit code.
    fn wait_stopped(&self, key: &SpaceKey) -> BoxFuture<'static, Result<Option<i64>, RuntimeError>>;
}

/// The environment of a running Space, as on the hub: its identity, the
/// hardware, then its variables (they may override nothing of the former).
pub fn space_env(
    key: &SpaceKey,
    config: &AppConfig,
    domain: &str,
    variables: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let (ns, name) = (key.namespace.as_str(), key.name.as_str());
    let flavor = config.flavor;
    let mut env: BTreeMap<String, String> = variables.clone();
    let fixed = [
        ("SPACE_ID", naming::space_id(ns, name)),
        ("SPACE_HOST", naming::host(ns, name, domain)),
        ("SPACE_AUTHOR_NAME", ns.to_owned()),
        ("SPACE_REPO_NAME", name.to_owned()),
        ("SYSTEM", "spaces".to_owned()),
        ("ACCELERATOR", flavor.accelerator().to_owned()),
        ("CPU_CORES", flavor.vcpu.to_string()),
        ("MEMORY", flavor.memory_quantity()),
    ];
    for (k, v) in fixed {
        env.insert(k.to_owned(), v);
    }
    if let Some(title) = &config.title {
        env.insert("SPACE_TITLE".to_owned(), title.clone());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{SpaceSpec, resolve};

    fn spec() -> RunSpec {
        RunSpec {
            key: SpaceKey::new("alice", "demo"),
            image: "img:1".into(),
            app_port: 7860,
            env: BTreeMap::from([("A".into(), "1".into())]),
            labels: BTreeMap::new(),
            cpus: None,
            memory_bytes: None,
        }
    }

    #[test]
    fn fingerprint_follows_what_shapes_the_instance() {
        let a = spec();
        assert_eq!(a.fingerprint(), spec().fingerprint());
        let mut b = spec();
        b.env.insert("A".into(), "2".into());
        assert_ne!(a.fingerprint(), b.fingerprint());
        let mut c = spec();
        c.image = "img:2".into();
        assert_ne!(a.fingerprint(), c.fingerprint());
        let mut d = spec();
        d.app_port = 8080;
        assert_ne!(a.fingerprint(), d.fingerprint());
    }

    #[test]
    fn env_has_the_hub_variables_and_they_win() {
        let spec =
            SpaceSpec { sdk: Some(crate::space::Sdk::Docker), hardware: "cpu-basic".into(), ..SpaceSpec::default() };
        let config = resolve(&spec, None).expect("valid");
        let vars = BTreeMap::from([("MODEL".to_owned(), "x".to_owned()), ("SYSTEM".to_owned(), "mine".to_owned())]);
        let env = space_env(&SpaceKey::new("alice", "demo"), &config, "localhost", &vars);
        assert_eq!(env["SPACE_ID"], "alice/demo");
        assert_eq!(env["SPACE_HOST"], "alice-demo.localhost");
        assert_eq!(env["SYSTEM"], "spaces");
        assert_eq!(env["MODEL"], "x");
        assert_eq!(env["CPU_CORES"], "2");
    }
}
