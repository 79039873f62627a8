//! Noise schedulers: DDPM for training, and the samplers used for inference.
//!
//! Each scheduler reproduces diffusers' class of the same name step for step, reading
//! the same `scheduler/scheduler_config.json`, so a seed gives the same image. Scalar
//! maths runs in `f32` in the order diffusers runs it on 0-d float32 tensors, and the
//! noise schedule itself is computed with libtorch, so the numbers agree bit for bit
//! where the reference's do.

pub mod ddim;
pub mod ddpm;
pub mod dpmpp;
pub mod euler;
pub mod euler_ancestral;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpmpp::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;

/// How the betas grow over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    /// Linear in √β: what Stable Diffusion was trained with.
    ScaledLinear,
    /// The cosine schedule of improved DDPM.
    SquaredcosCapV2,
}

/// What the network predicts; it decides the training target and how samplers read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// How inference timesteps are picked among the training ones (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// `scheduler/scheduler_config.json`. One file serves every scheduler, as in diffusers;
/// the optional keys default per scheduler (as `from_config` does) when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub steps_offset: usize,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    pub use_karras_sigmas: Option<bool>,
    pub rescale_betas_zero_snr: bool,
    pub solver_order: Option<usize>,
    pub lower_order_final: Option<bool>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            steps_offset: 0,
            timestep_spacing: None,
            set_alpha_to_one: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            use_karras_sigmas: None,
            rescale_betas_zero_snr: false,
            solver_order: None,
            lower_order_final: None,
        }
    }
}

/// Why a scheduler config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerConfigError {
    #[error("cannot read scheduler config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid scheduler config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl SchedulerConfig {
    /// Stable Diffusion 1.x and 2.x as trained: scaled-linear betas from 0.00085 to 0.012.
    pub fn stable_diffusion(prediction_type: PredictionType) -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type,
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            ..Self::default()
        }
    }

    /// Reads `scheduler_config.json`. Keys the file leaves out take the defaults of the
    /// scheduler built from it, not of the class the file names: diffusers records which
    /// values were defaulted and drops them when `from_config` switches classes.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| SchedulerConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The cumulative product of (1 - β) over the training timesteps, float32 as in
    /// diffusers (it is computed there in float32 too, and sampling depends on its rounding).
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps as i64;
        let opts = (Kind::Float, Device::Cpu);
        let betas = match (&self.trained_betas, self.beta_schedule) {
            (Some(betas), _) => Tensor::from_slice(betas).to_kind(Kind::Float),
            (None, BetaSchedule::Linear) => {
                Tensor::linspace(self.beta_start, self.beta_end, n, opts)
            }
            (None, BetaSchedule::ScaledLinear) => {
                Tensor::linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n, opts).square()
            }
            (None, BetaSchedule::SquaredcosCapV2) => {
                Tensor::from_slice(&cosine_betas(self.num_train_timesteps)).to_kind(Kind::Float)
            }
        };
        let betas = if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let alphas_cumprod = (betas.ones_like() - &betas).cumprod(0, Kind::Float);
        Vec::<f32>::try_from(&alphas_cumprod).expect("a float vector")
    }

    /// A predicted x₀ clamped to ±`clip_sample_range` when `clip_sample` is on (as DDPM and
    /// DDIM default it), unchanged otherwise.
    fn clip_predicted_original(&self, pred_original: Tensor) -> Tensor {
        if self.clip_sample.unwrap_or(true) {
            let r = self.clip_sample_range;
            pred_original.clamp(-r, r)
        } else {
            pred_original
        }
    }
}

/// Improved DDPM's cosine schedule, β capped at 0.999.
fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// Shifts the schedule so the last timestep has zero signal (Lin et al. 2023).
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let sqrt_bar = (betas.ones_like() - betas).cumprod(0, Kind::Float).sqrt();
    let first = sqrt_bar.get(0);
    let last = sqrt_bar.get(-1);
    let sqrt_bar = (&sqrt_bar - &last) * (&first / (&first - &last));
    let bar = sqrt_bar.square();
    let n = bar.size()[0];
    let alphas = Tensor::cat(
        &[
            bar.narrow(0, 0, 1),
            bar.narrow(0, 1, n - 1) / bar.narrow(0, 0, n - 1),
        ],
        0,
    );
    alphas.ones_like() - alphas
}

/// The Karras et al. noise levels between `sigma_max` and `sigma_min` (ρ = 7), in f64
/// as diffusers computes them.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// numpy's `linspace` (endpoint included), in f64.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        end
                    } else {
                        start + i as f64 * step
                    }
                })
                .collect()
        }
    }
}

/// numpy's `interp` of `x` over the points `(i, values[i])`.
fn interp_index(x: f64, values: &[f32]) -> f64 {
    let last = values.len() - 1;
    if x <= 0.0 {
        return values[0] as f64;
    }
    if x >= last as f64 {
        return values[last] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (values[j] as f64, values[j + 1] as f64);
    (hi - lo) * (x - j as f64) + lo
}

/// The (fractional) training timestep whose noise level is `sigma`, interpolating in log σ.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // diffusers takes the last index where log σ ≥ log_sigmas[i] (0 when there is none).
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The noise level σ = √((1 - ᾱ)/ᾱ) of every training timestep, in float32.
fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// Inference timesteps by spacing. `linspace` spacing gives fractional ones, which
/// `on_linspace` turns into what the scheduler keeps: DDPM and DDIM round them, the Euler
/// schedulers only cast them to float32.
fn spaced_timesteps(
    cfg: &SchedulerConfig,
    spacing: TimestepSpacing,
    n: usize,
    on_linspace: impl Fn(f64) -> f64,
) -> Vec<f64> {
    let train = cfg.num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(on_linspace)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(train as f64, train as f64 / n as f64)
            .into_iter()
            .map(|t| round_half_even(t) - 1.0)
            .collect(),
    }
}

/// Integer inference timesteps, leading-spaced unless configured, as DDPM and DDIM pick
/// them; `num_inference_steps` is clamped to the training timesteps. Returns the steps
/// actually taken and the timesteps.
fn discrete_timesteps(cfg: &SchedulerConfig, num_inference_steps: usize) -> (usize, Vec<f64>) {
    let n = num_inference_steps.clamp(1, cfg.num_train_timesteps);
    let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
    (n, spaced_timesteps(cfg, spacing, n, round_half_even))
}

/// Every training timestep, last first: the schedule before `set_timesteps` picks some.
fn training_timesteps(num_train_timesteps: usize) -> Vec<f64> {
    (0..num_train_timesteps).rev().map(|t| t as f64).collect()
}

/// numpy's `arange(start, 0, -step)`.
fn trailing(start: f64, step: f64) -> Vec<f64> {
    let count = (start / step).ceil() as usize;
    (0..count).map(|i| start - i as f64 * step).collect()
}

/// numpy rounds halves to even.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// Where sampling noise comes from. Ancestral samplers draw from it once per step, in
/// order, so a pipeline that hands in the seeded CPU generator reproduces diffusers.
pub trait NoiseSource {
    /// Standard normal noise of `shape`; the scheduler moves it to the sample's device and kind.
    fn randn(&mut self, shape: &[i64]) -> Tensor;
}

impl<F: FnMut(&[i64]) -> Tensor> NoiseSource for F {
    fn randn(&mut self, shape: &[i64]) -> Tensor {
        self(shape)
    }
}

/// libtorch's global CPU generator, drawn float32 as diffusers' `randn_tensor` draws with a
/// CPU `torch.Generator`: seed it with `tch::manual_seed` first.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuGenerator;

impl NoiseSource for CpuGenerator {
    fn randn(&mut self, shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }
}

/// Draws noise shaped like `like`, on its device and in its kind.
fn noise_like(noise: &mut dyn NoiseSource, like: &Tensor) -> Tensor {
    noise
        .randn(&like.size())
        .to_device(like.device())
        .to_kind(like.kind())
}

/// The interface every inference scheduler shares, as in diffusers.
pub trait Scheduler {
    /// Chooses the timesteps of an `n`-step run and resets any state from a previous run.
    fn set_timesteps(&mut self, num_inference_steps: usize);
    /// The timesteps to feed the UNet, first to last (fractional for some schedulers).
    fn timesteps(&self) -> &[f64];
    /// The noise level of each timestep plus a final one, for the σ-parameterised
    /// schedulers; empty for those that work in ᾱ (DDPM, DDIM).
    fn sigmas(&self) -> &[f32] {
        &[]
    }
    /// Scale of the initial Gaussian latents: 1 for the schedulers that work in ᾱ.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The UNet input at `timestep`: σ-scaled for the Karras-style samplers, the sample
    /// itself for the others.
    fn scale_model_input(&mut self, sample: &Tensor, _timestep: f64) -> Tensor {
        sample.shallow_clone()
    }
    /// One denoising step from `timestep`: returns the previous (less noisy) sample.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Tensor;
}

/// Position of `timestep` in `timesteps`; with duplicates diffusers takes the second, so a
/// run that starts mid-schedule does not skip a σ.
fn index_for_timestep(timesteps: &[f64], timestep: f64) -> usize {
    let hits: Vec<usize> = timesteps
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == timestep)
        .map(|(i, _)| i)
        .collect();
    match hits.as_slice() {
        [] => timesteps.len().saturating_sub(1),
        [only] => *only,
        [_, second, ..] => *second,
    }
}

/// The samplers the `sample` command offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampler {
    Ddim,
    Euler,
    #[serde(rename = "euler-a")]
    EulerAncestral,
    #[serde(rename = "dpmpp-2m-karras")]
    DpmPp2mKarras,
}

impl Sampler {
    pub const ALL: [Sampler; 4] = [
        Sampler::Ddim,
        Sampler::Euler,
        Sampler::EulerAncestral,
        Sampler::DpmPp2mKarras,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Sampler::Ddim => "ddim",
            Sampler::Euler => "euler",
            Sampler::EulerAncestral => "euler-a",
            Sampler::DpmPp2mKarras => "dpmpp-2m-karras",
        }
    }

    /// The scheduler for this sampler, configured from the model's scheduler config.
    pub fn scheduler(self, cfg: &SchedulerConfig) -> Box<dyn Scheduler> {
        match self {
            Sampler::Ddim => Box::new(DdimScheduler::new(cfg)),
            Sampler::Euler => Box::new(EulerDiscreteScheduler::new(cfg)),
            Sampler::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(cfg)),
            Sampler::DpmPp2mKarras => {
                let cfg = SchedulerConfig {
                    use_karras_sigmas: Some(true),
                    solver_order: Some(2),
                    lower_order_final: Some(true),
                    ..cfg.clone()
                };
                Box::new(DpmSolverMultistepScheduler::new(&cfg))
            }
        }
    }
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown `--sampler` value.
#[derive(Debug, thiserror::Error)]
#[error("unknown sampler {0:?}: expected one of ddim, euler, euler-a, dpmpp-2m-karras")]
pub struct UnknownSampler(pub String);

impl FromStr for Sampler {
    type Err = UnknownSampler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Sampler::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| UnknownSampler(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_diffusion_schedule_ends_where_diffusers_does() {
        let ac = SchedulerConfig::stable_diffusion(PredictionType::Epsilon).alphas_cumprod();
        assert_eq!(ac.len(), 1000);
        assert!((ac[0] - (1.0 - 0.00085)).abs() < 1e-7);
        // ᾱ at t = 999 for SD's schedule is about 0.00466: σ_max ≈ 14.61.
        let sigma_max = train_sigmas(&ac)[999];
        assert!((sigma_max - 14.6146).abs() < 1e-3, "{sigma_max}");
    }

    #[test]
    fn discrete_spacings_match_numpy() {
        let cfg = SchedulerConfig {
            steps_offset: 1,
            ..SchedulerConfig::default()
        };
        let spaced = |spacing, n| spaced_timesteps(&cfg, spacing, n, round_half_even);
        assert_eq!(
            spaced(TimestepSpacing::Leading, 10),
            [901., 801., 701., 601., 501., 401., 301., 201., 101., 1.]
        );
        assert_eq!(
            spaced(TimestepSpacing::Trailing, 3),
            [999., 666., 332.] // arange(1000, 0, -333.33).round() - 1
        );
        assert_eq!(spaced(TimestepSpacing::Linspace, 4), [999., 666., 333., 0.]);
        assert_eq!(
            discrete_timesteps(&cfg, 10).1,
            spaced(TimestepSpacing::Leading, 10)
        );
    }

    #[test]
    fn numpy_rounding_and_interp() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(-0.5), 0.0);
        assert_eq!(round_half_even(332.6), 333.0);
        let v = [0.0f32, 10.0, 30.0];
        assert_eq!(interp_index(0.5, &v), 5.0);
        assert_eq!(interp_index(1.25, &v), 15.0);
        assert_eq!(interp_index(2.0, &v), 30.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let ac = SchedulerConfig::stable_diffusion(PredictionType::Epsilon).alphas_cumprod();
        let sigmas = train_sigmas(&ac);
        let log_sigmas: Vec<f32> = sigmas.iter().map(|s| s.ln()).collect();
        for t in [0usize, 1, 500, 998, 999] {
            let back = sigma_to_t(sigmas[t] as f64, &log_sigmas);
            assert!((back - t as f64).abs() < 1e-3, "{t} -> {back}");
        }
        let between = sigma_to_t(
            ((sigmas[10] as f64).ln() * 0.5 + (sigmas[11] as f64).ln() * 0.5).exp(),
            &log_sigmas,
        );
        assert!((between - 10.5).abs() < 1e-3, "{between}");
    }

    #[test]
    fn karras_sigmas_span_the_range() {
        let s = karras_sigmas(0.03, 14.6, 5);
        assert!((s[0] - 14.6).abs() < 1e-9 && (s[4] - 0.03).abs() < 1e-9);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn samplers_parse_by_cli_name() {
        for s in Sampler::ALL {
            assert_eq!(s.name().parse::<Sampler>().unwrap(), s);
        }
        assert!(
            "heun"
                .parse::<Sampler>()
                .unwrap_err()
                .to_string()
                .contains("dpmpp-2m-karras")
        );
    }

    #[test]
    fn config_reads_diffusers_json() {
        let json = r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false,
            "prediction_type": "v_prediction"}"#;
        let cfg: SchedulerConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            cfg,
            SchedulerConfig::stable_diffusion(PredictionType::VPrediction)
        );
        assert_eq!(
            cfg.timestep_spacing, None,
            "each scheduler picks its own default"
        );
    }
}
