//! The RBAC list is exactly what the code uses: every request reconcile and leader
//! election make is recorded and must be granted, and every granted verb is used.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use dreambooth_operator::leader::LeaseLock;
use dreambooth_operator::rbac::{LEADER_ELECTION_RULES, PolicyRule, RULES, allows};
use k8s_openapi::jiff::Timestamp;
use support::{Cluster, spec};

fn granted(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    rules
        .iter()
        .flat_map(|r| {
            r.verbs
                .iter()
                .map(|v| (r.api_group.to_owned(), r.resource.to_owned(), v.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn reconcile_uses_exactly_the_granted_permissions() {
    let cluster = Cluster::with_settings(Some(5)).await;
    // A session that runs, is suspended and resumed, fails once, retries, succeeds and expires.
    let mut session = spec();
    session.cluster.ttl_seconds_after_finished = Some(10);
    cluster.create("anna", session).await;
    cluster.reconcile("anna").await;
    cluster.pod("anna", 1, "Running", None).await;
    cluster.reconcile("anna").await;
    // Twice: a repeated event becomes a patch of the first one's series.
    for _ in 0..2 {
        for suspend in [true, false] {
            let mut stored = cluster.session("anna").await;
            stored.spec.cluster.suspend = Some(suspend);
            cluster
                .sessions
                .replace("anna", &Default::default(), &stored)
                .await
                .unwrap();
            cluster.reconcile("anna").await;
        }
    }
    cluster
        .pod("anna", 1, "Failed", Some((75, String::new())))
        .await;
    cluster.finish_job("anna-1", "Failed").await;
    cluster.advance(3600);
    cluster.reconcile("anna").await;
    cluster.pod_succeeded("anna", 2, 5).await;
    cluster.finish_job("anna-2", "Complete").await;
    cluster.reconcile("anna").await;
    cluster.advance(10);
    cluster.reconcile("anna").await;

    // A second session that overruns its deadline: its Job is deleted.
    let mut late = spec();
    late.cluster.active_deadline_seconds = Some(60);
    cluster.create("late", late).await;
    cluster.reconcile("late").await;
    cluster.pod("late", 1, "Running", None).await;
    cluster.reconcile("late").await;
    cluster.advance(61);
    cluster.reconcile("late").await;

    let used = cluster.rbac_used();
    for (group, resource, verb) in &used {
        assert!(
            allows(RULES, group, resource, verb),
            "{verb} {group}/{resource} is used but not in RULES"
        );
    }
    // The controller's watches (not driven here) list and watch sessions and Jobs, and
    // a server-side apply that creates an object needs `create` besides `patch`.
    let mut expected = used.clone();
    for resource in [("", "configmaps"), ("batch", "jobs")] {
        expected.insert((resource.0.into(), resource.1.into(), "create".into()));
    }
    for resource in [("dreambooth.dev", "dreamboothsessions"), ("batch", "jobs")] {
        for verb in ["list", "watch"] {
            expected.insert((resource.0.into(), resource.1.into(), verb.into()));
        }
    }
    assert_eq!(
        expected,
        granted(RULES),
        "RULES grants something the code never uses"
    );
}

#[tokio::test]
async fn leader_election_uses_exactly_its_rules() {
    let cluster = Cluster::new().await;
    let client = cluster.ctx.client.clone();
    let lease =
        |id: &str| LeaseLock::new(client.clone(), "ops", "lease", id, Duration::from_secs(15));
    let now: Timestamp = support::START.parse().unwrap();
    assert!(lease("a").try_acquire_or_renew(now).await.unwrap());
    assert!(lease("a").try_acquire_or_renew(now).await.unwrap());
    let used = cluster.rbac_used();
    assert_eq!(used, granted(LEADER_ELECTION_RULES));
}
