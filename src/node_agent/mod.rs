//! `hangar node-agent`: freezes and thaws the Space pods of one node through
//! their pod cgroups (the frozen sleep tier).
//!
//! It watches the Space pods on its node and converges each to the
//! operator's decision (the pod's `hangar.dev/freeze` annotation), and serves
//! an authenticated `POST /thaw` for the proxy that returns once the cgroup is
//! THAWED: the wake path never waits on the apiserver. It listens on its
//! node's address at a fixed port (hostPort or host network), where the proxy
//! finds it from the Node's `InternalIP`: an agent advertises nothing, so it
//! cannot redirect another node's thaw calls.

pub mod agent;
pub mod api;
pub mod cgroup;
pub mod decision;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::space::naming::SPACE_LABEL;
use agent::Agent;
use cgroup::Cgroups;

/// Every pod is looked at again this often, whatever the watch says (a
/// failed freeze, a cgroup changed behind the agent's back).
const RESYNC: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, clap::Args)]
pub struct NodeAgentArgs {
    /// The node this agent runs on (the DaemonSet passes `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Address of the thaw API.
    #[arg(long, env = "HANGAR_NODE_AGENT_LISTEN", default_value = "0.0.0.0:9450")]
    pub listen: SocketAddr,
    /// File holding the bearer token callers must send (a mounted Secret).
    #[arg(long, env = "HANGAR_NODE_AGENT_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Root of the node's cgroup filesystem (v1 or v2, detected).
    #[arg(long, env = "HANGAR_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Manage the pods of one namespace only (as the operator's and proxy's `--namespace`).
    #[arg(long, env = "HANGAR_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub limits: crate::http_server::Limits,
}

/// Reads a token file: its content without surrounding whitespace, never empty.
pub fn read_token(path: &std::path::Path) -> crate::Result<String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| crate::Error::Invalid(format!("token file {}: {e}", path.display())))?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(crate::Error::Invalid(format!("token file {} is empty", path.display())));
    }
    Ok(token)
}

pub async fn run(args: NodeAgentArgs) -> crate::Result<()> {
    let token = read_token(&args.token_file)?;
    let cgroups = Cgroups::detect(&args.cgroup_root)?;
    tracing::info!(node = %args.node_name, cgroup = ?cgroups.version(), "node agent starting");
    let client = Client::try_default().await?;
    let mut registry = Registry::with_prefix("hangar_node_agent");
    let agent = Agent::new(client.clone(), cgroups, &mut registry);
    let (synced_tx, synced) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(watch_pods(client, args.clone(), Arc::clone(&agent), synced_tx));
    tracing::info!(addr = %bound, "thaw API listening");
    let app = api::router(api::ApiState::new(agent, &token, registry, synced));
    crate::http_server::serve(listener, app, args.limits, crate::shutdown::signal()).await?;
    Ok(())
}

/// Watches the Space pods on the node and converges each one it sees change.
async fn watch_pods(client: Client, args: NodeAgentArgs, agent: Arc<Agent>, synced: watch::Sender<bool>) {
    let api: Api<Pod> = match &args.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", args.node_name)).labels(SPACE_LABEL);
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listing: HashSet<String> = HashSet::new();
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Apply(pod)) => converge_soon(&agent, agent.observe(&pod)),
                    Ok(watcher::Event::Delete(pod)) => agent.forget(&pod),
                    Ok(watcher::Event::Init) => listing.clear(),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let Some(uid) = agent.observe(&pod) {
                            listing.insert(uid.clone());
                            converge_soon(&agent, Some(uid));
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        agent.retain(&listing);
                        synced.send_replace(true);
                    }
                    Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
                }
            }
            _ = resync.tick() => {
                for uid in agent.known() {
                    converge_soon(&agent, Some(uid));
                }
            }
        }
    }
}

fn converge_soon(agent: &Arc<Agent>, uid: Option<String>) {
    if let Some(uid) = uid {
        let agent = Arc::clone(agent);
        tokio::spawn(async move { agent.converge(&uid).await });
    }
}
