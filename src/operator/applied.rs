//! Whether an object needs applying: the operator stamps each object it
//! applies with a hash of its rendered form, and skips the server-side apply
//! when the cached object already carries the hash of what it renders now.
//! A Space at rest then costs no writes, and a restarted operator re-applies
//! nothing it applied before.
//!
//! The cache lags the operator's own writes by a watch event; what this process
//! applied is remembered until the watch shows the object deleted, so a
//! reconcile that runs in between does not apply the same thing again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Annotation with the hash of the object as the operator rendered it.
pub const RENDERED_ANNOTATION: &str = "hangar.dev/rendered";

/// Stamps `object` with the hash of its rendered form (taken before the stamp) and returns the hash.
pub fn stamp<K: Resource + Serialize>(object: &mut K) -> String {
    let bytes = serde_json::to_vec(&*object).unwrap_or_default();
    let hash = hex::encode(&Sha256::digest(&bytes)[..8]);
    object.annotations_mut().insert(RENDERED_ANNOTATION.to_owned(), hash.clone());
    hash
}

/// Whether the cached object was applied from the same render.
pub fn is_current(cached: Option<&ObjectMeta>, hash: &str) -> bool {
    cached.and_then(|m| m.annotations.as_ref()?.get(RENDERED_ANNOTATION)).is_some_and(|h| h == hash)
}

/// `(kind, namespace, name)`.
type Key = (&'static str, String, String);

/// The hash this process last applied per object, until the object is seen deleted.
#[derive(Clone, Default)]
pub struct Written(Arc<Mutex<HashMap<Key, String>>>);

impl Written {
    /// Whether an object rendered as `hash` needs applying: not if the cache
    /// holds that render (unless someone changed what the hash does not cover:
    /// `drifted`), nor if this process applied it and the cache has yet to catch up.
    pub fn needs_apply(
        &self,
        kind: &'static str,
        cached: Option<&ObjectMeta>,
        key: (&str, &str),
        hash: &str,
        drifted: bool,
    ) -> bool {
        if is_current(cached, hash) {
            return drifted;
        }
        let Ok(written) = self.0.lock() else { return true };
        written.get(&(kind, key.0.to_owned(), key.1.to_owned())).is_none_or(|h| h != hash)
    }

    /// Whether this process applied the object (and has not seen it deleted since).
    pub fn contains(&self, kind: &'static str, key: (&str, &str)) -> bool {
        self.0.lock().is_ok_and(|w| w.contains_key(&(kind, key.0.to_owned(), key.1.to_owned())))
    }

    pub fn record(&self, kind: &'static str, key: (&str, &str), hash: String) {
        if let Ok(mut written) = self.0.lock() {
            written.insert((kind, key.0.to_owned(), key.1.to_owned()), hash);
        }
    }

    /// The object was deleted: the next render of it must be applied.
    pub fn deleted(&self, kind: &'static str, key: (&str, &str)) {
        if let Ok(mut written) = self.0.lock() {
            written.remove(&(kind, key.0.to_owned(), key.1.to_owned()));
        }
    }

    /// The watch relisted (deletes may have been missed): trust only the cache.
    pub fn relisted(&self, kind: &'static str) {
        if let Ok(mut written) = self.0.lock() {
            written.retain(|k, _| k.0 != kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;

    fn service(port: i32) -> Service {
        let mut s = Service::default();
        s.metadata.name = Some("space-a".into());
        s.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            ports: Some(vec![k8s_openapi::api::core::v1::ServicePort { port, ..Default::default() }]),
            ..Default::default()
        });
        s
    }

    #[test]
    fn same_render_is_current_a_different_one_or_none_is_not() {
        let mut a = service(80);
        let hash = stamp(&mut a);
        assert_eq!(a.annotations()[RENDERED_ANNOTATION], hash);
        assert!(is_current(Some(&a.metadata), &stamp(&mut service(80))), "stamping is deterministic");
        assert!(!is_current(Some(&a.metadata), &stamp(&mut service(81))));
        assert!(!is_current(Some(&service(80).metadata), &hash), "an object applied by someone else");
        assert!(!is_current(None, &hash), "an object not there");
    }

    #[test]
    fn own_writes_are_not_repeated_before_the_cache_sees_them() {
        let written = Written::default();
        let key = ("alice", "space-a");
        let mut old = service(80);
        let old_hash = stamp(&mut old);
        let new_hash = stamp(&mut service(81));
        assert!(written.needs_apply("Service", Some(&old.metadata), key, &new_hash, false));
        written.record("Service", key, new_hash.clone());
        assert!(written.contains("Service", key));
        assert!(!written.contains("Deployment", key));
        // The cache still shows the old render: this process's write is in flight.
        assert!(!written.needs_apply("Service", Some(&old.metadata), key, &new_hash, false));
        assert!(!written.needs_apply("Service", None, key, &new_hash, false));
        // Deleted (or a relist that may have missed a delete): apply again.
        written.deleted("Service", key);
        assert!(written.needs_apply("Service", None, key, &new_hash, false));
        written.record("Service", key, new_hash.clone());
        written.relisted("Service");
        assert!(written.needs_apply("Service", None, key, &new_hash, false));
        // The cache holds this render, but someone scaled it: apply again.
        assert!(!written.needs_apply("Service", Some(&old.metadata), key, &old_hash, false));
        assert!(written.needs_apply("Service", Some(&old.metadata), key, &old_hash, true));
    }
}
