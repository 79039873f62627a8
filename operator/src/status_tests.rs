use super::*;

const T0: &str = "2026-01-01T00:00:00Z";

fn at(seconds: i64) -> Timestamp {
    T0.parse::<Timestamp>().unwrap() + SignedDuration::from_secs(seconds)
}

fn observe<'a>(cluster: &'a ClusterSpec, status: SessionStatus) -> Observation<'a> {
    Observation {
        now: at(0),
        name: "anna",
        generation: Some(1),
        cluster,
        output_uri: "s3://out/anna/",
        problems: Vec::new(),
        status,
        job: None,
        pod: None,
        progress: None,
        may_start: true,
        poll_interval: Duration::from_secs(15),
    }
}

fn active_job() -> JobState {
    JobState {
        suspended: false,
        complete: false,
        failed: None,
        finished_at: None,
    }
}

fn running_pod() -> PodState {
    PodState {
        phase: PodPhase::Running,
        ip: Some("10.0.0.7".into()),
        terminated: None,
    }
}

fn failed_pod(code: i32, message: Option<&str>, finished: i64) -> PodState {
    PodState {
        phase: PodPhase::Failed,
        ip: None,
        terminated: Some(Termination {
            exit_code: code,
            message: message.map(str::to_owned),
            finished_at: Some(at(finished)),
        }),
    }
}

fn failed_job() -> JobState {
    JobState {
        failed: Some(("PodFailurePolicy".into(), "container exited".into())),
        ..active_job()
    }
}

/// A session on attempt `n` whose trainer has been running.
fn running_status(attempt: u32) -> SessionStatus {
    let cluster = ClusterSpec::default();
    let mut obs = observe(&cluster, SessionStatus::default());
    obs.status.attempts = attempt;
    obs.status.job_name = Some(job_name("anna", attempt));
    obs.job = Some(active_job());
    obs.pod = Some(running_pod());
    decide(&obs).status
}

fn condition(status: &SessionStatus, type_: ConditionType) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

fn is_true(status: &SessionStatus, type_: ConditionType) -> bool {
    condition(status, type_).is_some_and(|c| c.status == "True")
}

#[test]
fn new_session_creates_attempt_one() {
    let cluster = ClusterSpec::default();
    let d = decide(&observe(&cluster, SessionStatus::default()));
    assert_eq!(d.actions, [Action::CreateJob { attempt: 1 }]);
    assert_eq!(d.status.phase, Phase::Pending);
    assert_eq!(d.status.attempts, 1);
    assert_eq!(d.status.job_name.as_deref(), Some("anna-1"));
    assert_eq!(d.status.observed_generation, Some(1));
    assert!(is_true(&d.status, ConditionType::Created));
    assert_eq!(d.events[0].reason, "Created");
    assert_eq!(d.requeue_after, Some(Duration::from_secs(15)));
}

#[test]
fn invalid_spec_fails_with_every_problem_and_no_job() {
    let cluster = ClusterSpec::default();
    let mut obs = observe(&cluster, SessionStatus::default());
    obs.problems = vec![
        "spec.dataset.uri: required".into(),
        "spec.dataset.resolution: 700 is not a multiple of 64".into(),
    ];
    let d = decide(&obs);
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Phase::Failed);
    let message = d.status.message.as_deref().unwrap();
    assert!(
        message.contains("spec.dataset.uri") && message.contains("spec.dataset.resolution"),
        "{message}"
    );
    assert_eq!(
        condition(&d.status, ConditionType::Failed).unwrap().reason,
        "InvalidSpec"
    );
    assert!(
        d.events
            .iter()
            .any(|e| e.warning && e.reason == "InvalidSpec")
    );
    assert_eq!(d.status.completion_time.as_deref(), Some(T0));
}

#[test]
fn running_pod_makes_the_session_running_with_progress() {
    let cluster = ClusterSpec::default();
    let mut obs = observe(&cluster, running_status(1));
    obs.job = Some(active_job());
    obs.pod = Some(running_pod());
    obs.progress = Some(Progress {
        session: "anna".into(),
        stage: Stage::Unet,
        step: 400,
        total_steps: 1850,
        loss: Some(0.12),
        steps_per_second: Some(5.0),
        checkpoints: vec!["s3://out/anna/anna_step_250.safetensors".into()],
        ..Progress::default()
    });
    let d = decide(&obs);
    assert_eq!(d.status.phase, Phase::Running);
    assert_eq!(d.status.step, 400);
    assert_eq!(d.status.total_steps, Some(1850));
    assert_eq!(d.status.stage, Some(Stage::Unet));
    assert_eq!(d.status.eta_seconds, Some(290.0));
    assert_eq!(d.status.checkpoints.len(), 1);
    assert!(is_true(&d.status, ConditionType::Running));
    assert!(d.actions.is_empty());
}

#[test]
fn pending_pod_then_running_emits_running_once() {
    let cluster = ClusterSpec::default();
    let mut obs = observe(
        &cluster,
        SessionStatus {
            attempts: 1,
            ..Default::default()
        },
    );
    obs.job = Some(active_job());
    obs.pod = Some(PodState {
        phase: PodPhase::Pending,
        ip: None,
        terminated: None,
    });
    let pending = decide(&obs);
    assert_eq!(pending.status.phase, Phase::Pending);
    assert_eq!(pending.status.start_time.as_deref(), Some(T0));

    let mut obs = observe(&cluster, pending.status);
    obs.job = Some(active_job());
    obs.pod = Some(running_pod());
    let running = decide(&obs);
    assert!(running.events.iter().any(|e| e.reason == "Running"));
    let mut obs = observe(&cluster, running.status.clone());
    obs.job = Some(active_job());
    obs.pod = Some(running_pod());
    let again = decide(&obs);
    assert!(again.events.is_empty(), "{:?}", again.events);
    assert_eq!(
        again.status, running.status,
        "an unchanged world gives an unchanged status"
    );
}

#[test]
fn failed_poll_keeps_the_last_progress_and_the_phase() {
    let cluster = ClusterSpec::default();
    let mut status = running_status(1);
    status.step = 123;
    status.loss = Some(0.2);
    let mut obs = observe(&cluster, status);
    obs.job = Some(active_job());
    obs.pod = Some(running_pod());
    obs.progress = None;
    let d = decide(&obs);
    assert_eq!(d.status.phase, Phase::Running);
    assert_eq!(d.status.step, 123);
    assert_eq!(d.status.loss, Some(0.2));
}

#[test]
fn success_records_model_and_manifest_from_the_termination_message() {
    let cluster = ClusterSpec::default();
    let mut obs = observe(&cluster, running_status(1));
    obs.job = Some(JobState {
        complete: true,
        ..active_job()
    });
    let outcome = Outcome {
        outcome: ExitKind::Succeeded,
        step: 1850,
        manifest_uri: Some("s3://out/anna/manifest.json".into()),
        message: None,
    };
    obs.pod = Some(PodState {
        phase: PodPhase::Succeeded,
        ip: None,
        terminated: Some(Termination {
            exit_code: 0,
            message: Some(outcome.to_termination_message()),
            finished_at: None,
        }),
    });
    let d = decide(&obs);
    assert_eq!(d.status.phase, Phase::Succeeded);
    assert_eq!(d.status.step, 1850);
    assert_eq!(d.status.stage, Some(Stage::Done));
    assert_eq!(
        d.status.manifest.as_deref(),
        Some("s3://out/anna/manifest.json")
    );
    assert_eq!(
        d.status.model.as_deref(),
        Some("s3://out/anna/anna.safetensors")
    );
    assert_eq!(d.status.completion_time.as_deref(), Some(T0));
    assert!(is_true(&d.status, ConditionType::Succeeded));
    assert!(!is_true(&d.status, ConditionType::Running));
    assert!(d.events.iter().any(|e| e.reason == "Succeeded"));
    assert_eq!(d.requeue_after, None);
}

#[test]
fn retriable_exit_waits_then_starts_the_next_attempt() {
    let cluster = ClusterSpec::default();
    let outcome = Outcome {
        outcome: ExitKind::Retriable,
        step: 300,
        manifest_uri: None,
        message: Some("S3 throttled".into()),
    };
    let mut obs = observe(&cluster, running_status(1));
    obs.now = at(3);
    obs.job = Some(failed_job());
    obs.pod = Some(failed_pod(75, Some(&outcome.to_termination_message()), 0));
    let waiting = decide(&obs);
    assert!(
        waiting.actions.is_empty(),
        "backoff first: {:?}",
        waiting.actions
    );
    assert_eq!(waiting.status.phase, Phase::Pending);
    assert!(is_true(&waiting.status, ConditionType::Restarting));
    assert_eq!(waiting.requeue_after, Some(Duration::from_secs(7)));
    assert!(
        waiting
            .status
            .message
            .as_deref()
            .unwrap()
            .contains("S3 throttled")
    );

    let mut obs = observe(&cluster, waiting.status);
    obs.now = at(10);
    obs.job = Some(failed_job());
    obs.pod = Some(failed_pod(75, Some(&outcome.to_termination_message()), 0));
    let next = decide(&obs);
    assert_eq!(next.actions, [Action::CreateJob { attempt: 2 }]);
    assert_eq!(next.status.attempts, 2);
    assert_eq!(next.status.job_name.as_deref(), Some("anna-2"));
    assert!(next.events.iter().any(|e| e.reason == "Restarting"));
}

#[test]
fn retry_delay_doubles_up_to_ten_minutes() {
    assert_eq!(retry_delay(1), Duration::from_secs(10));
    assert_eq!(retry_delay(2), Duration::from_secs(20));
    assert_eq!(retry_delay(4), Duration::from_secs(80));
    assert_eq!(retry_delay(30), Duration::from_secs(600));
}

#[test]
fn preemption_and_lost_pods_are_retried() {
    let cluster = ClusterSpec::default();
    for pod in [
        Some(failed_pod(76, None, 0)),
        Some(failed_pod(137, Some("OOMKilled"), 0)),
        None,
    ] {
        let mut obs = observe(&cluster, running_status(1));
        obs.now = at(600);
        obs.job = Some(JobState {
            finished_at: Some(at(0)),
            ..failed_job()
        });
        obs.pod = pod.clone();
        let d = decide(&obs);
        assert_eq!(d.actions, [Action::CreateJob { attempt: 2 }], "pod {pod:?}");
    }
}

#[test]
fn backoff_limit_ends_the_retries() {
    let cluster = ClusterSpec {
        backoff_limit: Some(1),
        ..Default::default()
    };
    let mut obs = observe(&cluster, running_status(2));
    obs.now = at(600);
    obs.job = Some(failed_job());
    obs.pod = Some(failed_pod(75, None, 0));
    let d = decide(&obs);
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Phase::Failed);
    assert_eq!(
        condition(&d.status, ConditionType::Failed).unwrap().reason,
        "BackoffLimitExceeded"
    );
}

#[test]
fn bad_data_fails_at_once_with_the_trainer_message() {
    let cluster = ClusterSpec::default();
    for (kind, reason) in [
        (ExitKind::BadData, "BadData"),
        (ExitKind::BadConfig, "BadConfig"),
    ] {
        let outcome = Outcome {
            outcome: kind,
            step: 0,
            manifest_uri: None,
            message: Some("img_3.jpg: not an image".into()),
        };
        let mut obs = observe(&cluster, running_status(1));
        obs.job = Some(failed_job());
        obs.pod = Some(failed_pod(
            kind.code(),
            Some(&outcome.to_termination_message()),
            0,
        ));
        let d = decide(&obs);
        assert!(d.actions.is_empty());
        assert_eq!(d.status.phase, Phase::Failed);
        assert_eq!(d.status.message.as_deref(), Some("img_3.jpg: not an image"));
        assert_eq!(
            condition(&d.status, ConditionType::Failed).unwrap().reason,
            reason
        );
    }
    // A crash that left only logs: the exit code decides and the log tail is the message.
    let mut obs = observe(&cluster, running_status(1));
    obs.job = Some(failed_job());
    obs.pod = Some(failed_pod(65, Some("panic: bad image\n"), 0));
    let d = decide(&obs);
    assert_eq!(d.status.phase, Phase::Failed);
    assert_eq!(d.status.message.as_deref(), Some("panic: bad image"));
}

#[test]
fn deleted_job_is_recreated_for_the_same_attempt() {
    let cluster = ClusterSpec::default();
    let mut obs = observe(&cluster, running_status(2));
    obs.job = None;
    let d = decide(&obs);
    assert_eq!(d.actions, [Action::CreateJob { attempt: 2 }]);
    assert_eq!(d.status.attempts, 2);
    assert!(d.events.iter().any(|e| e.reason == "JobRecreated"));
}

#[test]
fn finished_sessions_never_recreate_jobs() {
    let cluster = ClusterSpec::default();
    let mut status = running_status(1);
    status.phase = Phase::Succeeded;
    let obs = observe(&cluster, status.clone());
    let d = decide(&obs);
    assert!(d.actions.is_empty());
    assert_eq!(
        d.status,
        SessionStatus {
            observed_generation: Some(1),
            ..status
        }
    );
}

#[test]
fn suspend_and_resume() {
    let cluster = ClusterSpec {
        suspend: Some(true),
        ..Default::default()
    };
    let mut obs = observe(&cluster, running_status(1));
    obs.job = Some(active_job());
    obs.pod = Some(running_pod());
    let d = decide(&obs);
    assert_eq!(d.actions, [Action::SuspendJob(true)]);
    assert_eq!(d.status.phase, Phase::Suspended);
    assert!(is_true(&d.status, ConditionType::Suspended));

    let mut obs = observe(&cluster, d.status);
    obs.job = Some(JobState {
        suspended: true,
        ..active_job()
    });
    let d = decide(&obs);
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Phase::Suspended);

    let cluster = ClusterSpec {
        suspend: Some(false),
        ..Default::default()
    };
    let mut obs = observe(&cluster, d.status);
    obs.job = Some(JobState {
        suspended: true,
        ..active_job()
    });
    let d = decide(&obs);
    assert_eq!(d.actions, [Action::SuspendJob(false)]);
    assert_eq!(d.status.phase, Phase::Pending);
    assert!(!is_true(&d.status, ConditionType::Suspended));
}

#[test]
fn suspended_new_session_creates_a_suspended_job() {
    let cluster = ClusterSpec {
        suspend: Some(true),
        ..Default::default()
    };
    let d = decide(&observe(&cluster, SessionStatus::default()));
    assert_eq!(d.actions, [Action::CreateJob { attempt: 1 }]);
    assert_eq!(d.status.phase, Phase::Suspended);
}

#[test]
fn kueue_admission_is_never_overridden() {
    let cluster = ClusterSpec {
        queue_name: Some("gpu".into()),
        ..Default::default()
    };
    let created = decide(&observe(&cluster, SessionStatus::default()));
    assert_eq!(created.status.phase, Phase::Pending);
    assert!(created.status.message.as_deref().unwrap().contains("Kueue"));
    let mut obs = observe(&cluster, created.status);
    obs.job = Some(JobState {
        suspended: true,
        ..active_job()
    });
    let d = decide(&obs);
    assert!(
        d.actions.is_empty(),
        "the operator must not unsuspend a queued Job: {:?}",
        d.actions
    );
    assert_eq!(d.status.phase, Phase::Pending);
    // Kueue admitted it: the pod runs.
    let mut obs = observe(&cluster, d.status);
    obs.job = Some(active_job());
    obs.pod = Some(running_pod());
    assert_eq!(decide(&obs).status.phase, Phase::Running);
}

#[test]
fn deadline_fails_the_session_and_stops_the_job() {
    let cluster = ClusterSpec {
        active_deadline_seconds: Some(60),
        ..Default::default()
    };
    let mut obs = observe(&cluster, running_status(1));
    obs.now = at(30);
    obs.job = Some(active_job());
    obs.pod = Some(running_pod());
    let before = decide(&obs);
    assert_eq!(before.status.phase, Phase::Running);
    assert!(before.requeue_after.unwrap() <= Duration::from_secs(30));

    obs.now = at(61);
    let after = decide(&obs);
    assert_eq!(after.status.phase, Phase::Failed);
    assert_eq!(after.actions, [Action::DeleteJob]);
    assert_eq!(
        condition(&after.status, ConditionType::Failed)
            .unwrap()
            .reason,
        "DeadlineExceeded"
    );
}

#[test]
fn ttl_deletes_the_finished_session() {
    let cluster = ClusterSpec {
        ttl_seconds_after_finished: Some(100),
        ..Default::default()
    };
    let mut status = running_status(1);
    status.phase = Phase::Succeeded;
    status.completion_time = Some(T0.into());
    let mut obs = observe(&cluster, status);
    obs.now = at(40);
    let early = decide(&obs);
    assert!(early.actions.is_empty());
    assert_eq!(early.requeue_after, Some(Duration::from_secs(60)));
    obs.now = at(100);
    assert_eq!(decide(&obs).actions, [Action::DeleteSession]);
}

#[test]
fn capacity_limit_keeps_new_sessions_pending() {
    let cluster = ClusterSpec::default();
    let mut obs = observe(&cluster, SessionStatus::default());
    obs.may_start = false;
    let d = decide(&obs);
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Phase::Pending);
    assert_eq!(
        condition(&d.status, ConditionType::Created).unwrap().reason,
        "WaitingForCapacity"
    );
    assert!(d.requeue_after.is_some());
}

#[test]
fn condition_time_changes_only_with_its_status() {
    let mut conditions = Vec::new();
    assert!(set_condition(
        &mut conditions,
        ConditionType::Running,
        true,
        "A",
        "",
        at(0),
        None
    ));
    assert!(!set_condition(
        &mut conditions,
        ConditionType::Running,
        true,
        "B",
        "m",
        at(5),
        None
    ));
    assert_eq!(conditions[0].last_transition_time, T0);
    assert_eq!(conditions[0].reason, "B");
    assert!(set_condition(
        &mut conditions,
        ConditionType::Running,
        false,
        "C",
        "",
        at(9),
        None
    ));
    assert_eq!(conditions[0].last_transition_time, at(9).to_string());
}
