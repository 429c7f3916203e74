//! Names every component agrees on: how a Space maps to Kubernetes objects,
//! labels, its activity Lease and its public id. One place, so the operator,
//! proxy, builder and webhook cannot drift apart.
//!
//! A Space's owner is its namespace: `SPACE_ID` is `{namespace}/{name}`.

use std::time::Duration;

/// Label on every object hangar makes for a Space (value: the Space's name).
pub const SPACE_LABEL: &str = "hangar.dev/space";
/// Label with the component that made an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "hangar";
/// Annotation the hub webhook sets on a Space: the newest commit of its
/// tracked branch. The operator builds it when it differs from `status.build.revision`.
pub const HEAD_SHA_ANNOTATION: &str = "hangar.dev/head-sha";
/// Annotation on a Space with its front matter's `custom_headers` as a JSON
/// object, written by the operator: the proxy never reads repositories.
pub const CUSTOM_HEADERS_ANNOTATION: &str = "hangar.dev/custom-headers";
/// Annotation on a Space with its effective `base_path` (spec, else front
/// matter) when it is not `/`, written by the operator for the same reason.
pub const BASE_PATH_ANNOTATION: &str = "hangar.dev/base-path";
/// Key of the bearer token in a private Space's token Secret.
pub const TOKEN_KEY: &str = "token";
/// Holder identity the proxy writes into activity Leases.
pub const LEASE_HOLDER: &str = "hangar-proxy";
/// The proxy renews a Space's Lease at most this often while traffic flows.
pub const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// Annotation on a Space's pod: the operator's freeze decision (written only
/// by the operator, absent while awake). Its value identifies the decision:
/// the Unix second the Space became due to freeze (`status.sleep.since`), so
/// a node agent can tell a new decision from one a thaw already overrode.
pub const FREEZE_ANNOTATION: &str = "hangar.dev/freeze";
/// Annotation on a Space's pod written only by its node agent: what it did
/// (JSON `{"state": "Frozen"|"Thawed", "decision", "memoryBytes"}`).
pub const FREEZER_ANNOTATION: &str = "hangar.dev/freezer";

/// Name of the Deployment and Service of a Space.
pub fn workload_name(space: &str) -> String {
    format!("space-{space}")
}

/// Name of the `coordination.k8s.io/v1` Lease recording a Space's last activity.
pub fn activity_lease_name(space: &str) -> String {
    format!("space-{space}-activity")
}

/// Name of a private Space's token Secret (labelled `hangar.dev/space=<name>`, key [`TOKEN_KEY`]).
pub fn token_secret_name(space: &str) -> String {
    format!("space-{space}-token")
}

/// `owner/name` as Spaces see it in `SPACE_ID`.
pub fn space_id(namespace: &str, space: &str) -> String {
    format!("{namespace}/{space}")
}

/// Host name of a Space under `domain`: `{owner}-{name}.{domain}`.
pub fn host(namespace: &str, space: &str, domain: &str) -> String {
    format!("{namespace}-{space}.{domain}")
}

/// Path prefix of a Space on the proxy's shared host.
pub fn path_prefix(namespace: &str, space: &str) -> String {
    format!("/spaces/{namespace}/{space}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(workload_name("whisper"), "space-whisper");
        assert_eq!(activity_lease_name("whisper"), "space-whisper-activity");
        assert_eq!(space_id("alice", "whisper"), "alice/whisper");
        assert_eq!(host("alice", "whisper", "spaces.example.com"), "alice-whisper.spaces.example.com");
        assert_eq!(path_prefix("alice", "whisper"), "/spaces/alice/whisper");
    }
}
