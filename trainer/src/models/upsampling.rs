//! Doubling the spatial size between resolution levels: nearest-neighbour, then a 3×3 conv.

use tch::Tensor;
use tch::nn::{self, Module};

#[derive(Debug)]
pub struct Upsample2D {
    pub conv: nn::Conv2D,
}

pub fn upsample_2d(p: nn::Path, channels: i64, out_channels: i64) -> Upsample2D {
    Upsample2D {
        conv: super::resnet::conv2d(&p / "conv", channels, out_channels, 3),
    }
}

impl Upsample2D {
    /// `size` is the target `[h, w]`: the UNet passes the size of the matching skip
    /// connection so inputs whose sides are not multiples of 8 still line up.
    /// Without it the size doubles.
    pub fn forward(&self, xs: &Tensor, size: Option<[i64; 2]>) -> Tensor {
        let size = size.unwrap_or_else(|| {
            let (_, _, h, w) = xs.size4().expect("Upsample2D input must be [B, C, H, W]");
            [2 * h, 2 * w]
        });
        self.conv.forward(&xs.upsample_nearest2d(size, None, None))
    }
}
