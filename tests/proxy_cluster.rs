//! Cluster tier: the Kubernetes route source against the test bed's real
//! kube-apiserver. Spaces and EndpointSlices are real API objects the source
//! watches, and the test plays the operator's part: it flips `status.stage`
//! and endpoint readiness when the Lease says "wake", and publishes a private
//! Space's token hash (`status.tokenHmac`).
//!
//! The apiserver refuses loopback endpoint addresses, so the slices carry a
//! documentation address (192.0.2.10, never contacted) and a thin wrapper maps
//! it to the loopback upstream: every byte this test sends stays on loopback.

mod proxy_support;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use hangar::proxy::{KubeSource, KubeSourceConfig, ProxyConfig, RouteSource, RouteTable, SourceError, SpaceKey};
use hangar::space::access_token::TokenKey;
use hangar::space::{Space, naming};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use proxy_support::{DOMAIN, Upstream, client};
use serde_json::json;
use support::{TestNamespace, wait_for};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// TEST-NET-1: what the slices say; mapped to 127.0.0.1 before the proxy sees it.
const STAND_IN_IP: &str = "192.0.2.10";

/// The Kubernetes source, with endpoint addresses moved to loopback (same port).
struct ToLoopback {
    inner: Arc<KubeSource>,
    tx: watch::Sender<Arc<RouteTable>>,
}

impl ToLoopback {
    fn new(inner: Arc<KubeSource>) -> Arc<Self> {
        let mut rx = inner.routes();
        let (tx, _) = watch::channel(Arc::new(to_loopback(&rx.borrow_and_update())));
        let this = Arc::new(Self { inner, tx: tx.clone() });
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let table = to_loopback(&rx.borrow_and_update());
                tx.send_replace(Arc::new(table));
            }
        });
        this
    }
}

fn to_loopback(table: &RouteTable) -> RouteTable {
    let routes = table.routes().map(|r| {
        let mut r = (**r).clone();
        for a in &mut r.endpoints {
            assert_eq!(a.ip().to_string(), STAND_IN_IP, "only the test's stand-in address is mapped");
            *a = SocketAddr::from(([127, 0, 0, 1], a.port()));
        }
        r
    });
    RouteTable::new(table.domain(), routes)
}

impl RouteSource for ToLoopback {
    fn routes(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.tx.subscribe()
    }
    fn wake(&self, space: &SpaceKey) -> BoxFuture<'static, Result<(), SourceError>> {
        self.inner.wake(space)
    }
    fn record_activity(&self, space: &SpaceKey, at: SystemTime) -> BoxFuture<'static, Result<(), SourceError>> {
        self.inner.record_activity(space, at)
    }
}

fn endpoint_slice(space: &str, port: u16, ready: bool) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-test", naming::workload_name(space)),
                     "labels": {"kubernetes.io/service-name": naming::workload_name(space)}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [STAND_IN_IP], "conditions": {"ready": ready}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }))
    .expect("endpoint slice")
}

async fn set_stage(spaces: &Api<Space>, name: &str, stage: &str) {
    spaces
        .patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": {"stage": stage}})))
        .await
        .unwrap_or_else(|e| panic!("setting {name}'s stage to {stage}: {e}"));
}

async fn set_ready(slices: &Api<EndpointSlice>, space: &str, port: u16, ready: bool) {
    slices
        .patch(
            &format!("{}-test", naming::workload_name(space)),
            &PatchParams::apply("proxy-test").force(),
            &Patch::Apply(endpoint_slice(space, port, ready)),
        )
        .await
        .expect("applying the endpoint slice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_source_routes_wakes_through_the_lease_and_checks_tokens() {
    let ns = TestNamespace::new("proxy", &["kube-apiserver"]).await;
    ns.install_crd().await;
    let up = Upstream::start("from-cluster").await;
    let port = up.addr.port();
    let spaces: Api<Space> = ns.api();
    let slices: Api<EndpointSlice> = ns.api();
    let leases: Api<Lease> = ns.api();

    for (name, visibility) in [("demo", "public"), ("secret", "private")] {
        let space: Space = serde_json::from_value(json!({
            "apiVersion": "hangar.dev/v1alpha1", "kind": "Space",
            "metadata": {"name": name},
            "spec": {"image": "registry.test/app:1", "appPort": port, "visibility": visibility, "startupTimeout": "30s"},
        }))
        .expect("space");
        spaces.create(&PostParams::default(), &space).await.expect("creating a Space");
        set_stage(&spaces, name, "RUNNING").await;
        slices.create(&PostParams::default(), &endpoint_slice(name, port, true)).await.expect("creating a slice");
    }
    let token_key = Arc::new(TokenKey::random().expect("token key"));
    let published = json!({"status": {"tokenHmac": token_key.publish(b"hf_cluster_token")}});
    spaces.patch_status("secret", &PatchParams::default(), &Patch::Merge(published)).await.expect("token hash");

    let cancel = CancellationToken::new();
    let source = KubeSource::start(
        ns.client.clone(),
        KubeSourceConfig { domain: DOMAIN.into(), namespace: Some(ns.name.clone()), token_key: Some(token_key) },
        cancel.clone(),
    );
    tokio::time::timeout(Duration::from_secs(30), source.synced()).await.expect("the source syncs");
    let demo = SpaceKey::new(ns.name.clone(), "demo");
    let mut routes = source.routes();
    tokio::time::timeout(
        Duration::from_secs(10),
        routes.wait_for(|t| t.get(&demo).is_some_and(|r| r.is_ready()) && t.len() == 2),
    )
    .await
    .expect("both Spaces routed")
    .expect("source alive");

    let loopback = ToLoopback::new(Arc::clone(&source));
    let proxy = hangar::proxy::start(
        ProxyConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            activity_interval: Duration::from_millis(500),
            ..ProxyConfig::default()
        },
        loopback.clone(),
    )
    .await
    .expect("proxy starts");
    let c = client();
    let host = naming::host(&ns.name, "demo", DOMAIN);
    let get = |path: &str| c.get(format!("http://{}{path}", proxy.addr)).header("host", host.clone());

    // Routed by host, from watched objects.
    let r = get("/whoami").send().await.expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "from-cluster");
    // Activity: the Lease appears, held by the proxy.
    let lease_name = naming::activity_lease_name("demo");
    let first = wait_for("the activity Lease", Duration::from_secs(10), || async {
        Ok(leases
            .get_opt(&lease_name)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.renew_time.map(|t| (s.holder_identity, t))))
    })
    .await;
    assert_eq!(first.0.as_deref(), Some(naming::LEASE_HOLDER));

    // Asleep: the operator set SLEEPING and scaled to zero (no ready endpoint).
    set_ready(&slices, "demo", port, false).await;
    set_stage(&spaces, "demo", "SLEEPING").await;
    tokio::time::timeout(Duration::from_secs(10), routes.wait_for(|t| t.get(&demo).is_some_and(|r| !r.is_ready())))
        .await
        .expect("the source sees the Space asleep")
        .expect("source alive");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before_wake = leases.get(&lease_name).await.expect("lease").spec.and_then(|s| s.renew_time).expect("renewTime");

    // 30 concurrent requests are held; the Lease renewal is the wake signal.
    let t0 = Instant::now();
    let held: Vec<_> = (0..30)
        .map(|i| {
            let req = get(&format!("/held/{i}"));
            tokio::spawn(async move {
                let r = req.send().await.expect("request");
                (r.status().as_u16(), r.json::<serde_json::Value>().await.expect("json")["uri"].clone())
            })
        })
        .collect();
    let woken = wait_for("the wake signal (a renewed Lease)", Duration::from_secs(10), || async {
        let t = leases.get(&lease_name).await?.spec.and_then(|s| s.renew_time);
        Ok(t.filter(|t| t.0 > before_wake.0).map(|_| Instant::now()))
    })
    .await;
    eprintln!("wake signal written {:?} after the first held request", woken - t0);
    // The operator's part: starting, then running with a ready endpoint.
    set_stage(&spaces, "demo", "APP_STARTING").await;
    set_ready(&slices, "demo", port, true).await;
    set_stage(&spaces, "demo", "RUNNING").await;
    for (i, h) in held.into_iter().enumerate() {
        let (status, uri) = h.await.expect("task");
        assert_eq!((status, uri), (200, json!(format!("/held/{i}"))), "held request {i}");
    }
    let metrics = proxy.metrics_text();
    let wakes = format!(r#"hangar_proxy_wakes_total{{namespace="{}",space="demo",tier="stopped"}} 1"#, ns.name);
    assert!(metrics.contains(&wakes), "exactly one wake for 30 requests:\n{metrics}");

    // Private Space: checked against the published token hash.
    let secret_host = naming::host(&ns.name, "secret", DOMAIN);
    let private = |token: Option<&str>| {
        let r = c.get(format!("http://{}/whoami", proxy.addr)).header("host", secret_host.clone());
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    };
    assert_eq!(private(None).send().await.expect("request").status(), 401);
    assert_eq!(private(Some("wrong")).send().await.expect("request").status(), 401);
    assert_eq!(private(Some("hf_cluster_token")).send().await.expect("request").status(), 200);

    // Deleted: 404.
    spaces.delete("demo", &DeleteParams::default()).await.expect("delete");
    tokio::time::timeout(Duration::from_secs(10), loopback.routes().wait_for(|t| t.get(&demo).is_none()))
        .await
        .expect("the proxy's table drops the Space")
        .expect("source alive");
    assert_eq!(get("/whoami").send().await.expect("request").status(), 404);

    proxy.shutdown().await.expect("clean shutdown");
    cancel.cancel();
}

/// A paused Space labelled for the test's operator (paused: it needs no pods,
/// and the proxy's answer names it).
/// (`base_path` as the operator publishes it from a front matter.)
fn labelled_paused_space(name: &str, label: &str) -> Space {
    serde_json::from_value(json!({
        "apiVersion": "hangar.dev/v1alpha1", "kind": "Space",
        "metadata": {"name": name, "labels": {"hangar.dev/host-claim-test": label},
                     "annotations": {naming::BASE_PATH_ANNOTATION: "/docs"}},
        "spec": {"image": "registry.test/app:1", "paused": true},
    }))
    .expect("space")
}

fn created_at(space: &Space) -> i64 {
    space.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).expect("a creation timestamp")
}

/// `{ns}/a-app` and `{ns}-a/app` share the host `{ns}-a-app.{domain}`. In
/// both creation orders the older keeps it: the operator tells the newer one
/// why it has none, and the proxy answers the host from the older.
#[tokio::test]
async fn the_older_of_two_spaces_sharing_a_host_keeps_it() {
    for older_is_first_namespace in [true, false] {
        let ns = TestNamespace::new("hostclaim", &["kube-apiserver", "kube-controller-manager"]).await;
        let other = TestNamespace::named(format!("{}-a", ns.name), &[]).await;
        ns.install_crd().await;
        let label = ns.name.clone();
        let _operator =
            support::operator::Operator::start_selecting(&ns, &format!("hangar.dev/host-claim-test={label}"));
        let first = (ns.api::<Space>(), SpaceKey::new(ns.name.clone(), "a-app"));
        let second = (other.api::<Space>(), SpaceKey::new(other.name.clone(), "app"));
        let ((older_api, older), (newer_api, newer)) =
            if older_is_first_namespace { (first, second) } else { (second, first) };
        let host = naming::host(&older.namespace, &older.name, DOMAIN);
        assert_eq!(host, naming::host(&newer.namespace, &newer.name, DOMAIN), "the names collide");

        // Creation times count in whole seconds: the newer one comes a second later.
        let made = older_api.create(&PostParams::default(), &labelled_paused_space(&older.name, &label)).await;
        let older_at = created_at(&made.expect("creating the older Space"));
        wait_for("the next second", Duration::from_secs(5), || async {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs();
            Ok((i64::try_from(now)? > older_at).then_some(()))
        })
        .await;
        let made = newer_api.create(&PostParams::default(), &labelled_paused_space(&newer.name, &label)).await;
        assert!(created_at(&made.expect("creating the newer Space")) > older_at);

        // The operator: the newer Space is told why it has no host; the older is not.
        let condition = wait_for("HostRoute=False on the newer Space", Duration::from_secs(60), || async {
            let space = newer_api.get(&newer.name).await?;
            Ok(space.status.and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "HostRoute")))
        })
        .await;
        assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("False", "HostTaken"));
        let operator_host = naming::host(&older.namespace, &older.name, "hf.test");
        assert!(
            condition.message.contains(&operator_host) && condition.message.contains(&older.to_string()),
            "{}",
            condition.message
        );
        let status = newer_api.get(&newer.name).await.expect("get").status.expect("status");
        assert_eq!(status.url, Some(format!("http://hf.test/spaces/{}/{}/", newer.namespace, newer.name)));
        let status = wait_for("the older Space's status", Duration::from_secs(60), || async {
            Ok(older_api.get(&older.name).await?.status.filter(|s| s.stage.is_some()))
        })
        .await;
        assert!(status.conditions.iter().all(|c| c.type_ != "HostRoute"), "{:?}", status.conditions);
        assert_eq!(status.url, Some(format!("http://{operator_host}/")));

        // The proxy (all namespaces): the host answers from the older Space, the path from each.
        let cancel = CancellationToken::new();
        let config = KubeSourceConfig { domain: DOMAIN.into(), namespace: None, token_key: None };
        let source = KubeSource::start(ns.client.clone(), config, cancel.clone());
        let mut routes = source.routes();
        tokio::time::timeout(
            Duration::from_secs(30),
            routes.wait_for(|t| t.get(&older).is_some() && t.get(&newer).is_some()),
        )
        .await
        .expect("both Spaces routed")
        .expect("source alive");
        let proxy = hangar::proxy::start(
            ProxyConfig { listen: "127.0.0.1:0".parse().expect("addr"), ..ProxyConfig::default() },
            source.clone(),
        )
        .await
        .expect("proxy starts");
        let c = client();
        let by_host = c.get(format!("http://{}/x", proxy.addr)).header("host", &host).send().await.expect("request");
        assert!(by_host.text().await.expect("body").contains(&format!("{older} is paused")), "the older holds {host}");
        let path = format!("http://{}/spaces/{}/{}/x", proxy.addr, newer.namespace, newer.name);
        let by_path = c.get(path).send().await.expect("request");
        assert!(by_path.text().await.expect("body").contains(&format!("{newer} is paused")));
        // The published base path: the root redirects to it, by host and by path.
        let no_redirects =
            reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().expect("client");
        let r =
            no_redirects.get(format!("http://{}/", proxy.addr)).header("host", &host).send().await.expect("request");
        assert_eq!(
            (r.status().as_u16(), r.headers().get("location").map(|l| l.as_bytes())),
            (307, Some(&b"/docs"[..]))
        );
        let prefix = naming::path_prefix(&newer.namespace, &newer.name);
        let r = no_redirects.get(format!("http://{}{prefix}/", proxy.addr)).send().await.expect("request");
        assert_eq!(r.headers().get("location").and_then(|l| l.to_str().ok()), Some(format!("{prefix}/docs").as_str()));
        proxy.shutdown().await.expect("clean shutdown");
        cancel.cancel();
    }
}
