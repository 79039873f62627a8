//! Euler ancestral: each Euler step goes down to a lower σ and fresh noise brings it back
//! up, as diffusers' `EulerAncestralDiscreteScheduler` (k-diffusion's `sample_euler_ancestral`).

use tch::Tensor;

use super::euler::EulerState;
use super::{NoiseSource, Scheduler, SchedulerConfig, noise_like};

#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    state: EulerState,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        Self {
            state: EulerState::new(cfg),
        }
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
        self.state.set_timesteps(num_inference_steps, false);
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

    /// Draws noise at every step, the last included, so the generator advances as in diffusers.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Tensor {
        self.state.step(
            model_output,
            timestep,
            sample,
            |sample, derivative, sigma, sigma_to| {
                let (sigma_down, sigma_up) = ancestral_sigmas(sigma, sigma_to);
                let prev = sample + derivative * (sigma_down - sigma) as f64;
                prev + noise_like(noise, model_output) * sigma_up as f64
            },
        )
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
