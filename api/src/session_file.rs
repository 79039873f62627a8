//! Reading a session file: YAML or JSON, either the full `DreamBoothSession` manifest a
//! user applies with kubectl, or a bare spec with an optional `name`, so one file works
//! both locally and in a cluster.

use std::path::Path;

use serde_json::{Map, Value};

use crate::spec::SessionSpec;

/// Spec fields that only matter to Kubernetes; a local run ignores them.
pub const CLUSTER_ONLY_FIELDS: &[&str] = &[
    "resources",
    "nodeSelector",
    "tolerations",
    "affinity",
    "priorityClassName",
    "queueName",
    "image",
    "imagePullSecrets",
    "serviceAccountName",
    "suspend",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
];

/// A named session, as read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub name: String,
    pub spec: SessionSpec,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid {format}: {message}")]
    Syntax {
        path: String,
        format: &'static str,
        message: String,
    },
    #[error("{path}: {field}: {message}")]
    Field {
        path: String,
        field: String,
        message: String,
    },
    #[error("{path}: kind is `{kind}`, expected `DreamBoothSession`")]
    WrongKind { path: String, kind: String },
}

impl Session {
    /// Reads and parses a session file; the format follows the extension (`.json` or YAML).
    pub fn load(path: &Path) -> Result<Session, SessionFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SessionFileError::Read {
            path: shown.clone(),
            source,
        })?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("session");
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Session::parse(&text, is_json, &shown, stem)
    }

    /// Parses session text; `default_name` is used for a bare spec without `name`.
    pub fn parse(
        text: &str,
        is_json: bool,
        path: &str,
        default_name: &str,
    ) -> Result<Session, SessionFileError> {
        let value: Value = if is_json {
            serde_json::from_str(text).map_err(|e| SessionFileError::Syntax {
                path: path.into(),
                format: "JSON",
                message: e.to_string(),
            })?
        } else {
            serde_norway::from_str(text).map_err(|e| SessionFileError::Syntax {
                path: path.into(),
                format: "YAML",
                message: e.to_string(),
            })?
        };
        let Value::Object(mut root) = value else {
            return Err(field_error(path, "(top level)", "expected a mapping"));
        };
        let (name, mut spec) = if root.contains_key("apiVersion") || root.contains_key("kind") {
            manifest_parts(&mut root, path)?
        } else {
            let name = match root.remove("name") {
                None => default_name.to_owned(),
                Some(Value::String(name)) => name,
                Some(_) => return Err(field_error(path, "name", "expected a string")),
            };
            (name, root)
        };
        for field in CLUSTER_ONLY_FIELDS {
            spec.remove(*field);
        }
        let spec = deserialize_spec(Value::Object(spec), path)?;
        Ok(Session { name, spec })
    }
}

fn manifest_parts(
    root: &mut Map<String, Value>,
    path: &str,
) -> Result<(String, Map<String, Value>), SessionFileError> {
    let kind = root.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind != "DreamBoothSession" {
        return Err(SessionFileError::WrongKind {
            path: path.into(),
            kind: kind.into(),
        });
    }
    let name = root
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| field_error(path, "metadata.name", "required"))?
        .to_owned();
    match root.remove("spec") {
        Some(Value::Object(spec)) => Ok((name, spec)),
        Some(_) => Err(field_error(path, "spec", "expected a mapping")),
        None => Err(field_error(path, "spec", "required")),
    }
}

/// Deserialises the spec, naming the field that failed (`spec.dataset.resolution`).
fn deserialize_spec(spec: Value, path: &str) -> Result<SessionSpec, SessionFileError> {
    serde_path_to_error::deserialize::<_, SessionSpec>(spec).map_err(|error| {
        let field = match error.path().to_string() {
            location if location == "." => "spec".to_owned(),
            location => format!("spec.{location}"),
        };
        field_error(path, &field, &error.into_inner().to_string())
    })
}

fn field_error(path: &str, field: &str, message: &str) -> SessionFileError {
    SessionFileError::Field {
        path: path.into(),
        field: field.into(),
        message: message.into(),
    }
}
