//! How the UNet learns which noise level it is denoising: sinusoidal timestep
//! features (as in the Transformer paper) followed by a small MLP.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Sinusoidal features of `timesteps` (`[B]`, any numeric kind) as `[B, dim]` float32.
///
/// The operations and their order follow diffusers' `get_timestep_embedding` so the
/// float32 rounding is the same.
pub fn sinusoidal_timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Tensor {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent = Tensor::arange(half, (Kind::Float, device)) * -(10000f64.ln());
    let exponent = exponent / (half as f64 - downscale_freq_shift);
    let freqs = exponent.exp();
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[args.sin(), args.cos()], -1);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[emb.narrow(1, half, half), emb.narrow(1, 0, half)], -1)
    } else {
        emb
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// The parameter-free sinusoid stage (`time_proj` in diffusers).
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    pub num_channels: i64,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        sinusoidal_timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
        )
    }
}

/// `linear_1 → SiLU → linear_2`, mapping sinusoid features to the resnets' time input.
#[derive(Debug)]
pub struct TimestepEmbedding {
    pub linear_1: nn::Linear,
    pub linear_2: nn::Linear,
}

pub fn timestep_embedding(p: nn::Path, in_channels: i64, time_embed_dim: i64) -> TimestepEmbedding {
    TimestepEmbedding {
        linear_1: nn::linear(
            &p / "linear_1",
            in_channels,
            time_embed_dim,
            Default::default(),
        ),
        linear_2: nn::linear(
            &p / "linear_2",
            time_embed_dim,
            time_embed_dim,
            Default::default(),
        ),
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_zero_gives_cos_one_first_when_flipped() {
        let emb = sinusoidal_timestep_embedding(&Tensor::from_slice(&[0i64, 500]), 8, true, 0.0);
        assert_eq!(emb.size(), vec![2, 8]);
        let first: Vec<f32> = Vec::try_from(emb.get(0)).unwrap();
        assert_eq!(first, vec![1., 1., 1., 1., 0., 0., 0., 0.]);
        // Frequency 0 of t = 500 is sin(500) after the flip's cos half.
        let sin0 = emb.double_value(&[1, 4]);
        assert!((sin0 - 500f64.sin()).abs() < 1e-4, "{sin0}");
    }

    #[test]
    fn freq_shift_changes_the_frequencies() {
        let t = Tensor::from_slice(&[10f32]);
        let a = sinusoidal_timestep_embedding(&t, 6, false, 0.0);
        let b = sinusoidal_timestep_embedding(&t, 6, false, 1.0);
        // exponent = -ln(10000) * i / (half - shift): i = 1 differs between shifts.
        let expected_a = (10.0 * (-(10000f64.ln()) / 3.0).exp()).sin();
        let expected_b = (10.0 * (-(10000f64.ln()) / 2.0).exp()).sin();
        assert!((a.double_value(&[0, 1]) - expected_a).abs() < 1e-5);
        assert!((b.double_value(&[0, 1]) - expected_b).abs() < 1e-5);
    }
}
