//! `SessionSpec`: everything a training run needs, as a user writes it.
//!
//! Field defaults are fast-DreamBooth's. Fields a preset may fill are `Option`s, so
//! "left unset" stays distinguishable from "set to the default"; `resolve` in
//! [`crate::presets`] turns them into concrete values.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema;

/// `Default` for a spec section is whatever serde fills in for an empty mapping, so the
/// defaults are written once (in the `#[serde(default = ...)]` attributes) and a section
/// left out of a file equals one written as `{}`.
macro_rules! default_from_serde {
    ($($section:ty),*) => {$(
        impl Default for $section {
            fn default() -> Self {
                serde_json::from_value(serde_json::json!({})).expect("every field has a default")
            }
        }
    )*};
}

default_from_serde!(SessionSpec, Dataset, Training, Checkpoints, Samples);

/// The training part of a `DreamBoothSession`: base model, photos, hyperparameters,
/// checkpoints, samples and where the results go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionSpec {
    /// The Stable Diffusion model to fine-tune. Default: `version: sd15`.
    #[serde(default)]
    pub base_model: BaseModel,
    /// The instance images and how to caption them.
    #[serde(default)]
    pub dataset: Dataset,
    /// Training hyperparameters.
    #[serde(default)]
    pub training: Training,
    /// Intermediate checkpoints and output formats.
    #[serde(default)]
    pub checkpoints: Checkpoints,
    /// Sample images rendered at every checkpoint and at the end.
    #[serde(default)]
    pub samples: Samples,
    /// Where the session's outputs go.
    #[serde(default)]
    pub output: Output,
    /// Object-storage connection settings (credentials come from the environment).
    #[serde(default)]
    pub storage: Storage,
}

/// The base model: a known version, a URI, or both (the version then overrides detection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BaseModel {
    /// A known Stable Diffusion release; gives the default `uri` and the architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<ModelVersion>,
    /// `s3://`, `https://`, `hf://org/repo[@revision]` or `file://`: a diffusers folder or a
    /// single `.safetensors` / `.ckpt` file. Default: the version's own repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Expected SHA-256 of a single-file model, checked before use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ModelVersion {
    /// Stable Diffusion 1.5, 512 px, epsilon prediction.
    #[serde(rename = "sd15")]
    Sd15,
    /// Stable Diffusion 2.1 base, 512 px, epsilon prediction.
    #[serde(rename = "sd21-512")]
    Sd21Base,
    /// Stable Diffusion 2.1, 768 px, v-prediction.
    #[serde(rename = "sd21-768")]
    Sd21,
}

impl ModelVersion {
    /// The public repository the version maps to unless a cluster remaps it to a mirror.
    pub fn default_uri(self) -> &'static str {
        match self {
            ModelVersion::Sd15 => "hf://stable-diffusion-v1-5/stable-diffusion-v1-5",
            ModelVersion::Sd21Base => "hf://stabilityai/stable-diffusion-2-1-base",
            ModelVersion::Sd21 => "hf://stabilityai/stable-diffusion-2-1",
        }
    }

    /// The resolution the version was trained at.
    pub fn native_resolution(self) -> u32 {
        match self {
            ModelVersion::Sd15 | ModelVersion::Sd21Base => 512,
            ModelVersion::Sd21 => 768,
        }
    }
}

impl BaseModel {
    /// The URI to fetch: the explicit one, else the version's default (SD 1.5 when neither).
    pub fn effective_uri(&self) -> String {
        match (&self.uri, self.version) {
            (Some(uri), _) => uri.clone(),
            (None, version) => version
                .unwrap_or(ModelVersion::Sd15)
                .default_uri()
                .to_owned(),
        }
    }
}

/// The instance images, their captions and how they are prepared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dataset {
    /// Folder of instance images (JPEG, PNG, WebP, BMP), with optional `<stem>.txt` captions.
    #[serde(default)]
    pub uri: String,
    /// The rare token naming the subject, e.g. `sksper`. Default: taken from the file names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z0-9]{3,24}$')",
        "message": "must be 3 to 24 characters of a-z and 0-9"
    }]), length(max = 64))]
    pub token: Option<String>,
    /// Where each image's caption comes from.
    #[serde(default)]
    pub captions: Captions,
    /// The caption template for `captions: prompt`; `{token}` is replaced by the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_prompt: Option<String>,
    /// How images are cropped to a square before resizing.
    #[serde(default)]
    pub crop: Crop,
    /// Skip unreadable images with a warning instead of failing the session.
    #[serde(default)]
    pub skip_invalid: bool,
    /// Training resolution in pixels: a multiple of 64 from 64 to 2048.
    #[serde(default = "default_resolution")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self >= 64 && self <= 2048 && self % 64 == 0",
        "message": "must be a multiple of 64 from 64 to 2048"
    }]))]
    pub resolution: u32,
    /// Also train on horizontally flipped copies.
    #[serde(default)]
    pub flip: bool,
    /// Aspect-ratio buckets instead of square crops.
    #[serde(default)]
    pub buckets: bool,
    /// Prior preservation with class images; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_preservation: Option<PriorPreservation>,
}

fn default_resolution() -> u32 {
    512
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum Captions {
    /// The file name without its counter: `sksper (1).jpg` → `sksper`.
    #[default]
    Filename,
    /// The file-name token followed by the contents of `<stem>.txt`.
    External,
    /// `dataset.instancePrompt` with `{token}` replaced.
    Prompt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum Crop {
    #[default]
    Center,
    /// Crop around a focal point found from edges and entropy.
    Smart,
}

/// Prior preservation: train on class images too, so the class keeps its meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriorPreservation {
    /// The prompt of the class images, e.g. `photo of a person`.
    pub class_prompt: String,
    /// Existing class images; missing ones are generated by the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_images_uri: Option<String>,
    /// How many class images to train with.
    #[serde(default = "default_num_class_images")]
    pub num_class_images: u32,
    /// Weight of the prior loss relative to the instance loss.
    #[serde(default = "default_prior_loss_weight")]
    pub loss_weight: f64,
}

fn default_num_class_images() -> u32 {
    200
}

fn default_prior_loss_weight() -> f64 {
    1.0
}

/// Training hyperparameters. Unset fields come from the preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Training {
    /// What is being taught; fills the unset fields below.
    #[serde(default)]
    pub preset: Preset,
    /// Phase 2: the UNet. fast-DreamBooth: 1500 steps at 2e-6.
    #[serde(default)]
    pub unet: PhaseSpec,
    /// Phase 1: the text encoder. fast-DreamBooth: 350 steps at 1e-6.
    #[serde(default)]
    pub text_encoder: PhaseSpec,
    /// Offset noise strength (0 = off). The `style` preset uses 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset_noise: Option<f64>,
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
    /// Images per optimizer step.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Trade about a third more compute for most of the activation memory. `auto`: on
    /// for a CUDA device with less than 20 GiB, off otherwise and on the CPU; always on
    /// with `memory: lowMemory`.
    #[serde(default)]
    pub gradient_checkpointing: GradientCheckpointing,
    /// How the weights and optimizer states are held: `default` (fp32) or `lowMemory`
    /// (bf16 weights and AdamW states, gradient checkpointing; about half the memory,
    /// eager steps). Not with `mixedPrecision: fp16`.
    #[serde(default)]
    pub memory: MemoryMode,
    #[serde(default)]
    pub lr_scheduler: LrScheduler,
    /// Steps of linear warmup at the start of each phase.
    #[serde(default)]
    pub lr_warmup_steps: u32,
    /// Min-SNR-γ loss weighting (5 is typical); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_snr_gamma: Option<f64>,
    /// Seed for noise, data order and initial sample latents; recorded in the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn default_batch_size() -> u32 {
    1
}

/// Steps and learning rate of one training phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PhaseSpec {
    /// A step count, or `auto` to choose from the preset and the number of images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Steps>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self > 0.0 && self <= 0.001",
        "message": "must be in (0, 1e-3]"
    }]))]
    pub learning_rate: Option<f64>,
}

/// A step count or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Steps {
    Count(u32),
    Auto(AutoKeyword),
}

impl Steps {
    pub const AUTO: Steps = Steps::Auto(AutoKeyword::Auto);
}

/// The literal `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoKeyword {
    Auto,
}

impl JsonSchema for Steps {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Steps".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schema::int_or_auto("A step count, or `auto`.")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum Preset {
    Face,
    Style,
    Object,
    /// No preset: fast-DreamBooth's defaults.
    #[default]
    Custom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum MixedPrecision {
    /// bf16 autocast with fp32 master weights (GPU); fp32 on CPU.
    #[default]
    Bf16,
    /// fp16 autocast with dynamic loss scaling.
    Fp16,
    /// Full fp32.
    No,
}

/// Where the memory of a training step goes (`training.memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum MemoryMode {
    /// fp32 master weights and AdamW states, the forward pass under `mixedPrecision`
    /// autocast: the reference numerics.
    #[default]
    Default,
    /// bf16 weights updated with stochastic rounding, bf16 AdamW states and gradient
    /// checkpointing: about half the memory (SD 1.5's UNet fits a 12 GB card), eager
    /// steps (no CUDA graph). Exports still use `checkpoints.precision`.
    LowMemory,
}

/// `auto`, `true` or `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(untagged)]
pub enum GradientCheckpointing {
    Forced(bool),
    #[default]
    #[serde(with = "auto_literal")]
    Auto,
}

mod auto_literal {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("auto")
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        match String::deserialize(d)?.as_str() {
            "auto" => Ok(()),
            other => Err(D::Error::custom(format!(
                "expected `auto`, true or false, got `{other}`"
            ))),
        }
    }
}

impl JsonSchema for GradientCheckpointing {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GradientCheckpointing".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schema::bool_or_auto("`auto`, true or false.")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum LrScheduler {
    Constant,
    /// Linear decay to 0, as fast-DreamBooth does.
    #[default]
    Linear,
    Cosine,
}

/// Intermediate checkpoints and the formats of every model written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpoints {
    /// Save a checkpoint every N steps (counted over both phases); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<u32>,
    /// The first step that may be saved.
    #[serde(default)]
    pub start_from: u32,
    #[serde(default = "default_formats")]
    pub formats: Vec<ModelFormat>,
    #[serde(default)]
    pub precision: Precision,
    /// Training states kept for resume; older ones are deleted.
    #[serde(default = "default_keep_last_states")]
    pub keep_last_states: u32,
}

fn default_formats() -> Vec<ModelFormat> {
    vec![ModelFormat::Safetensors]
}

fn default_keep_last_states() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ModelFormat {
    /// One `.safetensors` file in the original SD layout (AUTOMATIC1111, ComfyUI).
    Safetensors,
    /// The same as a pickle `.ckpt`, for old tools.
    Ckpt,
    /// A diffusers folder.
    Diffusers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum Precision {
    #[default]
    Fp16,
    Fp32,
    Bf16,
}

/// Sample images of the subject, rendered at each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Samples {
    /// Prompts to render (at most 16); `{token}` is replaced. Default: the instance caption.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "size(self) <= 16",
        "message": "at most 16 sample prompts"
    }]))]
    pub prompts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default = "default_sample_seed")]
    pub seed: u64,
    #[serde(default = "default_sample_steps")]
    pub steps: u32,
    #[serde(default = "default_guidance_scale")]
    pub guidance_scale: f64,
    #[serde(default)]
    pub sampler: Sampler,
    /// Default: the training resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Default: the training resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

fn default_sample_seed() -> u64 {
    42
}

fn default_sample_steps() -> u32 {
    30
}

fn default_guidance_scale() -> f64 {
    7.5
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
pub enum Sampler {
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "euler")]
    Euler,
    #[serde(rename = "euler-a")]
    EulerAncestral,
    #[default]
    #[serde(rename = "dpmpp-2m-karras")]
    DpmPp2mKarras,
}

/// Where outputs go: `<uri>/` gets models, checkpoints, samples, state and `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Output {
    /// `s3://bucket/prefix` or `file:///path`.
    #[serde(default)]
    pub uri: String,
}

/// S3-compatible storage settings; credentials come from the environment or the pod's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Storage {
    /// Endpoint override for MinIO, Ceph, R2 and the like.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most self-hosted servers.
    #[serde(default)]
    pub force_path_style: bool,
    /// In a cluster: the Secret holding the access keys, handed to the trainer pod by
    /// `secretKeyRef` (the operator never reads it). Ignored by a local run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<CredentialsSecret>,
}

/// A Secret with S3 access keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialsSecret {
    pub name: String,
    #[serde(default = "default_access_key_id_key")]
    pub access_key_id_key: String,
    #[serde(default = "default_secret_access_key_key")]
    pub secret_access_key_key: String,
}

fn default_access_key_id_key() -> String {
    "AWS_ACCESS_KEY_ID".into()
}

fn default_secret_access_key_key() -> String {
    "AWS_SECRET_ACCESS_KEY".into()
}
