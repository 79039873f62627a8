//! The reconcile loop: reads a session's Job, pod and progress, asks the state machine
//! what comes next, and carries it out. The only module that talks to the Kubernetes API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dreambooth_api::crd::DreamBoothSession;
use dreambooth_api::{Phase, SessionStatus};
use std::pin::Pin;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use crate::job::{self, JobSettings, OPERATOR_NAME, build_config_map, build_job, job_name};
use crate::metrics::{OperatorMetrics, phase_label};
use crate::progress::ProgressClient;
use crate::status::{self, JobState, Observation, PodPhase, PodState, Termination};

/// The one field manager of every server-side apply and patch.
pub const FIELD_MANAGER: &str = "dreambooth-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("session {0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// The `kind` label of `dreambooth_operator_reconcile_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "client",
            Error::NoNamespace(_) => "spec",
        }
    }
}

/// The operator's settings, from its flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub job: JobSettings,
    /// How often a running trainer's progress is read.
    pub poll_interval: Duration,
    /// Sessions that may hold a Job at once over the watched namespaces; `None`: no limit.
    pub max_running_sessions: Option<u32>,
    /// The watched namespaces; empty: all.
    pub namespaces: Vec<String>,
}

pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: OperatorMetrics,
    pub settings: Settings,
    pub progress: ProgressClient,
    /// The time; tests replace it to cross backoffs, deadlines and TTLs.
    pub clock: Clock,
    /// Consecutive reconcile errors per session, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The last phase seen per session, for the sessions-by-phase gauge.
    phases: Mutex<HashMap<String, Phase>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: OperatorMetrics,
        settings: Settings,
        progress: ProgressClient,
    ) -> Context {
        let reporter = Reporter {
            controller: OPERATOR_NAME.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            progress,
            clock: Arc::new(Timestamp::now),
            failures: Mutex::default(),
            phases: Mutex::default(),
        }
    }

    pub fn with_clock(mut self, clock: Clock) -> Context {
        self.clock = clock;
        self
    }
}

/// Runs the controller over `namespaces` (all when empty) until `shutdown` resolves.
/// Each listed namespace gets its own watches, so namespaced Roles suffice.
pub async fn run(
    ctx: Arc<Context>,
    namespaces: &[String],
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown: Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>> = Box::pin(shutdown);
    let shutdown = shutdown.shared();
    let client = ctx.client.clone();
    let scopes: Vec<(Api<DreamBoothSession>, Api<Job>)> = if namespaces.is_empty() {
        vec![(Api::all(client.clone()), Api::all(client))]
    } else {
        namespaces
            .iter()
            .map(|ns| {
                (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                )
            })
            .collect()
    };
    let owned =
        watcher::Config::default().labels(&format!("{}={}", job::MANAGED_BY_LABEL, OPERATOR_NAME));
    let controllers = scopes.into_iter().map(|(sessions, jobs)| {
        Controller::new(sessions, watcher::Config::default())
            .owns(jobs, owned.clone())
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|result| async move {
                if let Err(error) = result {
                    warn!(%error, "reconcile failed");
                }
            })
    });
    futures::future::join_all(controllers).await;
}

/// One pass over a session: observe, decide, act, write the status if it changed.
#[instrument(skip_all, fields(session = %session.name_any(), namespace = session.namespace()))]
pub async fn reconcile(
    session: Arc<DreamBoothSession>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&session, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let key = object_key(&session);
    match &result {
        Ok(_) => {
            ctx.metrics.reconciliations.with_label_values(&["ok"]).inc();
            ctx.failures.lock().unwrap().remove(&key);
        }
        Err(error) => {
            ctx.metrics
                .reconciliations
                .with_label_values(&["error"])
                .inc();
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[error.kind()])
                .inc();
        }
    }
    result
}

/// Errors retry with their own backoff per session: 5 s doubling to 5 minutes.
pub fn error_policy(session: Arc<DreamBoothSession>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap();
    let count = failures.entry(object_key(&session)).or_insert(0);
    *count += 1;
    let delay =
        (Duration::from_secs(5) * (1u32 << (*count - 1).min(6))).min(Duration::from_secs(300));
    warn!(session = %session.name_any(), %error, ?delay, "reconcile error; retrying");
    Action::requeue(delay)
}

async fn reconcile_inner(session: &DreamBoothSession, ctx: &Context) -> Result<Action, Error> {
    let name = session.name_any();
    let namespace = session
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let client = ctx.client.clone();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let stored = session.status.clone().unwrap_or_default();
    let now = (ctx.clock)();

    let attempt = stored.attempts;
    let job = match attempt {
        0 => None,
        n => jobs.get_opt(&job_name(&name, n)).await?,
    };
    let pod = match &job {
        Some(_) if !stored.phase.is_finished() => newest_pod(&pods, &name, attempt).await?,
        _ => None,
    };
    let progress = match pod.as_ref().and_then(|p| p.status.as_ref()?.pod_ip.clone()) {
        Some(ip) if pod_phase(pod.as_ref()) == PodPhase::Running => {
            match ctx.progress.poll(&ip).await {
                Ok(progress) => {
                    ctx.metrics.progress_polls.with_label_values(&["ok"]).inc();
                    Some(progress)
                }
                Err(error) => {
                    ctx.metrics
                        .progress_polls
                        .with_label_values(&["error"])
                        .inc();
                    warn!(%error, "progress poll failed; the status keeps its last values");
                    None
                }
            }
        }
        _ => None,
    };
    let report = dreambooth_api::validate(&name, &session.spec.session);
    let may_start = match (attempt, ctx.settings.max_running_sessions) {
        (0, Some(limit)) if report.is_valid() && !stored.phase.is_finished() => {
            has_capacity(&ctx.client, &ctx.settings.namespaces, session, limit).await?
        }
        _ => true,
    };
    let observation = Observation {
        now,
        name: &name,
        generation: session.metadata.generation,
        cluster: &session.spec.cluster,
        output_uri: &session.spec.session.output.uri,
        problems: report.errors().map(ToString::to_string).collect(),
        status: stored.clone(),
        job: job.as_ref().map(job_state),
        pod: pod.as_ref().map(pod_state),
        progress,
        may_start,
        poll_interval: ctx.settings.poll_interval,
    };
    let decision = status::decide(&observation);

    for action in &decision.actions {
        match action {
            status::Action::CreateJob { attempt } => {
                create_job(session, *attempt, ctx, &jobs).await?
            }
            status::Action::SuspendJob(suspend) => {
                let patch = json!({"spec": {"suspend": suspend}});
                let params = PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                jobs.patch(&job_name(&name, attempt), &params, &Patch::Merge(&patch))
                    .await?;
            }
            status::Action::DeleteJob => {
                delete_if_present(&jobs, &job_name(&name, attempt)).await?;
            }
            status::Action::DeleteSession => {
                publish(ctx, session, &decision.events).await;
                let sessions: Api<DreamBoothSession> = Api::namespaced(client, &namespace);
                delete_if_present(&sessions, &name).await?;
                forget(ctx, session);
                info!("deleted after ttlSecondsAfterFinished");
                return Ok(Action::await_change());
            }
        }
    }

    if session.status.is_none() || decision.status != stored {
        write_status(session, &namespace, &decision.status, ctx).await?;
    }
    record(ctx, session, &stored, &decision.status, job.as_ref(), now);
    publish(ctx, session, &decision.events).await;
    Ok(match decision.requeue_after {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

/// Creates the ConfigMap and the Job of `attempt` unless the Job exists already (a
/// repeated pass after a failed status write): a Job is applied once, so Kueue's
/// unsuspend and the user's later edits are never overwritten.
async fn create_job(
    session: &DreamBoothSession,
    attempt: u32,
    ctx: &Context,
    jobs: &Api<Job>,
) -> Result<(), Error> {
    let name = job_name(&session.name_any(), attempt);
    if jobs.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    let namespace = session.namespace().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let config_map = build_config_map(session, &ctx.settings.job);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    config_maps
        .patch(&config_map.name_any(), &params, &Patch::Apply(&config_map))
        .await?;
    let job = build_job(session, attempt, &ctx.settings.job);
    jobs.patch(&name, &params, &Patch::Apply(&job)).await?;
    ctx.metrics.jobs_created.inc();
    info!(job = %name, "created Job");
    Ok(())
}

async fn write_status(
    session: &DreamBoothSession,
    namespace: &str,
    status: &SessionStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let sessions: Api<DreamBoothSession> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({
        "apiVersion": DreamBoothSession::api_version(&()),
        "kind": DreamBoothSession::kind(&()),
        "status": status,
    });
    sessions
        .patch_status(
            &session.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// The newest pod of an attempt: a disruption makes the Job start a replacement.
async fn newest_pod(pods: &Api<Pod>, session: &str, attempt: u32) -> Result<Option<Pod>, Error> {
    let selector = format!(
        "{}={session},{}={attempt}",
        job::SESSION_LABEL,
        job::ATTEMPT_LABEL
    );
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    Ok(list
        .items
        .into_iter()
        .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0)))
}

/// FIFO admission under `--max-running-sessions`: sessions holding a Job count against
/// the limit, and older sessions still waiting go first.
async fn has_capacity(
    client: &Client,
    namespaces: &[String],
    session: &DreamBoothSession,
    limit: u32,
) -> Result<bool, Error> {
    let mut sessions = Vec::new();
    let scopes: Vec<Api<DreamBoothSession>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    for api in scopes {
        sessions.extend(api.list(&ListParams::default()).await?.items);
    }
    let key = |s: &DreamBoothSession| {
        (
            s.metadata.creation_timestamp.as_ref().map(|t| t.0),
            s.namespace(),
            s.name_any(),
        )
    };
    let mine = key(session);
    let mut running = 0u32;
    let mut ahead = 0u32;
    for other in &sessions {
        let status = other.status.clone().unwrap_or_default();
        if status.phase.is_finished() {
            continue;
        }
        if status.attempts > 0 {
            running += 1;
        } else if key(other) < mine {
            ahead += 1;
        }
    }
    Ok(running + ahead < limit)
}

fn job_state(job: &Job) -> JobState {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let condition = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
    };
    let finished = condition("Complete").or_else(|| condition("Failed"));
    JobState {
        suspended: job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false),
        complete: condition("Complete").is_some(),
        failed: condition("Failed").map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        }),
        finished_at: finished
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0),
    }
}

fn pod_phase(pod: Option<&Pod>) -> PodPhase {
    match pod.and_then(|p| p.status.as_ref()?.phase.as_deref()) {
        Some("Pending") => PodPhase::Pending,
        Some("Running") => PodPhase::Running,
        Some("Succeeded") => PodPhase::Succeeded,
        Some("Failed") => PodPhase::Failed,
        _ => PodPhase::Unknown,
    }
}

fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|all| all.iter().find(|c| c.name == job::TRAINER_CONTAINER))
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .map(|t| Termination {
            exit_code: t.exit_code,
            message: t.message.clone(),
            finished_at: t.finished_at.as_ref().map(|f| f.0),
        });
    PodState {
        phase: pod_phase(Some(pod)),
        ip: status.and_then(|s| s.pod_ip.clone()),
        terminated,
    }
}

/// Metrics that follow the status: phase counts, attempts, queue wait, duration.
fn record(
    ctx: &Context,
    session: &DreamBoothSession,
    before: &SessionStatus,
    after: &SessionStatus,
    job: Option<&Job>,
    now: Timestamp,
) {
    let metrics = &ctx.metrics;
    let namespace = session.namespace().unwrap_or_default();
    metrics
        .session_attempts
        .with_label_values(&[namespace.as_str(), session.name_any().as_str()])
        .set(i64::from(after.attempts));
    {
        let mut phases = ctx.phases.lock().unwrap();
        let previous = phases.insert(object_key(session), after.phase);
        if previous != Some(after.phase) {
            if let Some(previous) = previous {
                metrics
                    .sessions
                    .with_label_values(&[phase_label(previous)])
                    .dec();
            }
            metrics
                .sessions
                .with_label_values(&[phase_label(after.phase)])
                .inc();
        }
    }
    if before.phase != Phase::Running && after.phase == Phase::Running {
        let created = job
            .and_then(|j| j.metadata.creation_timestamp.as_ref())
            .map(|t| t.0);
        if let Some(created) = created {
            metrics
                .queue_wait
                .observe(now.duration_since(created).as_secs_f64().max(0.0));
        }
    }
    if !before.phase.is_finished() && after.phase.is_finished() {
        let start = after
            .start_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .or_else(|| session.metadata.creation_timestamp.as_ref().map(|t| t.0));
        if let Some(start) = start {
            metrics
                .session_duration
                .with_label_values(&[phase_label(after.phase)])
                .observe(now.duration_since(start).as_secs_f64().max(0.0));
        }
    }
}

fn forget(ctx: &Context, session: &DreamBoothSession) {
    if let Some(phase) = ctx.phases.lock().unwrap().remove(&object_key(session)) {
        ctx.metrics
            .sessions
            .with_label_values(&[phase_label(phase)])
            .dec();
    }
    let namespace = session.namespace().unwrap_or_default();
    let _ = ctx
        .metrics
        .session_attempts
        .remove_label_values(&[namespace.as_str(), session.name_any().as_str()]);
}

/// Events are best effort: a rejected event must not stop the session's progress.
async fn publish(ctx: &Context, session: &DreamBoothSession, notes: &[status::Note]) {
    let reference = session.object_ref(&());
    for note in notes {
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(truncate(&note.message, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            warn!(%error, reason = note.reason, "could not publish an event");
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn object_key(session: &DreamBoothSession) -> String {
    format!(
        "{}/{}",
        session.namespace().unwrap_or_default(),
        session.name_any()
    )
}
