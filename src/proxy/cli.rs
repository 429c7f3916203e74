//! `hangar proxy`: its arguments and the process around the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::kubernetes::{KubeSource, KubeSourceConfig};
use super::route::{SpaceKey, SpaceRoute};
use super::server::ProxyConfig;
use super::source::{MemorySource, RouteSource};

#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address Spaces are served on (HTTP/1.1 and h2c).
    #[arg(long, env = "HANGAR_PROXY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address of /metrics and /healthz.
    #[arg(long, env = "HANGAR_PROXY_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Spaces are served at `{owner}-{name}.{domain}` (and at `/spaces/{owner}/{name}/` on any host).
    #[arg(long, env = "HANGAR_DOMAIN", default_value = "spaces.localhost")]
    pub domain: String,
    /// Kubernetes mode: watch only this namespace (default: all).
    #[arg(long, env = "HANGAR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Static mode instead of Kubernetes: serve `OWNER/NAME=HOST:PORT` (repeatable), always running.
    #[arg(long = "route", value_name = "OWNER/NAME=HOST:PORT", value_parser = parse_route)]
    pub routes: Vec<SpaceRoute>,
    /// Requests held per starting Space before answering 503.
    #[arg(long, env = "HANGAR_PROXY_MAX_HELD", default_value_t = 1000)]
    pub max_held_per_space: usize,
    /// Seconds to wait for an upstream's response head.
    #[arg(long, default_value_t = 300)]
    pub header_timeout_secs: u64,
    /// Peers (CIDRs, comma-separated) whose X-Forwarded-*, Forwarded and
    /// X-Real-IP headers are kept: the load balancers in front of the proxy.
    /// From anyone else the proxy sets its own. Default: none.
    #[arg(long, env = "HANGAR_PROXY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Trust every peer's forwarding headers (as `--trusted-proxies 0.0.0.0/0,::/0`):
    /// only when nothing but a trusted load balancer can reach the proxy.
    #[arg(long, env = "HANGAR_PROXY_TRUST_FORWARDED")]
    pub trust_forwarded_headers: bool,
    #[command(flatten)]
    pub limits: crate::http_server::Limits,
    /// File with the node agents' bearer token: frozen Spaces are thawed
    /// through them (without it the proxy assumes no agents, nothing frozen).
    #[arg(long, env = "HANGAR_NODE_AGENT_TOKEN_FILE")]
    pub node_agent_token_file: Option<std::path::PathBuf>,
    /// The port node agents listen on at their node's InternalIP (the chart's `nodeAgent.port`).
    #[arg(long, env = "HANGAR_NODE_AGENT_PORT", default_value_t = super::kubernetes::DEFAULT_NODE_AGENT_PORT)]
    pub node_agent_port: u16,
    /// File with the key the operator hashes private Spaces' tokens with (the
    /// operator's `--token-key-file`); without it no private Space can be reached.
    #[arg(long, env = "HANGAR_TOKEN_KEY_FILE")]
    pub token_key_file: Option<std::path::PathBuf>,
    /// Threads serving connections, each with its own event loop and upstream pool (0: one per CPU).
    #[arg(long, env = "HANGAR_PROXY_WORKERS", default_value_t = 0)]
    pub workers: usize,
}

fn parse_route(spec: &str) -> Result<SpaceRoute, String> {
    let invalid = || format!("{spec:?} is not OWNER/NAME=HOST:PORT");
    let (id, addr) = spec.split_once('=').ok_or_else(invalid)?;
    let (owner, name) = id.split_once('/').ok_or_else(invalid)?;
    let addr: SocketAddr = addr.parse().map_err(|_| invalid())?;
    let mut route = SpaceRoute::new(SpaceKey::new(owner, name));
    route.stage = Some(crate::space::Stage::Running);
    route.endpoints = vec![addr];
    Ok(route)
}

fn trusted_proxies(args: &ProxyArgs) -> Vec<ipnet::IpNet> {
    let mut nets = args.trusted_proxies.clone();
    if args.trust_forwarded_headers {
        nets.extend(["0.0.0.0/0", "::/0"].iter().filter_map(|n| n.parse::<ipnet::IpNet>().ok()));
    }
    nets
}

/// Runs `hangar proxy` until SIGINT/SIGTERM.
pub async fn run(args: ProxyArgs) -> crate::Result<()> {
    let cancel = CancellationToken::new();
    let source: Arc<dyn RouteSource> = if args.routes.is_empty() {
        let client = kube::Client::try_default().await?;
        let token_key = args.token_key_file.as_deref().map(crate::operator::read_token_key).transpose()?;
        if token_key.is_none() {
            tracing::warn!("no --token-key-file: every request to a private Space is refused");
        }
        let config = KubeSourceConfig { domain: args.domain.clone(), namespace: args.namespace.clone(), token_key };
        let token = args.node_agent_token_file.as_deref().map(crate::node_agent::read_token).transpose()?;
        let source = KubeSource::start_with_agents(client, config, token, args.node_agent_port, cancel.clone());
        source.synced().await;
        tracing::info!("routes synced from the cluster");
        source
    } else {
        let source = MemorySource::new(&args.domain);
        for route in &args.routes {
            source.upsert(route.clone());
        }
        source
    };
    let config = ProxyConfig {
        listen: args.listen,
        admin_listen: Some(args.admin_listen),
        max_held_per_space: args.max_held_per_space,
        header_timeout: Duration::from_secs(args.header_timeout_secs),
        trusted_proxies: trusted_proxies(&args),
        limits: args.limits,
        workers: args.workers,
        ..ProxyConfig::default()
    };
    let result = super::server::run(config, source, crate::shutdown::signal()).await;
    cancel.cancel();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_static_routes() {
        let r = parse_route("alice/echo=127.0.0.1:9000").expect("valid");
        assert_eq!(r.key, SpaceKey::new("alice", "echo"));
        assert_eq!(r.endpoints, vec![SocketAddr::from(([127, 0, 0, 1], 9000))]);
        assert!(parse_route("alice=127.0.0.1:9000").is_err());
        assert!(parse_route("alice/echo=nowhere").is_err());
    }
}
