//! `dreambooth-trainer bench`: the speed and memory of the training loop's steps on the
//! full-size architecture with random weights, printed next to the physical floor.
//!
//! It times the real [`Trainer`] (the same step a session runs: fused AdamW and a CUDA
//! graph on CUDA unless `--eager`), on synthetic cached latents and captions. The VAE is
//! a tiny one: training never runs it, and a full one would only add to peak memory.

use std::time::Instant;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use dreambooth_api::spec::{LrScheduler, MemoryMode as TrainingMemory};

use crate::cuda;
use crate::models::clip::{ClipTextConfig, clip_text_model};
use crate::models::config::{UNetConfig, VaeConfig};
use crate::models::unet::unet;
use crate::models::vae::autoencoder_kl;
use crate::models::versions::KnownVersion;
use crate::pipeline::{ModelVarStores, Models};
use crate::schedulers::PredictionType;
use crate::train::examples::Example;
use crate::train::objective::NoiseSettings;
use crate::train::trainer::{LoopSettings, Phase, StepPrecision, Trainer};

/// Tokens per caption, as every SD pipeline pads to.
const SEQUENCE_LENGTH: i64 = 77;
/// Distinct synthetic examples the data order cycles through.
const EXAMPLES: usize = 4;

/// `default`: fp32 master weights and AdamW states. `low`: the session's
/// `training.memory: lowMemory` (bf16 weights and states, gradient checkpointing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum MemoryMode {
    Default,
    Low,
}

impl MemoryMode {
    /// The spec's memory mode this option stands for.
    pub fn training_memory(self) -> TrainingMemory {
        match self {
            MemoryMode::Default => TrainingMemory::Default,
            MemoryMode::Low => TrainingMemory::LowMemory,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub version: KnownVersion,
    /// Tiny networks instead of the full-size ones, for smoke tests on the CPU.
    pub tiny: bool,
    pub phase: Phase,
    pub memory: MemoryMode,
    pub resolution: i64,
    pub batch: i64,
    pub steps: usize,
    pub warmup: usize,
    pub device: Device,
    /// bf16 autocast with fp32 master weights (GPU); fp32 otherwise.
    pub bf16: bool,
    /// Eager steps only: no CUDA graph.
    pub eager: bool,
    /// Packed UNet weights where the trainer can use them (see `train::packed_master`).
    pub packed: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub arch: String,
    pub phase: Phase,
    pub memory: MemoryMode,
    /// `packed` (bf16 halves + remainders) or `fp32` (cast by autocast every step).
    pub weights: &'static str,
    pub device: String,
    pub resolution: i64,
    pub batch: i64,
    pub steps: usize,
    pub steps_per_second: f64,
    pub images_per_second: f64,
    pub ms_per_step: f64,
    /// Most bytes held by tensors at once, from model creation on (GiB).
    pub peak_gib: Option<f64>,
    /// Most bytes the caching allocator reserved from the device (GiB).
    pub peak_reserved_gib: Option<f64>,
    /// The estimated physical floor over the measured step time (1.0 = at the floor).
    pub fraction_of_floor: Option<f64>,
    pub final_loss: f64,
}

/// Random-weight networks of `config`'s architecture, and the loop settings of a run
/// that spends all its steps in `config.phase`.
pub fn random_trainer(config: &BenchConfig, seed: i64) -> Trainer {
    let (unet_config, text_config) = if config.tiny {
        (tiny_unet(), tiny_text_encoder())
    } else {
        (config.version.unet(), config.version.text_encoder())
    };
    tch::manual_seed(seed);
    let stores = ModelVarStores {
        text_encoder: VarStore::new(config.device),
        unet: VarStore::new(config.device),
        vae: VarStore::new(config.device),
    };
    let models = Models {
        text_encoder: clip_text_model(stores.text_encoder.root(), &text_config),
        unet: unet(stores.unet.root(), &unet_config),
        vae: autoencoder_kl(stores.vae.root(), &tiny_vae()),
    };
    let side = config.resolution / 8;
    let options = (Kind::Float, config.device);
    let examples = (0..EXAMPLES)
        .map(|_| Example {
            mean: Tensor::randn([1, 4, side, side], options),
            std: Tensor::full([1, 4, side, side], 0.05, options),
            input_ids: Tensor::randint(
                text_config.vocab_size,
                [1, SEQUENCE_LENGTH],
                (Kind::Int64, config.device),
            ),
            embedding: None,
        })
        .collect();
    let steps = (config.warmup + config.steps) as u32;
    let (text_encoder_steps, unet_steps) = match config.phase {
        Phase::TextEncoder => (steps, 0),
        Phase::Unet => (0, steps),
    };
    let settings = LoopSettings {
        text_encoder_steps,
        text_encoder_lr: 1e-6,
        unet_steps,
        unet_lr: 2e-6,
        batch_size: config.batch as usize,
        lr_scheduler: LrScheduler::Constant,
        lr_warmup_steps: 0,
        noise: NoiseSettings {
            prediction: PredictionType::Epsilon,
            offset_noise: 0.0,
            min_snr_gamma: None,
        },
        prior_loss_weight: None,
        seed: seed as u64,
        precision: if config.bf16 && config.device.is_cuda() {
            StepPrecision::Bf16Autocast
        } else {
            StepPrecision::Fp32
        },
        memory: config.memory.training_memory(),
    };
    let mut trainer = Trainer::new(
        models,
        stores,
        settings,
        examples,
        Vec::new(),
        &scaled_linear_alphas_cumprod(),
    );
    trainer.set_cuda_graphs(!config.eager);
    trainer.set_packed_weights(config.packed);
    trainer
}

/// Times `config.steps` steps after `config.warmup` untimed ones (which include the
/// CUDA graph's warm-up and capture).
pub fn bench(config: &BenchConfig) -> BenchReport {
    if config.bf16 && config.device.is_cuda() {
        cuda::set_autocast_bf16(true).expect("bf16 autocast needs the CUDA shim");
        let _ = cuda::set_tf32(true);
    }
    let mut trainer = random_trainer(config, 0);
    if let Device::Cuda(index) = config.device {
        let _ = cuda::reset_peak_memory(index);
    }
    for step in 0..config.warmup {
        let _ = trainer.launch_step(step as u32);
    }
    synchronize(config.device);
    let start = Instant::now();
    let mut last = None;
    for step in config.warmup..config.warmup + config.steps {
        last = Some(trainer.launch_step(step as u32));
    }
    synchronize(config.device);
    let seconds = start.elapsed().as_secs_f64();
    let final_loss = last.map_or(f64::NAN, |pending| pending.read().loss);
    let ms_per_step = seconds * 1000.0 / config.steps.max(1) as f64;
    let (memory, reserved) = match config.device {
        Device::Cuda(index) => (
            cuda::memory_stats(index).ok().flatten(),
            cuda::peak_reserved_memory(index).ok().flatten(),
        ),
        _ => (None, None),
    };
    let gib = |bytes: i64| bytes as f64 / f64::from(1 << 30);
    let floor = (!config.tiny && config.device.is_cuda() && config.phase == Phase::Unet)
        .then(|| floor_ms(config) / ms_per_step);
    let mode = if trainer.replays_cuda_graph() {
        "graph"
    } else {
        "eager"
    };
    BenchReport {
        implementation: format!("dreambooth-{mode}"),
        arch: if config.tiny {
            "tiny".into()
        } else {
            format!("{:?}", config.version).to_lowercase()
        },
        phase: config.phase,
        memory: config.memory,
        weights: if trainer.trains_packed_weights() {
            "packed"
        } else {
            "fp32"
        },
        device: format!("{:?}", config.device),
        resolution: config.resolution,
        batch: config.batch,
        steps: config.steps,
        steps_per_second: 1000.0 / ms_per_step,
        images_per_second: 1000.0 / ms_per_step * config.batch as f64,
        ms_per_step,
        peak_gib: memory.map(|m| gib(m.peak)),
        peak_reserved_gib: reserved.map(gib),
        fraction_of_floor: floor,
        final_loss,
    }
}

/// DESIGN.md's estimate on an H200: 3.1 ms of bf16 compute per 512² image for SD1.5's
/// forward and backward, plus 5.6 ms for AdamW to stream 860M fp32 parameters.
fn floor_ms(config: &BenchConfig) -> f64 {
    let pixels = (config.resolution as f64 / 512.0).powi(2);
    3.1 * pixels * config.batch as f64 + 5.6
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// SD's training schedule (scaled-linear betas 0.00085..0.012 over 1000 steps).
fn scaled_linear_alphas_cumprod() -> Vec<f32> {
    let mut product = 1f64;
    (0..1000)
        .map(|i| {
            let root =
                0.00085f64.sqrt() + (0.012f64.sqrt() - 0.00085f64.sqrt()) * f64::from(i) / 999.0;
            product *= 1.0 - root * root;
            product as f32
        })
        .collect()
}

fn tiny_unet() -> UNetConfig {
    UNetConfig::from_json(
        r#"{"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "cross_attention_dim": 32, "attention_head_dim": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}"#,
    )
    .expect("the tiny UNet config parses")
}

fn tiny_text_encoder() -> ClipTextConfig {
    serde_json::from_str(
        r#"{"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
            "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 999}"#,
    )
    .expect("the tiny text-encoder config parses")
}

fn tiny_vae() -> VaeConfig {
    VaeConfig::from_json(
        r#"{"block_out_channels": [32], "layers_per_block": 1, "norm_num_groups": 8,
            "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D"]}"#,
    )
    .expect("the tiny VAE config parses")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(phase: Phase) -> BenchConfig {
        BenchConfig {
            version: KnownVersion::Sd15,
            tiny: true,
            phase,
            memory: MemoryMode::Default,
            resolution: 64,
            batch: 2,
            steps: 2,
            warmup: 1,
            device: Device::Cpu,
            bf16: false,
            eager: false,
            packed: true,
        }
    }

    #[test]
    fn tiny_bench_runs_both_phases_on_the_cpu() {
        for phase in [Phase::Unet, Phase::TextEncoder] {
            let report = bench(&tiny(phase));
            assert!(
                report.steps_per_second > 0.0 && report.final_loss.is_finite(),
                "{report:?}"
            );
            assert_eq!(report.images_per_second, report.steps_per_second * 2.0);
            assert_eq!(report.peak_gib, None);
            // No CUDA on the CPU: the eager step on fp32 weights, named as such.
            assert_eq!(report.implementation, "dreambooth-eager");
            assert_eq!(report.weights, "fp32");
        }
    }

    #[test]
    fn low_memory_bench_runs_the_trainers_low_memory_path() {
        let config = BenchConfig {
            memory: MemoryMode::Low,
            ..tiny(Phase::Unet)
        };
        let trainer = random_trainer(&config, 0);
        assert_eq!(trainer.settings.memory, TrainingMemory::LowMemory);
        let kinds: Vec<Kind> = trainer
            .stores
            .unet
            .variables()
            .values()
            .map(Tensor::kind)
            .collect();
        assert!(kinds.iter().all(|k| *k == Kind::BFloat16), "{kinds:?}");
        let report = bench(&config);
        assert_eq!(report.memory, MemoryMode::Low);
        assert!(report.final_loss.is_finite(), "{report:?}");
    }

    #[test]
    fn the_schedule_is_sd_scaled_linear() {
        let alphas = scaled_linear_alphas_cumprod();
        assert!((alphas[0] - (1.0 - 0.00085)).abs() < 1e-6, "{}", alphas[0]);
        assert!((alphas[999] - 0.004_66).abs() < 1e-4, "{}", alphas[999]);
    }
}
