//! Euler ancestral: each Euler step goes down to a lower σ and fresh noise brings it back
//! up, as diffusers' `EulerAncestralDiscreteScheduler` (k-diffusion's `sample_euler_ancestral`).

use tch::Tensor;

use super::euler::{
    SigmaSchedule, euler_init_noise_sigma, euler_schedule, predicted_original, training_schedule,
};
use super::{NoiseSource, Scheduler, SchedulerConfig, index_for_timestep, noise_like};

#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    cfg: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    schedule: SigmaSchedule,
    step_index: Option<usize>,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        let mut alphas_cumprod = cfg.alphas_cumprod();
        if cfg.rescale_betas_zero_snr {
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
}

/// Splits the move from σ_from to σ_to into a deterministic part down to σ_down and fresh
/// noise of scale σ_up, with σ_down² + σ_up² = σ_to².
fn ancestral_sigmas(sigma_from: f32, sigma_to: f32) -> (f32, f32) {
    let up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
        / (sigma_from * sigma_from))
        .sqrt();
    let down = (sigma_to * sigma_to - up * up).sqrt();
    (down, up)
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        self.schedule = euler_schedule(
            &self.cfg,
            &self.alphas_cumprod,
            num_inference_steps.max(1),
            false,
        );
        self.step_index = None;
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    fn init_noise_sigma(&self) -> f64 {
        euler_init_noise_sigma(&self.cfg, &self.schedule.sigmas)
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Tensor {
        let i = self.index(timestep);
        let sigma = self.schedule.sigmas[i];
        sample / ((sigma * sigma + 1.0).sqrt() as f64)
    }

    /// Draws noise at every step, the last included, so the generator advances as in diffusers.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Tensor {
        let i = self.index(timestep);
        let (sigma, sigma_to) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        let sample = sample.to_kind(tch::Kind::Float);
        let pred_original =
            predicted_original(self.cfg.prediction_type, model_output, &sample, sigma);
        let (sigma_down, sigma_up) = ancestral_sigmas(sigma, sigma_to);
        let derivative = (&sample - pred_original) / sigma as f64;
        let prev = sample + derivative * (sigma_down - sigma) as f64;
        let prev = prev + noise_like(noise, model_output) * sigma_up as f64;
        self.step_index = Some(i + 1);
        prev.to_kind(model_output.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::PredictionType;
    use tch::{Device, Kind};

    #[test]
    fn ancestral_split_preserves_the_target_variance() {
        let (down, up) = ancestral_sigmas(5.0, 3.0);
        assert!((down * down + up * up - 9.0).abs() < 1e-4);
        assert!(down < 3.0 && up > 0.0);
        assert_eq!(ancestral_sigmas(2.0, 0.0), (0.0, 0.0));
    }

    #[test]
    fn every_step_draws_noise_shaped_like_the_sample() {
        let mut s = EulerAncestralDiscreteScheduler::new(&SchedulerConfig::stable_diffusion(
            PredictionType::Epsilon,
        ));
        s.set_timesteps(3);
        let mut draws = Vec::new();
        let mut source = |shape: &[i64]| {
            draws.push(shape.to_vec());
            Tensor::zeros(shape, (Kind::Float, Device::Cpu))
        };
        let mut x = Tensor::ones([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        for t in s.timesteps().to_vec() {
            let eps = s.scale_model_input(&x, t) * 0.0;
            x = s.step(&eps, t, &x, &mut source);
        }
        assert_eq!(draws, vec![vec![1, 4, 2, 2]; 3]);
    }
}
