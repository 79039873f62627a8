//! The ConfigMap and Job of one attempt of a session: pure functions of the session, the
//! attempt number and the operator's settings. Reconcile and `render` both use them, so
//! what a user renders is exactly what the cluster gets.

use std::collections::BTreeMap;

use dreambooth_api::crd::{DreamBoothSession, Resources};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

/// Labels shared with the trainer contract and the PodMonitor.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const SESSION_LABEL: &str = "dreambooth.dev/session";
pub const ATTEMPT_LABEL: &str = "dreambooth.dev/attempt";
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
pub const TRAINER_NAME: &str = "dreambooth-trainer";
pub const OPERATOR_NAME: &str = "dreambooth-operator";

/// Where the pod finds its session and keeps its cache.
pub const CONFIG_KEY: &str = "session.json";
pub const CONFIG_DIR: &str = "/etc/dreambooth";
pub const CACHE_DIR: &str = "/var/cache/dreambooth";
pub const TERMINATION_LOG: &str = "/dev/termination-log";
pub const TRAINER_PORT: u16 = 9090;
pub const TRAINER_CONTAINER: &str = "trainer";
/// Exit codes that fail the Job at once (bad config, bad data); see `ExitKind`.
const PERMANENT_EXIT_CODES: [i32; 2] = [64, 65];
/// The nobody-like user of distroless images; the trainer needs no privileges.
const TRAINER_UID: i64 = 65532;
/// Time for the trainer to save its state after SIGTERM (suspend, preemption).
const TERMINATION_GRACE_SECONDS: i64 = 120;

/// What the operator adds to every Job, from its flags.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobSettings {
    /// Used when the session names no `image`.
    pub default_image: String,
    /// The cluster's object store, for sessions whose `storage` names none.
    pub default_storage: StorageDefaults,
}

/// The operator's default object store (`--storage-endpoint` and friends).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StorageDefaults {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
}

/// `<session>-<attempt>`: one Job per attempt, so every retry is a fresh pod that resumes.
pub fn job_name(session: &str, attempt: u32) -> String {
    format!("{session}-{attempt}")
}

/// The ConfigMap holding the session JSON; one per session, shared by its attempts.
pub fn config_map_name(session: &str) -> String {
    format!("{session}-session")
}

/// The kubectl-style manifest the trainer reads from `/etc/dreambooth/session.json`: the
/// training spec with every default filled in (the cluster's object store included), and
/// none of the cluster-only fields.
pub fn session_json(session: &DreamBoothSession, settings: &JobSettings) -> String {
    let mut spec = session.spec.session.clone();
    let defaults = &settings.default_storage;
    if spec.storage.endpoint.is_none() && defaults.endpoint.is_some() {
        spec.storage.endpoint = defaults.endpoint.clone();
        spec.storage.force_path_style |= defaults.force_path_style;
    }
    if spec.storage.region.is_none() {
        spec.storage.region = defaults.region.clone();
    }
    let manifest = json!({
        "apiVersion": DreamBoothSession::api_version(&()),
        "kind": DreamBoothSession::kind(&()),
        "metadata": {"name": session.name_any()},
        "spec": spec,
    });
    serde_json::to_string_pretty(&manifest).expect("a session serialises")
}

pub fn build_config_map(session: &DreamBoothSession, settings: &JobSettings) -> ConfigMap {
    let name = session.name_any();
    let mut metadata = json!({
        "name": config_map_name(&name),
        "labels": session_labels(&name),
    });
    set_namespace_and_owner(&mut metadata, session);
    from_json(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {CONFIG_KEY: session_json(session, settings)},
    }))
}

/// The Job of one attempt. It never retries by itself (`backoffLimit: 0`): the operator
/// counts attempts, so each retry is a new Job whose trainer resumes from the latest state.
pub fn build_job(session: &DreamBoothSession, attempt: u32, settings: &JobSettings) -> Job {
    let name = session.name_any();
    let cluster = &session.spec.cluster;
    let mut labels = session_labels(&name);
    labels.insert(ATTEMPT_LABEL.into(), attempt.to_string());
    let mut job_labels = labels.clone();
    if let Some(queue) = &cluster.queue_name {
        job_labels.insert(KUEUE_QUEUE_LABEL.into(), queue.clone());
    }
    let mut metadata = json!({"name": job_name(&name, attempt), "labels": job_labels});
    set_namespace_and_owner(&mut metadata, session);

    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [trainer_container(session, settings)],
        "volumes": volumes(session),
    });
    let optional = [
        ("nodeSelector", to_json(&cluster.node_selector)),
        ("tolerations", to_json(&cluster.tolerations)),
        ("affinity", to_json(&cluster.affinity)),
        ("priorityClassName", to_json(&cluster.priority_class_name)),
        ("imagePullSecrets", to_json(&cluster.image_pull_secrets)),
        ("serviceAccountName", to_json(&cluster.service_account_name)),
    ];
    for (field, value) in optional {
        if !value.is_null() {
            pod_spec[field] = value;
        }
    }

    from_json(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 0,
            // Kueue admits a queued Job by unsuspending it; a suspended session starts
            // suspended. The operator flips `suspend` later only for the session's own flag.
            "suspend": cluster.queue_name.is_some() || cluster.suspended(),
            "podFailurePolicy": {"rules": [
                // Preemption, eviction, node drain: the Job makes a new pod, not a failure.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {"action": "FailJob", "onExitCodes": {
                    "containerName": TRAINER_CONTAINER,
                    "operator": "In",
                    "values": PERMANENT_EXIT_CODES,
                }},
            ]},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": TRAINER_PORT.to_string(),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }))
}

fn trainer_container(session: &DreamBoothSession, settings: &JobSettings) -> Value {
    let cluster = &session.spec.cluster;
    let image = cluster
        .image
        .clone()
        .unwrap_or_else(|| settings.default_image.clone());
    let listen = format!("0.0.0.0:{TRAINER_PORT}");
    let config = format!("{CONFIG_DIR}/{CONFIG_KEY}");
    let mut env = vec![json!({"name": "HOME", "value": "/tmp"})];
    if let Some(secret) = &session.spec.session.storage.credentials_secret {
        for (var, key) in [
            ("AWS_ACCESS_KEY_ID", &secret.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", &secret.secret_access_key_key),
        ] {
            env.push(json!({
                "name": var,
                "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}},
            }));
        }
    }
    json!({
        "name": TRAINER_CONTAINER,
        "image": image,
        "command": [TRAINER_NAME],
        "args": [
            "train", config,
            "--listen", listen,
            "--termination-log", TERMINATION_LOG,
            "--cache-dir", CACHE_DIR,
        ],
        "env": env,
        "ports": [{"name": "metrics", "containerPort": TRAINER_PORT, "protocol": "TCP"}],
        "resources": resource_requirements(cluster.resources.as_ref()),
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "periodSeconds": 10,
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "session", "mountPath": CONFIG_DIR, "readOnly": true},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    })
}

/// GPUs as a limit (extended resources need request == limit, so the limit suffices);
/// CPU, memory and ephemeral storage as request and limit alike, so the pod is not
/// evicted for using what it asked for.
fn resource_requirements(resources: Option<&Resources>) -> Value {
    let defaults = Resources::default();
    let resources = resources.unwrap_or(&defaults);
    let mut requests = serde_json::Map::new();
    let mut limits = serde_json::Map::new();
    if resources.gpus > 0 {
        limits.insert(
            resources.gpu_resource_name.clone(),
            resources.gpus.to_string().into(),
        );
    }
    for (key, value) in [
        ("cpu", &resources.cpu),
        ("memory", &resources.memory),
        ("ephemeral-storage", &resources.ephemeral_storage),
    ] {
        if let Some(value) = value {
            requests.insert(key.into(), value.clone().into());
            limits.insert(key.into(), value.clone().into());
        }
    }
    let mut out = json!({});
    if !requests.is_empty() {
        out["requests"] = requests.into();
    }
    if !limits.is_empty() {
        out["limits"] = limits.into();
    }
    out
}

fn volumes(session: &DreamBoothSession) -> Value {
    let cache_size = session
        .spec
        .cluster
        .resources
        .as_ref()
        .and_then(|r| r.ephemeral_storage.clone());
    let mut cache = json!({});
    if let Some(size) = cache_size {
        cache["sizeLimit"] = size.into();
    }
    json!([
        {"name": "session", "configMap": {"name": config_map_name(&session.name_any())}},
        {"name": "cache", "emptyDir": cache},
        {"name": "tmp", "emptyDir": {}},
    ])
}

fn session_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.into(), TRAINER_NAME.into()),
        (MANAGED_BY_LABEL.into(), OPERATOR_NAME.into()),
        (SESSION_LABEL.into(), name.into()),
    ])
}

/// The namespace, and the session as controlling owner when it has a uid (a session
/// read from a file for `render` has none), so deleting the session deletes its children.
fn set_namespace_and_owner(metadata: &mut Value, session: &DreamBoothSession) {
    if let Some(namespace) = session.namespace() {
        metadata["namespace"] = namespace.into();
    }
    if let Some(owner) = owner_reference(session) {
        metadata["ownerReferences"] = json!([owner]);
    }
}

pub fn owner_reference(session: &DreamBoothSession) -> Option<OwnerReference> {
    session.controller_owner_ref(&())
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("Kubernetes types serialise")
}

/// Every literal above is a valid object of its type; a failure is a bug here.
fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("the builder writes valid Kubernetes objects")
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
