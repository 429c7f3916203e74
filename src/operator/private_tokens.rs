//! Private Spaces' tokens, as the proxy gets them: the operator reads each
//! private Space's token Secret (`space-<name>-token`, by name: `get` only, no
//! list or watch of Secrets anywhere) and publishes the token's keyed hash in
//! the Space's status ([`crate::space::access_token`]).
//!
//! Without a watch, a rotated token is noticed when the Secret is read again:
//! at most every `resync` per Space, and whenever the Space's spec changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use crate::space::access_token::TokenKey;
use crate::space::naming::{TOKEN_KEY, token_secret_name};
use crate::space::{Space, Visibility};

/// One Space's last read.
struct Read {
    at: Instant,
    generation: Option<i64>,
    published: Option<String>,
}

/// The published token MACs, re-read from their Secrets now and then.
pub struct PrivateTokens {
    key: Option<Arc<TokenKey>>,
    resync: Duration,
    reads: Mutex<HashMap<String, Read>>,
}

fn space_key(space: &Space) -> String {
    format!("{}/{}", space.namespace().unwrap_or_default(), space.name_any())
}

impl PrivateTokens {
    /// `key`: `None` publishes nothing (no private Space can be reached).
    pub fn new(key: Option<Arc<TokenKey>>, resync: Duration) -> Self {
        Self { key, resync, reads: Mutex::new(HashMap::new()) }
    }

    pub fn key(&self) -> Option<&Arc<TokenKey>> {
        self.key.as_ref()
    }

    /// When the Space should be looked at again for its token (private Spaces only).
    pub fn recheck_in(&self, space: &Space) -> Option<Duration> {
        (space.spec.visibility == Visibility::Private && self.key.is_some()).then_some(self.resync)
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        self.reads.lock().unwrap_or_else(PoisonError::into_inner).remove(&format!("{namespace}/{name}"));
    }

    /// What `status.tokenHmac` should say now: read from the Secret when the
    /// last read is older than `resync` or the spec changed since. A read that
    /// fails (not a missing Secret) keeps what the status says, so an apiserver
    /// hiccup locks nobody out.
    pub async fn published(&self, client: &Client, space: &Space) -> Option<String> {
        let key = self.key.as_ref().filter(|_| space.spec.visibility == Visibility::Private);
        let Some(key) = key else {
            self.forget(&space.namespace().unwrap_or_default(), &space.name_any());
            return None;
        };
        let id = space_key(space);
        let generation = space.metadata.generation;
        {
            let reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(read) = reads.get(&id).filter(|r| r.generation == generation && r.at.elapsed() < self.resync) {
                return read.published.clone();
            }
        }
        let namespace = space.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let name = token_secret_name(&space.name_any());
        let published = match secrets.get_opt(&name).await {
            Ok(secret) => token_of(secret.as_ref()).map(|token| key.publish(token)),
            Err(e) => {
                tracing::warn!(space = %id, secret = %name, error = %e, "cannot read the private Space's token Secret");
                return space.status.as_ref().and_then(|s| s.token_hmac.clone());
            }
        };
        if published.is_none() {
            tracing::debug!(space = %id, secret = %name, "no token for the private Space: every request is refused");
        }
        let read = Read { at: Instant::now(), generation, published: published.clone() };
        self.reads.lock().unwrap_or_else(PoisonError::into_inner).insert(id, read);
        published
    }
}

/// The token a Secret holds (`data.token`), if any.
fn token_of(secret: Option<&Secret>) -> Option<&[u8]> {
    let token = secret?.data.as_ref()?.get(TOKEN_KEY)?;
    Some(token.0.as_slice()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_token_is_the_secrets_token_key() {
        let secret = |data: serde_json::Value| -> Secret {
            serde_json::from_value(
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": data}),
            )
            .expect("secret")
        };
        assert_eq!(token_of(Some(&secret(json!({"token": "czNjcmV0"})))), Some(&b"s3cret"[..]));
        assert_eq!(token_of(Some(&secret(json!({"other": "czNjcmV0"})))), None);
        assert_eq!(token_of(Some(&secret(json!({"token": ""})))), None, "an empty token lets nobody in");
        assert_eq!(token_of(None), None);
    }

    #[test]
    fn only_private_spaces_with_a_key_are_rechecked() {
        let space = |visibility: &str| -> Space {
            serde_json::from_value(json!({"apiVersion": "hangar.dev/v1alpha1", "kind": "Space",
                "metadata": {"name": "a", "namespace": "n"}, "spec": {"image": "i", "visibility": visibility}}))
            .expect("space")
        };
        let key = Arc::new(TokenKey::new(&[1; 32]).expect("key"));
        let tokens = PrivateTokens::new(Some(key), Duration::from_secs(30));
        assert_eq!(tokens.recheck_in(&space("private")), Some(Duration::from_secs(30)));
        assert_eq!(tokens.recheck_in(&space("public")), None);
        assert_eq!(PrivateTokens::new(None, Duration::from_secs(30)).recheck_in(&space("private")), None);
    }
}
