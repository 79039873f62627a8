//! The DreamBooth training objective: noise the cached latents at random timesteps,
//! and score the UNet's prediction (epsilon or v) with optional min-SNR-γ weighting and
//! prior preservation.

use tch::{Kind, Tensor};

use crate::schedulers::PredictionType;

/// Noise settings of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseSettings {
    /// What the UNet predicts, from the scheduler config.
    pub prediction: PredictionType,
    /// `noise + s·randn(B, C, 1, 1)`: lets the model shift whole-image brightness.
    pub offset_noise: f64,
    pub min_snr_gamma: Option<f64>,
}

/// One noised batch and what the UNet should output for it.
#[derive(Debug)]
pub struct NoisedBatch {
    pub noisy_latents: Tensor,
    pub timesteps: Tensor,
    pub target: Tensor,
    /// Per-sample loss weights `[B]` (all ones without min-SNR).
    pub weights: Tensor,
}

/// Draws noise and timesteps for `latents` `[B, C, H, W]` from libtorch's global generator
/// (seeded once per run, so a seed reproduces the loss sequence on the CPU).
/// `alphas_cumprod` is the DDPM schedule `[T]` in fp32 on the latents' device.
pub fn noise_batch(
    latents: &Tensor,
    alphas_cumprod: &Tensor,
    settings: &NoiseSettings,
) -> NoisedBatch {
    let (batch, channels) = (latents.size()[0], latents.size()[1]);
    let options = (Kind::Float, latents.device());
    let mut noise = Tensor::randn(latents.size(), options);
    if settings.offset_noise > 0.0 {
        noise += Tensor::randn([batch, channels, 1, 1], options) * settings.offset_noise;
    }
    let train_steps = alphas_cumprod.size()[0];
    let timesteps = Tensor::randint(train_steps, [batch], (Kind::Int64, latents.device()));
    let alpha_bar = alphas_cumprod
        .index_select(0, &timesteps)
        .view([batch, 1, 1, 1]);
    let signal = alpha_bar.sqrt();
    let sigma = (1f64 - &alpha_bar).sqrt();
    let noisy_latents = &signal * latents + &sigma * &noise;
    let target = match settings.prediction {
        PredictionType::Epsilon => noise,
        PredictionType::VPrediction => &signal * &noise - &sigma * latents,
        PredictionType::Sample => latents.shallow_clone(),
    };
    let weights = match settings.min_snr_gamma {
        Some(gamma) => min_snr_weights(&alpha_bar.view([batch]), gamma, settings.prediction),
        None => Tensor::ones([batch], options),
    };
    NoisedBatch {
        noisy_latents,
        timesteps,
        target,
        weights,
    }
}

/// Min-SNR-γ (Hang et al. 2023): `min(SNR, γ) / SNR` for epsilon, `min(SNR, γ) / (SNR + 1)`
/// for v-prediction, so easy low-noise timesteps stop dominating the gradient.
pub fn min_snr_weights(alpha_bar: &Tensor, gamma: f64, prediction: PredictionType) -> Tensor {
    let snr = alpha_bar / (1f64 - alpha_bar);
    let clipped = snr.clamp_max(gamma);
    match prediction {
        PredictionType::Epsilon => clipped / snr,
        PredictionType::VPrediction => clipped / (snr + 1.0),
        // x0 targets are already SNR-weighted relative to epsilon.
        PredictionType::Sample => clipped,
    }
}

/// Weighted MSE. With prior preservation the batch is `[instance…, class…]` (equal halves)
/// and the class half's loss is added with `prior_weight`.
pub fn loss(prediction: &Tensor, batch: &NoisedBatch, prior_weight: Option<f64>) -> Tensor {
    let per_sample = (prediction.to_kind(Kind::Float) - &batch.target)
        .square()
        .mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float)
        * &batch.weights;
    match prior_weight {
        None => per_sample.mean(Kind::Float),
        Some(weight) => {
            let halves = per_sample.chunk(2, 0);
            halves[0].mean(Kind::Float) + halves[1].mean(Kind::Float) * weight
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alphas_cumprod() -> Tensor {
        // SD's scaled-linear schedule.
        let betas = Tensor::linspace(
            0.00085f64.sqrt(),
            0.012f64.sqrt(),
            1000,
            (Kind::Float, tch::Device::Cpu),
        )
        .square();
        (Tensor::ones_like(&betas) - betas).cumprod(0, Kind::Float)
    }

    fn settings(prediction: PredictionType) -> NoiseSettings {
        NoiseSettings {
            prediction,
            offset_noise: 0.0,
            min_snr_gamma: None,
        }
    }

    #[test]
    fn noised_latents_mix_signal_and_noise_by_the_schedule() {
        tch::manual_seed(0);
        let latents = Tensor::randn([3, 4, 8, 8], (Kind::Float, tch::Device::Cpu));
        let ac = alphas_cumprod();
        let batch = noise_batch(&latents, &ac, &settings(PredictionType::Epsilon));
        let a = ac.index_select(0, &batch.timesteps).view([3, 1, 1, 1]);
        let rebuilt = a.sqrt() * &latents + (1f64 - &a).sqrt() * &batch.target;
        assert!(rebuilt.allclose(&batch.noisy_latents, 1e-5, 1e-6, false));
        assert_eq!(batch.weights.size(), [3]);
    }

    #[test]
    fn v_target_is_alpha_noise_minus_sigma_x0() {
        tch::manual_seed(1);
        let latents = Tensor::randn([2, 4, 4, 4], (Kind::Float, tch::Device::Cpu));
        let ac = alphas_cumprod();
        let batch = noise_batch(&latents, &ac, &settings(PredictionType::VPrediction));
        let a = ac.index_select(0, &batch.timesteps).view([2, 1, 1, 1]);
        // x_t = α x0 + σ ε and v = α ε − σ x0 give x0 = α x_t − σ v.
        let x0 = a.sqrt() * &batch.noisy_latents - (1f64 - &a).sqrt() * &batch.target;
        assert!(x0.allclose(&latents, 1e-4, 1e-5, false));
    }

    #[test]
    fn min_snr_caps_the_weight_of_low_noise_steps() {
        let alpha_bar = Tensor::from_slice(&[0.99f32, 0.5, 0.01]);
        let eps = Vec::<f32>::try_from(min_snr_weights(&alpha_bar, 5.0, PredictionType::Epsilon))
            .unwrap();
        // SNR 99 → 5/99; SNR 1 → 1; SNR ≈ 0.0101 → 1.
        assert!((eps[0] - 5.0 / 99.0).abs() < 1e-4, "{eps:?}");
        assert!(
            (eps[1] - 1.0).abs() < 1e-6 && (eps[2] - 1.0).abs() < 1e-6,
            "{eps:?}"
        );
        let v = Vec::<f32>::try_from(min_snr_weights(
            &alpha_bar,
            5.0,
            PredictionType::VPrediction,
        ))
        .unwrap();
        assert!((v[1] - 0.5).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn prior_loss_is_added_with_its_weight() {
        let target = Tensor::zeros([2, 1, 1, 1], (Kind::Float, tch::Device::Cpu));
        let batch = NoisedBatch {
            noisy_latents: target.shallow_clone(),
            timesteps: Tensor::zeros([2], (Kind::Int64, tch::Device::Cpu)),
            target,
            weights: Tensor::ones([2], (Kind::Float, tch::Device::Cpu)),
        };
        let prediction = Tensor::from_slice(&[1f32, 2.0]).view([2, 1, 1, 1]);
        assert_eq!(loss(&prediction, &batch, None).double_value(&[]), 2.5);
        assert_eq!(
            loss(&prediction, &batch, Some(0.5)).double_value(&[]),
            1.0 + 0.5 * 4.0
        );
    }
}
