//! `dreambooth-trainer bench`: the speed and memory of one training step on the
//! full-size architecture with random weights, printed next to the physical floor.
//!
//! This is the eager path (libtorch's AdamW, autocast); the CUDA-graph fast path
//! reports through the same numbers when it lands.

use std::time::Instant;

use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};

use crate::cuda;
use crate::models::config::UNetConfig;
use crate::models::unet::unet;
use crate::models::versions::KnownVersion;
use crate::schedulers::PredictionType;
use crate::train::objective::{NoiseSettings, loss, noise_batch};

/// Tokens per caption, as every SD pipeline pads to.
const SEQUENCE_LENGTH: i64 = 77;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub version: KnownVersion,
    /// A tiny UNet instead of the full-size one, for smoke tests on the CPU.
    pub tiny: bool,
    pub resolution: i64,
    pub batch: i64,
    pub steps: usize,
    pub warmup: usize,
    pub device: Device,
    /// bf16 autocast with fp32 master weights (GPU); fp32 otherwise.
    pub bf16: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub arch: String,
    pub device: String,
    pub resolution: i64,
    pub batch: i64,
    pub steps: usize,
    pub steps_per_second: f64,
    pub images_per_second: f64,
    pub ms_per_step: f64,
    pub peak_gib: Option<f64>,
    /// The estimated physical floor over the measured step time (1.0 = at the floor).
    pub fraction_of_floor: Option<f64>,
    pub final_loss: f64,
}

fn tiny_unet() -> UNetConfig {
    UNetConfig::from_json(
        r#"{"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "cross_attention_dim": 32, "attention_head_dim": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}"#,
    )
    .expect("the tiny config parses")
}

/// Times the UNet phase: noise, forward, loss, backward, grad clip 1.0, AdamW.
pub fn bench_unet_phase(config: &BenchConfig) -> BenchReport {
    let unet_config = if config.tiny {
        tiny_unet()
    } else {
        config.version.unet()
    };
    let context_dim = match &unet_config.cross_attention_dim {
        crate::models::config::PerBlock::One(d) => *d,
        crate::models::config::PerBlock::Each(d) => d[0],
    };
    let latent_side = config.resolution / 8;
    let use_autocast = config.bf16 && config.device.is_cuda();
    if use_autocast {
        cuda::set_autocast_bf16(true).expect("bf16 autocast needs the CUDA shim");
        let _ = cuda::set_tf32(true);
    }
    tch::manual_seed(0);
    let vs = nn::VarStore::new(config.device);
    let model = unet(vs.root(), &unet_config);
    let mut optimizer = nn::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        wd: 1e-2,
        eps: 1e-8,
        amsgrad: false,
    }
    .build(&vs, 2e-6)
    .expect("AdamW builds");
    let options = (Kind::Float, config.device);
    let latents = Tensor::randn([config.batch, 4, latent_side, latent_side], options);
    let context = Tensor::randn([config.batch, SEQUENCE_LENGTH, context_dim], options);
    let alphas_cumprod = scaled_linear_alphas_cumprod(config.device);
    let settings = NoiseSettings {
        prediction: PredictionType::Epsilon,
        offset_noise: 0.0,
        min_snr_gamma: None,
    };
    let step = |optimizer: &mut nn::Optimizer| -> Tensor {
        let batch = noise_batch(&latents, &alphas_cumprod, &settings);
        let prediction = cuda::autocast(use_autocast, || {
            model.forward(&batch.noisy_latents, &batch.timesteps, &context)
        });
        let loss = loss(&prediction, &batch, None);
        optimizer.backward_step_clip_norm(&loss, 1.0);
        loss
    };
    for _ in 0..config.warmup {
        let _ = step(&mut optimizer);
    }
    synchronize(config.device);
    if config.device.is_cuda() {
        let _ = cuda::reset_peak_memory(0);
    }
    let start = Instant::now();
    let mut last = Tensor::zeros([], options);
    for _ in 0..config.steps {
        last = step(&mut optimizer);
    }
    synchronize(config.device);
    let seconds = start.elapsed().as_secs_f64();
    let ms_per_step = seconds * 1000.0 / config.steps as f64;
    let peak_gib = match config.device {
        Device::Cuda(index) => cuda::memory_stats(index)
            .ok()
            .flatten()
            .map(|m| m.peak as f64 / f64::from(1 << 30)),
        _ => None,
    };
    let floor = (!config.tiny && config.device.is_cuda()).then(|| floor_ms(config) / ms_per_step);
    BenchReport {
        arch: if config.tiny {
            "tiny".into()
        } else {
            format!("{:?}", config.version).to_lowercase()
        },
        device: format!("{:?}", config.device),
        resolution: config.resolution,
        batch: config.batch,
        steps: config.steps,
        steps_per_second: 1000.0 / ms_per_step,
        images_per_second: 1000.0 / ms_per_step * config.batch as f64,
        ms_per_step,
        peak_gib,
        fraction_of_floor: floor,
        final_loss: last.double_value(&[]),
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
fn scaled_linear_alphas_cumprod(device: Device) -> Tensor {
    let betas = Tensor::linspace(
        0.00085f64.sqrt(),
        0.012f64.sqrt(),
        1000,
        (Kind::Float, device),
    )
    .square();
    (1f64 - betas).cumprod(0, Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_bench_runs_on_the_cpu_and_reports_speed() {
        let report = bench_unet_phase(&BenchConfig {
            version: KnownVersion::Sd15,
            tiny: true,
            resolution: 64,
            batch: 2,
            steps: 2,
            warmup: 1,
            device: Device::Cpu,
            bf16: false,
        });
        assert!(
            report.steps_per_second > 0.0 && report.final_loss.is_finite(),
            "{report:?}"
        );
        assert_eq!(report.images_per_second, report.steps_per_second * 2.0);
        assert_eq!(report.peak_gib, None);
    }
}
