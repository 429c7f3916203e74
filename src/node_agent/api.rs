//! The agent's HTTP API: `POST /thaw` (bearer token, compared in constant
//! time), `GET /metrics`, `GET /healthz`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::agent::{Agent, ThawTarget};

/// A thaw that arrives before the first pod list waits this long for it.
const SYNC_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct ApiState {
    agent: Arc<Agent>,
    token_sha256: [u8; 32],
    registry: Arc<Registry>,
    synced: watch::Receiver<bool>,
}

impl ApiState {
    pub fn new(agent: Arc<Agent>, token: &str, registry: Registry, synced: watch::Receiver<bool>) -> Self {
        Self { agent, token_sha256: Sha256::digest(token.as_bytes()).into(), registry: Arc::new(registry), synced }
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/thaw", post(thaw))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Whether the headers carry `Authorization: Bearer <token>` for `expected`
/// (digests compared, so neither content nor length leaks through timing).
pub fn authorized(headers: &HeaderMap, expected: &[u8; 32]) -> bool {
    let Some(value) = headers.get(AUTHORIZATION).map(|v| v.as_bytes()) else { return false };
    let Some(scheme) = value.get(..7) else { return false };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let given: [u8; 32] = Sha256::digest(value[7..].trim_ascii()).into();
    bool::from(given.ct_eq(expected))
}

async fn thaw(State(state): State<ApiState>, headers: HeaderMap, Json(target): Json<ThawTarget>) -> Response {
    if !authorized(&headers, &state.token_sha256) {
        return (StatusCode::UNAUTHORIZED, "401 Unauthorized: send Authorization: Bearer <token>\n").into_response();
    }
    let names_pods =
        target.uid.is_some() || (target.namespace.is_some() && (target.pod.is_some() || target.space.is_some()));
    if !names_pods {
        return (StatusCode::BAD_REQUEST, "400 Bad Request: name a pod by uid, or namespace + pod or space\n")
            .into_response();
    }
    // Before the first list the agent knows no pod: wait for it rather than answer "nothing to thaw".
    let mut synced = state.synced.clone();
    if tokio::time::timeout(SYNC_WAIT, synced.wait_for(|s| *s)).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable: pods not listed yet\n").into_response();
    }
    let report = state.agent.thaw(&target).await;
    tracing::debug!(?target, ?report, "thaw request");
    if report.pods == 0 {
        return (StatusCode::NOT_FOUND, Json(report)).into_response();
    }
    Json(report).into_response()
}

async fn metrics(State(state): State<ApiState>) -> (StatusCode, String) {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (StatusCode::OK, body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_token_check() {
        let expected: [u8; 32] = Sha256::digest(b"s3cret").into();
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_str(v).expect("header"));
            h
        };
        assert!(authorized(&with("Bearer s3cret"), &expected));
        assert!(authorized(&with("bearer  s3cret "), &expected));
        assert!(!authorized(&with("Bearer s3cre"), &expected));
        assert!(!authorized(&with("Basic s3cret"), &expected));
        assert!(!authorized(&with("Bearer"), &expected));
        assert!(!authorized(&HeaderMap::new(), &expected));
    }
}
