//! The model being trained, back into files: the weights under diffusers
//! names with the base model's configs, written in the requested formats, and the
//! sample images rendered at a checkpoint.

use std::path::Path;

use dreambooth_api::spec::{ModelFormat, Precision, Samples};
use image::RgbImage;

use crate::checkpoint::{
    CheckpointError, Component, LoadedModel, save_diffusers_folder, save_single_file,
    var_store_tensors,
};
use crate::pipeline::{ModelVarStores, Models, PipelineError, SampleRequest, generate, to_rgb8};
use crate::schedulers::{Sampler, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;

/// The pipeline as it is now: the trained weights (shared with the VarStores, not
/// copied) with the base model's configs, scheduler and tokenizer.
pub fn snapshot(base: &LoadedModel, stores: &ModelVarStores) -> LoadedModel {
    let component = |vs: &tch::nn::VarStore, from: &Component| Component {
        tensors: var_store_tensors(vs),
        config: from.config.clone(),
        weights: from.weights.clone(),
    };
    LoadedModel {
        source: base.source.clone(),
        kind: base.kind,
        version: base.version,
        prediction_type: base.prediction_type,
        unet: component(&stores.unet, &base.unet),
        text_encoder: component(&stores.text_encoder, &base.text_encoder),
        vae: component(&stores.vae, &base.vae),
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
) -> Result<Vec<String>, CheckpointError> {
    let mut written = Vec::new();
    for format in formats {
        match format {
            ModelFormat::Safetensors => {
                let name = format!("{stem}.safetensors");
                save_single_file(model, &dir.join(&name), precision)?;
                written.push(name);
            }
            ModelFormat::Diffusers => {
                save_diffusers_folder(model, &dir.join(stem), precision)?;
                written.push(stem.to_owned());
            }
            ModelFormat::Ckpt => {
                return Err(CheckpointError::invalid(
                    &dir.join(format!("{stem}.ckpt")),
                    "writing .ckpt is not supported yet; use safetensors",
                ));
            }
        }
    }
    Ok(written)
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
