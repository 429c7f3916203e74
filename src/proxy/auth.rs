//! Private Spaces: `Authorization: Bearer <token>`, checked against the
//! token's keyed hash in constant time ([`crate::space::access_token`], the
//! one check the logs API uses too).

use http::HeaderMap;

use super::route::Access;
use crate::space::access_token;

/// Whether a request may reach a Space with `access`.
pub fn allowed(access: &Access, headers: &HeaderMap) -> bool {
    match access {
        Access::Public => true,
        Access::Private { token } => access_token::authorized(token.as_ref(), headers),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::space::access_token::{ExpectedToken, TokenKey};
    use http::HeaderValue;
    use http::header::AUTHORIZATION;

    #[test]
    fn public_spaces_need_nothing_private_ones_their_token() {
        let key = Arc::new(TokenKey::new(&[5; 32]).expect("key"));
        let private = Access::Private { token: Some(ExpectedToken::new(&key, b"s3cret")) };
        let mut with = HeaderMap::new();
        with.insert(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(allowed(&Access::Public, &HeaderMap::new()));
        assert!(!allowed(&private, &HeaderMap::new()));
        assert!(allowed(&private, &with));
        assert!(!allowed(&Access::Private { token: None }, &with));
    }
}
