//! `dreambooth-operator render SESSION.yaml`: the ConfigMap and Job the operator would
//! create for a manifest, printed as YAML without a cluster, from the same builder.

use std::path::Path;

use dreambooth_api::crd::{ClusterSpec, DreamBoothSession};
use dreambooth_api::session_file::{Session, SessionFileError};
use kube::ResourceExt;

use crate::job::{JobSettings, build_config_map, build_job};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Session(#[from] SessionFileError),
    #[error("{path}: {field}: {message}")]
    Field {
        path: String,
        field: String,
        message: String,
    },
    #[error("{path}: {problems}")]
    Invalid { path: String, problems: String },
}

/// Reads a `DreamBoothSession` manifest (YAML or JSON), naming the file and the field
/// on any error. Its namespace defaults to `default`, as kubectl's would.
pub fn load_session(path: &Path) -> Result<DreamBoothSession, RenderError> {
    let shown = path.display().to_string();
    // The api crate's reader checks the training part and names the failing field.
    Session::load(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| SessionFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let value: serde_json::Value =
        serde_norway::from_str(&text).map_err(|e| SessionFileError::Syntax {
            path: shown.clone(),
            format: "YAML",
            message: e.to_string(),
        })?;
    // The flattened spec hides the failing field's path, so the cluster part is read on
    // its own first (the training part was checked above).
    if let Some(spec) = value.get("spec") {
        serde_path_to_error::deserialize::<_, ClusterSpec>(spec).map_err(|e| {
            RenderError::Field {
                path: shown.clone(),
                field: format!("spec.{}", e.path()),
                message: e.inner().to_string(),
            }
        })?;
    }
    let mut session: DreamBoothSession =
        serde_path_to_error::deserialize(value).map_err(|e| RenderError::Field {
            path: shown.clone(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
    if session.metadata.namespace.is_none() {
        session.metadata.namespace = Some("default".into());
    }
    Ok(session)
}

/// The ConfigMap and the Job of `attempt`, as one multi-document YAML stream. An invalid
/// session is an error listing every problem, as reconcile would report it.
pub fn render(path: &Path, attempt: u32, settings: &JobSettings) -> Result<String, RenderError> {
    let session = load_session(path)?;
    let report = dreambooth_api::validate(&session.name_any(), &session.spec.session);
    if !report.is_valid() {
        let problems: Vec<String> = report.errors().map(ToString::to_string).collect();
        return Err(RenderError::Invalid {
            path: path.display().to_string(),
            problems: problems.join("; "),
        });
    }
    let config_map =
        serde_norway::to_string(&build_config_map(&session, settings)).expect("serialises");
    let job = serde_norway::to_string(&build_job(&session, attempt, settings)).expect("serialises");
    Ok(format!("---\n{config_map}---\n{job}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> JobSettings {
        JobSettings {
            default_image: "trainer:dev".into(),
            ..Default::default()
        }
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn renders_config_map_and_job_for_an_attempt() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/session-full.yaml");
        let yaml = render(&path, 4, &settings()).unwrap();
        let documents: Vec<serde_json::Value> = yaml
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_norway::from_str(d).unwrap())
            .collect();
        assert_eq!(documents.len(), 2);
        assert_eq!(documents[0]["kind"], "ConfigMap");
        assert_eq!(documents[1]["kind"], "Job");
        assert_eq!(documents[1]["metadata"]["name"], "anna-4");
    }

    #[test]
    fn invalid_session_lists_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "bad.yaml",
            "apiVersion: dreambooth.dev/v1alpha1\nkind: DreamBoothSession\nmetadata: {name: bad}\n\
             spec:\n  dataset: {uri: 'ftp://x', resolution: 700}\n  output: {uri: 's3://o'}\n",
        );
        let error = render(&path, 1, &settings()).unwrap_err().to_string();
        assert!(error.contains("bad.yaml"), "{error}");
        assert!(error.contains("spec.dataset.uri"), "{error}");
        assert!(error.contains("spec.dataset.resolution"), "{error}");
    }

    #[test]
    fn wrong_cluster_field_names_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "typo.yaml",
            "apiVersion: dreambooth.dev/v1alpha1\nkind: DreamBoothSession\nmetadata: {name: t}\n\
             spec:\n  dataset: {uri: 's3://d'}\n  output: {uri: 's3://o'}\n  resources: {gpus: many}\n",
        );
        let error = load_session(&path).unwrap_err().to_string();
        assert!(error.contains("typo.yaml"), "{error}");
        assert!(error.contains("spec.resources.gpus"), "{error}");
    }
}
