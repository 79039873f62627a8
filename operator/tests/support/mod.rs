//! An in-memory cluster for lifecycle tests: the fake API server holds the sessions,
//! Jobs, pods and events; the test plays the Job controller and the kubelet (it makes
//! pods and sets their state); a real HTTP server on 127.0.0.1 stands in for the
//! trainer's `/progress`.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dreambooth_api::crd::{ClusterSpec, DreamBoothSession, DreamBoothSessionSpec};
use dreambooth_api::{ExitKind, Outcome, Progress, SessionSpec};
use dreambooth_operator::controller::{Context, Settings, reconcile};
use dreambooth_operator::http::{Reply, serve};
use dreambooth_operator::job::JobSettings;
use dreambooth_operator::metrics::OperatorMetrics;
use dreambooth_operator::progress::ProgressClient;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};
use kube_fake_client::ClientBuilder;
use serde_json::json;

pub const NAMESPACE: &str = "studio";
pub const START: &str = "2026-03-01T12:00:00Z";

/// (method, path and query) of every request the operator's client made.
pub type Calls = Arc<Mutex<Vec<(String, String)>>>;

pub struct Cluster {
    pub client: Client,
    pub calls: Calls,
    pub ctx: Arc<Context>,
    pub clock: Arc<Mutex<Timestamp>>,
    /// What the stand-in trainer answers on `/progress`; `None` answers 503.
    pub progress: Arc<Mutex<Option<Progress>>>,
    pub sessions: Api<DreamBoothSession>,
    pub jobs: Api<Job>,
    pub pods: Api<Pod>,
    pub config_maps: Api<ConfigMap>,
    pub events: Api<Event>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub fn spec() -> DreamBoothSessionSpec {
    let mut session = SessionSpec::default();
    session.dataset.uri = "s3://data/anna".into();
    session.dataset.token = Some("sksanna".into());
    session.output.uri = "s3://out/anna".into();
    DreamBoothSessionSpec {
        session,
        cluster: ClusterSpec::default(),
    }
}

impl Cluster {
    pub async fn new() -> Cluster {
        Cluster::with_settings(None).await
    }

    pub async fn with_settings(max_running_sessions: Option<u32>) -> Cluster {
        let client = ClientBuilder::new()
            .with_resource::<DreamBoothSession>()
            .with_status_subresource::<DreamBoothSession>()
            .build()
            .await
            .expect("the fake API server starts");
        let progress: Arc<Mutex<Option<Progress>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = progress.clone();
        let server = tokio::spawn(serve(listener, move |path| {
            match (path, served.lock().unwrap().as_ref()) {
                ("/progress", Some(p)) => Reply::json(serde_json::to_string(p).unwrap()),
                _ => Reply::text(503, "not ready"),
            }
        }));
        let clock = Arc::new(Mutex::new(START.parse::<Timestamp>().unwrap()));
        let now = clock.clone();
        let settings = Settings {
            job: JobSettings {
                default_image: "trainer:test".into(),
                ..Default::default()
            },
            poll_interval: Duration::from_secs(15),
            max_running_sessions,
            namespaces: Vec::new(),
        };
        let calls: Calls = Arc::default();
        let ctx = Context::new(
            recording(client.clone(), calls.clone()),
            OperatorMetrics::new(),
            settings,
            ProgressClient::new(port, Duration::from_secs(2)),
        )
        .with_clock(Arc::new(move || *now.lock().unwrap()));
        Cluster {
            sessions: Api::namespaced(client.clone(), NAMESPACE),
            jobs: Api::namespaced(client.clone(), NAMESPACE),
            pods: Api::namespaced(client.clone(), NAMESPACE),
            config_maps: Api::namespaced(client.clone(), NAMESPACE),
            events: Api::namespaced(client.clone(), NAMESPACE),
            client,
            calls,
            ctx: Arc::new(ctx),
            clock,
            progress,
            server,
        }
    }

    pub fn advance(&self, seconds: i64) {
        let mut now = self.clock.lock().unwrap();
        *now += SignedDuration::from_secs(seconds);
    }

    pub fn now(&self) -> Timestamp {
        *self.clock.lock().unwrap()
    }

    pub async fn create(&self, name: &str, spec: DreamBoothSessionSpec) -> DreamBoothSession {
        let mut session = DreamBoothSession::new(name, spec);
        session.metadata.namespace = Some(NAMESPACE.into());
        self.sessions
            .create(&PostParams::default(), &session)
            .await
            .unwrap()
    }

    pub async fn session(&self, name: &str) -> DreamBoothSession {
        self.sessions.get(name).await.unwrap()
    }

    /// One reconcile of the session as stored now.
    pub async fn reconcile(&self, name: &str) -> Action {
        let session = self.session(name).await;
        reconcile(Arc::new(session), self.ctx.clone())
            .await
            .expect("reconcile succeeds")
    }

    pub async fn job_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .jobs
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|j| j.name_any())
            .collect();
        names.sort();
        names
    }

    /// A session created with the default spec whose first attempt's pod is running,
    /// reconciled after each step.
    pub async fn start_running(&self, name: &str) {
        self.create(name, spec()).await;
        self.reconcile(name).await;
        self.pod(name, 1, "Running", None).await;
        self.reconcile(name).await;
    }

    /// The (group, resource, verb) of every request made so far.
    pub fn rbac_used(&self) -> BTreeSet<(String, String, String)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(method, uri)| rbac_triple(method, uri))
            .collect()
    }

    /// Attempt `attempt`'s pod ended well after `step` steps (exit 0, the trainer's
    /// termination message).
    pub async fn pod_succeeded(&self, session: &str, attempt: u32, step: u32) {
        let message = outcome(Outcome {
            outcome: ExitKind::Succeeded,
            step,
            manifest_uri: None,
            message: None,
        });
        self.pod(session, attempt, "Succeeded", Some((0, message)))
            .await;
    }

    /// The kubelet: a pod of `job` in `phase`, on 127.0.0.1 where the stand-in trainer listens.
    pub async fn pod(&self, session: &str, attempt: u32, phase: &str, exit: Option<(i32, String)>) {
        let name = format!("{session}-{attempt}-pod");
        let mut status = json!({"phase": phase, "podIP": "127.0.0.1"});
        if let Some((code, message)) = exit {
            status["containerStatuses"] = json!([{
                "name": "trainer", "image": "trainer:test", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"terminated": {
                    "exitCode": code, "message": message,
                    "finishedAt": self.now().to_string(),
                }},
            }]);
        }
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "creationTimestamp": self.now().to_string(),
                "labels": {
                    "dreambooth.dev/session": session,
                    "dreambooth.dev/attempt": attempt.to_string(),
                },
            },
            "spec": {"containers": [{"name": "trainer", "image": "trainer:test"}]},
            "status": status,
        }))
        .unwrap();
        match self.pods.get_opt(&name).await.unwrap() {
            Some(_) => {
                let patch = json!({"status": pod.status});
                self.pods
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap();
            }
            None => {
                self.pods
                    .create(&PostParams::default(), &pod)
                    .await
                    .unwrap();
            }
        }
    }

    /// The Job controller: marks a Job `Complete` or `Failed`.
    pub async fn finish_job(&self, job: &str, condition: &str) {
        let patch = json!({"status": {"conditions": [{
            "type": condition, "status": "True", "reason": "Test",
            "message": "set by the test", "lastTransitionTime": self.now().to_string(),
        }]}});
        self.jobs
            .patch(job, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Kueue admitting a queued Job.
    pub async fn unsuspend(&self, job: &str) {
        let patch = json!({"spec": {"suspend": false}});
        self.jobs
            .patch(job, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    pub async fn delete_job(&self, job: &str) {
        self.jobs
            .delete(job, &DeleteParams::default())
            .await
            .unwrap();
    }

    pub async fn event_reasons(&self) -> Vec<String> {
        self.events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect()
    }

    pub fn serve_progress(&self, progress: Option<Progress>) {
        *self.progress.lock().unwrap() = progress;
    }
}

pub fn outcome(outcome: Outcome) -> String {
    outcome.to_termination_message()
}

/// The same API, with every request the operator makes written down first.
fn recording(client: Client, calls: Calls) -> Client {
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        calls
            .lock()
            .unwrap()
            .push((request.method().to_string(), request.uri().to_string()));
        let client = client.clone();
        async move { client.send(request).await }
    });
    Client::new(service, "default")
}

/// (API group, resource, verb) of a recorded request, as RBAC sees it.
pub fn rbac_triple(method: &str, uri: &str) -> (String, String, String) {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("unexpected path {path}"),
    };
    let rest = match rest {
        ["namespaces", _namespace, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected path {path}"),
    };
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if query.contains("watch=true") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", _) => "delete",
        _ => panic!("unexpected method {method}"),
    };
    (group.to_owned(), resource, verb.to_owned())
}
