//! Private Spaces: `Authorization: Bearer <token>`, compared in constant time.

use http::HeaderMap;
use http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::route::Access;

/// The digest stored in a route: comparing digests keeps the comparison
/// constant-time in the token's length too.
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The bearer token of a request, if it carries one.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| value[7..].trim_ascii())
}

/// Whether a request may reach a Space with `access`.
pub fn allowed(access: &Access, headers: &HeaderMap) -> bool {
    match access {
        Access::Public => true,
        Access::Private { token_sha256: None } => false,
        Access::Private { token_sha256: Some(expected) } => {
            bearer(headers).is_some_and(|given| bool::from(token_digest(given).ct_eq(expected)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn checks_bearer_tokens() {
        let private = Access::Private { token_sha256: Some(token_digest(b"s3cret")) };
        assert!(allowed(&Access::Public, &HeaderMap::new()));
        assert!(!allowed(&private, &HeaderMap::new()));
        assert!(!allowed(&private, &with_auth("Bearer wrong")));
        assert!(!allowed(&private, &with_auth("Basic czNjcmV0")));
        assert!(!allowed(&private, &with_auth("Bearer s3cret2")));
        assert!(allowed(&private, &with_auth("Bearer s3cret")));
        assert!(allowed(&private, &with_auth("bearer  s3cret ")));
        // No token Secret: nobody gets in.
        assert!(!allowed(&Access::Private { token_sha256: None }, &with_auth("Bearer ")));
    }
}
