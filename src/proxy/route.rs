//! The route table: which Space a request is for, and what path the app sees.
//! Pure: built from snapshots the [`RouteSource`](super::RouteSource) publishes.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::space::access_token::ExpectedToken;
use crate::space::app_config::DEFAULT_STARTUP_TIMEOUT;
use crate::space::host_claim::Claim;
use crate::space::{Stage, naming};

/// A Space's identity: its owner (namespace) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpaceKey {
    pub namespace: String,
    pub name: String,
}

impl SpaceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for SpaceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Who may reach a Space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Public,
    /// Needs `Authorization: Bearer <token>`; holds the token's keyed hash,
    /// `None` while the token is unknown (then nobody gets in).
    Private {
        token: Option<ExpectedToken>,
    },
}

/// Everything the proxy needs to know about one Space.
#[derive(Clone, Debug)]
pub struct SpaceRoute {
    pub key: SpaceKey,
    /// `None`: the operator has not reported a stage yet.
    pub stage: Option<Stage>,
    /// Why the Space is in its stage (shown on the loading page and in errors).
    pub message: Option<String>,
    /// `spec.paused`: never woken by traffic.
    pub paused: bool,
    pub access: Access,
    /// Path the app is opened at (`/` or e.g. `/docs`).
    pub base_path: String,
    /// Extra response headers (front matter `custom_headers`).
    pub custom_headers: Vec<(HeaderName, HeaderValue)>,
    /// Bounds how long requests are held while the Space starts.
    pub startup_timeout: Duration,
    /// Ready upstream addresses (pod IP : app port, or a local container's port).
    pub endpoints: Vec<SocketAddr>,
    /// Frozen (the light sleep tier): its pods are kept but their processes
    /// are frozen; a request thaws them through their node agents first.
    pub frozen: Option<Frozen>,
    /// Decides a host two Spaces' names share ([`host_claim`]): lower is
    /// older. The Space's creation time (Unix seconds) in a cluster, the
    /// order routes were given in locally; `None`: after the known ones.
    pub since: Option<i64>,
}

/// A frozen Space's pods, addressed even while their readiness probe fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frozen {
    /// The operator's decision (`status.sleep.since`, Unix seconds): a thaw
    /// overrides it, a newer one freezes again.
    pub decision: i64,
    pub pods: Vec<FrozenPod>,
}

/// One pod of a frozen Space, as its EndpointSlice names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrozenPod {
    pub addr: SocketAddr,
    /// The node whose agent thaws it.
    pub node: Option<String>,
    pub uid: Option<String>,
}

impl SpaceRoute {
    /// A public Space with defaults, not ready yet.
    pub fn new(key: SpaceKey) -> Self {
        Self {
            key,
            stage: None,
            message: None,
            paused: false,
            access: Access::Public,
            base_path: "/".to_owned(),
            custom_headers: Vec::new(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            endpoints: Vec::new(),
            frozen: None,
            since: None,
        }
    }

    fn claim(&self) -> Claim<'_> {
        Claim::new(&self.key.namespace, &self.key.name, self.since)
    }

    /// Whether requests can be forwarded now.
    pub fn is_ready(&self) -> bool {
        !self.is_paused() && self.frozen.is_none() && !self.endpoints.is_empty()
    }

    /// The route once its frozen pods are thawed: forward to them at once,
    /// without waiting for their readiness probe to pass again.
    pub fn thawed(&self) -> Self {
        let mut route = self.clone();
        if let Some(frozen) = route.frozen.take() {
            route.endpoints = frozen.pods.iter().map(|p| p.addr).collect();
        }
        route
    }

    pub fn is_paused(&self) -> bool {
        self.paused || self.stage == Some(Stage::Paused)
    }

    /// What a request for this Space must do right now.
    pub fn disposition(&self) -> Disposition {
        if self.is_paused() {
            return Disposition::Paused;
        }
        // Frozen pods may still look ready (the probe takes seconds to fail):
        // never forward to them before the thaw.
        if self.frozen.is_some() {
            return Disposition::Wake;
        }
        if !self.endpoints.is_empty() {
            return Disposition::Forward;
        }
        match self.stage {
            Some(Stage::Sleeping) => Disposition::Wake,
            Some(stage) if stage.is_error() || matches!(stage, Stage::Stopped | Stage::Deleting) => {
                Disposition::Unavailable(stage)
            }
            // Building, starting, or serving stages whose endpoints are not ready yet.
            _ => Disposition::Hold,
        }
    }
}

/// The outcome of looking at a Space's state for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    Forward,
    /// Asleep: signal a wake, then hold.
    Wake,
    /// On its way up (building, starting): hold without waking.
    Hold,
    Paused,
    /// Will not come up on its own (error stages, stopped, deleting).
    Unavailable(Stage),
}

/// A request matched to a Space.
#[derive(Clone, Debug)]
pub struct Match {
    pub route: Arc<SpaceRoute>,
    /// Path and query to send upstream.
    pub upstream_path: String,
    /// `/spaces/{owner}/{name}` for path routing (sent as `X-Forwarded-Prefix`), empty for host routing.
    pub prefix: String,
    /// Where a GET of the Space's root should go instead: its base path, or the
    /// prefix with a trailing slash (so the app's relative links resolve).
    pub redirect: Option<String>,
}

/// What a request's host and path resolve to.
#[derive(Clone, Debug)]
pub enum Resolution {
    Space(Match),
    /// Looks like a Space address, but no such Space: 404.
    UnknownSpace,
    /// Neither a Space host nor a Space path: the proxy's own endpoints.
    NotASpace,
}

/// An immutable snapshot of all routes; sources publish a new one on every change.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    domain: String,
    by_host: HashMap<String, Arc<SpaceRoute>>,
    by_key: BTreeMap<SpaceKey, Arc<SpaceRoute>>,
}

impl RouteTable {
    /// Builds a table for Spaces served under `domain` (`{owner}-{name}.{domain}`).
    /// Two Spaces whose host names collide (`a-b/c` and `a/b-c`): the older
    /// keeps the host ([`host_claim`]), the other is reachable by path only.
    pub fn new(domain: &str, routes: impl IntoIterator<Item = SpaceRoute>) -> Self {
        let domain = normalize_host(domain).to_ascii_lowercase();
        let by_key: BTreeMap<SpaceKey, Arc<SpaceRoute>> =
            routes.into_iter().map(|r| (r.key.clone(), Arc::new(r))).collect();
        let mut by_host: HashMap<String, Arc<SpaceRoute>> = HashMap::with_capacity(by_key.len());
        for (key, route) in &by_key {
            let host = naming::host(&key.namespace, &key.name, &domain).to_ascii_lowercase();
            match by_host.entry(host) {
                Entry::Vacant(e) => {
                    e.insert(Arc::clone(route));
                }
                Entry::Occupied(mut e) => {
                    if route.claim().outranks(&e.get().claim()) {
                        e.insert(Arc::clone(route));
                    }
                }
            }
        }
        Self { domain, by_host, by_key }
    }

    /// The Space that holds `key`'s host name when that is another one (the
    /// two names collide and it is older): `key` is served by path only.
    pub fn host_holder(&self, key: &SpaceKey) -> Option<&SpaceKey> {
        let host = naming::host(&key.namespace, &key.name, &self.domain).to_ascii_lowercase();
        self.by_host.get(&host).map(|r| &r.key).filter(|holder| *holder != key)
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn get(&self, key: &SpaceKey) -> Option<&Arc<SpaceRoute>> {
        self.by_key.get(key)
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<SpaceRoute>> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// A copy with one route replaced or added.
    pub fn with(&self, route: SpaceRoute) -> Self {
        let mut routes: Vec<SpaceRoute> = self.by_key.values().map(|r| (**r).clone()).collect();
        routes.retain(|r| r.key != route.key);
        routes.push(route);
        Self::new(&self.domain, routes)
    }

    /// A copy without `key`.
    pub fn without(&self, key: &SpaceKey) -> Self {
        Self::new(&self.domain, self.by_key.values().filter(|r| &r.key != key).map(|r| (**r).clone()))
    }

    /// Resolves a request by host first (`{owner}-{name}.{domain}`), then by
    /// path (`/spaces/{owner}/{name}/...`). `path_and_query` is the request
    /// target in origin form (`/a/b?c`).
    pub fn resolve(&self, host: Option<&str>, path_and_query: &str) -> Resolution {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let path = if path.is_empty() { "/" } else { path };
        if let Some(host) = host.map(normalize_host) {
            if let Some(route) = self.by_host.get(host).or_else(|| self.by_host.get(&host.to_ascii_lowercase())) {
                let redirect = (path == "/" && route.base_path != "/").then(|| with_query(&route.base_path, query));
                return Resolution::Space(Match {
                    route: Arc::clone(route),
                    upstream_path: path_and_query_or_root(path_and_query),
                    prefix: String::new(),
                    redirect,
                });
            }
            if !self.domain.is_empty() && is_subdomain_of(host, &self.domain) {
                return Resolution::UnknownSpace;
            }
        }
        let Some(rest) = path.strip_prefix("/spaces/") else {
            return Resolution::NotASpace;
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(owner), Some(name)) = (parts.next(), parts.next()) else {
            return Resolution::UnknownSpace;
        };
        let Some(route) = self.by_key.get(&SpaceKey::new(owner, name)) else {
            return Resolution::UnknownSpace;
        };
        let prefix = naming::path_prefix(owner, name);
        let (upstream_path, redirect) = match parts.next() {
            // `/spaces/o/n`: no trailing slash, relative links would break.
            None => ("/".to_owned(), Some(with_query(&format!("{prefix}{}", slash_base(&route.base_path)), query))),
            Some("") if route.base_path != "/" => {
                ("/".to_owned(), Some(with_query(&format!("{prefix}{}", route.base_path), query)))
            }
            Some(tail) => (with_query(&format!("/{tail}"), query), None),
        };
        Resolution::Space(Match { route: Arc::clone(route), upstream_path, prefix, redirect })
    }
}

fn slash_base(base_path: &str) -> &str {
    if base_path.is_empty() { "/" } else { base_path }
}

fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    }
}

fn path_and_query_or_root(pq: &str) -> String {
    if pq.starts_with('/') { pq.to_owned() } else { format!("/{pq}") }
}

/// Host without port and trailing dot. IPv6 literals (`[::1]:80`) keep their brackets.
pub fn normalize_host(host: &str) -> &str {
    let host = host.trim();
    let host = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
    };
    host.strip_suffix('.').unwrap_or(host)
}

fn is_subdomain_of(host: &str, domain: &str) -> bool {
    host.len() > domain.len() + 1
        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
        && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let mut docs = SpaceRoute::new(SpaceKey::new("alice", "docs"));
        docs.base_path = "/docs".into();
        RouteTable::new(
            "Spaces.Example.com.",
            [SpaceRoute::new(SpaceKey::new("alice", "whisper")), docs, SpaceRoute::new(SpaceKey::new("bob-x", "y"))],
        )
    }

    fn space(r: Resolution) -> Match {
        match r {
            Resolution::Space(m) => m,
            other => panic!("expected a Space, got {other:?}"),
        }
    }

    #[test]
    fn host_routing_keeps_path_and_query() {
        let t = table();
        let m = space(t.resolve(Some("alice-whisper.spaces.example.com:8080"), "/run/predict?x=1"));
        assert_eq!(m.route.key, SpaceKey::new("alice", "whisper"));
        assert_eq!(m.upstream_path, "/run/predict?x=1");
        assert_eq!(m.prefix, "");
        assert_eq!(m.redirect, None);
        // Case and a trailing dot do not matter.
        let m = space(t.resolve(Some("ALICE-Whisper.spaces.example.com."), "/"));
        assert_eq!(m.route.key.name, "whisper");
        // Owners with dashes: the table is built from names, never parsed back.
        assert_eq!(space(t.resolve(Some("bob-x-y.spaces.example.com"), "/")).route.key, SpaceKey::new("bob-x", "y"));
    }

    #[test]
    fn unknown_space_host_is_404_other_hosts_fall_through() {
        let t = table();
        assert!(matches!(t.resolve(Some("alice-nope.spaces.example.com"), "/"), Resolution::UnknownSpace));
        assert!(matches!(t.resolve(Some("localhost:8080"), "/healthz"), Resolution::NotASpace));
        assert!(matches!(t.resolve(None, "/metrics"), Resolution::NotASpace));
        // The bare domain is not a Space host.
        assert!(matches!(t.resolve(Some("spaces.example.com"), "/"), Resolution::NotASpace));
    }

    #[test]
    fn path_routing_strips_prefix() {
        let t = table();
        let m = space(t.resolve(Some("localhost"), "/spaces/alice/whisper/queue/join?hash=abc"));
        assert_eq!(m.route.key, SpaceKey::new("alice", "whisper"));
        assert_eq!(m.upstream_path, "/queue/join?hash=abc");
        assert_eq!(m.prefix, "/spaces/alice/whisper");
        assert_eq!(m.redirect, None);
        let m = space(t.resolve(None, "/spaces/alice/whisper/"));
        assert_eq!((m.upstream_path.as_str(), m.redirect), ("/", None));
        // Without the trailing slash: redirect so relative links work.
        let m = space(t.resolve(None, "/spaces/alice/whisper?a=b"));
        assert_eq!(m.redirect.as_deref(), Some("/spaces/alice/whisper/?a=b"));
        assert!(matches!(t.resolve(None, "/spaces/alice/nope/"), Resolution::UnknownSpace));
        assert!(matches!(t.resolve(None, "/spaces/alice"), Resolution::UnknownSpace));
        assert!(matches!(t.resolve(None, "/spaces/"), Resolution::UnknownSpace));
        // A Space host wins over a Space path.
        let m = space(t.resolve(Some("alice-whisper.spaces.example.com"), "/spaces/alice/docs/"));
        assert_eq!((m.route.key.name.as_str(), m.upstream_path.as_str()), ("whisper", "/spaces/alice/docs/"));
    }

    #[test]
    fn base_path_redirects_the_root_only() {
        let t = table();
        let m = space(t.resolve(Some("alice-docs.spaces.example.com"), "/?lang=en"));
        assert_eq!(m.redirect.as_deref(), Some("/docs?lang=en"));
        let m = space(t.resolve(Some("alice-docs.spaces.example.com"), "/docs/intro"));
        assert_eq!((m.upstream_path.as_str(), m.redirect), ("/docs/intro", None));
        let m = space(t.resolve(None, "/spaces/alice/docs/"));
        assert_eq!(m.redirect.as_deref(), Some("/spaces/alice/docs/docs"));
        let m = space(t.resolve(None, "/spaces/alice/docs"));
        assert_eq!(m.redirect.as_deref(), Some("/spaces/alice/docs/docs"));
        let m = space(t.resolve(None, "/spaces/alice/docs/docs/x"));
        assert_eq!((m.upstream_path.as_str(), m.redirect), ("/docs/x", None));
    }

    fn aged(namespace: &str, name: &str, since: i64) -> SpaceRoute {
        let mut r = SpaceRoute::new(SpaceKey::new(namespace, name));
        r.since = Some(since);
        r
    }

    #[test]
    fn the_older_space_keeps_a_shared_host_in_both_orders() {
        let (acme, acme_corp) = (SpaceKey::new("acme", "corp-app"), SpaceKey::new("acme-corp", "app"));
        for (older, newer) in [(&acme, &acme_corp), (&acme_corp, &acme)] {
            let routes = [aged(&newer.namespace, &newer.name, 200), aged(&older.namespace, &older.name, 100)];
            let t = RouteTable::new("d", routes);
            assert_eq!(&space(t.resolve(Some("acme-corp-app.d"), "/")).route.key, older);
            assert_eq!((t.host_holder(newer), t.host_holder(older)), (Some(older), None));
            // The other keeps its path route.
            let path = format!("/spaces/{}/{}/", newer.namespace, newer.name);
            assert_eq!(&space(t.resolve(None, &path)).route.key, newer);
        }
        // Same age or none known: by key, the same way everywhere.
        let t = RouteTable::new("d", [aged("a-b", "c", 7), aged("a", "b-c", 7)]);
        assert_eq!(space(t.resolve(Some("a-b-c.d"), "/")).route.key, SpaceKey::new("a", "b-c"));
        let t = RouteTable::new("d", [SpaceRoute::new(SpaceKey::new("a", "b-c")), aged("a-b", "c", 7)]);
        assert_eq!(space(t.resolve(Some("a-b-c.d"), "/")).route.key, SpaceKey::new("a-b", "c"));
    }

    fn pod_addr() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 7], 7860))
    }

    #[test]
    fn dispositions() {
        let mut r = SpaceRoute::new(SpaceKey::new("a", "b"));
        assert_eq!(r.disposition(), Disposition::Hold);
        r.stage = Some(Stage::Sleeping);
        assert_eq!(r.disposition(), Disposition::Wake);
        r.stage = Some(Stage::BuildError);
        assert_eq!(r.disposition(), Disposition::Unavailable(Stage::BuildError));
        r.endpoints.push(SocketAddr::from(([127, 0, 0, 1], 1)));
        r.stage = Some(Stage::RunningBuilding);
        assert_eq!(r.disposition(), Disposition::Forward);
        // Frozen: thaw first, even if the endpoints still look ready; then its pods serve.
        let pod = FrozenPod { addr: SocketAddr::from(([10, 0, 0, 7], 7860)), node: Some("n".into()), uid: None };
        let mut frozen = r.clone();
        frozen.frozen = Some(Frozen { decision: 1, pods: vec![pod] });
        assert_eq!((frozen.disposition(), frozen.is_ready()), (Disposition::Wake, false));
        let thawed = frozen.thawed();
        assert_eq!((thawed.disposition(), thawed.endpoints.clone()), (Disposition::Forward, vec![pod_addr()]));
        r.paused = true;
        assert_eq!(r.disposition(), Disposition::Paused);
        r.paused = false;
        r.stage = Some(Stage::Paused);
        assert_eq!(r.disposition(), Disposition::Paused);
    }

    #[test]
    fn with_and_without() {
        let t = table();
        let mut r = SpaceRoute::new(SpaceKey::new("alice", "whisper"));
        r.paused = true;
        let t2 = t.with(r);
        assert_eq!(t2.len(), 3);
        assert!(t2.get(&SpaceKey::new("alice", "whisper")).is_some_and(|r| r.paused));
        let t3 = t2.without(&SpaceKey::new("alice", "whisper"));
        assert_eq!(t3.len(), 2);
        assert!(matches!(t3.resolve(Some("alice-whisper.spaces.example.com"), "/"), Resolution::UnknownSpace));
    }

    use proptest::prelude::*;

    /// Owners and names as they come: DNS labels with dashes, so hosts collide.
    fn label() -> impl Strategy<Value = String> {
        "[a-c]{1,2}(-[a-c]{1,2}){0,2}"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Crafted hosts and paths never panic the router, and never reach a
        /// Space by an address that is not its own: by host only its host
        /// (the older of colliding ones), by path only `/spaces/{owner}/{name}`.
        #[test]
        fn routing_never_answers_for_another_space(
            keys in proptest::collection::vec((label(), label(), proptest::option::of(0i64..4)), 0..8),
            host in proptest::option::of(proptest::prop_oneof![
                "[a-c-]{1,9}\\.d\\.?(:[0-9]{1,5})?",
                "[ -~]{0,20}",
                "[A-C-]{1,9}\\.D",
            ]),
            path in proptest::prop_oneof![
                "/spaces/[a-c-]{0,6}/[a-c-]{0,6}(/[ -~]{0,10})?",
                "/spaces/[a-c./%-]{0,12}(/[a-c./%-]{0,12}){0,3}",
                "[ -~]{0,30}",
            ],
        ) {
            let routes = keys.iter().map(|(ns, name, since)| {
                let mut r = SpaceRoute::new(SpaceKey::new(ns.as_str(), name.as_str()));
                r.since = *since;
                r
            });
            let t = RouteTable::new("d", routes);
            let Resolution::Space(m) = t.resolve(host.as_deref(), &path) else { return Ok(()) };
            let key = &m.route.key;
            if m.prefix.is_empty() {
                let asked = normalize_host(host.as_deref().unwrap_or_default()).to_ascii_lowercase();
                prop_assert_eq!(naming::host(&key.namespace, &key.name, "d").to_ascii_lowercase(), asked.clone());
                let mine = Claim::new(&key.namespace, &key.name, m.route.since);
                for other in t.routes().filter(|r| r.key != *key) {
                    let theirs = Claim::new(&other.key.namespace, &other.key.name, other.since);
                    prop_assert!(!(theirs.same_host(&mine) && theirs.outranks(&mine)), "{} took {}", key, asked);
                }
            } else {
                prop_assert_eq!(&m.prefix, &naming::path_prefix(&key.namespace, &key.name));
                let p = path.split('?').next().unwrap_or_default();
                prop_assert!(p == m.prefix || p.starts_with(&format!("{}/", m.prefix)), "{} for {}", key, path);
            }
        }
    }

    #[test]
    fn normalizes_hosts() {
        assert_eq!(normalize_host("a.b:80"), "a.b");
        assert_eq!(normalize_host("a.b."), "a.b");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("a.b"), "a.b");
    }
}
