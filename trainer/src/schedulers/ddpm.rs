//! DDPM (Ho et al. 2020): the forward noising process that training samples from, its
//! targets (ε or v), and the ancestral reverse step, as diffusers' `DDPMScheduler`.

use tch::{Kind, Tensor};

use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, discrete_timesteps, noise_like,
    training_timesteps,
};

#[derive(Debug)]
pub struct DdpmScheduler {
    cfg: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// The same schedule as a tensor, for per-sample indexing during training.
    alphas_cumprod_t: Tensor,
    timesteps: Vec<f64>,
}

impl DdpmScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        let alphas_cumprod = cfg.alphas_cumprod();
        let n = cfg.num_train_timesteps;
        Self {
            cfg: cfg.clone(),
            alphas_cumprod_t: Tensor::from_slice(&alphas_cumprod),
            alphas_cumprod,
            timesteps: training_timesteps(n),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.cfg.prediction_type
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.cfg.num_train_timesteps
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// √ᾱ_t and √(1-ᾱ_t) for each sample's timestep, shaped to broadcast over `like`.
    fn coefficients(&self, like: &Tensor, timesteps: &Tensor) -> (Tensor, Tensor) {
        let ac = self
            .alphas_cumprod_t
            .to_device(like.device())
            .to_kind(like.kind())
            .index_select(0, &timesteps.to_device(like.device()).to_kind(Kind::Int64));
        let mut shape = vec![-1i64];
        shape.resize(like.dim(), 1);
        let sqrt_alpha = ac.sqrt().view(shape.as_slice());
        let sqrt_one_minus = (ac.ones_like() - &ac).sqrt().view(shape.as_slice());
        (sqrt_alpha, sqrt_one_minus)
    }

    /// x_t = √ᾱ_t·x₀ + √(1-ᾱ_t)·ε, with one timestep per sample (`timesteps` is `[B]`).
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (a, s) = self.coefficients(original, timesteps);
        a * original + s * noise
    }

    /// The v-prediction target v = √ᾱ_t·ε − √(1-ᾱ_t)·x₀ (Salimans & Ho 2022).
    pub fn get_velocity(&self, sample: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (a, s) = self.coefficients(sample, timesteps);
        a * noise - s * sample
    }

    /// What the UNet is trained to predict for these latents, noise and timesteps.
    pub fn training_target(&self, latents: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        match self.cfg.prediction_type {
            PredictionType::Epsilon => noise.shallow_clone(),
            PredictionType::VPrediction => self.get_velocity(latents, noise, timesteps),
            PredictionType::Sample => latents.shallow_clone(),
        }
    }

    /// Signal-to-noise ratio ᾱ_t / (1-ᾱ_t) per timestep, for min-SNR-γ loss weighting.
    pub fn snr(&self, timesteps: &Tensor) -> Tensor {
        let ac = self
            .alphas_cumprod_t
            .to_device(timesteps.device())
            .index_select(0, &timesteps.to_kind(Kind::Int64));
        (ac.sqrt() / (ac.ones_like() - &ac).sqrt()).square()
    }

    /// The timestep after `t` in the current schedule, -1 after the last.
    fn previous_timestep(&self, t: usize) -> i64 {
        match self.timesteps.iter().position(|&x| x == t as f64) {
            Some(i) if i + 1 < self.timesteps.len() => self.timesteps[i + 1] as i64,
            Some(_) => -1,
            None => t as i64 - 1,
        }
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        (_, self.timesteps) = discrete_timesteps(&self.cfg, num_inference_steps);
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The posterior mean plus "fixed small" variance noise (none at t = 0).
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Tensor {
        let t = timestep as usize;
        let prev_t = self.previous_timestep(t);
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            1.0
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        let pred_original = match self.cfg.prediction_type {
            PredictionType::Epsilon => {
                (sample - model_output * beta_prod_t.sqrt() as f64) / alpha_prod_t.sqrt() as f64
            }
            PredictionType::VPrediction => {
                sample * alpha_prod_t.sqrt() as f64 - model_output * beta_prod_t.sqrt() as f64
            }
            PredictionType::Sample => model_output.shallow_clone(),
        };
        let pred_original = self.cfg.clip_predicted_original(pred_original);

        let original_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let prev = pred_original * original_coeff as f64 + sample * sample_coeff as f64;
        if t > 0 {
            let variance = (beta_prod_t_prev / beta_prod_t * current_beta_t).max(1e-20);
            prev + noise_like(noise, model_output) * variance.sqrt() as f64
        } else {
            prev
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::CpuGenerator;

    fn sd(prediction_type: PredictionType) -> DdpmScheduler {
        DdpmScheduler::new(&SchedulerConfig::stable_diffusion(prediction_type))
    }

    #[test]
    fn add_noise_uses_each_samples_timestep() {
        let s = sd(PredictionType::Epsilon);
        let x0 = Tensor::ones([2, 1, 2, 2], (Kind::Float, tch::Device::Cpu));
        let noise = Tensor::zeros_like(&x0);
        let t = Tensor::from_slice(&[0i64, 999]);
        let noisy = s.add_noise(&x0, &noise, &t);
        let ac = s.alphas_cumprod();
        assert!((noisy.double_value(&[0, 0, 0, 0]) - (ac[0] as f64).sqrt()).abs() < 1e-6);
        assert!((noisy.double_value(&[1, 0, 1, 1]) - (ac[999] as f64).sqrt()).abs() < 1e-6);
    }

    #[test]
    fn velocity_and_epsilon_targets_recover_the_clean_sample() {
        tch::manual_seed(1);
        let s = sd(PredictionType::VPrediction);
        let x0 = Tensor::randn([3, 4, 2, 2], (Kind::Float, tch::Device::Cpu));
        let eps = Tensor::randn([3, 4, 2, 2], (Kind::Float, tch::Device::Cpu));
        let t = Tensor::from_slice(&[10i64, 500, 990]);
        let xt = s.add_noise(&x0, &eps, &t);
        let v = s.training_target(&x0, &eps, &t);
        // x₀ = √ᾱ·x_t − √(1-ᾱ)·v for the v parameterisation.
        let (a, b) = s.coefficients(&x0, &t);
        let back = a * &xt - b * &v;
        assert!(back.allclose(&x0, 1e-5, 1e-5, false));
        assert!(
            sd(PredictionType::Epsilon)
                .training_target(&x0, &eps, &t)
                .equal(&eps)
        );
    }

    #[test]
    fn snr_falls_with_time() {
        let s = sd(PredictionType::Epsilon);
        let snr = Vec::<f32>::try_from(s.snr(&Tensor::from_slice(&[0i64, 500, 999]))).unwrap();
        assert!(snr[0] > snr[1] && snr[1] > snr[2] && snr[2] > 0.0);
    }

    #[test]
    fn reverse_step_at_zero_is_the_predicted_clean_sample() {
        let mut s = sd(PredictionType::Epsilon);
        s.set_timesteps(10);
        assert_eq!(s.timesteps()[0], 901.0);
        let sample = Tensor::ones([1, 1, 2, 2], (Kind::Float, tch::Device::Cpu)) * 0.5;
        let eps = Tensor::zeros_like(&sample);
        let out = s.step(&eps, 1.0, &sample, &mut CpuGenerator);
        // From the last timestep the previous one is -1 (ᾱ_prev = 1): x₀ = x_t / √ᾱ_1, with
        // negligible (clamped 1e-20) variance.
        let expected = 0.5 / (s.alphas_cumprod()[1] as f64).sqrt();
        assert!((out.double_value(&[0, 0, 0, 0]) - expected).abs() < 1e-6);
    }
}
