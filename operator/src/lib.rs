//! The dreambooth-operator: turns `DreamBoothSession`s into training Jobs.

use dreambooth_api::crd::DreamBoothSession;
use kube::CustomResourceExt;

/// The CRD exactly as committed in `crds/dreamboothsession.yaml`.
pub fn crd_yaml() -> String {
    serde_norway::to_string(&DreamBoothSession::crd()).expect("the CRD serialises to YAML")
}
