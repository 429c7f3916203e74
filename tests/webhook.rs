//! The hub webhook receiver over real HTTP on loopback, with an in-memory
//! Space directory (the Kubernetes-backed one is tested in webhook_cluster.rs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hangar::webhook::{HeadUpdate, SpaceDirectory, router};
use serde_json::{Value, json};

const SECRET: &str = "correct horse battery staple";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// Spaces `alice/demo` and `alice/other`, their head shas, and every write.
#[derive(Clone, Default)]
struct Memory {
    heads: Arc<Mutex<BTreeMap<String, Option<String>>>>,
    writes: Arc<Mutex<Vec<String>>>,
}

impl SpaceDirectory for Memory {
    async fn set_head_sha(&self, namespace: &str, name: &str, sha: &str) -> Result<HeadUpdate, String> {
        let mut heads = self.heads.lock().map_err(|e| e.to_string())?;
        let Some(head) = heads.get_mut(&format!("{namespace}/{name}")) else { return Ok(HeadUpdate::NotFound) };
        if head.as_deref() == Some(sha) {
            return Ok(HeadUpdate::Unchanged);
        }
        *head = Some(sha.to_owned());
        self.writes.lock().map_err(|e| e.to_string())?.push(format!("{namespace}/{name}={sha}"));
        Ok(HeadUpdate::Updated)
    }
}

async fn start() -> (String, Memory) {
    let mem = Memory::default();
    {
        let mut heads = mem.heads.lock().expect("lock");
        heads.insert("alice/demo".into(), None);
        heads.insert("alice/other".into(), None);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/webhooks/hub", listener.local_addr().expect("addr"));
    let app = router(SECRET, mem.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, mem)
}

fn payload(name: &str, r#ref: &str, scope: &str, sha: &str) -> Value {
    json!({
        "event": {"action": "update", "scope": scope},
        "repo": {"type": "space", "name": name, "id": "6", "private": false, "subdomain": "alice-demo",
                 "url": {"web": "https://hub/spaces/alice/demo", "api": "https://hub/api/spaces/alice/demo"},
                 "headSha": sha, "owner": {"id": "1"}},
        "updatedRefs": [{"ref": r#ref, "oldSha": "f".repeat(40), "newSha": sha}],
        "webhook": {"id": "w1", "version": 3}
    })
}

async fn post(url: &str, secret: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let http = reqwest::Client::builder().no_proxy().build().expect("client");
    let mut req = http.post(url).header("content-type", "application/json").body(body);
    if let Some(s) = secret {
        req = req.header("X-Webhook-Secret", s);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn a_push_to_main_moves_the_space_and_redelivery_is_idempotent() {
    let (url, mem) = start().await;
    let body = payload("alice/demo", "refs/heads/main", "repo.content", SHA).to_string();
    let (status, answer) = post(&url, Some(SECRET), body.clone()).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["sha"], SHA);
    assert_eq!(mem.heads.lock().expect("lock")["alice/demo"].as_deref(), Some(SHA));
    // The same delivery again: acknowledged, nothing written.
    let (status, answer) = post(&url, Some(SECRET), body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["reason"].as_str().expect("reason").contains("already at"), "{answer}");
    assert_eq!(*mem.writes.lock().expect("lock"), [format!("alice/demo={SHA}")]);
}

#[tokio::test]
async fn bad_secrets_bad_bodies_and_other_events_change_nothing() {
    let (url, mem) = start().await;
    let good = payload("alice/demo", "refs/heads/main", "repo.content", SHA).to_string();

    let (status, answer) = post(&url, None, good.clone()).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = post(&url, Some("wrong"), good.clone()).await;
    assert_eq!(status, 403, "{answer}");
    let (status, _) = post(&url, Some(&format!("{SECRET}x")), good.clone()).await;
    assert_eq!(status, 403, "a longer secret with the right prefix is wrong too");
    let (status, _) = post(&url, Some(""), good.clone()).await;
    assert_eq!(status, 403);

    let (status, answer) = post(&url, Some(SECRET), "{\"event\": ").await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().expect("error").starts_with("malformed JSON: EOF while parsing"), "{answer}");
    let (status, answer) = post(&url, Some(SECRET), "{\"event\": {\"action\": \"update\"}}").await;
    assert_eq!(status, 422, "{answer}");
    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(hangar::webhook::MAX_BODY_BYTES + 1));
    let (status, _) = post(&url, Some(SECRET), huge).await;
    assert_eq!(status, 413);

    for (p, reason) in [
        (payload("alice/demo", "refs/heads/dev", "repo.content", SHA), "no update of refs/heads/main"),
        (payload("alice/demo", "refs/heads/main", "repo.config", SHA), "does not change"),
        (payload("alice/demo", "refs/heads/main", "discussion", SHA), "does not change"),
        (payload("mallory/unknown", "refs/heads/main", "repo.content", SHA), "no Space mallory/unknown"),
    ] {
        let (status, answer) = post(&url, Some(SECRET), p.to_string()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["status"], "ignored", "{answer}");
        assert!(answer["reason"].as_str().expect("reason").contains(reason), "{answer}");
    }
    assert!(mem.writes.lock().expect("lock").is_empty(), "nothing was written");
    assert!(mem.heads.lock().expect("lock").values().all(Option::is_none));
}

#[test]
fn the_cli_refuses_to_start_without_a_secret() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["webhook", "--listen", "127.0.0.1:0"])
        .env_remove("HANGAR_WEBHOOK_SECRET")
        .env_remove("HANGAR_WEBHOOK_SECRET_FILE")
        .output()
        .expect("run hangar");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no webhook secret: set HANGAR_WEBHOOK_SECRET or --secret-file"), "{stderr}");
}
