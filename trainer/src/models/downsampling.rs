//! Halving the spatial size between resolution levels with a strided 3×3 conv.

use tch::Tensor;
use tch::nn::{self, Module};

#[derive(Debug)]
pub struct Downsample2D {
    pub conv: nn::Conv2D,
    /// diffusers' VAE uses padding 0 and pads right/bottom by one instead, so that
    /// its checkpoints see exactly the pixels they were trained on.
    pad_right_bottom: bool,
}

pub fn downsample_2d(p: nn::Path, channels: i64, out_channels: i64, padding: i64) -> Downsample2D {
    let cfg = nn::ConvConfig {
        stride: 2,
        padding,
        ..Default::default()
    };
    Downsample2D {
        conv: nn::conv2d(&p / "conv", channels, out_channels, 3, cfg),
        pad_right_bottom: padding == 0,
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(xs)
        }
    }
}
