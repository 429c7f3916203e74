//! The hub webhook receiver over real HTTP on loopback, with an in-memory
//! Space directory (the Kubernetes-backed one is tested in webhook_cluster.rs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

mod slow_client;

use std::net::SocketAddr;
use std::time::Duration;

use hangar::http_server::Limits;
use hangar::webhook::{HeadMove, HeadUpdate, SpaceDirectory, payload::head_move, router};
use serde_json::{Value, json};

const SECRET: &str = "correct horse battery staple";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const LIMITS: Limits = Limits { header_read_timeout: Duration::from_secs(1), idle_timeout: Duration::from_secs(2) };

/// Spaces `alice/demo` and `alice/other`, their head shas, and every write.
#[derive(Clone, Default)]
struct Memory {
    heads: Arc<Mutex<BTreeMap<String, Option<String>>>>,
    writes: Arc<Mutex<Vec<String>>>,
}

impl SpaceDirectory for Memory {
    async fn set_head_sha(
        &self,
        namespace: &str,
        name: &str,
        old_sha: Option<&str>,
        sha: &str,
    ) -> Result<HeadUpdate, String> {
        let mut heads = self.heads.lock().map_err(|e| e.to_string())?;
        let Some(head) = heads.get_mut(&format!("{namespace}/{name}")) else { return Ok(HeadUpdate::NotFound) };
        match head_move(head.as_deref(), old_sha, sha) {
            HeadMove::Apply => {}
            HeadMove::AlreadyThere => return Ok(HeadUpdate::Unchanged),
            HeadMove::OutOfOrder => return Ok(HeadUpdate::OutOfOrder { current: head.clone().unwrap_or_default() }),
        }
        *head = Some(sha.to_owned());
        self.writes.lock().map_err(|e| e.to_string())?.push(format!("{namespace}/{name}={sha}"));
        Ok(HeadUpdate::Updated)
    }
}

/// The receiver on loopback, served as `hangar webhook` serves it, with short timeouts.
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
    tokio::spawn(hangar::http_server::serve(listener, app, LIMITS, std::future::pending()));
    (url, mem)
}

fn payload(name: &str, r#ref: &str, scope: &str, sha: &str) -> Value {
    push(name, r#ref, scope, &"f".repeat(40), sha)
}

/// A delivery of a push moving `r#ref` from `old` to `new`.
fn push(name: &str, r#ref: &str, scope: &str, old: &str, sha: &str) -> Value {
    json!({
        "event": {"action": "update", "scope": scope},
        "repo": {"type": "space", "name": name, "id": "6", "private": false, "subdomain": "alice-demo",
                 "url": {"web": "https://hub/spaces/alice/demo", "api": "https://hub/api/spaces/alice/demo"},
                 "headSha": sha, "owner": {"id": "1"}},
        "updatedRefs": [{"ref": r#ref, "oldSha": old, "newSha": sha}],
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

#[tokio::test]
async fn an_older_delivery_never_moves_the_space_back() {
    let (url, mem) = start().await;
    let (a, b, c) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
    let deliver = |old: &str, new: &str| push("alice/demo", "refs/heads/main", "repo.content", old, new).to_string();
    // Pushes a -> b, then b -> c: each starts from where the Space is.
    assert_eq!(post(&url, Some(SECRET), deliver(&a, &b)).await.0, 202);
    assert_eq!(post(&url, Some(SECRET), deliver(&b, &c)).await.0, 202);
    // The first push's delivery again, late (a retry): refused, the Space stays at c.
    let (status, answer) = post(&url, Some(SECRET), deliver(&a, &b)).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["current"], c.as_str(), "{answer}");
    assert!(answer["reason"].as_str().expect("reason").contains("never applied"), "{answer}");
    assert_eq!(mem.heads.lock().expect("lock")["alice/demo"].as_deref(), Some(c.as_str()));
    assert_eq!(mem.writes.lock().expect("lock").len(), 2);
}

#[tokio::test]
async fn slow_and_oversized_clients_are_cut_off() {
    let (url, _mem) = start().await;
    let addr: SocketAddr = url.trim_start_matches("http://").split('/').next().expect("host").parse().expect("addr");
    slow_client::assert_cut_off(
        addr,
        b"POST /webhooks/hub HTTP/1.1\r\nHost: x\r\nX-Webhook-Se",
        LIMITS.header_read_timeout,
    )
    .await;
    // HTTP/2 prior knowledge, its preface cut short.
    slow_client::assert_cut_off(addr, b"PRI * HTTP/2.0\r\n", LIMITS.header_read_timeout).await;
    slow_client::assert_idle_closed(addr, LIMITS.header_read_timeout).await;
    assert_eq!(slow_client::oversized_head(addr, "/healthz").await, "HTTP/1.1 431 Request Header Fields Too Large");
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
