//! The autoencoder between pixels and latents: diffusers' `AutoencoderKL`. Training
//! encodes each instance image once; sampling decodes the final latent.

use tch::Tensor;
use tch::nn::{self, Module};

use super::config::VaeConfig;
use super::resnet::{conv2d, group_norm};
use super::unet_blocks::{
    DownBlockConfig, DownEncoderBlock2D, ResnetSettings, UNetMidBlock2D, UpDecoderBlock2D,
    down_encoder_block_2d, unet_mid_block_2d, up_decoder_block_2d,
};

/// diffusers fixes the VAE's norm eps at 1e-6 whatever the config.
const VAE_NORM_EPS: f64 = 1e-6;

/// The encoder's output distribution over latents, per pixel and channel.
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does, so `exp` cannot overflow.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits the encoder's `[B, 2C, h, w]` moments into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> Self {
        let parts = moments.chunk(2, 1);
        DiagonalGaussian {
            mean: parts[0].shallow_clone(),
            logvar: parts[1].clamp(-30.0, 20.0),
        }
    }

    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// A draw `mean + std * noise`; the caller owns the noise so that the RNG, and
    /// therefore reproducibility, stays in one place.
    pub fn sample(&self, noise: &Tensor) -> Tensor {
        &self.mean + self.std() * noise
    }

    /// The most likely latent, the mean.
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }
}

#[derive(Debug)]
pub struct Encoder {
    pub conv_in: nn::Conv2D,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: UNetMidBlock2D,
    pub conv_norm_out: nn::GroupNorm,
    pub conv_out: nn::Conv2D,
}

fn vae_resnet(cfg: &VaeConfig) -> ResnetSettings {
    ResnetSettings {
        temb_channels: None,
        groups: cfg.norm_num_groups,
        eps: VAE_NORM_EPS,
        output_scale_factor: 1.0,
    }
}

pub fn encoder(p: nn::Path, cfg: &VaeConfig) -> Encoder {
    let channels = &cfg.block_out_channels;
    let n = channels.len();
    let resnet = vae_resnet(cfg);
    let down = &p / "down_blocks";
    let down_blocks = (0..n)
        .map(|i| {
            let block_cfg = DownBlockConfig {
                in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
                out_channels: channels[i],
                num_layers: cfg.layers_per_block,
                add_downsample: i + 1 < n,
                downsample_padding: 0,
            };
            down_encoder_block_2d(&down / i, &block_cfg, &resnet)
        })
        .collect();
    let last = channels[n - 1];
    Encoder {
        conv_in: conv2d(&p / "conv_in", cfg.in_channels, channels[0], 3),
        down_blocks,
        mid_block: unet_mid_block_2d(
            &p / "mid_block",
            last,
            1,
            cfg.mid_block_add_attention,
            &resnet,
        ),
        conv_norm_out: group_norm(
            &p / "conv_norm_out",
            cfg.norm_num_groups,
            last,
            VAE_NORM_EPS,
        ),
        // Mean and log-variance for each latent channel.
        conv_out: conv2d(&p / "conv_out", last, 2 * cfg.latent_channels, 3),
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.conv_in.forward(xs);
        for block in &self.down_blocks {
            xs = block.forward(&xs);
        }
        let xs = self.mid_block.forward(&xs);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&xs).silu())
    }
}

#[derive(Debug)]
pub struct Decoder {
    pub conv_in: nn::Conv2D,
    pub mid_block: UNetMidBlock2D,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: nn::GroupNorm,
    pub conv_out: nn::Conv2D,
}

pub fn decoder(p: nn::Path, cfg: &VaeConfig) -> Decoder {
    let channels = &cfg.block_out_channels;
    let n = channels.len();
    let resnet = vae_resnet(cfg);
    let last = channels[n - 1];
    let up = &p / "up_blocks";
    // Up block i works at the resolution of down block n-1-i.
    let up_blocks = (0..n)
        .map(|i| {
            let level = n - 1 - i;
            let in_channels = channels[(level + 1).min(n - 1)];
            up_decoder_block_2d(
                &up / i,
                in_channels,
                channels[level],
                cfg.layers_per_block + 1,
                i + 1 < n,
                &resnet,
            )
        })
        .collect();
    Decoder {
        conv_in: conv2d(&p / "conv_in", cfg.latent_channels, last, 3),
        mid_block: unet_mid_block_2d(
            &p / "mid_block",
            last,
            1,
            cfg.mid_block_add_attention,
            &resnet,
        ),
        up_blocks,
        conv_norm_out: group_norm(
            &p / "conv_norm_out",
            cfg.norm_num_groups,
            channels[0],
            VAE_NORM_EPS,
        ),
        conv_out: conv2d(&p / "conv_out", channels[0], cfg.out_channels, 3),
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.mid_block.forward(&self.conv_in.forward(xs));
        for block in &self.up_blocks {
            xs = block.forward(&xs);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&xs).silu())
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<nn::Conv2D>,
    pub post_quant_conv: Option<nn::Conv2D>,
    /// Latents are multiplied by this before the UNet sees them (0.18215 for SD).
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    downscale_factor: i64,
}

/// Builds the VAE under `p` with diffusers' parameter names.
///
/// Panics when `cfg` fails [`VaeConfig::validate`]; configs read with
/// [`VaeConfig::from_file`] have already passed it.
pub fn autoencoder_kl(p: nn::Path, cfg: &VaeConfig) -> AutoencoderKL {
    if let Err(e) = cfg.validate() {
        panic!("cannot build a VAE from this config: {e}");
    }
    let moments = 2 * cfg.latent_channels;
    AutoencoderKL {
        encoder: encoder(&p / "encoder", cfg),
        decoder: decoder(&p / "decoder", cfg),
        quant_conv: cfg
            .use_quant_conv
            .then(|| conv2d(&p / "quant_conv", moments, moments, 1)),
        post_quant_conv: cfg.use_post_quant_conv.then(|| {
            conv2d(
                &p / "post_quant_conv",
                cfg.latent_channels,
                cfg.latent_channels,
                1,
            )
        }),
        scaling_factor: cfg.scaling_factor,
        shift_factor: cfg.shift_factor,
        downscale_factor: cfg.downscale_factor(),
    }
}

impl AutoencoderKL {
    /// Images `[B, 3, H, W]` in [-1, 1] to the latent distribution `[B, C, H/f, W/f]`.
    pub fn encode(&self, xs: &Tensor) -> DiagonalGaussian {
        let moments = self.encoder.forward(xs);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments),
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latents `[B, C, h, w]` back to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let latents = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&latents)
    }

    /// How many pixels one latent covers per side (8 for SD).
    pub fn downscale_factor(&self) -> i64 {
        self.downscale_factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn logvar_is_clamped_and_sampling_uses_the_std() {
        let moments = Tensor::from_slice(&[1f32, -2., -100., 50.]).reshape([1, 4, 1, 1]);
        let dist = DiagonalGaussian::from_moments(&moments);
        let logvar: Vec<f32> = Vec::try_from(dist.logvar.flatten(0, -1)).unwrap();
        assert_eq!(logvar, vec![-30., 20.]);
        let noise = Tensor::from_slice(&[1f32, 1.]).reshape([1, 2, 1, 1]);
        let drawn = dist.sample(&noise);
        let expected_first = 1.0 + (-15f64).exp();
        assert!((drawn.double_value(&[0, 0, 0, 0]) - expected_first).abs() < 1e-6);
        assert_eq!(dist.mode().double_value(&[0, 1, 0, 0]), -2.0);
    }

    #[test]
    fn tiny_vae_round_trip_shapes() {
        let cfg = VaeConfig {
            block_out_channels: vec![8, 16],
            down_block_types: vec![super::super::config::VaeDownBlockType::DownEncoderBlock2D; 2],
            up_block_types: vec![super::super::config::VaeUpBlockType::UpDecoderBlock2D; 2],
            norm_num_groups: 4,
            ..Default::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let vae = autoencoder_kl(vs.root(), &cfg);
        assert_eq!(vae.downscale_factor(), 2);
        let image = Tensor::rand([1, 3, 8, 6], (Kind::Float, Device::Cpu));
        let dist = vae.encode(&image);
        assert_eq!(dist.mean.size(), vec![1, 4, 4, 3]);
        assert_eq!(vae.decode(&dist.mode()).size(), vec![1, 3, 8, 6]);
        let names = vs.variables();
        assert!(names.contains_key("encoder.mid_block.attentions.0.to_q.bias"));
        assert!(names.contains_key("encoder.down_blocks.0.downsamplers.0.conv.weight"));
        assert!(names.contains_key("decoder.up_blocks.0.upsamplers.0.conv.weight"));
        assert!(!names.contains_key("decoder.up_blocks.1.upsamplers.0.conv.weight"));
        assert_eq!(
            names["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].size(),
            vec![8, 16, 1, 1]
        );
    }
}
