//! Leader election with a `coordination.k8s.io` Lease, so two replicas are safe: only
//! the holder reconciles; a standby takes over once the holder stops renewing.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::controller::FIELD_MANAGER;

/// One candidate's view of the Lease.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// Takes the Lease if it is free or expired, renews it if ours. True when we hold it
    /// afterwards. A lost race (HTTP 409) is just "not the leader".
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": self.name},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": seconds,
                    "acquireTime": MicroTime(now),
                    "renewTime": MicroTime(now),
                    "leaseTransitions": 0,
                },
            }))
            .expect("a valid Lease");
            return conflict_is_false(
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| true),
            );
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let patch = if holder == self.identity {
            json!({"spec": {"renewTime": MicroTime(now), "leaseDurationSeconds": seconds}})
        } else {
            let held_for = SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds.unwrap_or(seconds),
            ));
            let expired = spec
                .renew_time
                .as_ref()
                .is_none_or(|renewed| renewed.0 + held_for <= now);
            if !holder.is_empty() && !expired {
                return Ok(false);
            }
            info!(previous = %holder, "taking over the expired Lease");
            json!({"spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": seconds,
                "acquireTime": MicroTime(now),
                "renewTime": MicroTime(now),
                "leaseTransitions": spec.lease_transitions.unwrap_or(0) + 1,
            }})
        };
        // The resourceVersion makes the write conditional: two standbys cannot both win.
        let mut patch = patch;
        patch["metadata"] = json!({"resourceVersion": lease.resource_version()});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        conflict_is_false(
            self.api
                .patch(&self.name, &params, &Patch::Merge(&patch))
                .await
                .map(|_| true),
        )
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&self, retry: Duration) {
        loop {
            match self.try_acquire_or_renew(Timestamp::now()).await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, "leader election: cannot reach the Lease"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews until a renewal fails past the Lease's duration; returns when leadership is
    /// lost, so the caller stops reconciling before another replica starts.
    pub async fn keep(&self, renew_every: Duration) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(renew_every).await;
            match self.try_acquire_or_renew(Timestamp::now()).await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!("another replica holds the Lease");
                    return;
                }
                Err(error) => warn!(%error, "leader election: renewal failed"),
            }
            // Stop before the Lease could be taken over by a standby.
            if last_renewed.elapsed() + renew_every >= self.duration {
                warn!("could not renew the Lease in time");
                return;
            }
        }
    }
}

fn conflict_is_false(result: Result<bool, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_fake_client::ClientBuilder;

    fn at(seconds: i64) -> Timestamp {
        "2026-01-01T00:00:00Z".parse::<Timestamp>().unwrap() + SignedDuration::from_secs(seconds)
    }

    #[tokio::test]
    async fn one_leader_at_a_time_and_takeover_after_expiry() {
        let client = ClientBuilder::new().build().await.unwrap();
        let lock = |id: &str| {
            LeaseLock::new(
                client.clone(),
                "ops",
                "dreambooth-operator",
                id,
                Duration::from_secs(15),
            )
        };
        let (a, b) = (lock("a"), lock("b"));
        assert!(a.try_acquire_or_renew(at(0)).await.unwrap());
        assert!(
            !b.try_acquire_or_renew(at(1)).await.unwrap(),
            "b must wait while a holds it"
        );
        assert!(a.try_acquire_or_renew(at(10)).await.unwrap(), "a renews");
        assert!(
            !b.try_acquire_or_renew(at(20)).await.unwrap(),
            "renewed at 10: valid until 25"
        );
        assert!(
            b.try_acquire_or_renew(at(25)).await.unwrap(),
            "expired: b takes over"
        );
        assert!(!a.try_acquire_or_renew(at(26)).await.unwrap(), "a lost it");
        let lease = Api::<Lease>::namespaced(client, "ops")
            .get("dreambooth-operator")
            .await
            .unwrap();
        let spec = lease.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
    }
}
