//! Cluster tier: the webhook receiver against the test bed's kube-apiserver.
//! A delivery for a push moves the Space's head-sha annotation (the operator's
//! rebuild trigger); wrong secrets, malformed JSON and other refs change nothing.

mod support;

use hangar::space::Space;
use hangar::space::naming::HEAD_SHA_ANNOTATION;
use hangar::webhook::{KubeSpaces, router};
use kube::api::{Api, PostParams};
use serde_json::json;
use support::TestNamespace;

const SECRET: &str = "cluster-tier-secret";

fn delivery(namespace: &str, name: &str, r#ref: &str, sha: &str) -> String {
    push(namespace, name, r#ref, &"f".repeat(40), sha)
}

/// A delivery of a push moving `r#ref` from `old` to `sha`.
fn push(namespace: &str, name: &str, r#ref: &str, old: &str, sha: &str) -> String {
    json!({
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "space", "name": format!("{namespace}/{name}"), "id": "1", "private": false,
                 "subdomain": "x", "url": {"web": "w", "api": "a"}, "headSha": sha, "owner": {"id": "o"}},
        "updatedRefs": [{"ref": r#ref, "oldSha": old, "newSha": sha}],
        "webhook": {"id": "w", "version": 3}
    })
    .to_string()
}

async fn head(api: &Api<Space>, name: &str) -> Option<String> {
    let space = api.get(name).await.expect("get Space");
    space.metadata.annotations.and_then(|a| a.get(HEAD_SHA_ANNOTATION).cloned())
}

#[tokio::test]
async fn a_delivery_moves_the_space_to_the_new_sha_and_nothing_else_does() {
    let ns = TestNamespace::new("webhook", &["kube-apiserver"]).await;
    ns.install_crd().await;
    let api: Api<Space> = ns.api();
    let space: Space = serde_json::from_value(json!({
        "apiVersion": "hangar.dev/v1alpha1", "kind": "Space",
        "metadata": {"name": "demo"},
        "spec": {"source": {"git": "https://example.invalid/alice/demo.git"}}
    }))
    .expect("Space");
    api.create(&PostParams::default(), &space).await.expect("create Space");
    let spec_before = api.get("demo").await.expect("get").spec;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/webhooks/hub", listener.local_addr().expect("addr"));
    let app = router(SECRET, KubeSpaces::new(ns.client.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::builder().no_proxy().build().expect("client");
    let send = |secret: Option<&'static str>, body: String| {
        let mut req = http.post(&url).header("content-type", "application/json").body(body);
        if let Some(s) = secret {
            req = req.header("X-Webhook-Secret", s);
        }
        async move { req.send().await.expect("POST").status().as_u16() }
    };

    let sha1 = "1111111111111111111111111111111111111111";
    let sha2 = "2222222222222222222222222222222222222222";
    // Rejected or ignored deliveries change nothing.
    assert_eq!(send(Some("wrong"), delivery(&ns.name, "demo", "refs/heads/main", sha1)).await, 403);
    assert_eq!(send(None, delivery(&ns.name, "demo", "refs/heads/main", sha1)).await, 401);
    assert_eq!(send(Some(SECRET), "{not json".into()).await, 400);
    assert_eq!(send(Some(SECRET), delivery(&ns.name, "demo", "refs/heads/dev", sha1)).await, 200);
    assert_eq!(send(Some(SECRET), delivery(&ns.name, "missing", "refs/heads/main", sha1)).await, 200);
    assert_eq!(head(&api, "demo").await, None);

    // A push to main sets the annotation; a redelivery is a no-op; the next push moves it.
    assert_eq!(send(Some(SECRET), delivery(&ns.name, "demo", "refs/heads/main", sha1)).await, 202);
    assert_eq!(head(&api, "demo").await.as_deref(), Some(sha1));
    let rv = api.get("demo").await.expect("get").metadata.resource_version;
    assert_eq!(send(Some(SECRET), delivery(&ns.name, "demo", "refs/heads/main", sha1)).await, 200);
    assert_eq!(api.get("demo").await.expect("get").metadata.resource_version, rv, "redelivery wrote nothing");
    assert_eq!(send(Some(SECRET), push(&ns.name, "demo", "refs/heads/main", sha1, sha2)).await, 202);
    assert_eq!(head(&api, "demo").await.as_deref(), Some(sha2));
    // The push to sha1 delivered again, late: refused, the Space stays at sha2, nothing written.
    let rv = api.get("demo").await.expect("get").metadata.resource_version;
    assert_eq!(send(Some(SECRET), delivery(&ns.name, "demo", "refs/heads/main", sha1)).await, 409);
    assert_eq!(head(&api, "demo").await.as_deref(), Some(sha2));
    assert_eq!(api.get("demo").await.expect("get").metadata.resource_version, rv, "a late delivery wrote nothing");
    assert_eq!(api.get("demo").await.expect("get").spec, spec_before, "the owner's spec is untouched");
}
