//! How a session's spec becomes the settings of one run: presets and `auto` resolved,
//! continued training detected, precision chosen for the device, the seed picked and
//! recorded, and what the model files say about themselves.

use dreambooth_api::spec::{GradientCheckpointing, MemoryMode, MixedPrecision};
use dreambooth_api::{ResolvedTraining, Session};
use tch::Device;

use super::objective::NoiseSettings;
use super::trainer::{LoopSettings, StepPrecision};
use crate::checkpoint::LoadedModel;
use crate::data::PreparedDataset;
use crate::export::model::ModelDescription;
use crate::models::checkpointing;

/// "Continue training": a base model that is an earlier session's output (its header
/// says so) already has a trained text encoder, so its steps default to 0 (as the
/// fast-DreamBooth guide advises) unless the spec sets them.
pub(super) fn continued_training(
    training: &dreambooth_api::spec::Training,
    base: &LoadedModel,
) -> dreambooth_api::spec::Training {
    let mut training = training.clone();
    let earlier_session = crate::checkpoint::read_safetensors_metadata(&base.source)
        .ok()
        .and_then(|metadata| metadata.get("dreambooth.session").cloned());
    if let (Some(session), None) = (earlier_session, training.text_encoder.steps) {
        tracing::info!("continuing session `{session}`: text encoder steps default to 0");
        training.text_encoder.steps = Some(dreambooth_api::spec::Steps::Count(0));
    }
    training
}

pub(super) fn loop_settings(
    spec: &dreambooth_api::SessionSpec,
    resolved: &ResolvedTraining,
    base: &LoadedModel,
    seed: u64,
    device: Device,
    with_classes: bool,
) -> LoopSettings {
    LoopSettings {
        text_encoder_steps: resolved.text_encoder_steps,
        text_encoder_lr: resolved.text_encoder_learning_rate,
        unet_steps: resolved.unet_steps,
        unet_lr: resolved.unet_learning_rate,
        batch_size: spec.training.batch_size as usize,
        lr_scheduler: spec.training.lr_scheduler,
        lr_warmup_steps: spec.training.lr_warmup_steps,
        noise: NoiseSettings {
            prediction: base.prediction_type,
            offset_noise: resolved.offset_noise,
            min_snr_gamma: spec.training.min_snr_gamma,
        },
        prior_loss_weight: spec
            .dataset
            .prior_preservation
            .as_ref()
            .filter(|_| with_classes)
            .map(|p| p.loss_weight),
        seed,
        precision: match (device.is_cuda(), spec.training.mixed_precision) {
            (true, MixedPrecision::Bf16) => StepPrecision::Bf16Autocast,
            (true, MixedPrecision::Fp16) => StepPrecision::Fp16Autocast,
            _ => StepPrecision::Fp32,
        },
        memory: spec.training.memory,
    }
}

pub(super) fn is_checkpoint(spec: &dreambooth_api::SessionSpec, done: u32, total: u32) -> bool {
    match spec.checkpoints.every {
        Some(every) => {
            done.is_multiple_of(every) && done >= spec.checkpoints.start_from && done < total
        }
        None => false,
    }
}

/// Sample prompts with `{token}` filled; without any, the first instance caption.
pub(super) fn sample_prompts(
    spec: &dreambooth_api::SessionSpec,
    prepared: &PreparedDataset,
) -> Vec<String> {
    let token = spec
        .dataset
        .token
        .clone()
        .unwrap_or_else(|| prepared.images[0].caption.clone());
    if spec.samples.prompts.is_empty() {
        vec![prepared.images[0].caption.clone()]
    } else {
        spec.samples
            .prompts
            .iter()
            .map(|p| p.replace("{token}", &token))
            .collect()
    }
}

/// `spec.training.gradientCheckpointing` for this device (see
/// [`checkpointing::resolve`] for what `auto` means; `lowMemory` turns it on), said once
/// in the log.
pub(super) fn gradient_checkpointing(
    setting: GradientCheckpointing,
    memory: MemoryMode,
    device: Device,
) -> bool {
    let enabled = memory == MemoryMode::LowMemory || checkpointing::resolve(setting, device);
    if enabled && !checkpointing::available() {
        tracing::warn!(
            "spec.training.gradientCheckpointing: this build has no checkpoint shim \
             (no CUDA headers beside libtorch); training without it"
        );
        return false;
    }
    tracing::info!(
        "gradient checkpointing {} ({setting:?} on {device:?})",
        if enabled { "on" } else { "off" }
    );
    enabled
}

/// The spec as run: presets and `auto` expanded, the seed chosen.
pub(super) fn resolved_config(
    session: &Session,
    resolved: &ResolvedTraining,
    seed: u64,
    gradient_checkpointing: bool,
) -> serde_json::Value {
    let mut spec = session.spec.clone();
    spec.training.seed = Some(seed);
    spec.training.gradient_checkpointing = GradientCheckpointing::Forced(gradient_checkpointing);
    spec.training.unet.steps = Some(dreambooth_api::spec::Steps::Count(resolved.unet_steps));
    spec.training.unet.learning_rate = Some(resolved.unet_learning_rate);
    spec.training.text_encoder.steps = Some(dreambooth_api::spec::Steps::Count(
        resolved.text_encoder_steps,
    ));
    spec.training.text_encoder.learning_rate = Some(resolved.text_encoder_learning_rate);
    spec.training.offset_noise = Some(resolved.offset_noise);
    serde_json::json!({ "name": session.name, "spec": spec })
}

pub(super) fn describe(session: &Session, steps: u32, seed: u64) -> ModelDescription<'_> {
    ModelDescription {
        session: &session.name,
        base_model: session.spec.base_model.uri.as_deref().unwrap_or("sd15"),
        token: session.spec.dataset.token.as_deref(),
        steps,
        resolution: session.spec.dataset.resolution,
        seed,
    }
}

pub(super) fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}
