//! Text-to-image sampling, step for step as diffusers' `StableDiffusionPipeline`: the
//! same prompt encoding, initial latents from the seeded CPU generator, classifier-free
//! guidance with a negative prompt, and decoding, so one seed gives the same image.

use std::path::PathBuf;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{
    CheckpointError, LoadedModel, Tensors, load_pipeline_weights, var_store_tensors,
};
use crate::models::clip::{ClipTextConfig, ClipTextModel, clip_text_model};
use crate::models::{
    AutoencoderKL, ConfigError, UNet2DConditionModel, UNetConfig, VaeConfig, autoencoder_kl, unet,
};
use crate::schedulers::{CpuGenerator, NoiseSource, Sampler, Scheduler, SchedulerConfig};
use crate::tokenizer::{ClipTokenizer, TokenizerError};

/// The three networks a sampling run needs, on one device.
pub struct Models {
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
}

/// The VarStores behind [`Models`], for callers that train or save the same weights.
pub struct ModelVarStores {
    pub text_encoder: VarStore,
    pub unet: VarStore,
    pub vae: VarStore,
}

/// The networks' weights by name as they are saved (see `Trainer::weights`).
pub struct ModelWeights {
    pub text_encoder: Tensors,
    pub unet: Tensors,
    pub vae: Tensors,
}

impl ModelWeights {
    /// The VarStores' own tensors, shared, not copied.
    pub fn of(stores: &ModelVarStores) -> Self {
        Self {
            text_encoder: var_store_tensors(&stores.text_encoder),
            unet: var_store_tensors(&stores.unet),
            vae: var_store_tensors(&stores.vae),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}: invalid {what} config: {message}", .path.display())]
    InvalidConfig {
        path: std::path::PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("image size {width}x{height} is not a multiple of {multiple} pixels")]
    Size {
        width: i64,
        height: i64,
        multiple: i64,
    },
    #[error("at least one sampling step is needed")]
    NoSteps,
    #[error(
        "{}: a single-file checkpoint carries no tokenizer; sample from a diffusers folder",
        .path.display()
    )]
    NoTokenizer { path: std::path::PathBuf },
    #[error("cannot write image {}: {source}", .path.display())]
    Image {
        path: std::path::PathBuf,
        source: image::ImageError,
    },
}

impl Models {
    /// Builds the networks from loaded weights, as fp32 parameters on `device`.
    pub fn load(
        model: &LoadedModel,
        device: Device,
    ) -> Result<(Self, ModelVarStores), PipelineError> {
        let text_cfg: ClipTextConfig = serde_json::from_value(model.text_encoder.config.clone())
            .map_err(|e| PipelineError::InvalidConfig {
                path: model.text_encoder.weights.clone(),
                what: "text encoder",
                message: e.to_string(),
            })?;
        let unet_cfg = UNetConfig::from_json(&model.unet.config.to_string())?;
        let vae_cfg = VaeConfig::from_json(&model.vae.config.to_string())?;

        let mut text_vs = VarStore::new(device);
        let text_encoder = clip_text_model(text_vs.root(), &text_cfg);
        model.text_encoder.fill(&mut text_vs, "text encoder")?;
        let mut unet_vs = VarStore::new(device);
        let unet = unet(unet_vs.root(), &unet_cfg);
        model.unet.fill(&mut unet_vs, "UNet")?;
        let mut vae_vs = VarStore::new(device);
        let vae = autoencoder_kl(vae_vs.root(), &vae_cfg);
        model.vae.fill(&mut vae_vs, "VAE")?;
        Ok((
            Self {
                text_encoder,
                unet,
                vae,
            },
            ModelVarStores {
                text_encoder: text_vs,
                unet: unet_vs,
                vae: vae_vs,
            },
        ))
    }

    fn device(&self) -> Device {
        self.unet.conv_in.ws.device()
    }
}

/// One image to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    pub prompt: String,
    /// What guidance steers away from; empty means the unconditional embedding.
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    /// Classifier-free guidance scale; at 1 or below the negative prompt is not used.
    pub guidance_scale: f64,
    pub width: i64,
    pub height: i64,
}

impl Default for SampleRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            steps: 30,
            guidance_scale: 7.5,
            width: 512,
            height: 512,
        }
    }
}

/// Encodes prompts as the UNet's conditioning `[batch, 77, width]`.
pub fn encode_prompts(
    models: &Models,
    tokenizer: &ClipTokenizer,
    prompts: &[&str],
) -> Result<Tensor, PipelineError> {
    let ids = tokenizer.encode_tensor(prompts)?.to_device(models.device());
    Ok(models.text_encoder.forward(&ids).last_hidden_state)
}

/// Generates one image `[1, 3, H, W]` in [0, 1] on the CPU.
///
/// Seeds libtorch's global generator with `request.seed` (as diffusers seeds its CPU
/// `Generator`): the initial latents and any ancestral noise come from it, in that order.
pub fn generate(
    models: &Models,
    tokenizer: &ClipTokenizer,
    scheduler: &mut dyn Scheduler,
    request: &SampleRequest,
) -> Result<Tensor, PipelineError> {
    let factor = models.vae.downscale_factor();
    // diffusers refuses sizes that are not multiples of 8 whatever the VAE.
    let multiple = factor.max(8);
    if request.width % multiple != 0
        || request.height % multiple != 0
        || request.width <= 0
        || request.height <= 0
    {
        return Err(PipelineError::Size {
            width: request.width,
            height: request.height,
            multiple,
        });
    }
    if request.steps == 0 {
        return Err(PipelineError::NoSteps);
    }
    let _guard = tch::no_grad_guard();
    let device = models.device();
    let unet_kind = models.unet.conv_in.ws.kind();
    let guided = request.guidance_scale > 1.0;
    let context = if guided {
        encode_prompts(
            models,
            tokenizer,
            &[&request.negative_prompt, &request.prompt],
        )?
    } else {
        encode_prompts(models, tokenizer, &[&request.prompt])?
    }
    .to_kind(unet_kind);

    scheduler.set_timesteps(request.steps);
    let channels = models.unet.conv_in.ws.size()[1];
    tch::manual_seed(request.seed as i64);
    let shape = [1, channels, request.height / factor, request.width / factor];
    let mut noise = CpuGenerator;
    let mut latents = (noise.randn(&shape) * scheduler.init_noise_sigma()).to_device(device);
    for t in scheduler.timesteps().to_vec() {
        let input = if guided {
            Tensor::cat(&[&latents, &latents], 0)
        } else {
            latents.shallow_clone()
        };
        let input = scheduler.scale_model_input(&input, t);
        let timestep = Tensor::scalar_tensor(t, (Kind::Float, device));
        // bf16 matrices beside fp32 norms (packed training weights) need autocast's
        // per-op dtypes; all-fp32 weights sample in fp32.
        let mixed = unet_kind == Kind::BFloat16 && device.is_cuda();
        let prediction = crate::cuda::autocast(mixed, || {
            models
                .unet
                .forward(&input.to_kind(unet_kind), &timestep, &context)
        })
        .to_kind(Kind::Float);
        let prediction = if guided {
            let parts = prediction.chunk(2, 0);
            let (uncond, cond) = (&parts[0], &parts[1]);
            uncond + (cond - uncond) * request.guidance_scale
        } else {
            prediction
        };
        latents = scheduler.step(&prediction, t, &latents, &mut noise);
    }

    let vae_kind = models.vae.decoder.conv_in.ws.kind();
    let latents = (latents / models.vae.scaling_factor).to_kind(vae_kind);
    let image = models.vae.decode(&latents).to_kind(Kind::Float);
    Ok((image / 2.0 + 0.5).clamp(0.0, 1.0).to_device(Device::Cpu))
}

/// An image `[1, 3, H, W]` in [0, 1] as 8-bit RGB, rounded as diffusers does before saving.
pub fn to_rgb8(image: &Tensor) -> image::RgbImage {
    let (_, _, height, width) = image.size4().expect("an image batch [1, 3, H, W]");
    let bytes = (image.get(0).permute([1, 2, 0]) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .contiguous()
        .flatten(0, -1);
    let bytes = Vec::<u8>::try_from(&bytes).expect("u8 pixels");
    image::RgbImage::from_raw(width as u32, height as u32, bytes).expect("H×W×3 bytes")
}

/// Writes a generated image as a PNG.
pub fn save_png(image: &Tensor, path: &std::path::Path) -> Result<(), PipelineError> {
    to_rgb8(image)
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| PipelineError::Image {
            path: path.to_owned(),
            source,
        })
}

/// `dreambooth-trainer sample`: one image from a model folder or file.
#[derive(Debug, Clone, clap::Args)]
pub struct SampleArgs {
    /// A diffusers folder or a single `.safetensors`/`.ckpt` file.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// ddim, euler, euler-a or dpmpp-2m-karras.
    #[arg(long, default_value = "dpmpp-2m-karras")]
    pub sampler: Sampler,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Defaults to the size the UNet was trained at (512 for SD 1.x, 768 for SD 2.x-v).
    #[arg(long)]
    pub width: Option<i64>,
    #[arg(long)]
    pub height: Option<i64>,
    #[arg(long)]
    pub out: PathBuf,
}

/// Loads the model, generates on the first CUDA device if there is one, writes the PNG.
pub fn run_sample(args: &SampleArgs) -> Result<(), PipelineError> {
    let loaded = load_pipeline_weights(&args.model)?;
    let tokenizer_dir = loaded
        .tokenizer
        .clone()
        .ok_or_else(|| PipelineError::NoTokenizer {
            path: args.model.clone(),
        })?;
    let tokenizer = ClipTokenizer::from_dir(tokenizer_dir)?;
    let scheduler_cfg: SchedulerConfig =
        serde_json::from_value(loaded.scheduler.clone()).map_err(|e| {
            PipelineError::InvalidConfig {
                path: args.model.clone(),
                what: "scheduler",
                message: e.to_string(),
            }
        })?;
    let sample_size = UNetConfig::from_json(&loaded.unet.config.to_string())?.sample_size;
    let (models, _stores) = Models::load(&loaded, Device::cuda_if_available())?;
    // The networks hold their own copy now; keeping the file's would double peak memory.
    drop(loaded);
    let native = sample_size.unwrap_or(64) * models.vae.downscale_factor();
    let request = SampleRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        seed: args.seed,
        steps: args.steps,
        guidance_scale: args.guidance,
        width: args.width.unwrap_or(native),
        height: args.height.unwrap_or(native),
    };
    let mut scheduler = args.sampler.scheduler(&scheduler_cfg);
    let image = generate(&models, &tokenizer, scheduler.as_mut(), &request)?;
    save_png(&image, &args.out)
}
