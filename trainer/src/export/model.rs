//! The model being trained, back into files: the weights under diffusers
//! names with the base model's configs, written in the requested formats, and the
//! sample images rendered at a checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use dreambooth_api::spec::{ModelFormat, Precision, Samples};
use image::RgbImage;

use crate::checkpoint::{
    CheckpointError, Component, LoadedModel, SdVersion, Tensors, save_ckpt, save_diffusers_folder,
    save_single_file_with_metadata,
};
use crate::pipeline::{ModelWeights, Models, PipelineError, SampleRequest, generate, to_rgb8};
use crate::schedulers::{PredictionType, Sampler, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;

/// The pipeline as it is now: the trained `weights` with the base model's configs,
/// scheduler and tokenizer.
pub fn snapshot(base: &LoadedModel, weights: &ModelWeights) -> LoadedModel {
    let component = |tensors: &Tensors, from: &Component| Component {
        tensors: tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.shallow_clone()))
            .collect(),
        config: from.config.clone(),
        weights: from.weights.clone(),
    };
    LoadedModel {
        source: base.source.clone(),
        kind: base.kind,
        version: base.version,
        prediction_type: base.prediction_type,
        unet: component(&weights.unet, &base.unet),
        text_encoder: component(&weights.text_encoder, &base.text_encoder),
        vae: component(&weights.vae, &base.vae),
        scheduler: base.scheduler.clone(),
        tokenizer: base.tokenizer.clone(),
    }
}

/// Writes `model` as `<stem>.safetensors` / `<stem>/` (diffusers) into `dir`; returns the
/// file names written, in the order of `formats`.
pub fn write_model(
    model: &LoadedModel,
    dir: &Path,
    stem: &str,
    formats: &[ModelFormat],
    precision: Precision,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<String>, CheckpointError> {
    let mut written = Vec::new();
    for format in formats {
        match format {
            ModelFormat::Safetensors => {
                let name = format!("{stem}.safetensors");
                save_single_file_with_metadata(model, &dir.join(&name), precision, metadata)?;
                written.push(name);
            }
            ModelFormat::Diffusers => {
                save_diffusers_folder(model, &dir.join(stem), precision)?;
                written.push(stem.to_owned());
            }
            ModelFormat::Ckpt => {
                let name = format!("{stem}.ckpt");
                save_ckpt(model, &dir.join(&name), precision)?;
                written.push(name);
            }
        }
    }
    Ok(written)
}

/// What a trained file says about itself in its safetensors header: Stability's
/// `modelspec.*` keys (shown by AUTOMATIC1111 and ComfyUI) and our own `dreambooth.*`.
pub struct ModelDescription<'a> {
    pub session: &'a str,
    pub base_model: &'a str,
    pub token: Option<&'a str>,
    pub steps: u32,
    pub resolution: u32,
    pub seed: u64,
}

impl ModelDescription<'_> {
    pub fn metadata(&self, model: &LoadedModel) -> BTreeMap<String, String> {
        let architecture = match (model.version, model.prediction_type) {
            (SdVersion::Sd1, _) => "stable-diffusion-v1",
            (SdVersion::Sd2, PredictionType::VPrediction) => "stable-diffusion-v2-768-v",
            (SdVersion::Sd2, _) => "stable-diffusion-v2-512",
        };
        let mut metadata = BTreeMap::from([
            ("modelspec.sai_model_spec".to_owned(), "1.0.0".to_owned()),
            ("modelspec.architecture".to_owned(), architecture.to_owned()),
            (
                "modelspec.implementation".to_owned(),
                "https://github.com/Stability-AI/generative-models".to_owned(),
            ),
            ("modelspec.title".to_owned(), self.session.to_owned()),
            (
                "modelspec.resolution".to_owned(),
                format!("{0}x{0}", self.resolution),
            ),
            ("dreambooth.session".to_owned(), self.session.to_owned()),
            (
                "dreambooth.base_model".to_owned(),
                self.base_model.to_owned(),
            ),
            ("dreambooth.steps".to_owned(), self.steps.to_string()),
            (
                "dreambooth.resolution".to_owned(),
                self.resolution.to_string(),
            ),
            ("dreambooth.seed".to_owned(), self.seed.to_string()),
        ]);
        if let Some(token) = self.token {
            metadata.insert("dreambooth.token".to_owned(), token.to_owned());
        }
        metadata
    }
}

/// What rendering sample images needs besides the networks.
pub struct SampleRenderer<'a> {
    pub tokenizer: &'a ClipTokenizer,
    pub scheduler: &'a SchedulerConfig,
    pub samples: &'a Samples,
    /// Prompts with `{token}` already filled in.
    pub prompts: &'a [String],
    /// Width and height unless `samples` sets them.
    pub size: (i64, i64),
}

impl SampleRenderer<'_> {
    /// Renders every prompt with the same seeds at each checkpoint, so checkpoints compare.
    pub fn render(&self, models: &Models) -> Result<Vec<RgbImage>, PipelineError> {
        let samples = self.samples;
        let sampler = samples_sampler(samples);
        let _guard = tch::no_grad_guard();
        self.prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let mut scheduler = sampler.scheduler(self.scheduler);
                let request = SampleRequest {
                    prompt: prompt.clone(),
                    negative_prompt: samples.negative_prompt.clone().unwrap_or_default(),
                    seed: samples.seed + i as u64,
                    steps: samples.steps as usize,
                    guidance_scale: samples.guidance_scale,
                    width: samples.width.map_or(self.size.0, i64::from),
                    height: samples.height.map_or(self.size.1, i64::from),
                };
                generate(models, self.tokenizer, scheduler.as_mut(), &request)
                    .map(|image| to_rgb8(&image))
            })
            .collect()
    }
}

fn samples_sampler(samples: &Samples) -> Sampler {
    use dreambooth_api::spec::Sampler as Spec;
    match samples.sampler {
        Spec::Ddim => Sampler::Ddim,
        Spec::Euler => Sampler::Euler,
        Spec::EulerAncestral => Sampler::EulerAncestral,
        Spec::DpmPp2mKarras => Sampler::DpmPp2mKarras,
    }
}
