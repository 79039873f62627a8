//! DDIM (Song et al. 2021) with η = 0: the deterministic sampler, as diffusers'
//! `DDIMScheduler`.

use tch::Tensor;

use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, discrete_timesteps, training_timesteps,
};

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    cfg: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// ᾱ after the last step: 1 (a clean image) or, as SD configures it, ᾱ₀.
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
}

impl DdimScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        let alphas_cumprod = cfg.alphas_cumprod();
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let n = cfg.num_train_timesteps;
        Self {
            cfg: cfg.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: training_timesteps(n),
            num_inference_steps: n,
        }
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        (self.num_inference_steps, self.timesteps) =
            discrete_timesteps(&self.cfg, num_inference_steps);
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Tensor {
        let t = timestep as i64;
        // diffusers steps back by the leading ratio whatever the spacing; so do we.
        let prev_t = t - (self.cfg.num_train_timesteps / self.num_inference_steps) as i64;
        let alpha_prod_t = self.alphas_cumprod[t as usize];
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt() as f64, beta_prod_t.sqrt() as f64);

        let (pred_original, pred_epsilon) = match self.cfg.prediction_type {
            PredictionType::Epsilon => (
                (sample - model_output * sqrt_b) / sqrt_a,
                model_output.shallow_clone(),
            ),
            PredictionType::Sample => (
                (model_output.shallow_clone()),
                (sample - model_output * sqrt_a) / sqrt_b,
            ),
            PredictionType::VPrediction => (
                sample * sqrt_a - model_output * sqrt_b,
                model_output * sqrt_a + sample * sqrt_b,
            ),
        };
        let pred_original = self.cfg.clip_predicted_original(pred_original);
        let direction = pred_epsilon * (1.0 - alpha_prod_t_prev).sqrt() as f64;
        (pred_original * alpha_prod_t_prev.sqrt() as f64 + direction).to_kind(model_output.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::CpuGenerator;
    use tch::{Device, Kind};

    #[test]
    fn leading_spacing_with_steps_offset_as_stable_diffusion_configures_it() {
        let mut s = DdimScheduler::new(&SchedulerConfig::stable_diffusion(PredictionType::Epsilon));
        s.set_timesteps(50);
        assert_eq!(s.timesteps().len(), 50);
        assert_eq!(s.timesteps()[0], 981.0);
        assert_eq!(s.timesteps()[49], 1.0);
    }

    #[test]
    fn a_perfect_noise_prediction_walks_back_along_the_forward_process() {
        let cfg = SchedulerConfig::stable_diffusion(PredictionType::Epsilon);
        let mut s = DdimScheduler::new(&cfg);
        s.set_timesteps(10);
        let ac = cfg.alphas_cumprod();
        let x0 = Tensor::from_slice(&[0.3f32, -0.7]);
        let eps = Tensor::from_slice(&[1.0f32, 0.5]);
        let noisy = |t: usize| &x0 * (ac[t] as f64).sqrt() + &eps * (1.0 - ac[t] as f64).sqrt();
        let out = s.step(&eps, 901.0, &noisy(901), &mut CpuGenerator);
        assert!(out.allclose(&noisy(801), 1e-5, 1e-5, false));
        // The last step lands on ᾱ₀ (set_alpha_to_one = false), not on x₀.
        let last = s.step(&eps, 1.0, &noisy(1), &mut CpuGenerator);
        assert!(last.allclose(&noisy(0), 1e-5, 1e-5, false));
        assert_eq!(last.kind(), Kind::Float);
        assert_eq!(last.device(), Device::Cpu);
    }
}
