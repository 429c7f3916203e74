//! The JSON merge patch (RFC 7386) between two documents: what the operator
//! sends to write a status. A merge patch costs the apiserver far less than a
//! server-side apply of a custom resource's status (no typed field-set
//! bookkeeping), and carrying only what changed keeps it small. Hand-written:
//! `json-patch` applies merge patches but does not compute them.

use serde_json::{Map, Value};

/// The merge patch that turns `from` into `to`: keys new or changed in `to`
/// with their values (objects recursively), keys gone from `to` as `null`,
/// anything else (arrays, scalars) replaced whole.
pub fn diff(from: &Value, to: &Value) -> Value {
    let (Value::Object(from), Value::Object(to)) = (from, to) else { return to.clone() };
    let mut patch = Map::new();
    for (key, value) in to {
        match from.get(key) {
            Some(old) if old == value => {}
            Some(old) => {
                patch.insert(key.clone(), diff(old, value));
            }
            None => {
                patch.insert(key.clone(), value.clone());
            }
        }
    }
    for key in from.keys().filter(|k| !to.contains_key(*k)) {
        patch.insert(key.clone(), Value::Null);
    }
    Value::Object(patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// RFC 7386's algorithm, to check that applying the diff gives `to`.
    fn apply(target: &Value, patch: &Value) -> Value {
        let Value::Object(patch) = patch else { return patch.clone() };
        let mut out = target.as_object().cloned().unwrap_or_default();
        for (k, v) in patch {
            if v.is_null() {
                out.remove(k);
            } else {
                let merged = apply(out.get(k).unwrap_or(&Value::Null), v);
                out.insert(k.clone(), merged);
            }
        }
        Value::Object(out)
    }

    #[test]
    fn carries_only_changes_and_nulls_what_went_away() {
        let from = json!({"stage": "APP_STARTING", "message": "waiting", "hardware": {"requested": "t4-small", "current": "cpu-basic"},
            "conditions": [{"type": "Ready", "status": "False"}], "observedGeneration": 1});
        let to = json!({"stage": "RUNNING", "hardware": {"requested": "t4-small", "current": "t4-small"},
            "conditions": [{"type": "Ready", "status": "True"}], "observedGeneration": 1});
        let patch = diff(&from, &to);
        assert_eq!(
            patch,
            json!({"stage": "RUNNING", "message": null, "hardware": {"current": "t4-small"},
                "conditions": [{"type": "Ready", "status": "True"}]})
        );
        assert_eq!(apply(&from, &patch), to);
    }

    #[test]
    fn from_nothing_is_everything_and_equal_is_empty() {
        let to = json!({"stage": "PAUSED", "url": "https://a.example/"});
        assert_eq!(diff(&Value::Null, &to), to);
        assert_eq!(diff(&to, &to), json!({}));
        let nested = json!({"build": {"log": ["a"], "commit": "x"}});
        let changed = json!({"build": {"log": ["a", "b"]}});
        let patch = diff(&nested, &changed);
        assert_eq!(patch, json!({"build": {"log": ["a", "b"], "commit": null}}));
        assert_eq!(apply(&nested, &patch), changed);
    }
}
