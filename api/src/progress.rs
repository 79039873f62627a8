//! `Progress`: what the trainer's `/progress` endpoint returns and the operator polls.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a session is in its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// Fetching the base model and the images.
    #[default]
    Downloading,
    /// Decoding, cropping, captioning, caching latents; generating class images.
    Preparing,
    /// Phase 1: the text encoder.
    TextEncoder,
    /// Phase 2: the UNet.
    Unet,
    /// Writing the final model, samples and manifest.
    Exporting,
    Done,
}

/// A snapshot of a running session. Steps count both phases together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub session: String,
    pub stage: Stage,
    /// Optimizer steps done, over both phases.
    pub step: u32,
    pub total_steps: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_per_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_per_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// URIs of the checkpoints written so far.
    #[serde(default)]
    pub checkpoints: Vec<String>,
    /// URIs of the sample images written so far.
    #[serde(default)]
    pub samples: Vec<String>,
    /// RFC 3339 time of this snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

impl Progress {
    /// Seconds left at the current speed, when both are known.
    pub fn estimate_eta(step: u32, total_steps: u32, steps_per_second: Option<f64>) -> Option<f64> {
        let speed = steps_per_second.filter(|s| *s > 0.0)?;
        Some(f64::from(total_steps.saturating_sub(step)) / speed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_remaining_steps_over_speed() {
        assert_eq!(Progress::estimate_eta(100, 500, Some(4.0)), Some(100.0));
        assert_eq!(Progress::estimate_eta(600, 500, Some(4.0)), Some(0.0));
        assert_eq!(Progress::estimate_eta(0, 500, Some(0.0)), None);
        assert_eq!(Progress::estimate_eta(0, 500, None), None);
    }

    #[test]
    fn progress_is_camel_case_json() {
        let progress = Progress {
            session: "anna".into(),
            stage: Stage::TextEncoder,
            step: 3,
            total_steps: 10,
            steps_per_second: Some(2.0),
            ..Progress::default()
        };
        let json = serde_json::to_value(&progress).unwrap();
        assert_eq!(json["stage"], "textEncoder");
        assert_eq!(json["totalSteps"], 10);
        assert_eq!(json["stepsPerSecond"], 2.0);
        assert!(json.get("loss").is_none());
        assert_eq!(serde_json::from_value::<Progress>(json).unwrap(), progress);
    }
}
