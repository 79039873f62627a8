//! `Manifest`: the index of a session's outputs, written last as `manifest.json`.
//! A session's output is complete only when its manifest exists.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The file name of the manifest inside the output prefix.
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub session: String,
    /// The base model actually used.
    pub base_model: String,
    /// Optimizer steps done over both phases.
    pub step: u32,
    pub total_steps: u32,
    /// The seed the run used (chosen at random and recorded when the spec had none).
    pub seed: u64,
    /// RFC 3339 time the manifest was written.
    pub created_at: String,
    pub artifacts: Vec<Artifact>,
    /// What the dataset preparation found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetReport>,
    /// The resolved configuration the run used (presets and `auto` expanded), so a
    /// finished output says exactly how it was made.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub config: serde_json::Value,
}

/// What dataset preparation used, skipped and noticed; printed and kept in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct DatasetReport {
    pub images: Vec<ReportedImage>,
    pub skipped: Vec<SkippedFile>,
    /// Groups of files with identical content (each counts twice in training).
    pub duplicates: Vec<Vec<String>>,
    /// Files whose shorter side is below the training size; they are upscaled.
    pub smaller_than_resolution: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportedImage {
    pub file: String,
    pub caption: String,
    /// Size after EXIF orientation, before cropping.
    pub width: u32,
    pub height: u32,
    /// The size it is trained at.
    pub train_width: u32,
    pub train_height: u32,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedFile {
    pub file: String,
    pub reason: String,
}

/// One file the session wrote, with what is needed to verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    pub kind: ArtifactKind,
    /// The step the artifact reflects.
    pub step: u32,
    pub uri: String,
    pub bytes: u64,
    /// Lower-case hexadecimal SHA-256 of the file.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ArtifactKind {
    /// The final model.
    Model,
    /// An intermediate model, `<session>_step_<N>`.
    Checkpoint,
    /// A sample image.
    Sample,
    /// A training state for exact resume.
    State,
    /// A generated class image for prior preservation.
    ClassImage,
    /// The dataset report.
    DatasetReport,
}

impl Manifest {
    /// The final model artifacts (one per requested format).
    pub fn models(&self) -> impl Iterator<Item = &Artifact> {
        self.artifacts
            .iter()
            .filter(|a| a.kind == ArtifactKind::Model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_through_json() {
        let manifest = Manifest {
            session: "anna".into(),
            base_model: "hf://stable-diffusion-v1-5/stable-diffusion-v1-5".into(),
            step: 1850,
            total_steps: 1850,
            seed: 7,
            created_at: "2026-11-27T10:00:00Z".into(),
            artifacts: vec![Artifact {
                kind: ArtifactKind::Model,
                step: 1850,
                uri: "s3://b/anna/anna.safetensors".into(),
                bytes: 2_132_856_864,
                sha256: "ab".repeat(32),
            }],
            dataset: None,
            config: serde_json::json!({"training": {"unetSteps": 1850}}),
        };
        let json = serde_json::to_string(&manifest).unwrap();
        assert!(json.contains("\"kind\":\"model\""));
        assert!(json.contains("\"baseModel\""));
        assert!(json.contains("\"unetSteps\":1850"));
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), manifest);
        assert_eq!(manifest.models().count(), 1);
    }
}
