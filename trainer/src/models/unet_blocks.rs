//! The resolution levels the UNet and the VAE are stacked from: down blocks that
//! shrink the map and keep skip connections, mid blocks at the bottom, up blocks that
//! grow it back and consume the skips. Names and parameter paths are diffusers'.

use tch::Tensor;
use tch::nn::{self, Module};

use super::attention::{
    Attention, AttentionConfig, Transformer2DConfig, Transformer2DModel, attention,
    transformer_2d_model,
};
use super::checkpointing::{Shared, checkpoint_one};
use super::downsampling::{Downsample2D, downsample_2d};
use super::resnet::{ResnetBlock2D, ResnetBlock2DConfig, resnet_block_2d};
use super::upsampling::{Upsample2D, upsample_2d};

/// What all resnets of one block share.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetSettings {
    fn build(&self, p: nn::Path, in_channels: i64, out_channels: i64) -> ResnetBlock2D {
        let cfg = ResnetBlock2DConfig {
            in_channels,
            out_channels,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: self.output_scale_factor,
        };
        resnet_block_2d(p, &cfg)
    }

    /// A block's `resnets.{i}`: the first takes `in_channels`, every one gives `out_channels`.
    fn stack(
        &self,
        p: &nn::Path,
        num_layers: i64,
        in_channels: i64,
        out_channels: i64,
    ) -> Vec<Shared<ResnetBlock2D>> {
        let resnets = p / "resnets";
        (0..num_layers)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { out_channels };
                Shared::new(self.build(&resnets / i, cin, out_channels))
            })
            .collect()
    }
}

/// What all spatial transformers of one block share.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSettings {
    pub heads: i64,
    pub layers: i64,
    pub cross_attention_dim: i64,
    pub norm_num_groups: i64,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

impl TransformerSettings {
    fn build(&self, p: nn::Path, channels: i64) -> Transformer2DModel {
        let cfg = Transformer2DConfig {
            in_channels: channels,
            heads: self.heads,
            dim_head: channels / self.heads,
            num_layers: self.layers,
            cross_attention_dim: self.cross_attention_dim,
            norm_num_groups: self.norm_num_groups,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention: self.only_cross_attention,
            upcast_attention: self.upcast_attention,
        };
        transformer_2d_model(p, &cfg)
    }

    /// A block's `attentions.{i}`, all `channels` wide.
    fn stack(
        &self,
        p: &nn::Path,
        num_layers: i64,
        channels: i64,
    ) -> Vec<Shared<Transformer2DModel>> {
        let attentions = p / "attentions";
        (0..num_layers)
            .map(|i| Shared::new(self.build(&attentions / i, channels)))
            .collect()
    }
}

/// Channels and depth of one down block.
#[derive(Debug, Clone, Copy)]
pub struct DownBlockConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub num_layers: i64,
    pub add_downsample: bool,
    pub downsample_padding: i64,
}

fn down_resnets(
    p: &nn::Path,
    cfg: &DownBlockConfig,
    resnet: &ResnetSettings,
) -> Vec<Shared<ResnetBlock2D>> {
    resnet.stack(p, cfg.num_layers, cfg.in_channels, cfg.out_channels)
}

fn downsampler(p: &nn::Path, cfg: &DownBlockConfig) -> Option<Downsample2D> {
    cfg.add_downsample.then(|| {
        let (c, pad) = (cfg.out_channels, cfg.downsample_padding);
        downsample_2d(p / "downsamplers" / 0, c, c, pad)
    })
}

/// Runs one resnet, through a gradient checkpoint when `checkpointed`.
fn run_resnet(
    resnet: &Shared<ResnetBlock2D>,
    xs: &Tensor,
    temb: &Tensor,
    checkpointed: bool,
) -> Tensor {
    if !checkpointed {
        return resnet.forward(xs, Some(temb));
    }
    let resnet = resnet.clone();
    checkpoint_one(&[xs, temb], move |t| resnet.forward(&t[0], Some(&t[1])))
}

/// Runs one spatial transformer, through a gradient checkpoint when `checkpointed`.
fn run_transformer(
    attn: &Shared<Transformer2DModel>,
    xs: &Tensor,
    context: &Tensor,
    checkpointed: bool,
) -> Tensor {
    if !checkpointed {
        return attn.forward(xs, context);
    }
    let attn = attn.clone();
    checkpoint_one(&[xs, context], move |t| attn.forward(&t[0], &t[1]))
}

/// A down block of resnets each followed by a spatial transformer.
#[derive(Debug)]
pub struct CrossAttnDownBlock2D {
    pub resnets: Vec<Shared<ResnetBlock2D>>,
    pub attentions: Vec<Shared<Transformer2DModel>>,
    pub downsampler: Option<Downsample2D>,
    /// Recompute each resnet and transformer in the backward pass (see `checkpointing`).
    pub gradient_checkpointing: bool,
}

pub fn cross_attn_down_block_2d(
    p: nn::Path,
    cfg: &DownBlockConfig,
    resnet: &ResnetSettings,
    transformer: &TransformerSettings,
) -> CrossAttnDownBlock2D {
    CrossAttnDownBlock2D {
        resnets: down_resnets(&p, cfg, resnet),
        attentions: transformer.stack(&p, cfg.num_layers, cfg.out_channels),
        downsampler: downsampler(&p, cfg),
        gradient_checkpointing: false,
    }
}

impl CrossAttnDownBlock2D {
    /// Returns the block's output and the skip connections it leaves for the up path.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        let mut xs = xs.shallow_clone();
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            let ck = self.gradient_checkpointing;
            xs = run_transformer(attn, &run_resnet(resnet, &xs, temb, ck), context, ck);
            skips.push(xs.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs);
            skips.push(xs.shallow_clone());
        }
        (xs, skips)
    }
}

/// A down block of resnets only (the UNet's lowest resolution).
#[derive(Debug)]
pub struct DownBlock2D {
    pub resnets: Vec<Shared<ResnetBlock2D>>,
    pub downsampler: Option<Downsample2D>,
    /// Recompute each resnet and transformer in the backward pass (see `checkpointing`).
    pub gradient_checkpointing: bool,
}

pub fn down_block_2d(p: nn::Path, cfg: &DownBlockConfig, resnet: &ResnetSettings) -> DownBlock2D {
    DownBlock2D {
        resnets: down_resnets(&p, cfg, resnet),
        downsampler: downsampler(&p, cfg),
        gradient_checkpointing: false,
    }
}

impl DownBlock2D {
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        let mut xs = xs.shallow_clone();
        for resnet in &self.resnets {
            xs = run_resnet(resnet, &xs, temb, self.gradient_checkpointing);
            skips.push(xs.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs);
            skips.push(xs.shallow_clone());
        }
        (xs, skips)
    }
}

/// The UNet's bottom: resnet, then (transformer, resnet) per layer.
#[derive(Debug)]
pub struct UNetMidBlock2DCrossAttn {
    pub resnets: Vec<Shared<ResnetBlock2D>>,
    pub attentions: Vec<Shared<Transformer2DModel>>,
    /// Recompute each resnet and transformer in the backward pass (see `checkpointing`).
    pub gradient_checkpointing: bool,
}

pub fn unet_mid_block_2d_cross_attn(
    p: nn::Path,
    channels: i64,
    num_layers: i64,
    resnet: &ResnetSettings,
    transformer: &TransformerSettings,
) -> UNetMidBlock2DCrossAttn {
    UNetMidBlock2DCrossAttn {
        resnets: resnet.stack(&p, num_layers + 1, channels, channels),
        attentions: transformer.stack(&p, num_layers, channels),
        gradient_checkpointing: false,
    }
}

impl UNetMidBlock2DCrossAttn {
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let ck = self.gradient_checkpointing;
        let mut xs = run_resnet(&self.resnets[0], xs, temb, ck);
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = run_resnet(resnet, &run_transformer(attn, &xs, context, ck), temb, ck);
        }
        xs
    }
}

/// Channels and depth of one up block. Each resnet's input is the previous output
/// concatenated with a skip connection, so the input widths vary per layer.
#[derive(Debug, Clone, Copy)]
pub struct UpBlockConfig {
    /// Channels of the skip coming from the down block one level deeper.
    pub in_channels: i64,
    /// Channels of the up block before this one.
    pub prev_output_channels: i64,
    pub out_channels: i64,
    pub num_layers: i64,
    pub add_upsample: bool,
}

fn up_resnets(
    p: &nn::Path,
    cfg: &UpBlockConfig,
    resnet: &ResnetSettings,
) -> Vec<Shared<ResnetBlock2D>> {
    let resnets = p / "resnets";
    (0..cfg.num_layers)
        .map(|i| {
            let skip = if i == cfg.num_layers - 1 {
                cfg.in_channels
            } else {
                cfg.out_channels
            };
            let cin = if i == 0 {
                cfg.prev_output_channels
            } else {
                cfg.out_channels
            };
            Shared::new(resnet.build(&resnets / i, cin + skip, cfg.out_channels))
        })
        .collect()
}

/// A block's `upsamplers.0`, when it has one.
fn upsampler(p: &nn::Path, add_upsample: bool, channels: i64) -> Option<Upsample2D> {
    add_upsample.then(|| upsample_2d(p / "upsamplers" / 0, channels, channels))
}

/// Pops the most recent skip connection and concatenates it on the channel axis.
fn with_skip(xs: &Tensor, skips: &mut Vec<Tensor>) -> Tensor {
    let skip = skips
        .pop()
        .expect("an up block needs one skip connection per resnet");
    Tensor::cat(&[xs, &skip], 1)
}

/// An up block of resnets each followed by a spatial transformer.
#[derive(Debug)]
pub struct CrossAttnUpBlock2D {
    pub resnets: Vec<Shared<ResnetBlock2D>>,
    pub attentions: Vec<Shared<Transformer2DModel>>,
    pub upsampler: Option<Upsample2D>,
    /// Recompute each resnet and transformer in the backward pass (see `checkpointing`).
    pub gradient_checkpointing: bool,
}

pub fn cross_attn_up_block_2d(
    p: nn::Path,
    cfg: &UpBlockConfig,
    resnet: &ResnetSettings,
    transformer: &TransformerSettings,
) -> CrossAttnUpBlock2D {
    CrossAttnUpBlock2D {
        resnets: up_resnets(&p, cfg, resnet),
        attentions: transformer.stack(&p, cfg.num_layers, cfg.out_channels),
        upsampler: upsampler(&p, cfg.add_upsample, cfg.out_channels),
        gradient_checkpointing: false,
    }
}

impl CrossAttnUpBlock2D {
    /// Consumes one skip per resnet from the end of `skips`; `upsample_size` is the
    /// spatial size of the next (shallower) level's skips.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<[i64; 2]>,
    ) -> Tensor {
        let mut xs = xs.shallow_clone();
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            let ck = self.gradient_checkpointing;
            let h = run_resnet(resnet, &with_skip(&xs, skips), temb, ck);
            xs = run_transformer(attn, &h, context, ck);
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, upsample_size),
            None => xs,
        }
    }
}

/// An up block of resnets only.
#[derive(Debug)]
pub struct UpBlock2D {
    pub resnets: Vec<Shared<ResnetBlock2D>>,
    pub upsampler: Option<Upsample2D>,
    /// Recompute each resnet and transformer in the backward pass (see `checkpointing`).
    pub gradient_checkpointing: bool,
}

pub fn up_block_2d(p: nn::Path, cfg: &UpBlockConfig, resnet: &ResnetSettings) -> UpBlock2D {
    UpBlock2D {
        resnets: up_resnets(&p, cfg, resnet),
        upsampler: upsampler(&p, cfg.add_upsample, cfg.out_channels),
        gradient_checkpointing: false,
    }
}

impl UpBlock2D {
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        upsample_size: Option<[i64; 2]>,
    ) -> Tensor {
        let mut xs = xs.shallow_clone();
        for resnet in &self.resnets {
            xs = run_resnet(
                resnet,
                &with_skip(&xs, skips),
                temb,
                self.gradient_checkpointing,
            );
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, upsample_size),
            None => xs,
        }
    }
}

/// The VAE encoder's level: resnets without time input, then a downsample.
#[derive(Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<Shared<ResnetBlock2D>>,
    pub downsampler: Option<Downsample2D>,
}

pub fn down_encoder_block_2d(
    p: nn::Path,
    cfg: &DownBlockConfig,
    resnet: &ResnetSettings,
) -> DownEncoderBlock2D {
    DownEncoderBlock2D {
        resnets: down_resnets(&p, cfg, resnet),
        downsampler: downsampler(&p, cfg),
    }
}

impl Module for DownEncoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = xs.shallow_clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None);
        }
        match &self.downsampler {
            Some(down) => down.forward(&xs),
            None => xs,
        }
    }
}

/// The VAE decoder's level: resnets without time input or skips, then an upsample.
#[derive(Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<Shared<ResnetBlock2D>>,
    pub upsampler: Option<Upsample2D>,
}

pub fn up_decoder_block_2d(
    p: nn::Path,
    in_channels: i64,
    out_channels: i64,
    num_layers: i64,
    add_upsample: bool,
    resnet: &ResnetSettings,
) -> UpDecoderBlock2D {
    UpDecoderBlock2D {
        resnets: resnet.stack(&p, num_layers, in_channels, out_channels),
        upsampler: upsampler(&p, add_upsample, out_channels),
    }
}

impl Module for UpDecoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = xs.shallow_clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None);
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, None),
            None => xs,
        }
    }
}

/// The VAE's bottom: resnet, then (single-head self-attention, resnet) per layer.
#[derive(Debug)]
pub struct UNetMidBlock2D {
    pub resnets: Vec<Shared<ResnetBlock2D>>,
    pub attentions: Vec<Attention>,
}

/// `add_attention` is the VAE config's `mid_block_add_attention`; without attention
/// the block is just its resnets.
pub fn unet_mid_block_2d(
    p: nn::Path,
    channels: i64,
    num_layers: i64,
    add_attention: bool,
    resnet: &ResnetSettings,
) -> UNetMidBlock2D {
    let attentions = &p / "attentions";
    // diffusers builds this with one head as wide as the block (attention_head_dim = channels).
    let attn_cfg = AttentionConfig {
        query_dim: channels,
        cross_attention_dim: None,
        heads: 1,
        dim_head: channels,
        bias: true,
        upcast: true,
        spatial_norm: Some((resnet.groups, resnet.eps)),
    };
    UNetMidBlock2D {
        resnets: resnet.stack(&p, num_layers + 1, channels, channels),
        attentions: if add_attention {
            (0..num_layers)
                .map(|i| attention(&attentions / i, &attn_cfg))
                .collect()
        } else {
            Vec::new()
        },
    }
}

impl Module for UNetMidBlock2D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.resnets[0].forward(xs, None);
        for (i, resnet) in self.resnets[1..].iter().enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward_spatial(&xs);
            }
            xs = resnet.forward(&xs, None);
        }
        xs
    }
}
