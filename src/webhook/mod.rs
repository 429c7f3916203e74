//! The hub webhook receiver: a push to a Space's repository triggers a rebuild.
//!
//! `POST /webhooks/hub` with a version 3 payload (SPACES.md). The shared
//! secret in `X-Webhook-Secret` is compared in constant time: missing -> 401,
//! wrong -> 403. Not JSON -> 400, JSON of the wrong shape -> 422, a body over
//! [`MAX_BODY_BYTES`] -> 413. A `repo.content` update of `refs/heads/main`
//! of a Space hangar knows sets the Space's `hangar.dev/head-sha` annotation
//! to the new commit (the operator rebuilds when it differs from the last
//! build) and answers 202; anything else is acknowledged with 200 and the
//! reason it was ignored. Redelivery is idempotent: the same sha again
//! changes nothing and says so. A push whose `oldSha` is not the Space's
//! current head (an older delivery arriving late) is refused with 409 and
//! changes nothing: a Space never moves back ([`payload::head_move`]).

pub mod payload;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::space::Space;
use crate::space::naming::HEAD_SHA_ANNOTATION;
pub use payload::{Decision, HeadMove, Payload, PayloadError};

/// Hub payloads are a few KiB; anything far larger is not one.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// The header carrying the shared secret.
pub const SECRET_HEADER: &str = "x-webhook-secret";

/// What happened to a Space's head sha.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadUpdate {
    /// The annotation now holds the new sha.
    Updated,
    /// It already did (a redelivery).
    Unchanged,
    /// The delivery's push did not start from the Space's head (an older
    /// delivery arriving late): not applied ([`payload::head_move`]).
    OutOfOrder { current: String },
    /// No such Space.
    NotFound,
}

/// Where Spaces live: Kubernetes in production, a map in tests.
pub trait SpaceDirectory: Send + Sync + 'static {
    /// Sets Space `namespace/name`'s head sha annotation to `sha` when the
    /// push (from `old_sha`) applies to its current head ([`payload::head_move`]).
    fn set_head_sha(
        &self,
        namespace: &str,
        name: &str,
        old_sha: Option<&str>,
        sha: &str,
    ) -> impl std::future::Future<Output = Result<HeadUpdate, String>> + Send;
}

/// Spaces in a Kubernetes cluster; patches only the annotation.
#[derive(Clone)]
pub struct KubeSpaces {
    client: kube::Client,
}

impl KubeSpaces {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

/// The field manager of the webhook's writes.
pub const FIELD_MANAGER: &str = "hangar-webhook";

impl SpaceDirectory for KubeSpaces {
    async fn set_head_sha(
        &self,
        namespace: &str,
        name: &str,
        old_sha: Option<&str>,
        sha: &str,
    ) -> Result<HeadUpdate, String> {
        use kube::api::{Api, Patch, PatchParams};
        let api: Api<Space> = Api::namespaced(self.client.clone(), namespace);
        let space = match api.get_opt(name).await {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(HeadUpdate::NotFound),
            Err(e) => return Err(format!("reading Space {namespace}/{name}: {e}")),
        };
        let current = space.metadata.annotations.as_ref().and_then(|a| a.get(HEAD_SHA_ANNOTATION));
        match payload::head_move(current.map(String::as_str), old_sha, sha) {
            HeadMove::Apply => {}
            HeadMove::AlreadyThere => return Ok(HeadUpdate::Unchanged),
            HeadMove::OutOfOrder => {
                return Ok(HeadUpdate::OutOfOrder { current: current.cloned().unwrap_or_default() });
            }
        }
        // A merge patch of one annotation: never touches the owner's spec. The
        // resourceVersion makes it apply only to the head judged above (two
        // deliveries at once: the second gets a conflict, and the hub retries).
        let patch = json!({"metadata": {
            "annotations": {HEAD_SHA_ANNOTATION: sha},
            "resourceVersion": space.metadata.resource_version,
        }});
        match api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(HeadUpdate::Updated),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(HeadUpdate::NotFound),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Err(format!("Space {namespace}/{name} changed while this delivery was applied; retry"))
            }
            Err(e) => Err(format!("patching Space {namespace}/{name}: {e}")),
        }
    }
}

struct AppState<D> {
    /// sha256 of the secret: compared digest to digest, so neither the
    /// length nor the content of the expected secret leaks through timing.
    secret_digest: [u8; 32],
    spaces: D,
}

/// The webhook routes: `POST /webhooks/hub`, `GET /healthz`.
pub fn router<D: SpaceDirectory>(secret: &str, spaces: D) -> Router {
    let state = Arc::new(AppState { secret_digest: Sha256::digest(secret.as_bytes()).into(), spaces });
    Router::new()
        .route("/webhooks/hub", post(receive::<D>))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

async fn receive<D: SpaceDirectory>(
    State(state): State<Arc<AppState<D>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(given) = headers.get(SECRET_HEADER) else {
        return answer(StatusCode::UNAUTHORIZED, json!({"error": "missing X-Webhook-Secret header"}));
    };
    let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    if !bool::from(given.ct_eq(&state.secret_digest)) {
        return answer(StatusCode::FORBIDDEN, json!({"error": "wrong X-Webhook-Secret"}));
    }
    let payload = match payload::parse(&body) {
        Ok(p) => p,
        Err(e @ PayloadError::Syntax(_)) => return answer(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
        Err(e @ PayloadError::Shape(_)) => {
            return answer(StatusCode::UNPROCESSABLE_ENTITY, json!({"error": e.to_string()}));
        }
    };
    match payload::decide(&payload) {
        Decision::Ignore(reason) => {
            tracing::info!(repo = %payload.repo.name, %reason, "webhook ignored");
            answer(StatusCode::OK, json!({"status": "ignored", "reason": reason}))
        }
        Decision::Rebuild { namespace, name, old_sha, sha } => {
            match state.spaces.set_head_sha(&namespace, &name, old_sha.as_deref(), &sha).await {
                Ok(HeadUpdate::Updated) => {
                    tracing::info!(space = %format!("{namespace}/{name}"), %sha, "webhook: new head sha");
                    answer(
                        StatusCode::ACCEPTED,
                        json!({"status": "accepted", "space": format!("{namespace}/{name}"), "sha": sha}),
                    )
                }
                Ok(HeadUpdate::Unchanged) => answer(
                    StatusCode::OK,
                    json!({"status": "ignored", "reason": format!("Space {namespace}/{name} is already at {sha}"), "sha": sha}),
                ),
                Ok(HeadUpdate::OutOfOrder { current }) => {
                    let from = old_sha.as_deref().unwrap_or("?");
                    tracing::info!(space = %format!("{namespace}/{name}"), %current, %from, %sha, "webhook: out-of-order delivery");
                    answer(
                        StatusCode::CONFLICT,
                        json!({"status": "conflict", "space": format!("{namespace}/{name}"), "current": current, "sha": sha,
                           "reason": format!("Space {namespace}/{name} is at {current}, but this push moves {from} -> {sha}: \
                                              an older or out-of-order delivery is never applied (a Space does not move back)")}),
                    )
                }
                Ok(HeadUpdate::NotFound) => answer(
                    StatusCode::OK,
                    json!({"status": "ignored", "reason": format!("no Space {namespace}/{name} in hangar")}),
                ),
                Err(e) => {
                    tracing::error!(error = %e, "webhook: cannot update the Space");
                    // 503: the hub retries a failed delivery.
                    answer(StatusCode::SERVICE_UNAVAILABLE, json!({"error": e}))
                }
            }
        }
    }
}

/// `hangar webhook` options.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Address to listen on.
    #[arg(long, env = "HANGAR_WEBHOOK_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// File holding the shared secret the hub sends in X-Webhook-Secret
    /// (trailing newline ignored); or set HANGAR_WEBHOOK_SECRET.
    #[arg(long, env = "HANGAR_WEBHOOK_SECRET_FILE")]
    pub secret_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub limits: crate::http_server::Limits,
}

/// Runs the receiver until the process is stopped.
pub async fn serve(args: WebhookArgs) -> crate::Result<()> {
    let secret = match (&args.secret_file, std::env::var("HANGAR_WEBHOOK_SECRET")) {
        (Some(path), _) => std::fs::read_to_string(path)?.trim_end_matches(['\r', '\n']).to_owned(),
        (None, Ok(s)) => s,
        (None, Err(_)) => {
            return Err(crate::Error::Io(std::io::Error::other(
                "no webhook secret: set HANGAR_WEBHOOK_SECRET or --secret-file",
            )));
        }
    };
    if secret.is_empty() {
        return Err(crate::Error::Io(std::io::Error::other("the webhook secret is empty")));
    }
    // kube's TLS needs a process-wide rustls provider; the crate builds only
    // `ring`, but say so explicitly (an error just means one is installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default().await?;
    let app = router(&secret, KubeSpaces::new(client));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "hub webhook receiver listening");
    // SIGTERM (a pod stopping) drains in-flight deliveries instead of waiting out the grace period.
    crate::http_server::serve(listener, app, args.limits, crate::shutdown::signal()).await?;
    Ok(())
}
