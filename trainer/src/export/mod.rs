//! A session's outputs under its output prefix: where each artifact goes (the key
//! names below), the manifest that lists them, and the sample images. The layout:
//!
//! ```text
//! <session>_step_<N>.safetensors   intermediate checkpoints
//! <session>.safetensors            the final model
//! samples/step_<N>/<i>.png         one image per sample prompt, and grid.png
//! state/step_<N>/…                 training state for exact resume
//! manifest.json                    written last: the output is complete once it exists
//! ```

pub mod manifest;
pub mod model;
pub mod samples;

use std::path::PathBuf;

pub use dreambooth_api::manifest::MANIFEST_FILE;
pub use manifest::{OutputWriter, load_manifest, state_steps};
pub use samples::{grid_image, grid_layout, write_samples};

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{uri}: recorded in the manifest but missing from storage")]
    ArtifactMissing { uri: String },
    #[error("{uri}: recorded as {recorded} bytes but storage holds {found} bytes")]
    ArtifactSize {
        uri: String,
        recorded: u64,
        found: u64,
    },
    #[error("{uri}: not under this session's output prefix {prefix}")]
    ForeignArtifact { uri: String, prefix: String },
    #[error("{uri}: not a valid manifest: {source}")]
    ManifestParse {
        uri: String,
        source: serde_json::Error,
    },
    #[error("{path}: cannot list the folder to upload: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a sample grid needs at least one image")]
    EmptyGrid,
    #[error(
        "sample {index} is {found_w}x{found_h} but sample 0 is {want_w}x{want_h}; a grid needs one size"
    )]
    GridSizeMismatch {
        index: usize,
        want_w: u32,
        want_h: u32,
        found_w: u32,
        found_h: u32,
    },
    #[error("{key}: cannot encode the PNG: {source}")]
    Png {
        key: String,
        source: image::ImageError,
    },
}

/// `<session>_step_<N>.safetensors`: N is the number of optimizer steps in the weights.
pub fn checkpoint_key(session: &str, step: u32) -> String {
    format!("{session}_step_{step}.safetensors")
}

/// `<session>.safetensors`: the final model.
pub fn model_key(session: &str) -> String {
    format!("{session}.safetensors")
}

/// `state/step_<N>/`: the folder of one training state (ends in `/`, a listing prefix).
pub fn state_prefix(step: u32) -> String {
    format!("state/step_{step}/")
}

/// The step of a key under `state/step_<N>/`, so resume and pruning can find states by
/// listing storage.
pub fn state_step(key: &str) -> Option<u32> {
    let rest = key.strip_prefix("state/step_")?;
    let (digits, _) = rest.split_once('/')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `samples/step_<N>/`: the folder of one checkpoint's sample images.
pub fn samples_prefix(step: u32) -> String {
    format!("samples/step_{step}/")
}

/// `samples/step_<N>/<i>.png`, `i` counting sample prompts from 0.
pub fn sample_key(step: u32, index: usize) -> String {
    format!("samples/step_{step}/{index}.png")
}

/// `samples/step_<N>/grid.png`.
pub fn sample_grid_key(step: u32) -> String {
    format!("samples/step_{step}/grid.png")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        assert_eq!(checkpoint_key("anna", 400), "anna_step_400.safetensors");
        assert_eq!(model_key("anna"), "anna.safetensors");
        assert_eq!(state_prefix(1200), "state/step_1200/");
        assert_eq!(sample_key(400, 2), "samples/step_400/2.png");
        assert_eq!(sample_grid_key(400), "samples/step_400/grid.png");
        assert!(sample_key(7, 0).starts_with(&samples_prefix(7)));
    }

    #[test]
    fn state_steps_parse_back_from_keys() {
        assert_eq!(
            state_step(&format!("{}optimizer.safetensors", state_prefix(1200))),
            Some(1200)
        );
        assert_eq!(state_step("state/step_0/x"), Some(0));
        for not_state in [
            "state/step_/x",
            "state/step_12",
            "state/step_1a/x",
            "state/step_+1/x",
            "samples/step_1/0.png",
            "anna_step_400.safetensors",
        ] {
            assert_eq!(state_step(not_state), None, "{not_state}");
        }
    }
}
