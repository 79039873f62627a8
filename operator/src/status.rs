//! The session state machine: what the operator saw (the session, its current Job and
//! pod, the trainer's progress and termination message) in, the new status and what to do
//! next out. Pure: no API calls, the clock is an input, so every transition is unit-tested.

use std::time::Duration;

use dreambooth_api::crd::ClusterSpec;
use dreambooth_api::{
    Condition, ConditionType, ExitKind, Outcome, Phase, Progress, SessionStatus, Stage,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::job::job_name;

/// Retries wait 10 s, 20 s, 40 s ... up to 10 minutes.
const RETRY_BASE: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(600);
/// How often a session waiting for capacity looks again.
const CAPACITY_RECHECK: Duration = Duration::from_secs(30);

/// Everything reconcile observed about one session.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub now: Timestamp,
    pub name: &'a str,
    pub generation: Option<i64>,
    pub cluster: &'a ClusterSpec,
    /// `spec.output.uri`, where the final model lands.
    pub output_uri: &'a str,
    /// Validation errors of the spec, each `path: message`; empty when valid.
    pub problems: Vec<String>,
    /// The status as stored (default for a new session).
    pub status: SessionStatus,
    /// The Job of the current attempt (`status.attempts`), if it exists.
    pub job: Option<JobState>,
    /// The newest pod of that Job.
    pub pod: Option<PodState>,
    /// The latest successful `/progress` poll; `None` keeps what the status has.
    pub progress: Option<Progress>,
    /// False while `--max-running-sessions` is reached and older sessions wait first.
    pub may_start: bool,
    /// Requeue interval while a trainer runs (the progress poll interval).
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobState {
    pub suspended: bool,
    /// The Job's `Complete` condition is true.
    pub complete: bool,
    /// The Job's `Failed` condition: its reason and message.
    pub failed: Option<(String, String)>,
    /// When the Job finished, from its conditions.
    pub finished_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodState {
    pub phase: PodPhase,
    pub ip: Option<String>,
    /// The trainer container's exit, once it has terminated.
    pub terminated: Option<Termination>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Termination {
    pub exit_code: i32,
    /// The termination message (the trainer's `Outcome` JSON, or log tail on a crash).
    pub message: Option<String>,
    pub finished_at: Option<Timestamp>,
}

/// What reconcile must do besides writing the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the ConfigMap (if missing) and the Job of this attempt.
    CreateJob { attempt: u32 },
    /// Set `spec.suspend` of the current Job.
    SuspendJob(bool),
    /// Delete the current Job (its pod gets SIGTERM): the deadline passed.
    DeleteJob,
    /// Delete the session itself: its TTL after finishing ran out.
    DeleteSession,
}

/// An event to publish on the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: SessionStatus,
    pub actions: Vec<Action>,
    pub events: Vec<Note>,
    /// Look again after this long even if nothing changes.
    pub requeue_after: Option<Duration>,
}

/// The next status and actions for a session.
pub fn decide(obs: &Observation) -> Decision {
    let mut machine = Machine {
        obs,
        d: Decision {
            status: obs.status.clone(),
            actions: Vec::new(),
            events: Vec::new(),
            requeue_after: None,
        },
    };
    machine.d.status.observed_generation = obs.generation;
    machine.run();
    let from = obs.status.phase;
    let to = machine.d.status.phase;
    if from != to && to.is_finished() {
        machine
            .d
            .status
            .completion_time
            .get_or_insert_with(|| obs.now.to_string());
    }
    machine.d
}

struct Machine<'o, 'a> {
    obs: &'o Observation<'a>,
    d: Decision,
}

impl Machine<'_, '_> {
    fn run(&mut self) {
        let obs = self.obs;
        if obs.status.phase.is_finished() {
            return self.expire_after_ttl();
        }
        if !obs.problems.is_empty() {
            let message = obs.problems.join("; ");
            return self.fail("InvalidSpec", format!("invalid spec: {message}"));
        }
        if self.past_deadline() {
            return;
        }
        if obs.status.attempts == 0 {
            return self.start_first_attempt();
        }
        let attempt = obs.status.attempts;
        match &obs.job {
            None => self.recreate(attempt),
            Some(job) if job.complete => self.succeed(),
            Some(job) if job.failed.is_some() || self.pod_failed() => {
                self.retry_or_fail(job, attempt)
            }
            Some(job) => self.follow(job),
        }
    }

    fn start_first_attempt(&mut self) {
        if !self.obs.may_start {
            self.set_phase(Phase::Pending, "the cluster's --max-running-sessions is reached; waiting for a slot, first come first served");
            self.condition(
                ConditionType::Created,
                false,
                "WaitingForCapacity",
                "waiting for a free slot",
            );
            self.d.requeue_after = Some(CAPACITY_RECHECK);
            return;
        }
        self.create_job(1);
        self.note(
            false,
            "Created",
            format!("created Job {}", job_name(self.obs.name, 1)),
        );
    }

    fn create_job(&mut self, attempt: u32) {
        let name = job_name(self.obs.name, attempt);
        self.d.actions.push(Action::CreateJob { attempt });
        self.d.status.attempts = attempt;
        self.d.status.job_name = Some(name.clone());
        self.condition(
            ConditionType::Created,
            true,
            "JobCreated",
            &format!("Job {name}"),
        );
        let cluster = self.obs.cluster;
        if cluster.suspended() {
            self.suspended();
        } else if cluster.queue_name.is_some() {
            self.queued();
        } else {
            self.set_phase(Phase::Pending, "waiting for the trainer pod");
        }
        self.requeue_within(self.obs.poll_interval);
    }

    /// Keeps the earliest of the requeue times asked for (deadline, poll).
    fn requeue_within(&mut self, after: Duration) {
        let current = self.d.requeue_after.get_or_insert(after);
        *current = (*current).min(after);
    }

    /// The Job vanished while the session runs: someone deleted it. The same attempt
    /// starts again; its trainer resumes from the latest state in storage.
    fn recreate(&mut self, attempt: u32) {
        let name = job_name(self.obs.name, attempt);
        self.note(
            true,
            "JobRecreated",
            format!("Job {name} was deleted; recreating it"),
        );
        self.create_job(attempt);
    }

    fn follow(&mut self, job: &JobState) {
        let cluster = self.obs.cluster;
        self.requeue_within(self.obs.poll_interval);
        match (job.suspended, cluster.suspended()) {
            (false, true) => {
                self.d.actions.push(Action::SuspendJob(true));
                self.note(
                    false,
                    "Suspended",
                    "suspending the Job; the trainer saves its state".into(),
                );
                self.suspended();
            }
            (true, true) => self.suspended(),
            // Kueue unsuspends a queued Job when it admits it; the operator never does.
            (true, false) if cluster.queue_name.is_some() => self.queued(),
            (true, false) => {
                self.d.actions.push(Action::SuspendJob(false));
                self.note(false, "Resumed", "resuming the Job".into());
                self.condition(ConditionType::Suspended, false, "Resumed", "");
                self.set_phase(Phase::Pending, "resuming: waiting for the trainer pod");
            }
            (false, false) => self.track_pod(),
        }
    }

    fn track_pod(&mut self) {
        let obs = self.obs;
        self.condition(ConditionType::Suspended, false, "NotSuspended", "");
        if obs.status.start_time.is_none() {
            self.d.status.start_time = Some(obs.now.to_string());
        }
        let running = obs
            .pod
            .as_ref()
            .is_some_and(|p| p.phase == PodPhase::Running);
        if !running {
            self.set_phase(Phase::Pending, "waiting for the trainer pod");
            return;
        }
        if obs.status.phase != Phase::Running {
            let attempt = obs.status.attempts;
            self.note(
                false,
                "Running",
                format!("attempt {attempt}: the trainer is running"),
            );
        }
        self.set_phase(Phase::Running, "training");
        self.condition(
            ConditionType::Running,
            true,
            "TrainerRunning",
            &format!("attempt {}", obs.status.attempts),
        );
        self.condition(ConditionType::Restarting, false, "TrainerRunning", "");
        if let Some(progress) = &obs.progress {
            self.apply_progress(progress);
        }
    }

    fn apply_progress(&mut self, progress: &Progress) {
        let status = &mut self.d.status;
        status.stage = Some(progress.stage);
        status.step = progress.step;
        status.total_steps = Some(progress.total_steps);
        status.loss = progress.loss;
        status.steps_per_second = progress.steps_per_second;
        status.eta_seconds = progress.eta_seconds.or_else(|| {
            Progress::estimate_eta(
                progress.step,
                progress.total_steps,
                progress.steps_per_second,
            )
        });
        status.checkpoints = progress.checkpoints.clone();
        status.samples = progress.samples.clone();
    }

    fn succeed(&mut self) {
        let obs = self.obs;
        let outcome = self.outcome();
        let status = &mut self.d.status;
        status.stage = Some(Stage::Done);
        status.eta_seconds = None;
        if let Some(outcome) = &outcome {
            status.step = outcome.step;
            status.manifest = outcome.manifest_uri.clone();
        }
        status.model = Some(format!(
            "{}/{}.safetensors",
            obs.output_uri.trim_end_matches('/'),
            obs.name
        ));
        let model = status.model.clone().unwrap_or_default();
        self.set_phase(Phase::Succeeded, &format!("the model is at {model}"));
        self.condition(ConditionType::Running, false, "Completed", "");
        self.condition(ConditionType::Restarting, false, "Completed", "");
        self.condition(ConditionType::Succeeded, true, "Completed", &model);
        self.note(false, "Succeeded", format!("training finished: {model}"));
        self.expire_after_ttl();
    }

    fn pod_failed(&self) -> bool {
        self.obs
            .pod
            .as_ref()
            .is_some_and(|p| p.phase == PodPhase::Failed)
    }

    /// The trainer's `Outcome`, when the termination message holds one.
    fn outcome(&self) -> Option<Outcome> {
        let message = self
            .obs
            .pod
            .as_ref()?
            .terminated
            .as_ref()?
            .message
            .as_deref()?;
        serde_json::from_str(message.trim()).ok()
    }

    fn retry_or_fail(&mut self, job: &JobState, attempt: u32) {
        let obs = self.obs;
        let termination = obs.pod.as_ref().and_then(|p| p.terminated.as_ref());
        let outcome = self.outcome();
        let kind = match (&outcome, termination) {
            (Some(outcome), _) => outcome.outcome,
            (None, Some(t)) => ExitKind::from_code(t.exit_code),
            // No pod left to ask (node lost, pod deleted): assume the infrastructure.
            (None, None) => ExitKind::Preempted,
        };
        let message = outcome
            .and_then(|o| o.message)
            .or_else(|| {
                termination
                    .and_then(|t| t.message.clone())
                    .map(|m| m.trim().to_owned())
            })
            .or_else(|| {
                job.failed
                    .as_ref()
                    .map(|(reason, message)| format!("{reason}: {message}"))
            })
            .unwrap_or_else(|| "the trainer pod is gone".into());
        if !kind.is_retriable() {
            let reason = match kind {
                ExitKind::BadConfig => "BadConfig",
                ExitKind::BadData => "BadData",
                _ => "TrainerFailed",
            };
            return self.fail(reason, message);
        }
        let limit = obs.cluster.backoff_limit();
        if attempt > limit {
            return self.fail(
                "BackoffLimitExceeded",
                format!("{attempt} attempts failed (backoffLimit {limit}); the last: {message}"),
            );
        }
        let failed_at = termination
            .and_then(|t| t.finished_at)
            .or(job.finished_at)
            .unwrap_or(obs.now);
        let wait = retry_delay(attempt);
        let ready_at = failed_at + SignedDuration::try_from(wait).expect("at most 10 minutes");
        self.condition(ConditionType::Running, false, "AttemptFailed", &message);
        if obs.now < ready_at {
            let left = ready_at.duration_since(obs.now).unsigned_abs();
            let line = format!(
                "attempt {attempt} failed ({kind:?}): {message}; attempt {} starts after {}s",
                attempt + 1,
                wait.as_secs()
            );
            if self.condition(ConditionType::Restarting, true, "BackingOff", &line) {
                self.note(true, "AttemptFailed", line.clone());
            }
            self.set_phase(Phase::Pending, &line);
            self.d.requeue_after = Some(left.max(Duration::from_secs(1)));
            return;
        }
        let next = attempt + 1;
        self.condition(
            ConditionType::Restarting,
            true,
            "Resuming",
            &format!("attempt {next} resumes from the latest checkpoint"),
        );
        self.note(
            false,
            "Restarting",
            format!("starting attempt {next}, resuming from the latest checkpoint"),
        );
        self.create_job(next);
    }

    /// Enforced by the operator across attempts, from the session's start.
    fn past_deadline(&mut self) -> bool {
        let obs = self.obs;
        let (Some(limit), Some(start)) = (
            obs.cluster.active_deadline_seconds,
            obs.status
                .start_time
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok()),
        ) else {
            return false;
        };
        let deadline = start + SignedDuration::from_secs(limit);
        if obs.now < deadline {
            let left = deadline.duration_since(obs.now).unsigned_abs();
            self.d.requeue_after = Some(left);
            return false;
        }
        if obs
            .job
            .as_ref()
            .is_some_and(|j| !j.complete && j.failed.is_none())
        {
            self.d.actions.push(Action::DeleteJob);
        }
        self.fail(
            "DeadlineExceeded",
            format!("activeDeadlineSeconds ({limit}s) passed"),
        );
        true
    }

    fn expire_after_ttl(&mut self) {
        let obs = self.obs;
        let Some(ttl) = obs.cluster.ttl_seconds_after_finished else {
            return;
        };
        let finished = self
            .d
            .status
            .completion_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .unwrap_or(obs.now);
        let expires = finished + SignedDuration::from_secs(i64::from(ttl));
        if obs.now >= expires {
            self.d.actions.push(Action::DeleteSession);
            self.note(false, "Deleted", format!("ttlSecondsAfterFinished ({ttl}s) passed; deleting the session (outputs in storage stay)"));
        } else {
            let left = expires.duration_since(obs.now).unsigned_abs();
            self.d.requeue_after = Some(left.max(Duration::from_secs(1)));
        }
    }

    fn fail(&mut self, reason: &'static str, message: String) {
        self.set_phase(Phase::Failed, &message);
        self.d.status.eta_seconds = None;
        self.condition(ConditionType::Running, false, reason, "");
        self.condition(ConditionType::Restarting, false, reason, "");
        self.condition(ConditionType::Failed, true, reason, &message);
        self.note(true, reason, message);
        self.d.requeue_after = None;
        // The completion time is set by `decide`; TTL counts from it.
        self.d
            .status
            .completion_time
            .get_or_insert_with(|| self.obs.now.to_string());
        self.expire_after_ttl();
    }

    fn suspended(&mut self) {
        self.set_phase(
            Phase::Suspended,
            "suspended: set spec.suspend to false to resume",
        );
        self.condition(ConditionType::Suspended, true, "SuspendedByUser", "");
        self.condition(ConditionType::Running, false, "Suspended", "");
    }

    fn queued(&mut self) {
        let queue = self.obs.cluster.queue_name.as_deref().unwrap_or_default();
        self.set_phase(
            Phase::Pending,
            &format!("waiting for Kueue to admit the Job through queue {queue}"),
        );
        self.condition(ConditionType::Suspended, false, "Queued", queue);
    }

    fn set_phase(&mut self, phase: Phase, message: &str) {
        self.d.status.phase = phase;
        self.d.status.message = Some(message.to_owned());
    }

    /// Sets a condition; true when its status flipped (or it is new).
    fn condition(&mut self, type_: ConditionType, on: bool, reason: &str, message: &str) -> bool {
        let obs = self.obs;
        set_condition(
            &mut self.d.status.conditions,
            type_,
            on,
            reason,
            message,
            obs.now,
            obs.generation,
        )
    }

    fn note(&mut self, warning: bool, reason: &'static str, message: String) {
        self.d.events.push(Note {
            warning,
            reason,
            message,
        });
    }
}

/// The wait before attempt `failed + 1`: exponential from 10 s, capped at 10 minutes.
pub fn retry_delay(failed_attempt: u32) -> Duration {
    let factor = 1u32 << failed_attempt.saturating_sub(1).min(10);
    (RETRY_BASE * factor).min(RETRY_MAX)
}

/// Updates or adds one condition; the transition time changes only when the status does,
/// so an unchanged session writes an identical status.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: ConditionType,
    on: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
    generation: Option<i64>,
) -> bool {
    let status = if on { "True" } else { "False" };
    let fresh = Condition {
        type_,
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: now.to_string(),
        observed_generation: generation,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) if existing.status == status => {
            existing.reason = fresh.reason;
            existing.message = fresh.message;
            existing.observed_generation = generation;
            false
        }
        Some(existing) => {
            *existing = fresh;
            true
        }
        None => {
            conditions.push(fresh);
            true
        }
    }
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
