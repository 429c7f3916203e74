//! The hub webhook payload (version 3) and what hangar does with it. Pure.

use serde::Deserialize;

/// The part of a version 3 payload hangar reads; other fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    pub event: Event,
    pub repo: Repo,
    #[serde(default)]
    pub updated_refs: Vec<UpdatedRef>,
    #[serde(default)]
    pub webhook: Option<WebhookInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Event {
    pub action: String,
    pub scope: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Repo {
    #[serde(rename = "type")]
    pub kind: String,
    /// `owner/name`.
    pub name: String,
    #[serde(default)]
    pub head_sha: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdatedRef {
    #[serde(rename = "ref")]
    pub name: String,
    #[serde(default)]
    pub old_sha: Option<String>,
    #[serde(default)]
    pub new_sha: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WebhookInfo {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub version: Option<u32>,
}

/// The branch whose pushes rebuild a Space.
pub const TRACKED_REF: &str = "refs/heads/main";

/// What a delivery asks of hangar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Move Space `namespace/name` to `sha`, from `old_sha` (the push's
    /// previous head, lowercase; `None` when the payload has none).
    Rebuild { namespace: String, name: String, old_sha: Option<String>, sha: String },
    /// Nothing to do, and why.
    Ignore(String),
}

/// Why a body is not a payload: 400 (not JSON) or 422 (JSON, wrong shape).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("malformed JSON: {0}")]
    Syntax(String),
    #[error("not a hub webhook payload: {0}")]
    Shape(String),
}

/// Parses a delivery's body.
pub fn parse(body: &[u8]) -> Result<Payload, PayloadError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| PayloadError::Syntax(e.to_string()))?;
    serde_json::from_value(value).map_err(|e| PayloadError::Shape(e.to_string()))
}

/// Decides what a payload means. Only a content update of `refs/heads/main`
/// of a Space repository to a new commit triggers.
pub fn decide(p: &Payload) -> Decision {
    if let Some(v) = p.webhook.as_ref().and_then(|w| w.version)
        && v != 3
    {
        return Decision::Ignore(format!("webhook payload version {v} is not supported (only 3)"));
    }
    if p.repo.kind != "space" {
        return Decision::Ignore(format!("repository type {:?} is not a space", p.repo.kind));
    }
    if p.event.scope != "repo.content" || p.event.action != "update" {
        return Decision::Ignore(format!(
            "event {}/{} does not change the Space's content",
            p.event.scope, p.event.action
        ));
    }
    let Some((namespace, name)) = p.repo.name.split_once('/') else {
        return Decision::Ignore(format!("repository name {:?} is not owner/name", p.repo.name));
    };
    if namespace.is_empty() || name.is_empty() || name.contains('/') {
        return Decision::Ignore(format!("repository name {:?} is not owner/name", p.repo.name));
    }
    let Some(main) = p.updated_refs.iter().find(|r| r.name == TRACKED_REF) else {
        let refs: Vec<&str> = p.updated_refs.iter().map(|r| r.name.as_str()).collect();
        return Decision::Ignore(format!("no update of {TRACKED_REF} (updated: {})", refs.join(", ")));
    };
    match main.new_sha.as_deref() {
        Some(sha) if is_sha(sha) && !sha.bytes().all(|b| b == b'0') => Decision::Rebuild {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            old_sha: main.old_sha.as_deref().filter(|s| is_sha(s)).map(str::to_ascii_lowercase),
            sha: sha.to_ascii_lowercase(),
        },
        Some(sha) if is_sha(sha) => Decision::Ignore(format!("{TRACKED_REF} was deleted")),
        other => Decision::Ignore(format!("{TRACKED_REF} has no valid newSha ({other:?})")),
    }
}

/// Whether a push's delivery applies to a Space, given its current head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadMove {
    Apply,
    /// The Space is at `new` already (a redelivery).
    AlreadyThere,
    /// The push started from another commit than the Space's head: an older
    /// delivery arriving late (or one ahead of a missing one). Never applied,
    /// so a Space never moves back.
    OutOfOrder,
}

/// The ordering rule: a delivery moving the branch `old -> new` applies only
/// to a Space whose head is `old`, or that has no head yet. Deliveries form a
/// chain (each push's `oldSha` is the previous push's `newSha`), so the Space
/// follows the chain forward and a late one (its `old` is behind) is refused.
/// A push without `oldSha`, or with the zero sha (the branch was created,
/// e.g. again after a deletion), has no predecessor to check and applies.
pub fn head_move(current: Option<&str>, old: Option<&str>, new: &str) -> HeadMove {
    let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    match (current, old) {
        (Some(cur), _) if same(cur, new) => HeadMove::AlreadyThere,
        (None, _) | (_, None) => HeadMove::Apply,
        (_, Some(old)) if old.bytes().all(|b| b == b'0') => HeadMove::Apply,
        (Some(cur), Some(old)) if same(cur, old) => HeadMove::Apply,
        _ => HeadMove::OutOfOrder,
    }
}

fn is_sha(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn payload(scope: &str, action: &str, r#ref: &str, new_sha: &str) -> serde_json::Value {
        json!({
            "event": {"action": action, "scope": scope},
            "repo": {"type": "space", "name": "alice/demo", "id": "x", "private": false,
                     "subdomain": "alice-demo", "url": {"web": "w", "api": "a"},
                     "headSha": new_sha, "owner": {"id": "o"}},
            "updatedRefs": [{"ref": r#ref, "oldSha": "1".repeat(40), "newSha": new_sha}],
            "webhook": {"id": "w", "version": 3}
        })
    }

    fn decide_json(v: serde_json::Value) -> Decision {
        decide(&parse(v.to_string().as_bytes()).expect("parses"))
    }

    #[test]
    fn main_content_update_rebuilds() {
        assert_eq!(
            decide_json(payload("repo.content", "update", "refs/heads/main", &SHA.to_uppercase())),
            Decision::Rebuild {
                namespace: "alice".into(),
                name: "demo".into(),
                old_sha: Some("1".repeat(40)),
                sha: SHA.into()
            }
        );
    }

    #[test]
    fn deliveries_only_move_a_space_forward() {
        let (a, b, c) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
        assert_eq!(head_move(None, Some(&a), &b), HeadMove::Apply, "no head yet");
        assert_eq!(head_move(Some(&a), Some(&a), &b), HeadMove::Apply, "the next push");
        assert_eq!(head_move(Some(&b), Some(&a), &b), HeadMove::AlreadyThere, "a redelivery");
        assert_eq!(head_move(Some(&c), Some(&a), &b), HeadMove::OutOfOrder, "an older push arriving late");
        assert_eq!(head_move(Some(&a), Some(&b), &c), HeadMove::OutOfOrder, "ahead of a missing one");
        assert_eq!(head_move(Some(&c), Some(&"0".repeat(40)), &b), HeadMove::Apply, "the branch was created");
        assert_eq!(head_move(Some(&c), None, &b), HeadMove::Apply, "nothing to order by");
        assert_eq!(head_move(Some(&a.to_uppercase()), Some(&a), &b), HeadMove::Apply);
    }

    #[test]
    fn everything_else_is_ignored_with_a_reason() {
        let cases = [
            (payload("repo.content", "update", "refs/heads/dev", SHA), "no update of refs/heads/main"),
            (payload("repo.content", "update", "refs/tags/v1", SHA), "no update"),
            (payload("repo", "create", "refs/heads/main", SHA), "does not change"),
            (payload("repo.config", "update", "refs/heads/main", SHA), "does not change"),
            (payload("discussion", "create", "refs/heads/main", SHA), "does not change"),
            (payload("repo.content", "update", "refs/heads/main", &"0".repeat(40)), "deleted"),
            (payload("repo.content", "update", "refs/heads/main", "nope"), "no valid newSha"),
        ];
        for (p, reason) in cases {
            match decide_json(p.clone()) {
                Decision::Ignore(r) => assert!(r.contains(reason), "{r} should contain {reason}: {p}"),
                d => panic!("{d:?} for {p}"),
            }
        }
        let mut model = payload("repo.content", "update", "refs/heads/main", SHA);
        model["repo"]["type"] = json!("model");
        assert!(matches!(decide_json(model), Decision::Ignore(r) if r.contains("not a space")));
        let mut v2 = payload("repo.content", "update", "refs/heads/main", SHA);
        v2["webhook"]["version"] = json!(2);
        assert!(matches!(decide_json(v2), Decision::Ignore(r) if r.contains("version 2")));
        let mut bad_name = payload("repo.content", "update", "refs/heads/main", SHA);
        bad_name["repo"]["name"] = json!("demo");
        assert!(matches!(decide_json(bad_name), Decision::Ignore(r) if r.contains("owner/name")));
    }

    #[test]
    fn parse_errors_distinguish_syntax_from_shape() {
        assert!(matches!(parse(b"{not json"), Err(PayloadError::Syntax(_))));
        assert!(matches!(parse(b"{\"event\": 1}"), Err(PayloadError::Shape(_))));
        assert!(matches!(parse(b"[]"), Err(PayloadError::Shape(_))));
    }
}
