//! The residual block that carries most of the UNet's and the VAE's capacity:
//! GroupNorm → SiLU → 3×3 conv, twice, with the time embedding added in between.

use tch::Tensor;
use tch::nn::{self, Module};

/// Shape and normalisation of one [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Width of the time embedding; `None` in the VAE, which has no time input.
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    /// The block's output is divided by this (diffusers' `output_scale_factor`).
    pub output_scale_factor: f64,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    pub norm1: nn::GroupNorm,
    pub conv1: nn::Conv2D,
    pub time_emb_proj: Option<nn::Linear>,
    pub norm2: nn::GroupNorm,
    pub conv2: nn::Conv2D,
    /// A 1×1 conv on the skip path when the channel count changes.
    pub conv_shortcut: Option<nn::Conv2D>,
    output_scale_factor: f64,
}

/// A group norm with diffusers' affine parameters (`weight`, `bias`).
pub(crate) fn group_norm(p: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(
        p,
        groups,
        channels,
        nn::GroupNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// A biased conv with "same" padding for odd kernels.
pub(crate) fn conv2d(p: nn::Path, in_channels: i64, out_channels: i64, kernel: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        padding: kernel / 2,
        ..Default::default()
    };
    nn::conv2d(p, in_channels, out_channels, kernel, cfg)
}

pub fn resnet_block_2d(p: nn::Path, cfg: &ResnetBlock2DConfig) -> ResnetBlock2D {
    let (cin, cout) = (cfg.in_channels, cfg.out_channels);
    ResnetBlock2D {
        norm1: group_norm(&p / "norm1", cfg.groups, cin, cfg.eps),
        conv1: conv2d(&p / "conv1", cin, cout, 3),
        time_emb_proj: cfg
            .temb_channels
            .map(|t| nn::linear(&p / "time_emb_proj", t, cout, Default::default())),
        norm2: group_norm(&p / "norm2", cfg.groups, cout, cfg.eps),
        conv2: conv2d(&p / "conv2", cout, cout, 3),
        conv_shortcut: (cin != cout).then(|| conv2d(&p / "conv_shortcut", cin, cout, 1)),
        output_scale_factor: cfg.output_scale_factor,
    }
}

impl ResnetBlock2D {
    /// `temb` is `[B, temb_channels]`; it is ignored by blocks built without a time input.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(xs).silu());
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => h + proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1),
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs),
            None => xs.shallow_clone(),
        };
        let out = skip + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}
