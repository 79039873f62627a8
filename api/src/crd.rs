//! The `DreamBoothSession` custom resource: the session spec plus the fields only a
//! cluster needs. Behind the `crd` feature so the trainer never compiles kube.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, LocalObjectReference, Toleration};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, json_schema};
use serde::{Deserialize, Serialize};

use crate::spec::SessionSpec;
use crate::status::SessionStatus;

/// The training part of the spec: fixed once the session exists, since a running or
/// resumed trainer must keep training the same thing. A field may be neither added
/// nor removed nor changed; placement and lifecycle fields stay editable.
const IMMUTABLE_TRAINING_RULE: &str = "has(self.baseModel) == has(oldSelf.baseModel) && (!has(self.baseModel) || self.baseModel == oldSelf.baseModel) \
&& has(self.dataset) == has(oldSelf.dataset) && (!has(self.dataset) || self.dataset == oldSelf.dataset) \
&& has(self.training) == has(oldSelf.training) && (!has(self.training) || self.training == oldSelf.training) \
&& has(self.checkpoints) == has(oldSelf.checkpoints) && (!has(self.checkpoints) || self.checkpoints == oldSelf.checkpoints) \
&& has(self.samples) == has(oldSelf.samples) && (!has(self.samples) || self.samples == oldSelf.samples) \
&& has(self.output) == has(oldSelf.output) && (!has(self.output) || self.output == oldSelf.output) \
&& has(self.storage) == has(oldSelf.storage) && (!has(self.storage) || self.storage == oldSelf.storage)";

/// A DreamBooth fine-tuning session: photos of a subject in, a personalised model out.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[kube(
    group = "dreambooth.dev",
    derive = "Default",
    version = "v1alpha1",
    kind = "DreamBoothSession",
    namespaced,
    shortname = "dbs",
    status = "SessionStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Stage","type":"string","jsonPath":".status.stage"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.step"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.totalSteps"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": IMMUTABLE_TRAINING_RULE,
    "message": "baseModel, dataset, training, checkpoints, samples, output and storage cannot change once the session exists; create a new session instead"
}]))]
pub struct DreamBoothSessionSpec {
    #[serde(flatten)]
    pub session: SessionSpec,
    #[serde(flatten)]
    pub cluster: ClusterSpec,
}

/// Where and how the training Job runs, and the session's lifecycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// GPUs, CPU, memory and cache size of the trainer pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Node labels the trainer pod must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the trainer pod (the `core/v1` Toleration shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "kubernetes_object_list")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity of the trainer pod (the `core/v1` Affinity shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "kubernetes_object")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Kueue `LocalQueue` to admit the Job through; the Job is then created suspended
    /// and Kueue decides when it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    /// Trainer image; default: the operator's `--trainer-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "kubernetes_object_list")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Stop the session (the trainer saves its state, no pod runs) until set back to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// Attempts after the first, each resuming from the latest checkpoint. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<u32>,
    /// Seconds from the session's start after which it fails, all attempts together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Seconds after the session finished when the operator deletes it (its Jobs and
    /// ConfigMap go with it; the outputs in storage stay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
}

pub const DEFAULT_BACKOFF_LIMIT: u32 = 3;
pub const DEFAULT_GPU_RESOURCE_NAME: &str = "nvidia.com/gpu";

impl ClusterSpec {
    pub fn backoff_limit(&self) -> u32 {
        self.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT)
    }

    pub fn suspended(&self) -> bool {
        self.suspend.unwrap_or(false)
    }
}

/// The trainer pod's resources. Quantities use Kubernetes notation (`8`, `32Gi`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// GPUs to request (as a limit). 0 runs on the CPU.
    #[serde(default = "default_gpus")]
    pub gpus: u32,
    /// The extended resource that counts GPUs.
    #[serde(default = "default_gpu_resource_name")]
    pub gpu_resource_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Size of the cache emptyDir (base model, latents); also requested as ephemeral storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<String>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            gpus: default_gpus(),
            gpu_resource_name: default_gpu_resource_name(),
            cpu: None,
            memory: None,
            ephemeral_storage: None,
        }
    }
}

fn default_gpus() -> u32 {
    1
}

fn default_gpu_resource_name() -> String {
    DEFAULT_GPU_RESOURCE_NAME.into()
}

/// A Kubernetes core type kept as-is: the API server validates it when the Job is created,
/// so the CRD need not repeat its large schema.
fn kubernetes_object(_: &mut schemars::SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn kubernetes_object_list(_: &mut schemars::SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}
