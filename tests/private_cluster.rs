//! Cluster tier, real node: a private Space with the chart's permissions (issue 18).
//!
//! The operator and the proxy run as processes under the chart's ServiceAccounts (the chart
//! installed with its RBAC, components scaled to 0): the proxy may read no Secret at all,
//! so a private Space's token reaches it only as the keyed hash the operator publishes in
//! the Space's status. Its traffic and its logs (the operator's logs API) want the token;
//! a rotated token replaces the old one.

mod support;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use hangar::space::{Space, Stage};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::operator::free_port;
use support::process::{Component, args};
use support::{TestNamespace, http_client, run_ok, wait_for};

const DOMAIN: &str = "hf.test";
const RELEASE: &str = "priv";
/// `cpu-basic` goes to the real node, where the pod really runs and answers.
const MAPPING: &str = "\
requests: {cpu: 10m, memory: 32Mi}
flavors:
  cpu-basic:
    nodeSelector: {hangar.dev/test-node: real}
";

struct Hangar {
    _operator: Component,
    _proxy: Component,
    operator_http: String,
    proxy_addr: String,
}

/// The operator (with its builder: the logs API lives there) and the proxy, each under
/// its chart ServiceAccount, sharing a token key file as the chart's Secret would.
fn start(ns: &TestNamespace, dir: &Path) -> Hangar {
    support::chart::install(ns, RELEASE, dir, json!({}));
    let env = |component: &str| {
        let sa = format!("{RELEASE}-hangar-{component}");
        let kubeconfig = support::chart::service_account_kubeconfig(ns, &sa, dir);
        vec![("KUBECONFIG", kubeconfig.into_os_string()), ("RUST_LOG", OsString::from("info,hangar=debug"))]
    };
    let key = support::chart::token_key_file(dir);
    let mapping = dir.join("hardware.yaml");
    std::fs::write(&mapping, MAPPING).expect("mapping");
    let operator_http = format!("127.0.0.1:{}", free_port());
    let mut operator_args = args(["operator", "--namespace", &ns.name, "--domain", DOMAIN, "--url-scheme", "http"]);
    // Token Secrets are read again every second: the rotation below takes effect quickly.
    operator_args.extend(args(["--http-addr", &operator_http, "--token-resync", "1s"]));
    operator_args.extend(args(support::operator::builder_args(&ns.env)));
    operator_args.extend(args([OsString::from("--hardware-mapping"), mapping.into_os_string()]));
    operator_args.extend(args([OsString::from("--token-key-file"), key.clone().into_os_string()]));
    let operator = Component::start("operator", dir, &operator_args, &env("operator"));
    let (proxy_addr, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut proxy_args = args(["proxy", "--namespace", &ns.name, "--domain", DOMAIN, "--listen", &proxy_addr]);
    proxy_args.extend(args(["--admin-listen", &admin]));
    proxy_args.extend(args([OsString::from("--token-key-file"), key.into_os_string()]));
    let proxy = Component::start("proxy", dir, &proxy_args, &env("proxy"));
    Hangar { _operator: operator, _proxy: proxy, operator_http, proxy_addr }
}

/// The status code of GET `url` (with `host`, and the bearer `token` if any); only the
/// head is awaited (a run log is an endless SSE stream).
async fn status(url: &str, host: Option<&str>, token: Option<&str>) -> u16 {
    let mut request = http_client().get(url);
    if let Some(host) = host {
        request = request.header("host", host);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.map(|r| r.status().as_u16()).unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

fn token_secret(token: &str) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": hangar::space::naming::token_secret_name("private")},
        "stringData": {"token": token},
    }))
    .expect("secret")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_space_wants_its_token_for_traffic_and_logs_and_a_rotated_token_replaces_it() {
    let ns = TestNamespace::new(
        "private",
        &["kubelet", "containerd", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "registry"],
    )
    .await;
    ns.install_crd().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = format!("{}/hangar-test/private:{}", ns.env.registry, ns.name);
    support::build_python_app(&ns.env, &image, &support::unique_name("private-app"));
    run_ok(ns.env.docker().args(["push", "-q", &image]));
    let h = start(&ns, dir.path());

    let (old, new) = ("private-token-before-rotation", "private-token-after-rotation");
    let secrets: Api<Secret> = ns.api();
    secrets.create(&PostParams::default(), &token_secret(old)).await.expect("token Secret");
    let space: Space = serde_json::from_value(json!({
        "apiVersion": "hangar.dev/v1alpha1", "kind": "Space", "metadata": {"name": "private"},
        "spec": {"image": image, "appPort": 7860, "hardware": "cpu-basic", "visibility": "private",
                 "startupTimeout": "3m"},
    }))
    .expect("space");
    let spaces: Api<Space> = ns.api();
    spaces.create(&PostParams::default(), &space).await.expect("create Space");
    let running = support::space::wait_stage(&spaces, "private", Stage::Running, Duration::from_secs(240)).await;
    let published = running.status.and_then(|s| s.token_hmac).expect("status.tokenHmac");
    assert!(published.starts_with("hmac-sha256:") && !published.contains(old), "{published}");

    // Traffic: the proxy, which cannot read the Secret, checks the published hash.
    let host = format!("{}-private.{DOMAIN}", ns.name);
    let app = format!("http://{}/", h.proxy_addr);
    let through_proxy = |token: &'static str| {
        let (app, host) = (app.clone(), host.clone());
        async move { status(&app, Some(&host), Some(token)).await }
    };
    wait_for("the proxy serving the private Space with its token", Duration::from_secs(60), || async {
        Ok((through_proxy(old).await == 200).then_some(()))
    })
    .await;
    assert_eq!(status(&app, Some(&host), None).await, 401, "no token");
    assert_eq!(through_proxy("wrong").await, 401, "a wrong token");

    // Logs: the same check on the operator's logs API, build and run logs alike.
    let logs = |kind: &str| format!("http://{}/api/spaces/{}/private/logs/{kind}", h.operator_http, ns.name);
    assert_eq!(status(&logs("run"), None, None).await, 401, "run logs without the token");
    assert_eq!(status(&logs("run"), None, Some("wrong")).await, 401, "run logs with a wrong token");
    assert_eq!(status(&logs("build"), None, None).await, 401, "build logs without the token");
    wait_for("the private Space's run log, with its token", Duration::from_secs(60), || async {
        Ok((status(&logs("run"), None, Some(old)).await == 200).then_some(()))
    })
    .await;

    // Rotation: the Secret gets a new token; the old one is refused from then on.
    let rotate = json!({"stringData": {"token": new}});
    secrets
        .patch(&hangar::space::naming::token_secret_name("private"), &PatchParams::default(), &Patch::Merge(rotate))
        .await
        .expect("rotate the token");
    wait_for("the proxy taking the rotated token", Duration::from_secs(60), || async {
        Ok((through_proxy(new).await == 200).then_some(()))
    })
    .await;
    assert_eq!(through_proxy(old).await, 401, "the old token after rotation");
    // The operator's own watch of the Space may see the new status a moment after the proxy's.
    wait_for("the logs API taking the rotated token", Duration::from_secs(30), || async {
        Ok((status(&logs("run"), None, Some(new)).await == 200).then_some(()))
    })
    .await;
    assert_eq!(status(&logs("run"), None, Some(old)).await, 401, "run logs with the old token");
    let rotated = spaces.get("private").await.expect("Space").status.and_then(|s| s.token_hmac);
    assert!(rotated.is_some_and(|r| r != published), "a new hash in the status");

    // A Space nobody made has no logs to show, token or not.
    let absent = format!("http://{}/api/spaces/{}/absent/logs/run", h.operator_http, ns.name);
    assert_eq!(status(&absent, None, None).await, 404);
}
