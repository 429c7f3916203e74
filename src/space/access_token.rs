//! Private Spaces' bearer tokens, checked without the token at hand.
//!
//! The operator reads a private Space's token Secret and publishes only an
//! HMAC-SHA256 of the token in the Space's status (`status.tokenHmac`); the
//! proxy and the logs API compare a request's bearer token against it. The
//! key is shared by the operator and the proxy alone (a Secret the chart makes
//! and mounts into their pods), so the status, which more people may read
//! than the Secret, tells nothing about the token: unlike a plain SHA-256,
//! a keyed hash cannot be brute-forced offline when a user picks a weak token.
//! Pure: no I/O here.

use std::fmt;
use std::sync::Arc;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use ring::hmac;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The scheme prefix of a published token MAC.
const SCHEME: &str = "hmac-sha256";
/// Shorter keys are refused: the MAC is only as strong as its key.
pub const MIN_KEY_BYTES: usize = 32;

/// The key of the token MACs.
pub struct TokenKey {
    key: hmac::Key,
    /// Names the key in published MACs (a hash of it: reveals nothing of a random key),
    /// so a MAC made with another key is told apart from a wrong token.
    id: String,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl TokenKey {
    /// A key from its bytes (a key file's content, its surrounding whitespace trimmed).
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!("the token key has {} bytes; it needs at least {MIN_KEY_BYTES}", bytes.len()));
        }
        let id = hex::encode(&Sha256::digest(bytes)[..4]);
        Ok(Self { key: hmac::Key::new(hmac::HMAC_SHA256, bytes), id })
    }

    /// A fresh random key (one process both publishes and checks: local mode).
    pub fn random() -> Result<Self, String> {
        let bytes: [u8; 32] = ring::rand::generate(&ring::rand::SystemRandom::new())
            .map_err(|_| "no randomness for a token key".to_owned())?
            .expose();
        Self::new(&bytes)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self, token: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.key, token);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// What the operator publishes for `token`: `hmac-sha256:<key id>:<hex MAC>`.
    pub fn publish(&self, token: &[u8]) -> String {
        format!("{SCHEME}:{}:{}", self.id, hex::encode(self.mac(token)))
    }
}

/// Why a published MAC cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishedError {
    #[error("not a token MAC (expected {SCHEME}:<key id>:<hex>)")]
    Malformed,
    #[error("made with token key {published}, but this component has key {own}: give both the same key file")]
    OtherKey { published: String, own: String },
}

/// The token a private Space expects, as its published MAC under a key.
#[derive(Clone)]
pub struct ExpectedToken {
    key: Arc<TokenKey>,
    mac: [u8; 32],
}

impl fmt::Debug for ExpectedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpectedToken").field("key", &self.key.id).finish_non_exhaustive()
    }
}

/// Equal MACs under the same key (route tables are compared; not a token check).
impl PartialEq for ExpectedToken {
    fn eq(&self, other: &Self) -> bool {
        self.key.id == other.key.id && self.mac == other.mac
    }
}

impl Eq for ExpectedToken {}

impl ExpectedToken {
    /// The token as `key` expects it (local mode, tests).
    pub fn new(key: &Arc<TokenKey>, token: &[u8]) -> Self {
        Self { key: Arc::clone(key), mac: key.mac(token) }
    }

    /// Parses a published MAC (`status.tokenHmac`) made with `key`.
    pub fn from_published(key: &Arc<TokenKey>, published: &str) -> Result<Self, PublishedError> {
        let mut parts = published.splitn(3, ':');
        let (Some(SCHEME), Some(id), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(PublishedError::Malformed);
        };
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(mac, &mut bytes).map_err(|_| PublishedError::Malformed)?;
        if id != key.id {
            return Err(PublishedError::OtherKey { published: id.to_owned(), own: key.id.clone() });
        }
        Ok(Self { key: Arc::clone(key), mac: bytes })
    }

    /// Whether `given` is the token, in constant time (MACs of equal length compared).
    pub fn matches(&self, given: &[u8]) -> bool {
        bool::from(self.key.mac(given).ct_eq(&self.mac))
    }
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| value[7..].trim_ascii())
}

/// Whether a request may see a private Space expecting `expected` (`None`: its
/// token is unknown, so nobody may). The one check of the proxy and the logs API.
pub fn authorized(expected: Option<&ExpectedToken>, headers: &HeaderMap) -> bool {
    match (expected, bearer(headers)) {
        (Some(expected), Some(given)) => expected.matches(given),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key(byte: u8) -> Arc<TokenKey> {
        Arc::new(TokenKey::new(&[byte; 40]).expect("key"))
    }

    fn with_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn a_published_mac_checks_the_token_it_was_made_from() {
        let k = key(7);
        let published = k.publish(b"s3cret");
        assert!(published.starts_with(&format!("hmac-sha256:{}:", k.id())), "{published}");
        assert!(!published.contains("s3cret"));
        let expected = ExpectedToken::from_published(&k, &published).expect("parses");
        assert_eq!(expected, ExpectedToken::new(&k, b"s3cret"));
        assert!(expected.matches(b"s3cret"));
        for wrong in [&b"s3cret2"[..], b"s3cre", b"", b"S3CRET"] {
            assert!(!expected.matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn the_mac_depends_on_the_key() {
        let (a, b) = (key(1), key(2));
        assert_ne!(a.publish(b"t"), b.publish(b"t"));
        assert_ne!(a.id(), b.id());
        // Not a plain hash of the token: without the key it says nothing.
        assert!(!a.publish(b"t").ends_with(&hex::encode(Sha256::digest(b"t"))));
        assert_eq!(
            ExpectedToken::from_published(&b, &a.publish(b"t")),
            Err(PublishedError::OtherKey { published: a.id().to_owned(), own: b.id().to_owned() })
        );
    }

    #[test]
    fn malformed_macs_and_short_keys_are_refused() {
        let k = key(3);
        for bad in ["", "hmac-sha256", "sha256:x:00", &format!("hmac-sha256:{}:zz", k.id()), "hmac-sha256:a:00"] {
            assert_eq!(ExpectedToken::from_published(&k, bad), Err(PublishedError::Malformed), "{bad}");
        }
        assert!(TokenKey::new(b"short").is_err());
        let random = TokenKey::random().expect("random key");
        assert_ne!(random.id(), TokenKey::random().expect("random key").id());
    }

    #[test]
    fn checks_bearer_tokens() {
        let k = key(9);
        let expected = ExpectedToken::new(&k, b"s3cret");
        let ok = |h: &HeaderMap| authorized(Some(&expected), h);
        assert!(!ok(&HeaderMap::new()));
        assert!(!ok(&with_auth("Bearer wrong")));
        assert!(!ok(&with_auth("Basic czNjcmV0")));
        assert!(!ok(&with_auth("Bearer s3cret2")));
        assert!(!ok(&with_auth("Bearer")));
        assert!(ok(&with_auth("Bearer s3cret")));
        assert!(ok(&with_auth("bearer  s3cret ")));
        // No known token: nobody gets in, not even with an empty one.
        assert!(!authorized(None, &with_auth("Bearer ")));
        assert!(!authorized(None, &with_auth("Bearer s3cret")));
    }
}
