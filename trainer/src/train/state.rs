//! A training state for exact resume: the weights of both trainable networks and the
//! current phase's optimizer moments, each in the dtype it trains in (fp32, or bf16 with
//! `memory: lowMemory`), and the step, in `state/step_<N>/`.

use std::path::Path;

use dreambooth_api::spec::MemoryMode;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::loss_scale::LossScaler;
use super::trainer::{Phase, Trainer, restore_weights};
use crate::pipeline::ModelWeights;

pub const WEIGHTS_FILE: &str = "state.safetensors";
pub const INFO_FILE: &str = "state.json";

/// `state.json`: what the tensors alone do not say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateInfo {
    /// Optimizer steps done over both phases; the run continues at this step.
    pub step: u32,
    pub phase: Option<Phase>,
    /// Steps the phase's optimizer has taken (its bias correction).
    pub optimizer_steps: i64,
    pub seed: u64,
    pub total_steps: u32,
    /// The memory mode the tensors were saved in (bf16 for `lowMemory`). A state
    /// resumed in the other mode is converted, and no longer continues bit for bit.
    #[serde(default)]
    pub memory: MemoryMode,
    /// fp16 runs only: the loss scale reached, so a resumed run does not re-learn it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Torch { path: String, source: tch::TchError },
}

/// Writes the state after `step` optimizer steps into `dir` (a local folder): `weights`
/// (`Trainer::weights`, which a checkpoint also exports) and the optimizer's moments.
pub fn save_state(
    trainer: &Trainer,
    weights: &ModelWeights,
    step: u32,
    dir: &Path,
) -> Result<StateInfo, StateError> {
    std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (prefix, component) in [
        ("text_encoder.", &weights.text_encoder),
        ("unet.", &weights.unet),
    ] {
        for (name, tensor) in component {
            tensors.push((format!("{prefix}{name}"), tensor.shallow_clone()));
        }
    }
    let (phase, optimizer_steps) = match trainer.optimizer() {
        Some((phase, optimizer)) => {
            tensors.extend(
                optimizer
                    .state_tensors()
                    .into_iter()
                    .map(|(n, t)| (format!("optimizer.{n}"), t)),
            );
            (Some(phase), optimizer.steps_taken())
        }
        None => (None, 0),
    };
    let weights = dir.join(WEIGHTS_FILE);
    Tensor::write_safetensors(&tensors, &weights).map_err(|source| StateError::Torch {
        path: weights.display().to_string(),
        source,
    })?;
    let info = StateInfo {
        step,
        phase,
        optimizer_steps,
        seed: trainer.settings.seed,
        total_steps: trainer.settings.total_steps(),
        memory: trainer.settings.memory,
        loss_scaler: trainer.loss_scaler,
    };
    let info_path = dir.join(INFO_FILE);
    let json = serde_json::to_string_pretty(&info).expect("state info serialises");
    std::fs::write(&info_path, json).map_err(|source| StateError::Io {
        path: info_path.display().to_string(),
        source,
    })?;
    Ok(info)
}

/// The tensor saved under `key` in `state`, checked to have `shape`; the error names the
/// key and says what it should match (`owner`: "the model", "the parameter").
pub(crate) fn saved_tensor<'a>(
    state: &'a [(String, Tensor)],
    key: &str,
    shape: &[i64],
    owner: &str,
) -> Result<&'a Tensor, String> {
    let saved = state
        .iter()
        .find(|(n, _)| n == key)
        .map(|(_, t)| t)
        .ok_or_else(|| format!("state lacks `{key}`"))?;
    if saved.size() != shape {
        return Err(format!(
            "`{key}` has shape {:?}, {owner} {shape:?}",
            saved.size()
        ));
    }
    Ok(saved)
}

/// Reads a state written by [`save_state`] into `trainer`; returns the step to continue at.
pub fn load_state(trainer: &mut Trainer, dir: &Path) -> Result<StateInfo, StateError> {
    let info_path = dir.join(INFO_FILE);
    let text = std::fs::read_to_string(&info_path).map_err(|source| StateError::Io {
        path: info_path.display().to_string(),
        source,
    })?;
    let invalid = |message: String| StateError::Invalid {
        path: info_path.display().to_string(),
        message,
    };
    let info: StateInfo = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if info.seed != trainer.settings.seed || info.total_steps != trainer.settings.total_steps() {
        return Err(invalid(format!(
            "saved for seed {} and {} steps, but this run has seed {} and {} steps",
            info.seed,
            info.total_steps,
            trainer.settings.seed,
            trainer.settings.total_steps()
        )));
    }
    if info.memory != trainer.settings.memory {
        tracing::warn!(
            "{}: saved with memory {:?}, resumed with {:?}: converting the weights and \
             optimizer states",
            info_path.display(),
            info.memory,
            trainer.settings.memory
        );
    }
    let weights = dir.join(WEIGHTS_FILE);
    let weights_error = |message: String| StateError::Invalid {
        path: weights.display().to_string(),
        message,
    };
    let tensors = Tensor::read_safetensors(&weights).map_err(|source| StateError::Torch {
        path: weights.display().to_string(),
        source,
    })?;
    restore_weights(&mut trainer.stores.text_encoder, &tensors, "text_encoder.")
        .map_err(weights_error)?;
    restore_weights(&mut trainer.stores.unet, &tensors, "unet.").map_err(weights_error)?;
    if trainer.loss_scaler.is_some() {
        trainer.loss_scaler = info.loss_scaler.or(trainer.loss_scaler);
    }
    if let Some(phase) = info.phase {
        let optimizer: Vec<(String, Tensor)> = tensors
            .iter()
            .filter_map(|(n, t)| {
                n.strip_prefix("optimizer.")
                    .map(|n| (n.to_owned(), t.shallow_clone()))
            })
            .collect();
        trainer
            .restore_optimizer(phase, &optimizer, info.optimizer_steps)
            .map_err(weights_error)?;
    }
    Ok(info)
}
