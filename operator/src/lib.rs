//! The dreambooth-operator: turns `DreamBoothSession`s into training Jobs, follows them
//! and reports on the session. Pure builders and the state machine sit in `job` and
//! `status`; only `controller` talks to the Kubernetes API.

use dreambooth_api::crd::DreamBoothSession;
use kube::CustomResourceExt;

pub mod controller;
pub mod http;
pub mod job;
pub mod leader;
pub mod metrics;
pub mod progress;
pub mod rbac;
pub mod render;
pub mod status;

/// The CRD exactly as committed in `crds/dreamboothsession.yaml`.
pub fn crd_yaml() -> String {
    serde_norway::to_string(&DreamBoothSession::crd()).expect("the CRD serialises to YAML")
}
