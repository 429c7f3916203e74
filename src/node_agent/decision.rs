//! Whether a pod should be frozen: the operator's decision against the last
//! thaw. Pure.
//!
//! The operator records a decision on the pod ([`FREEZE_ANNOTATION`]: the
//! Unix second the Space became due to freeze). A thaw (asked by the proxy)
//! overrides the decision it saw; the agent freezes again only for a *newer*
//! decision, so the old one, still recorded until the operator sees the
//! renewed activity Lease, cannot re-freeze a pod that serves traffic. The
//! agent keeps what it did on the pod ([`FREEZER_ANNOTATION`]), so a
//! restarted agent knows which decision was overridden.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::space::naming::{FREEZE_ANNOTATION, FREEZER_ANNOTATION};

/// A decision's identity: the Unix second it froze from (orders decisions).
pub type DecisionId = i64;

/// What the agent did last, as recorded on the pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordedState {
    Frozen,
    Thawed,
}

/// The agent's record on a pod ([`FREEZER_ANNOTATION`], JSON).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FreezerRecord {
    pub state: RecordedState,
    /// The decision frozen for, or (thawed) the newest decision the thaw overrode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionId>,
    /// Memory charged to the pod's cgroup when it froze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

impl FreezerRecord {
    /// The record in a pod's annotations; a malformed one counts as none.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Option<Self> {
        serde_json::from_str(annotations.get(FREEZER_ANNOTATION)?).ok()
    }

    pub fn to_annotation(&self) -> String {
        // Serializing a struct of plain fields cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The operator's decision on a pod, `None` when awake (or malformed).
pub fn decision(annotations: &BTreeMap<String, String>) -> Option<DecisionId> {
    annotations.get(FREEZE_ANNOTATION)?.trim().parse().ok()
}

/// Freeze iff there is a decision newer than the last one a thaw overrode.
pub fn should_freeze(decision: Option<DecisionId>, thawed_over: Option<DecisionId>) -> bool {
    match (decision, thawed_over) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(d), Some(t)) => d > t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thaw_overrides_its_decision_until_a_newer_one() {
        assert!(!should_freeze(None, None));
        assert!(!should_freeze(None, Some(5)));
        assert!(should_freeze(Some(100), None));
        // The proxy thawed over decision 100: the still-recorded 100 must not re-freeze.
        assert!(!should_freeze(Some(100), Some(100)));
        // A proxy that saw a newer decision than the agent did.
        assert!(!should_freeze(Some(100), Some(160)));
        // Idle again after the thaw: a new decision freezes.
        assert!(should_freeze(Some(160), Some(100)));
    }

    #[test]
    fn annotations_round_trip() {
        let record =
            FreezerRecord { state: RecordedState::Frozen, decision: Some(1_764_000_000), memory_bytes: Some(42) };
        let annotations = BTreeMap::from([
            (FREEZER_ANNOTATION.to_owned(), record.to_annotation()),
            (FREEZE_ANNOTATION.to_owned(), "1764000000".to_owned()),
        ]);
        assert_eq!(annotations[FREEZER_ANNOTATION], r#"{"state":"Frozen","decision":1764000000,"memoryBytes":42}"#);
        assert_eq!(FreezerRecord::from_annotations(&annotations), Some(record));
        assert_eq!(decision(&annotations), Some(1_764_000_000));
        let bad = BTreeMap::from([
            (FREEZER_ANNOTATION.to_owned(), "{".to_owned()),
            (FREEZE_ANNOTATION.to_owned(), "soon".to_owned()),
        ]);
        assert_eq!((FreezerRecord::from_annotations(&bad), decision(&bad)), (None, None));
    }
}
