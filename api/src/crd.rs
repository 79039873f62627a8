//! The `DreamBoothSession` custom resource: the session spec plus the fields only a
//! cluster needs. Behind the `crd` feature so the trainer never compiles kube.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::SessionSpec;
use crate::status::SessionStatus;

/// A DreamBooth fine-tuning session: photos of a subject in, a personalised model out.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "dreambooth.dev",
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
pub struct DreamBoothSessionSpec {
    #[serde(flatten)]
    pub session: SessionSpec,
    #[serde(flatten)]
    pub cluster: ClusterSpec,
}

/// Where and how the training Job runs. The "Operator" work fills these in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Stop the session (no pod runs) until set back to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// Kueue `LocalQueue` to admit the Job through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    /// Trainer image; default: the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Attempts after the first that resume from the latest checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<i32>,
}
