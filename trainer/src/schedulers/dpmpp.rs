//! DPM-Solver++ multistep (Lu et al. 2022) in its data-prediction form, orders 1 and 2
//! with the midpoint update, optionally on Karras σs: diffusers'
//! `DPMSolverMultistepScheduler`, the "DPM++ 2M Karras" of other tools.

use tch::{Kind, Tensor};

use super::{
    BetaSchedule, NoiseSource, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
    index_for_timestep, interp_index, karras_sigmas, linspace, round_half_even, sigma_to_t,
    trailing, train_sigmas,
};

#[derive(Debug)]
pub struct DpmSolverMultistepScheduler {
    cfg: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    /// One more than `timesteps`; the last is 0 so the final step returns the x₀ estimate.
    sigmas: Vec<f32>,
    /// The x₀ predictions of the previous and current step.
    model_outputs: [Option<Tensor>; 2],
    lower_order_nums: usize,
    step_index: Option<usize>,
}

impl DpmSolverMultistepScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        let mut s = Self {
            cfg: cfg.clone(),
            alphas_cumprod: cfg.alphas_cumprod(),
            timesteps: vec![],
            sigmas: vec![],
            model_outputs: [None, None],
            lower_order_nums: 0,
            step_index: None,
        };
        s.set_timesteps(cfg.num_train_timesteps);
        s
    }

    fn solver_order(&self) -> usize {
        self.cfg.solver_order.unwrap_or(2).clamp(1, 2)
    }

    /// Evenly spaced integer timesteps; these spacings reserve one extra step that is dropped.
    fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let train = self.cfg.num_train_timesteps;
        match self
            .cfg
            .timestep_spacing
            .unwrap_or(TimestepSpacing::Linspace)
        {
            TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, n + 1)
                .into_iter()
                .rev()
                .take(n)
                .map(round_half_even)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = train / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.cfg.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => trailing(train as f64, train as f64 / n as f64)
                .into_iter()
                .map(|t| round_half_even(t) - 1.0)
                .collect(),
        }
    }

    /// The data prediction x₀ from whatever the network predicts.
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        match self.cfg.prediction_type {
            PredictionType::Epsilon => (sample - model_output * sigma_t as f64) / alpha_t as f64,
            PredictionType::VPrediction => sample * alpha_t as f64 - model_output * sigma_t as f64,
            PredictionType::Sample => model_output.shallow_clone(),
        }
    }

    fn first_order_update(&self, x0: &Tensor, sample: &Tensor, i: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        sample * (sigma_t / sigma_s) as f64 - x0 * (alpha_t * ((-h).exp() - 1.0)) as f64
    }

    fn second_order_update(&self, m0: &Tensor, m1: &Tensor, sample: &Tensor, i: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (lambda_t, lambda_s0, lambda_s1) = (
            lambda(alpha_t, sigma_t),
            lambda(alpha_s0, sigma_s0),
            lambda(alpha_s1, sigma_s1),
        );
        let h = lambda_t - lambda_s0;
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d1 = (m0 - m1) * (1.0 / r0) as f64;
        let coeff = alpha_t * ((-h).exp() - 1.0);
        sample * (sigma_t / sigma_s0) as f64 - m0 * coeff as f64 - d1 * (0.5 * coeff) as f64
    }
}

/// α_t and σ_t of the variance-preserving process at Karras noise level σ.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Half the log-SNR, the solver's time variable.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        let n = num_inference_steps.clamp(1, self.cfg.num_train_timesteps);
        let all = train_sigmas(&self.alphas_cumprod);
        let (timesteps, sigmas) = if self.cfg.use_karras_sigmas.unwrap_or(false) {
            let log_sigmas: Vec<f32> = all.iter().map(|s| s.ln()).collect();
            let sigmas = karras_sigmas(all[0] as f64, all[all.len() - 1] as f64, n);
            // diffusers leaves the cosine schedule's timesteps fractional.
            let round = self.cfg.beta_schedule != BetaSchedule::SquaredcosCapV2;
            let timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas))
                .map(|t| if round { round_half_even(t) } else { t })
                .collect();
            (timesteps, sigmas)
        } else {
            let timesteps = self.spaced_timesteps(n);
            let sigmas = timesteps.iter().map(|&t| interp_index(t, &all)).collect();
            (timesteps, sigmas)
        };
        self.timesteps = timesteps;
        self.sigmas = sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect();
        self.model_outputs = [None, None];
        self.lower_order_nums = 0;
        self.step_index = None;
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Tensor {
        let i = *self
            .step_index
            .get_or_insert_with(|| index_for_timestep(&self.timesteps, timestep));
        let last = i + 1 == self.timesteps.len();
        // A final σ of 0 makes the second-order formula degenerate: finish with first order,
        // as also for short runs under `lower_order_final`.
        let short = self.timesteps.len() < 15 && self.cfg.lower_order_final.unwrap_or(true);
        let lower_order_final = last && (short || self.sigmas[i + 1] == 0.0);
        let x0 = self.convert_model_output(model_output, sample, self.sigmas[i]);
        let [_, current] = std::mem::take(&mut self.model_outputs);
        self.model_outputs = [current, Some(x0)];
        let sample = sample.to_kind(Kind::Float);
        let m0 = self.model_outputs[1].as_ref().expect("just stored");
        let prev = match &self.model_outputs[0] {
            Some(m1)
                if self.solver_order() == 2 && self.lower_order_nums >= 1 && !lower_order_final =>
            {
                self.second_order_update(m0, m1, &sample, i)
            }
            _ => self.first_order_update(m0, &sample, i),
        };
        if self.lower_order_nums < self.solver_order() {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        prev.to_kind(model_output.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::CpuGenerator;

    fn karras() -> DpmSolverMultistepScheduler {
        let cfg = SchedulerConfig {
            use_karras_sigmas: Some(true),
            ..SchedulerConfig::stable_diffusion(PredictionType::Epsilon)
        };
        DpmSolverMultistepScheduler::new(&cfg)
    }

    #[test]
    fn karras_schedule_spans_the_training_sigmas() {
        let mut s = karras();
        s.set_timesteps(10);
        assert_eq!(s.timesteps().len(), 10);
        assert_eq!(s.timesteps()[0], 999.0);
        assert_eq!(s.timesteps()[9], 0.0);
        assert!((s.sigmas()[0] - 14.6146).abs() < 1e-3);
        assert!((s.sigmas()[9] - 0.0292).abs() < 1e-3, "{}", s.sigmas()[9]);
        assert_eq!(s.sigmas()[10], 0.0);
    }

    #[test]
    fn a_constant_clean_prediction_is_reached_exactly_at_the_end() {
        // If the network always predicts x₀ = c, every update keeps the sample on the line
        // between the start and c, and the final σ = 0 step lands on c.
        let cfg = SchedulerConfig {
            prediction_type: PredictionType::Sample,
            use_karras_sigmas: Some(true),
            ..SchedulerConfig::stable_diffusion(PredictionType::Epsilon)
        };
        let mut s = DpmSolverMultistepScheduler::new(&cfg);
        s.set_timesteps(6);
        let c = Tensor::from_slice(&[0.25f32, -0.5]);
        let mut x = Tensor::from_slice(&[10.0f32, 3.0]);
        for t in s.timesteps().to_vec() {
            x = s.step(&c, t, &x, &mut CpuGenerator);
        }
        assert!(x.allclose(&c, 1e-5, 1e-5, false), "{x}");
    }

    #[test]
    fn linspace_spacing_drops_the_extra_step() {
        let mut s = DpmSolverMultistepScheduler::new(&SchedulerConfig::stable_diffusion(
            PredictionType::Epsilon,
        ));
        s.set_timesteps(4);
        // linspace(0, 999, 5).round()[::-1][:-1]
        assert_eq!(s.timesteps(), [999.0, 749.0, 500.0, 250.0]);
    }
}
