//! Euler's method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 2 without
//! churn), as diffusers' `EulerDiscreteScheduler`.

use tch::Tensor;

use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing, index_for_timestep,
    interp_index, karras_sigmas, sigma_to_t, spaced_timesteps, train_sigmas, training_timesteps,
};

/// The inference timesteps and noise levels shared by Euler and Euler ancestral.
#[derive(Debug, Clone)]
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One more than `timesteps`: the last is 0 (a clean sample).
    pub sigmas: Vec<f32>,
}

/// Picks fractional timesteps by spacing and interpolates σ at them, as the Euler
/// schedulers do (they keep `linspace` timesteps unrounded).
pub(super) fn euler_schedule(
    cfg: &SchedulerConfig,
    alphas_cumprod: &[f32],
    n: usize,
    karras: bool,
) -> SigmaSchedule {
    let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
    let timesteps = spaced_timesteps(cfg, spacing, n, |t| t as f32 as f64);
    let all = train_sigmas(alphas_cumprod);
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp_index(t, &all)).collect();
    let timesteps = if karras {
        let log_sigmas: Vec<f32> = all.iter().map(|s| s.ln()).collect();
        let (min, max) = (sigmas[sigmas.len() - 1], sigmas[0]);
        sigmas = karras_sigmas(min, max, n);
        sigmas
            .iter()
            .map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64)
            .collect()
    } else {
        timesteps
    };
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(0.0);
    SigmaSchedule { timesteps, sigmas }
}

/// Every training timestep, before `set_timesteps` picks some.
pub(super) fn training_schedule(alphas_cumprod: &[f32]) -> SigmaSchedule {
    let mut sigmas: Vec<f32> = train_sigmas(alphas_cumprod).into_iter().rev().collect();
    sigmas.push(0.0);
    SigmaSchedule {
        timesteps: training_timesteps(alphas_cumprod.len()),
        sigmas,
    }
}

/// The initial noise scale: σ_max, or √(σ_max² + 1) under leading spacing, as diffusers has it.
pub(super) fn euler_init_noise_sigma(cfg: &SchedulerConfig, sigmas: &[f32]) -> f64 {
    let max = sigmas.iter().copied().fold(0.0f32, f32::max);
    match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// x₀ as the network sees it at noise level σ.
pub(super) fn predicted_original(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Tensor {
    match prediction_type {
        PredictionType::Epsilon => sample - model_output * sigma as f64,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            model_output * (-sigma / s2.sqrt()) as f64 + sample / s2 as f64
        }
        PredictionType::Sample => model_output.shallow_clone(),
    }
}

/// What Euler and Euler ancestral share: the config, ᾱ, the current σ schedule and where
/// a run is in it, and the Euler move along the ODE that both steps start with.
#[derive(Debug, Clone)]
pub(super) struct EulerState {
    cfg: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    schedule: SigmaSchedule,
    step_index: Option<usize>,
}

impl EulerState {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        let mut alphas_cumprod = cfg.alphas_cumprod();
        if cfg.rescale_betas_zero_snr {
            // Zero terminal SNR makes σ infinite; diffusers nudges it to a finite value.
            *alphas_cumprod.last_mut().expect("training timesteps") = 2f32.powi(-24);
        }
        let schedule = training_schedule(&alphas_cumprod);
        Self {
            cfg: cfg.clone(),
            alphas_cumprod,
            schedule,
            step_index: None,
        }
    }

    fn index(&mut self, timestep: f64) -> usize {
        *self
            .step_index
            .get_or_insert_with(|| index_for_timestep(&self.schedule.timesteps, timestep))
    }

    pub fn set_timesteps(&mut self, num_inference_steps: usize, karras: bool) {
        self.schedule = euler_schedule(
            &self.cfg,
            &self.alphas_cumprod,
            num_inference_steps.max(1),
            karras,
        );
        self.step_index = None;
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    pub fn init_noise_sigma(&self) -> f64 {
        euler_init_noise_sigma(&self.cfg, &self.schedule.sigmas)
    }

    pub fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Tensor {
        let i = self.index(timestep);
        let sigma = self.schedule.sigmas[i];
        sample / ((sigma * sigma + 1.0).sqrt() as f64)
    }

    /// One step from `timestep`: `advance(sample, derivative, σ, σ_next)` gets the float32
    /// sample and dx/dσ there and returns the next sample, which comes back in the model's kind.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        advance: impl FnOnce(Tensor, Tensor, f32, f32) -> Tensor,
    ) -> Tensor {
        let i = self.index(timestep);
        let (sigma, sigma_next) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        let sample = sample.to_kind(tch::Kind::Float);
        let pred_original =
            predicted_original(self.cfg.prediction_type, model_output, &sample, sigma);
        let derivative = (&sample - pred_original) / sigma as f64;
        let prev = advance(sample, derivative, sigma, sigma_next);
        self.step_index = Some(i + 1);
        prev.to_kind(model_output.kind())
    }
}

#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    state: EulerState,
}

impl EulerDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        Self {
            state: EulerState::new(cfg),
        }
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        let karras = self.state.cfg.use_karras_sigmas.unwrap_or(false);
        self.state.set_timesteps(num_inference_steps, karras);
    }

    fn timesteps(&self) -> &[f64] {
        self.state.timesteps()
    }

    fn sigmas(&self) -> &[f32] {
        self.state.sigmas()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.state.init_noise_sigma()
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Tensor {
        self.state.scale_model_input(sample, timestep)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Tensor {
        self.state.step(
            model_output,
            timestep,
            sample,
            |sample, derivative, sigma, sigma_next| {
                sample + derivative * (sigma_next - sigma) as f64
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_schedule_starts_at_the_largest_sigma_and_ends_at_zero() {
        let mut s = EulerDiscreteScheduler::new(&SchedulerConfig::stable_diffusion(
            PredictionType::Epsilon,
        ));
        s.set_timesteps(10);
        assert_eq!(s.timesteps()[0], 999.0);
        assert_eq!(s.timesteps()[9], 0.0);
        assert!((s.timesteps()[1] - 888.0).abs() < 1e-9);
        assert_eq!(s.sigmas().len(), 11);
        assert_eq!(s.sigmas()[10], 0.0);
        assert!((s.init_noise_sigma() - s.sigmas()[0] as f64).abs() < 1e-12);
    }

    #[test]
    fn leading_spacing_scales_the_initial_noise_for_unit_variance_input() {
        let cfg = SchedulerConfig {
            timestep_spacing: Some(TimestepSpacing::Leading),
            ..SchedulerConfig::stable_diffusion(PredictionType::Epsilon)
        };
        let mut s = EulerDiscreteScheduler::new(&cfg);
        s.set_timesteps(10);
        assert_eq!(s.timesteps()[0], 901.0);
        let max = s.sigmas()[0] as f64;
        assert!((s.init_noise_sigma() - (max * max + 1.0).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn an_epsilon_step_moves_along_the_noise_by_the_sigma_difference() {
        let mut s = EulerDiscreteScheduler::new(&SchedulerConfig::stable_diffusion(
            PredictionType::Epsilon,
        ));
        s.set_timesteps(5);
        let t0 = s.timesteps()[0];
        let sample = Tensor::from_slice(&[2.0f32, -1.0]);
        let eps = Tensor::from_slice(&[1.0f32, 1.0]);
        let scaled = s.scale_model_input(&sample, t0);
        let sigma = s.sigmas()[0] as f64;
        assert!((scaled.double_value(&[0]) - 2.0 / (sigma * sigma + 1.0).sqrt()).abs() < 1e-6);
        let out = s.step(&eps, t0, &sample, &mut crate::schedulers::CpuGenerator);
        let expected = 2.0 + (s.sigmas()[1] as f64 - sigma);
        assert!((out.double_value(&[0]) - expected).abs() < 1e-4);
    }
}
