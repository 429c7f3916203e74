//! Front matter `custom_headers`: what a Space may add to its responses.
//!
//! Only what the hub accepts: the cross-origin isolation headers, with their
//! defined values. Anything else (framing like `content-length` or
//! `transfer-encoding`, hop-by-hop like `connection`, cookies, CSP of another
//! origin...) could let a Space desync shared connections or speak for the
//! platform, so it is a `CONFIG_ERROR`, and the proxy never writes it even if
//! it reached a route some other way.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};

/// The accepted headers and their values (lowercase, as the specs write them).
pub const ALLOWED: [(&str, &[&str]); 3] = [
    ("cross-origin-embedder-policy", &["unsafe-none", "require-corp", "credentialless"]),
    (
        "cross-origin-opener-policy",
        &["unsafe-none", "same-origin-allow-popups", "same-origin", "noopener-allow-popups"],
    ),
    ("cross-origin-resource-policy", &["same-site", "same-origin", "cross-origin"]),
];

/// Whether a Space may set a header of this (lowercase) name.
pub fn is_allowed_name(name: &str) -> bool {
    ALLOWED.iter().any(|(allowed, _)| *allowed == name)
}

/// Checks one header; `Err` says what is wrong with it.
pub fn check(name: &str, value: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    let Some((_, values)) = ALLOWED.iter().find(|(allowed, _)| *allowed == lower) else {
        return Err(format!(
            "header {name:?} is not allowed: only {} can be set (as on the hub)",
            ALLOWED.map(|(n, _)| n).join(", ")
        ));
    };
    if !values.contains(&value.trim()) {
        return Err(format!("{lower}: {value:?} is not one of {}", values.join(", ")));
    }
    Ok(())
}

/// Validates a front matter's `custom_headers`, names lowercased, values trimmed.
pub fn validate(headers: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, String> {
    headers
        .iter()
        .map(|(name, value)| check(name, value).map(|()| (name.to_ascii_lowercase(), value.trim().to_owned())))
        .collect()
}

/// The headers the proxy writes: the allowed ones only; the others are
/// reported to `rejected` (name and why) and left out.
pub fn to_pairs<'a>(
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
    mut rejected: impl FnMut(&str, String),
) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .into_iter()
        .filter_map(|(name, value)| {
            if let Err(why) = check(name, value) {
                rejected(name, why);
                return None;
            }
            let name = HeaderName::try_from(name.to_ascii_lowercase()).ok()?;
            Some((name, HeaderValue::try_from(value.trim()).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cross_origin_isolation_headers_with_their_values() {
        assert_eq!(check("Cross-Origin-Opener-Policy", "same-origin"), Ok(()));
        assert_eq!(check("cross-origin-embedder-policy", " require-corp "), Ok(()));
        assert_eq!(check("cross-origin-resource-policy", "cross-origin"), Ok(()));
        for name in ["content-length", "transfer-encoding", "connection", "set-cookie", "location", "x-frame-options"] {
            let why = check(name, "1").expect_err("refused");
            assert!(why.contains(name) && why.contains("not allowed"), "{why}");
        }
        let why = check("cross-origin-opener-policy", "same-origin\r\nx: y").expect_err("refused");
        assert!(why.contains("is not one of"), "{why}");
        assert!(check("cross-origin-resource-policy", "require-corp").is_err());
    }

    #[test]
    fn validate_normalizes_and_names_the_first_bad_header() {
        let ok = BTreeMap::from([("Cross-Origin-Embedder-Policy".to_owned(), "credentialless ".to_owned())]);
        assert_eq!(
            validate(&ok),
            Ok(BTreeMap::from([("cross-origin-embedder-policy".to_owned(), "credentialless".to_owned())]))
        );
        let bad = BTreeMap::from([
            ("cross-origin-opener-policy".to_owned(), "same-origin".to_owned()),
            ("transfer-encoding".to_owned(), "chunked".to_owned()),
        ]);
        assert!(validate(&bad).expect_err("refused").contains("\"transfer-encoding\""));
    }

    #[test]
    fn the_proxy_keeps_only_allowed_pairs() {
        let headers = BTreeMap::from([
            ("content-length".to_owned(), "0".to_owned()),
            ("cross-origin-opener-policy".to_owned(), "same-origin".to_owned()),
        ]);
        let mut dropped = Vec::new();
        let pairs = to_pairs(&headers, |name, _| dropped.push(name.to_owned()));
        assert_eq!(
            pairs,
            vec![(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"))]
        );
        assert_eq!(dropped, ["content-length"]);
        assert!(is_allowed_name("cross-origin-resource-policy") && !is_allowed_name("connection"));
    }
}
