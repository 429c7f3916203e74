//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator
//! replicas never reconcile at once. Hand-written (about 80 lines): the
//! crates that do this pin older `kube` releases than ours.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{PostParams, ResourceExt};

use crate::Result;

/// A claim is good for this long without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// The leader renews this often; a follower retries this often.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> Self {
        Self { api, name: name.to_owned(), identity: identity.to_owned() }
    }

    fn claim(&self, previous: Option<&Lease>, now: Timestamp) -> Lease {
        let mut lease = previous.cloned().unwrap_or_else(|| Lease {
            metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
            spec: None,
        });
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
        spec.renew_time = Some(MicroTime(now));
        lease
    }

    /// One attempt to take or keep the lead. Optimistic concurrency (the
    /// Lease's resourceVersion) makes two simultaneous attempts safe.
    pub async fn try_lead(&self) -> Result<bool> {
        let now = Timestamp::now();
        let Some(current) = self.api.get_opt(&self.name).await? else {
            return match self.api.create(&PostParams::default(), &self.claim(None, now)).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let held_by_other = spec.holder_identity.as_deref().is_some_and(|h| h != self.identity);
        let expires = spec.renew_time.map(|t| t.0).and_then(|t| {
            t.checked_add(Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64)).ok()
        });
        if held_by_other && expires.is_some_and(|e| e > now) {
            return Ok(false);
        }
        match self.api.replace(&current.name_any(), &PostParams::default(), &self.claim(Some(&current), now)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this process leads.
    pub async fn acquire(&self) {
        loop {
            match self.try_lead().await {
                Ok(true) => return,
                Ok(false) => tracing::debug!(lease = %self.name, "another replica leads; waiting"),
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "leader election failed; retrying"),
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Renews the lead until it is lost; returns when it is.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_lead().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => return,
                Err(e) if last_renewal.elapsed() < LEASE_DURATION => {
                    tracing::warn!(error = %e, "could not renew the leader lease; retrying")
                }
                Err(_) => return,
            }
        }
    }
}
