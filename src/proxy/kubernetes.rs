//! The Kubernetes [`RouteSource`]: routes from watched Spaces, readiness from
//! watched EndpointSlices (no polling), and activity written to each Space's
//! Lease (the operator's wake signal). The proxy reads no Secret: a private
//! Space's token reaches it only as the keyed hash the operator publishes in
//! the Space's status ([`crate::space::access_token`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use http::{HeaderName, HeaderValue};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::route::{Access, Frozen, FrozenPod, RouteTable, SpaceKey, SpaceRoute};
use super::source::{RouteSource, SourceError};
use super::thaw::NodeAgents;
use crate::space::access_token::{ExpectedToken, TokenKey};
use crate::space::app_config::{self, DEFAULT_STARTUP_TIMEOUT};
use crate::space::naming::{BASE_PATH_ANNOTATION, CUSTOM_HEADERS_ANNOTATION};
use crate::space::{Sdk, SleepTier, Space, SpaceSpec, Stage, Visibility, naming};

/// The node agents' port unless configured (the chart's `nodeAgent.port`).
pub const DEFAULT_NODE_AGENT_PORT: u16 = 9450;
/// Field manager of the proxy's Lease writes.
pub const FIELD_MANAGER: &str = "hangar-proxy";
/// The EndpointSlice label naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What to watch.
#[derive(Clone, Debug)]
pub struct KubeSourceConfig {
    /// Spaces are served at `{owner}-{name}.{domain}`.
    pub domain: String,
    /// Watch one namespace only; `None`: all.
    pub namespace: Option<String>,
    /// The key the operator hashes private Spaces' tokens with; `None`: no
    /// private Space can be reached.
    pub token_key: Option<Arc<TokenKey>>,
}

/// Routes from the cluster; see the module docs.
pub struct KubeSource {
    client: Client,
    tx: watch::Sender<Arc<RouteTable>>,
    synced: watch::Receiver<bool>,
    agents: Arc<NodeAgents>,
}

impl KubeSource {
    /// Starts the watchers in the background (until `cancel`). Routes appear
    /// as the initial lists arrive; [`KubeSource::synced`] waits for that.
    pub fn start(client: Client, config: KubeSourceConfig, cancel: CancellationToken) -> Arc<Self> {
        Self::start_with_agents(client, config, None, DEFAULT_NODE_AGENT_PORT, cancel)
    }

    /// [`KubeSource::start`] with the bearer token of the node agents, which
    /// thaw frozen Spaces (`None`: no agents, nothing is ever frozen), and the
    /// port they listen on at their node's address.
    pub fn start_with_agents(
        client: Client,
        config: KubeSourceConfig,
        node_agent_token: Option<String>,
        node_agent_port: u16,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let (tx, _) = watch::channel(Arc::new(RouteTable::new(&config.domain, [])));
        let (synced_tx, synced) = watch::channel(false);
        let agents = Arc::new(NodeAgents::new(client.clone(), node_agent_token, node_agent_port));
        let this = Arc::new(Self { client: client.clone(), tx: tx.clone(), synced, agents });
        tokio::spawn(watch_all(client, config, tx, synced_tx, Arc::clone(&this.agents), cancel));
        this
    }

    /// Waits until Spaces and EndpointSlices were both listed once.
    pub async fn synced(&self) {
        let mut rx = self.synced.clone();
        // An error means the watch task ended (cancelled): nothing more to wait for.
        let _ = rx.wait_for(|s| *s).await;
    }

    fn renew(&self, space: &SpaceKey, at: SystemTime) -> BoxFuture<'static, Result<(), SourceError>> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &space.namespace);
        let lease = activity_lease(space, at);
        let name = naming::activity_lease_name(&space.name);
        Box::pin(async move {
            let lease = lease?;
            api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&lease)).await?;
            Ok(())
        })
    }
}

/// The Lease the proxy applies: only the fields it owns.
pub fn activity_lease(space: &SpaceKey, at: SystemTime) -> Result<Lease, SourceError> {
    let at = k8s_openapi::jiff::Timestamp::try_from(at).map_err(|e| SourceError::Other(format!("time: {e}")))?;
    Ok(Lease {
        metadata: ObjectMeta {
            name: Some(naming::activity_lease_name(&space.name)),
            namespace: Some(space.namespace.clone()),
            labels: Some(BTreeMap::from([
                (naming::SPACE_LABEL.to_owned(), space.name.clone()),
                (naming::MANAGED_BY_LABEL.to_owned(), naming::MANAGED_BY.to_owned()),
            ])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(naming::LEASE_HOLDER.to_owned()),
            renew_time: Some(MicroTime(at)),
            ..Default::default()
        }),
    })
}

impl RouteSource for KubeSource {
    fn routes(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.tx.subscribe()
    }

    fn wake(&self, space: &SpaceKey) -> BoxFuture<'static, Result<(), SourceError>> {
        self.renew(space, SystemTime::now())
    }

    fn record_activity(&self, space: &SpaceKey, at: SystemTime) -> BoxFuture<'static, Result<(), SourceError>> {
        self.renew(space, at)
    }

    fn thaw(&self, route: &SpaceRoute) -> BoxFuture<'static, Result<(), SourceError>> {
        let agents = Arc::clone(&self.agents);
        let frozen = route.frozen.clone();
        Box::pin(async move {
            match frozen {
                Some(frozen) => agents.thaw(&frozen).await,
                None => Ok(()),
            }
        })
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn watch_all(
    client: Client,
    config: KubeSourceConfig,
    tx: watch::Sender<Arc<RouteTable>>,
    synced: watch::Sender<bool>,
    agents: Arc<NodeAgents>,
    cancel: CancellationToken,
) {
    let ns = config.namespace.as_deref();
    let (spaces, spaces_w) = reflector::store::<Space>();
    let (slices, slices_w) = reflector::store::<EndpointSlice>();
    let space_events = watcher(api::<Space>(&client, ns), watcher::Config::default())
        .default_backoff()
        .reflect(spaces_w)
        .map_ok(|_| ());
    let slice_events =
        watcher(api::<EndpointSlice>(&client, ns), watcher::Config::default().labels(SERVICE_NAME_LABEL))
            .default_backoff()
            .reflect(slices_w)
            .map_ok(|_| ());
    let mut events = futures::stream::select(space_events, slice_events).ready_chunks(256).boxed();
    let ready = {
        let (a, b) = (spaces.clone(), slices.clone());
        async move { tokio::try_join!(a.wait_until_ready(), b.wait_until_ready()).is_ok() }
    };
    let key = config.token_key.as_ref();
    tokio::pin!(ready);
    let mut is_synced = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            ok = &mut ready, if !is_synced => {
                is_synced = ok;
                publish(&tx, &config.domain, &spaces, &slices, key);
                agents.prepare(&tx.borrow());
                synced.send_replace(ok);
                continue;
            }
            batch = events.next() => {
                let Some(batch) = batch else { return };
                for event in &batch {
                    if let Err(e) = event {
                        // The backoff retries; routes stay as last seen meanwhile.
                        tracing::warn!(error = %e, "watch error");
                    }
                }
            }
        }
        if is_synced {
            publish(&tx, &config.domain, &spaces, &slices, key);
            agents.prepare(&tx.borrow());
        }
    }
}

fn publish(
    tx: &watch::Sender<Arc<RouteTable>>,
    domain: &str,
    spaces: &Store<Space>,
    slices: &Store<EndpointSlice>,
    key: Option<&Arc<TokenKey>>,
) {
    let table = build_table(domain, &spaces.state(), &slices.state(), key);
    tx.send_replace(Arc::new(table));
}

/// Who may reach `space`: a private one needs the token whose keyed hash its
/// status carries (published by the operator with the same `key`). Shared by
/// the proxy and the operator's logs API, so both ask the same of a request.
pub fn access_of(space: &Space, key: Option<&Arc<TokenKey>>) -> Access {
    if space.spec.visibility != Visibility::Private {
        return Access::Public;
    }
    let published = space.status.as_ref().and_then(|s| s.token_hmac.as_deref());
    let token = match (key, published) {
        (Some(key), Some(published)) => match ExpectedToken::from_published(key, published) {
            Ok(token) => Some(token),
            Err(e) => {
                // Once a minute at most: the routes are rebuilt on every watch event.
                static LAST_WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                if now >= LAST_WARNED.load(std::sync::atomic::Ordering::Relaxed) + 60 {
                    LAST_WARNED.store(now, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(space = %space.name_any(), namespace = ?space.namespace(), error = %e,
                        "cannot check a private Space's token: refusing its requests");
                }
                None
            }
        },
        _ => None,
    };
    Access::Private { token }
}

/// The route table for what the cluster holds now. Pure.
pub fn build_table(
    domain: &str,
    spaces: &[Arc<Space>],
    slices: &[Arc<EndpointSlice>],
    key: Option<&Arc<TokenKey>>,
) -> RouteTable {
    let mut ready: HashMap<(String, String), Vec<SocketAddr>> = HashMap::new();
    // Every endpoint that is not terminating, ready or not: a frozen Space's
    // pods fail their readiness probe and are thawed, then served, all the same.
    let mut present: HashMap<(String, String), Vec<FrozenPod>> = HashMap::new();
    for slice in slices {
        let (Some(ns), Some(service)) = (slice.namespace(), slice.labels().get(SERVICE_NAME_LABEL).cloned()) else {
            continue;
        };
        let port = slice.ports.iter().flatten().find_map(|p| p.port).and_then(|p| u16::try_from(p).ok());
        let addrs = ready.entry((ns.clone(), service.clone())).or_default();
        let pods = present.entry((ns, service)).or_default();
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            let terminating = conditions.and_then(|c| c.terminating) == Some(true);
            // `ready` unset means ready (API docs); terminating endpoints are not.
            let is_ready = conditions.and_then(|c| c.ready) != Some(false);
            for ip in endpoint.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let addr = SocketAddr::new(ip, port.unwrap_or(0));
                if is_ready {
                    addrs.push(addr);
                }
                if !terminating {
                    let uid = endpoint.target_ref.as_ref().and_then(|r| r.uid.clone());
                    pods.push(FrozenPod { addr, node: endpoint.node_name.clone(), uid });
                }
            }
        }
    }
    let routes = spaces.iter().filter_map(|space| {
        let ns = space.namespace()?;
        let name = space.name_any();
        let mut route = SpaceRoute::new(SpaceKey::new(ns.clone(), name.clone()));
        let (app_port, base_path, startup_timeout) = effective_config(&space.spec);
        route.base_path = published_base_path(space).unwrap_or(base_path);
        route.since = space.creation_timestamp().map(|t| t.0.as_second());
        route.startup_timeout = startup_timeout;
        route.paused = space.spec.paused;
        let mut frozen_since = None;
        if let Some(status) = &space.status {
            route.stage = status.stage;
            route.message = status.message.clone();
            frozen_since = status
                .sleep
                .as_ref()
                .filter(|s| s.tier == SleepTier::Frozen && status.stage == Some(Stage::Sleeping))
                .and_then(|s| s.since.as_ref())
                .map(|t| t.0.as_second());
        }
        route.access = access_of(space, key);
        route.custom_headers = custom_headers(space);
        let with_port = |a: SocketAddr| if a.port() == 0 { SocketAddr::new(a.ip(), app_port) } else { a };
        let service = (ns, naming::workload_name(&name));
        route.endpoints =
            ready.get(&service).map(|addrs| addrs.iter().map(|a| with_port(*a)).collect()).unwrap_or_default();
        if let Some(decision) = frozen_since {
            let pods: Vec<FrozenPod> = present
                .get(&service)
                .map(|pods| pods.iter().map(|p| FrozenPod { addr: with_port(p.addr), ..p.clone() }).collect())
                .unwrap_or_default();
            // No pod left to thaw: wake it the ordinary way.
            if !pods.is_empty() {
                route.frozen = Some(Frozen { decision, pods });
            }
        }
        Some(route)
    });
    RouteTable::new(domain, routes)
}

/// App port, base path and startup timeout from the spec alone. Without
/// front matter a git Space may lack `sdk`: the spec's other fields still count.
fn effective_config(spec: &SpaceSpec) -> (u16, String, std::time::Duration) {
    let resolved = app_config::resolve(spec, None).or_else(|_| {
        let fallback = SpaceSpec { sdk: Some(spec.sdk.unwrap_or(Sdk::Docker)), ..spec.clone() };
        app_config::resolve(&fallback, None)
    });
    match resolved {
        Ok(cfg) => (cfg.app_port, cfg.base_path, cfg.startup_timeout),
        Err(_) => (
            spec.app_port.and_then(|p| u16::try_from(p).ok()).unwrap_or(7860),
            spec.base_path.clone().filter(|p| app_config::check_base_path(p).is_ok()).unwrap_or_else(|| "/".to_owned()),
            DEFAULT_STARTUP_TIMEOUT,
        ),
    }
}

/// The effective base path the operator published (front matter included);
/// one that is not a plain path of the Space's site is ignored.
fn published_base_path(space: &Space) -> Option<String> {
    let path = space.annotations().get(BASE_PATH_ANNOTATION)?;
    match app_config::check_base_path(path) {
        Ok(()) => Some(path.clone()),
        Err(e) => {
            tracing::warn!(space = %space.name_any(), %path, error = e, "ignoring {BASE_PATH_ANNOTATION}");
            None
        }
    }
}

/// The annotation is the operator's, but the Space's owner can write it too:
/// only the headers a Space may set pass.
fn custom_headers(space: &Space) -> Vec<(HeaderName, HeaderValue)> {
    let Some(raw) = space.annotations().get(CUSTOM_HEADERS_ANNOTATION) else {
        return Vec::new();
    };
    match serde_json::from_str::<BTreeMap<String, String>>(raw) {
        Ok(map) => crate::space::custom_headers::to_pairs(&map, |name, why| {
            tracing::warn!(space = %space.name_any(), header = %name, %why, "ignoring a custom header");
        }),
        Err(e) => {
            tracing::warn!(space = %space.name_any(), error = %e, "ignoring invalid {CUSTOM_HEADERS_ANNOTATION}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{SpaceStatus, Stage};
    use serde_json::json;

    fn space(ns: &str, name: &str, spec: serde_json::Value, stage: Option<&str>) -> Arc<Space> {
        let mut v = json!({"apiVersion": "hangar.dev/v1alpha1", "kind": "Space",
            "metadata": {"name": name, "namespace": ns}, "spec": spec});
        if let Some(stage) = stage {
            v["status"] = json!({"stage": stage});
        }
        Arc::new(serde_json::from_value(v).expect("space"))
    }

    fn slice(ns: &str, service: &str, port: Option<i32>, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
        let mut v = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": format!("{service}-abc"), "namespace": ns, "labels": {SERVICE_NAME_LABEL: service}},
            "endpoints": endpoints});
        if let Some(p) = port {
            v["ports"] = json!([{"name": "http", "port": p, "protocol": "TCP"}]);
        }
        Arc::new(serde_json::from_value(v).expect("slice"))
    }

    #[test]
    fn builds_routes_from_spaces_slices_and_published_token_macs() {
        let key = Arc::new(TokenKey::new(&[4; 32]).expect("key"));
        let spaces = vec![
            space("alice", "whisper", json!({"image": "r/w:1", "appPort": 9000}), Some("RUNNING")),
            space("alice", "private", json!({"image": "r/p:1", "visibility": "private"}), Some("SLEEPING")),
            space("bob", "git", json!({"source": {"git": "file:///r"}, "basePath": "/docs", "paused": true}), None),
        ];
        let slices = vec![
            slice(
                "alice",
                "space-whisper",
                Some(9000),
                json!([{"addresses": ["10.244.0.5"], "conditions": {"ready": true}},
                       {"addresses": ["10.244.0.6"], "conditions": {"ready": false}},
                       {"addresses": ["10.244.0.7"]}]),
            ),
            // Same Service name, other namespace: not alice's.
            slice("bob", "space-whisper", Some(1), json!([{"addresses": ["10.0.0.1"]}])),
            slice("bob", "space-git", None, json!([{"addresses": ["10.0.0.2"]}])),
        ];
        let mut spaces = spaces;
        let mut private = (*spaces[1]).clone();
        if let Some(status) = private.status.as_mut() {
            status.token_hmac = Some(key.publish(b"s3cret"));
        }
        spaces[1] = Arc::new(private);
        let t = build_table("spaces.test", &spaces, &slices, Some(&key));
        assert_eq!(t.len(), 3);
        let w = t.get(&SpaceKey::new("alice", "whisper")).expect("whisper");
        assert_eq!(w.stage, Some(Stage::Running));
        assert_eq!(
            w.endpoints,
            vec!["10.244.0.5:9000".parse().expect("addr"), "10.244.0.7:9000".parse().expect("addr")]
        );
        assert_eq!(w.access, Access::Public);
        let p = t.get(&SpaceKey::new("alice", "private")).expect("private");
        assert_eq!(p.access, Access::Private { token: Some(ExpectedToken::new(&key, b"s3cret")) });
        // Without the key (or with another one) nobody gets in.
        let t = build_table("spaces.test", &spaces, &slices, None);
        assert_eq!(t.get(&SpaceKey::new("alice", "private")).expect("private").access, Access::Private { token: None });
        let other = Arc::new(TokenKey::new(&[5; 32]).expect("key"));
        let t = build_table("spaces.test", &spaces, &slices, Some(&other));
        assert_eq!(t.get(&SpaceKey::new("alice", "private")).expect("private").access, Access::Private { token: None });
        assert!(p.endpoints.is_empty());
        assert_eq!(p.disposition(), crate::proxy::Disposition::Wake);
        let g = t.get(&SpaceKey::new("bob", "git")).expect("git");
        assert!(g.paused);
        assert_eq!(g.base_path, "/docs");
        // No port on the slice: the app port (default for an unknown sdk: 7860).
        assert_eq!(g.endpoints, vec!["10.0.0.2:7860".parse().expect("addr")]);
        let _ = SpaceStatus::default();
    }

    #[test]
    fn a_frozen_space_keeps_its_not_ready_pods_to_thaw() {
        let mut frozen = (*space("alice", "f", json!({"image": "r/f:1"}), Some("SLEEPING"))).clone();
        if let Some(status) = frozen.status.as_mut() {
            status.sleep = Some(crate::space::SleepStatus {
                tier: SleepTier::Frozen,
                since: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(1_764_000_000).expect("time"),
                )),
                memory_bytes: None,
            });
        }
        let slices = vec![slice(
            "alice",
            "space-f",
            None,
            json!([{"addresses": ["10.244.0.9"], "conditions": {"ready": false}, "nodeName": "n1",
                    "targetRef": {"kind": "Pod", "name": "p", "uid": "u-1"}},
                   {"addresses": ["10.244.0.10"], "conditions": {"ready": false, "terminating": true}}]),
        )];
        let t = build_table("d", &[Arc::new(frozen.clone())], &slices, None);
        let r = t.get(&SpaceKey::new("alice", "f")).expect("route");
        let f = r.frozen.clone().expect("frozen");
        assert_eq!(f.decision, 1_764_000_000);
        assert_eq!(
            f.pods,
            vec![FrozenPod {
                addr: "10.244.0.9:7860".parse().expect("addr"),
                node: Some("n1".into()),
                uid: Some("u-1".into())
            }]
        );
        assert!(r.endpoints.is_empty());
        assert_eq!(r.disposition(), crate::proxy::Disposition::Wake);
        // Stopped (no sleep tier): an ordinary sleeping Space.
        if let Some(status) = frozen.status.as_mut() {
            status.sleep = None;
        }
        let t = build_table("d", &[Arc::new(frozen)], &slices, None);
        assert_eq!(t.get(&SpaceKey::new("alice", "f")).and_then(|r| r.frozen.clone()), None);
    }

    #[test]
    fn lease_carries_holder_and_renew_time() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        let lease = activity_lease(&SpaceKey::new("alice", "whisper"), at).expect("lease");
        let v = serde_json::to_value(&lease).expect("json");
        assert_eq!(v["metadata"]["name"], "space-whisper-activity");
        assert_eq!(v["metadata"]["namespace"], "alice");
        assert_eq!(v["spec"]["holderIdentity"], "hangar-proxy");
        assert_eq!(v["spec"]["renewTime"], "2023-11-14T22:13:20.123456Z");
    }

    #[test]
    fn custom_headers_from_annotation() {
        let mut s = (*space("a", "b", json!({"image": "i"}), None)).clone();
        s.metadata.annotations = Some(BTreeMap::from([(
            CUSTOM_HEADERS_ANNOTATION.to_owned(),
            r#"{"cross-origin-embedder-policy": "require-corp", "bad header": "x", "content-length": "0"}"#.to_owned(),
        )]));
        let h = custom_headers(&s);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].0, "cross-origin-embedder-policy");
    }

    #[test]
    fn base_path_from_annotation_wins_over_the_spec_when_valid() {
        let mut s = (*space("a", "b", json!({"image": "i", "basePath": "/spec"}), None)).clone();
        let annotate = |s: &mut Space, path: &str| {
            s.metadata.annotations = Some(BTreeMap::from([(BASE_PATH_ANNOTATION.to_owned(), path.to_owned())]));
        };
        annotate(&mut s, "/front-matter");
        let t = build_table("d", &[Arc::new(s.clone())], &[], None);
        assert_eq!(t.get(&SpaceKey::new("a", "b")).map(|r| r.base_path.clone()).as_deref(), Some("/front-matter"));
        annotate(&mut s, "//evil.example");
        let t = build_table("d", &[Arc::new(s)], &[], None);
        assert_eq!(t.get(&SpaceKey::new("a", "b")).map(|r| r.base_path.clone()).as_deref(), Some("/spec"));
    }
}
