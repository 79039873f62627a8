//! Whole session lifecycles driven through `reconcile` against an in-memory API server.

mod support;

use std::time::Duration;

use dreambooth_api::{ExitKind, Outcome, Phase, Progress, Stage};
use dreambooth_operator::job::{KUEUE_QUEUE_LABEL, build_config_map, build_job};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use support::{Cluster, outcome, spec};

#[tokio::test]
async fn created_running_succeeded() {
    let cluster = Cluster::new().await;
    cluster.create("anna", spec()).await;

    // Created: the ConfigMap and Job exactly as the builder makes them.
    let action = cluster.reconcile("anna").await;
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    assert_eq!(cluster.job_names().await, ["anna-1"]);
    let session = cluster.session("anna").await;
    let job = cluster.jobs.get("anna-1").await.unwrap();
    let expected = build_job(&session, 1, &cluster.ctx.settings.job);
    assert_eq!(job.spec, expected.spec);
    assert_eq!(job.metadata.labels, expected.metadata.labels);
    assert_eq!(
        job.metadata.owner_references,
        expected.metadata.owner_references
    );
    let config_map = cluster.config_maps.get("anna-session").await.unwrap();
    assert_eq!(
        config_map.data,
        build_config_map(&session, &cluster.ctx.settings.job).data
    );
    let status = session.status.unwrap();
    assert_eq!(status.phase, Phase::Pending);
    assert_eq!(status.attempts, 1);
    assert_eq!(status.job_name.as_deref(), Some("anna-1"));

    // Running: progress comes from the stand-in trainer over real HTTP.
    cluster.advance(20);
    cluster.pod("anna", 1, "Running", None).await;
    cluster.serve_progress(Some(Progress {
        session: "anna".into(),
        stage: Stage::Unet,
        step: 500,
        total_steps: 1500,
        loss: Some(0.08),
        steps_per_second: Some(4.0),
        ..Progress::default()
    }));
    cluster.reconcile("anna").await;
    let status = cluster.session("anna").await.status.unwrap();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!((status.step, status.total_steps), (500, Some(1500)));
    assert_eq!(status.eta_seconds, Some(250.0));
    assert_eq!(status.stage, Some(Stage::Unet));

    // A poll that fails leaves everything as it was.
    cluster.serve_progress(None);
    cluster.advance(15);
    cluster.reconcile("anna").await;
    let still = cluster.session("anna").await.status.unwrap();
    assert_eq!(still.phase, Phase::Running);
    assert_eq!(still.step, 500);

    // Succeeded, from the termination message.
    cluster.advance(600);
    let message = outcome(Outcome {
        outcome: ExitKind::Succeeded,
        step: 1500,
        manifest_uri: Some("s3://out/anna/manifest.json".into()),
        message: None,
    });
    cluster
        .pod("anna", 1, "Succeeded", Some((0, message)))
        .await;
    cluster.finish_job("anna-1", "Complete").await;
    let action = cluster.reconcile("anna").await;
    assert_eq!(action, Action::await_change());
    let status = cluster.session("anna").await.status.unwrap();
    assert_eq!(status.phase, Phase::Succeeded);
    assert_eq!(status.step, 1500);
    assert_eq!(
        status.manifest.as_deref(),
        Some("s3://out/anna/manifest.json")
    );
    assert_eq!(
        status.model.as_deref(),
        Some("s3://out/anna/anna.safetensors")
    );
    assert!(status.completion_time.is_some());
    let reasons = cluster.event_reasons().await;
    for reason in ["Created", "Running", "Succeeded"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} event in {reasons:?}"
        );
    }
    let metrics = cluster.ctx.metrics.render();
    assert!(
        metrics.contains("dreambooth_operator_jobs_created_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dreambooth_operator_progress_polls_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dreambooth_operator_progress_polls_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dreambooth_operator_sessions{phase=\"Succeeded\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn reconciling_twice_writes_nothing_the_second_time() {
    let cluster = Cluster::new().await;
    cluster.start_running("anna").await;
    let before = cluster.session("anna").await;
    let job_before = cluster.jobs.get("anna-1").await.unwrap();
    let events_before = cluster.event_reasons().await.len();
    cluster.advance(15);
    cluster.reconcile("anna").await;
    let after = cluster.session("anna").await;
    assert_eq!(
        after.resource_version(),
        before.resource_version(),
        "the status was rewritten"
    );
    assert_eq!(
        cluster.jobs.get("anna-1").await.unwrap().resource_version(),
        job_before.resource_version()
    );
    assert_eq!(cluster.event_reasons().await.len(), events_before);
}

#[tokio::test]
async fn retriable_failure_resumes_in_attempt_two_after_backoff() {
    let cluster = Cluster::new().await;
    cluster.start_running("anna").await;

    let message = outcome(Outcome {
        outcome: ExitKind::Retriable,
        step: 700,
        manifest_uri: None,
        message: Some("storage unreachable".into()),
    });
    cluster.pod("anna", 1, "Failed", Some((75, message))).await;
    cluster.finish_job("anna-1", "Failed").await;
    let action = cluster.reconcile("anna").await;
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(10)),
        "waits the first backoff"
    );
    assert_eq!(cluster.job_names().await, ["anna-1"]);
    let status = cluster.session("anna").await.status.unwrap();
    assert_eq!(status.phase, Phase::Pending);
    assert!(status.message.unwrap().contains("storage unreachable"));

    cluster.advance(10);
    cluster.reconcile("anna").await;
    assert_eq!(cluster.job_names().await, ["anna-1", "anna-2"]);
    let status = cluster.session("anna").await.status.unwrap();
    assert_eq!(status.attempts, 2);
    assert_eq!(status.job_name.as_deref(), Some("anna-2"));
    assert!(
        cluster
            .event_reasons()
            .await
            .iter()
            .any(|r| r == "Restarting")
    );

    // Attempt 2 runs: the session is Running again.
    cluster.pod("anna", 2, "Running", None).await;
    cluster.reconcile("anna").await;
    assert_eq!(
        cluster.session("anna").await.status.unwrap().phase,
        Phase::Running
    );
}

#[tokio::test]
async fn retries_stop_at_the_backoff_limit() {
    let cluster = Cluster::new().await;
    let mut spec = spec();
    spec.cluster.backoff_limit = Some(1);
    cluster.create("anna", spec).await;
    cluster.reconcile("anna").await;
    for attempt in 1..=2 {
        cluster
            .pod("anna", attempt, "Failed", Some((76, String::new())))
            .await;
        cluster
            .finish_job(&format!("anna-{attempt}"), "Failed")
            .await;
        cluster.advance(3600);
        cluster.reconcile("anna").await;
    }
    assert_eq!(cluster.job_names().await, ["anna-1", "anna-2"]);
    let status = cluster.session("anna").await.status.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    assert!(status.message.unwrap().contains("backoffLimit 1"));
}

#[tokio::test]
async fn bad_data_fails_at_once_with_the_trainer_message() {
    let cluster = Cluster::new().await;
    cluster.create("anna", spec()).await;
    cluster.reconcile("anna").await;
    let message = outcome(Outcome {
        outcome: ExitKind::BadData,
        step: 0,
        manifest_uri: None,
        message: Some("s3://data/anna: no readable images (3 skipped)".into()),
    });
    cluster.pod("anna", 1, "Failed", Some((65, message))).await;
    cluster.finish_job("anna-1", "Failed").await;
    assert_eq!(cluster.reconcile("anna").await, Action::await_change());
    let status = cluster.session("anna").await.status.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    assert_eq!(
        status.message.as_deref(),
        Some("s3://data/anna: no readable images (3 skipped)")
    );
    assert_eq!(cluster.job_names().await, ["anna-1"]);
    assert!(cluster.event_reasons().await.iter().any(|r| r == "BadData"));
}

#[tokio::test]
async fn invalid_spec_fails_with_every_problem_and_no_job() {
    let cluster = Cluster::new().await;
    let mut spec = spec();
    spec.session.dataset.uri = "ftp://nowhere".into();
    spec.session.dataset.resolution = 700;
    cluster.create("anna", spec).await;
    cluster.reconcile("anna").await;
    assert!(cluster.job_names().await.is_empty());
    let status = cluster.session("anna").await.status.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    let message = status.message.unwrap();
    assert!(
        message.contains("spec.dataset.uri") && message.contains("spec.dataset.resolution"),
        "{message}"
    );
    assert!(
        cluster
            .event_reasons()
            .await
            .iter()
            .any(|r| r == "InvalidSpec")
    );
}

#[tokio::test]
async fn job_deleted_behind_our_back_is_recreated_unless_finished() {
    let cluster = Cluster::new().await;
    cluster.create("anna", spec()).await;
    cluster.reconcile("anna").await;
    cluster.delete_job("anna-1").await;
    cluster.reconcile("anna").await;
    assert_eq!(cluster.job_names().await, ["anna-1"]);
    assert_eq!(cluster.session("anna").await.status.unwrap().attempts, 1);
    assert!(
        cluster
            .event_reasons()
            .await
            .iter()
            .any(|r| r == "JobRecreated")
    );

    cluster.pod_succeeded("anna", 1, 10).await;
    cluster.finish_job("anna-1", "Complete").await;
    cluster.reconcile("anna").await;
    cluster.delete_job("anna-1").await;
    cluster.reconcile("anna").await;
    assert!(
        cluster.job_names().await.is_empty(),
        "a finished session gets no new Job"
    );
}

#[tokio::test]
async fn suspend_and_resume_flip_the_job() {
    let cluster = Cluster::new().await;
    cluster.start_running("anna").await;

    let mut session = cluster.session("anna").await;
    session.spec.cluster.suspend = Some(true);
    let session = cluster
        .sessions
        .replace("anna", &Default::default(), &session)
        .await
        .unwrap();
    let _ = session;
    cluster.reconcile("anna").await;
    assert_eq!(
        cluster
            .jobs
            .get("anna-1")
            .await
            .unwrap()
            .spec
            .unwrap()
            .suspend,
        Some(true)
    );
    assert_eq!(
        cluster.session("anna").await.status.unwrap().phase,
        Phase::Suspended
    );

    let mut session = cluster.session("anna").await;
    session.spec.cluster.suspend = Some(false);
    cluster
        .sessions
        .replace("anna", &Default::default(), &session)
        .await
        .unwrap();
    cluster.reconcile("anna").await;
    assert_eq!(
        cluster
            .jobs
            .get("anna-1")
            .await
            .unwrap()
            .spec
            .unwrap()
            .suspend,
        Some(false)
    );
    assert_eq!(
        cluster.session("anna").await.status.unwrap().phase,
        Phase::Pending
    );
    let reasons = cluster.event_reasons().await;
    assert!(
        reasons.iter().any(|r| r == "Suspended") && reasons.iter().any(|r| r == "Resumed"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn queued_job_waits_for_kueue() {
    let cluster = Cluster::new().await;
    let mut spec = spec();
    spec.cluster.queue_name = Some("gpu-a100".into());
    cluster.create("anna", spec).await;
    cluster.reconcile("anna").await;
    let job = cluster.jobs.get("anna-1").await.unwrap();
    assert_eq!(job.labels()[KUEUE_QUEUE_LABEL], "gpu-a100");
    assert_eq!(job.spec.as_ref().unwrap().suspend, Some(true));
    cluster.advance(60);
    cluster.reconcile("anna").await;
    assert_eq!(
        cluster
            .jobs
            .get("anna-1")
            .await
            .unwrap()
            .spec
            .unwrap()
            .suspend,
        Some(true),
        "the operator never admits"
    );
    assert_eq!(
        cluster.session("anna").await.status.unwrap().phase,
        Phase::Pending
    );

    cluster.unsuspend("anna-1").await;
    cluster.pod("anna", 1, "Running", None).await;
    cluster.reconcile("anna").await;
    assert_eq!(
        cluster.session("anna").await.status.unwrap().phase,
        Phase::Running
    );
    assert_eq!(
        cluster
            .jobs
            .get("anna-1")
            .await
            .unwrap()
            .spec
            .unwrap()
            .suspend,
        Some(false)
    );
}

#[tokio::test]
async fn active_deadline_fails_the_session_and_deletes_the_job() {
    let cluster = Cluster::new().await;
    let mut spec = spec();
    spec.cluster.active_deadline_seconds = Some(3600);
    cluster.create("anna", spec).await;
    cluster.reconcile("anna").await;
    cluster.pod("anna", 1, "Running", None).await;
    cluster.reconcile("anna").await;
    cluster.advance(3599);
    cluster.reconcile("anna").await;
    assert_eq!(
        cluster.session("anna").await.status.unwrap().phase,
        Phase::Running
    );
    cluster.advance(1);
    cluster.reconcile("anna").await;
    let status = cluster.session("anna").await.status.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    assert!(status.message.unwrap().contains("activeDeadlineSeconds"));
    assert!(cluster.job_names().await.is_empty());
}

#[tokio::test]
async fn ttl_deletes_the_finished_session() {
    let cluster = Cluster::new().await;
    let mut spec = spec();
    spec.cluster.ttl_seconds_after_finished = Some(300);
    spec.session.dataset.resolution = 700; // fails at once: an invalid spec
    cluster.create("anna", spec).await;
    cluster.reconcile("anna").await;
    assert_eq!(
        cluster.session("anna").await.status.unwrap().phase,
        Phase::Failed
    );
    cluster.advance(299);
    assert_eq!(
        cluster.reconcile("anna").await,
        Action::requeue(Duration::from_secs(1))
    );
    cluster.advance(1);
    cluster.reconcile("anna").await;
    assert!(cluster.sessions.get_opt("anna").await.unwrap().is_none());
}

#[tokio::test]
async fn max_running_sessions_admits_first_come_first_served() {
    let cluster = Cluster::with_settings(Some(1)).await;
    cluster.create("first", spec()).await;
    cluster.advance(1);
    cluster.create("second", spec()).await;
    cluster.reconcile("first").await;
    cluster.reconcile("second").await;
    assert_eq!(cluster.job_names().await, ["first-1"]);
    let waiting = cluster.session("second").await.status.unwrap();
    assert_eq!(waiting.phase, Phase::Pending);
    assert!(waiting.message.unwrap().contains("max-running-sessions"));

    cluster.pod_succeeded("first", 1, 1).await;
    cluster.finish_job("first-1", "Complete").await;
    cluster.reconcile("first").await;
    cluster.reconcile("second").await;
    assert_eq!(cluster.job_names().await, ["first-1", "second-1"]);
}

#[tokio::test]
async fn reconcile_errors_back_off_per_session() {
    let cluster = Cluster::new().await;
    let session = std::sync::Arc::new(cluster.create("anna", spec()).await);
    let error = dreambooth_operator::controller::Error::NoNamespace("anna".into());
    let delays: Vec<Action> = (0..8)
        .map(|_| {
            dreambooth_operator::controller::error_policy(
                session.clone(),
                &error,
                cluster.ctx.clone(),
            )
        })
        .collect();
    let secs = |s| Action::requeue(Duration::from_secs(s));
    assert_eq!(delays[..4], [secs(5), secs(10), secs(20), secs(40)]);
    assert_eq!(delays[7], secs(300), "capped at five minutes");
    // A successful reconcile resets the count.
    cluster.reconcile("anna").await;
    let again = dreambooth_operator::controller::error_policy(session, &error, cluster.ctx.clone());
    assert_eq!(again, secs(5));
}
