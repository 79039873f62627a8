//! The denoiser: diffusers' `UNet2DConditionModel`, which predicts the noise (or v)
//! in a latent given the timestep and the text embeddings. Built entirely from
//! `unet/config.json`, so SD 1.x and SD 2.x share this code.

use tch::Tensor;
use tch::nn::{self, Module};

use super::config::{DownBlockType, UNetConfig, UpBlockType};
use super::embeddings::{TimestepEmbedding, Timesteps, timestep_embedding};
use super::resnet::{conv2d, group_norm};
use super::unet_blocks::{
    CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, DownBlockConfig, ResnetSettings,
    TransformerSettings, UNetMidBlock2DCrossAttn, UpBlock2D, UpBlockConfig,
    cross_attn_down_block_2d, cross_attn_up_block_2d, down_block_2d, unet_mid_block_2d_cross_attn,
    up_block_2d,
};

#[derive(Debug)]
pub enum DownBlock {
    CrossAttn(CrossAttnDownBlock2D),
    Plain(DownBlock2D),
}

#[derive(Debug)]
pub enum UpBlock {
    CrossAttn(CrossAttnUpBlock2D),
    Plain(UpBlock2D),
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: nn::Conv2D,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<UNetMidBlock2DCrossAttn>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: nn::GroupNorm,
    pub conv_out: nn::Conv2D,
    gradient_checkpointing: bool,
    center_input_sample: bool,
}

/// Builds the UNet under `p` with diffusers' parameter names.
///
/// Panics when `cfg` fails [`UNetConfig::validate`]; configs read with
/// [`UNetConfig::from_file`] have already passed it.
pub fn unet(p: nn::Path, cfg: &UNetConfig) -> UNet2DConditionModel {
    if let Err(e) = cfg.validate() {
        panic!("cannot build a UNet from this config: {e}");
    }
    let blocks = cfg.blocks().expect("validated above");
    let channels = &cfg.block_out_channels;
    let n = channels.len();
    let time_embed_dim = cfg.time_embed_dim();
    let resnet = ResnetSettings {
        temb_channels: Some(time_embed_dim),
        groups: cfg.norm_num_groups,
        eps: cfg.norm_eps,
        output_scale_factor: 1.0,
    };
    let transformer = |i: usize| TransformerSettings {
        heads: blocks.heads[i],
        layers: blocks.transformer_layers[i],
        cross_attention_dim: blocks.cross_attention_dim[i],
        norm_num_groups: cfg.norm_num_groups,
        use_linear_projection: cfg.use_linear_projection,
        only_cross_attention: blocks.only_cross_attention[i],
        upcast_attention: cfg.upcast_attention,
    };

    let down = &p / "down_blocks";
    let mut down_blocks = Vec::with_capacity(n);
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let block_cfg = DownBlockConfig {
            in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
            out_channels: channels[i],
            num_layers: blocks.layers[i],
            add_downsample: i + 1 < n,
            downsample_padding: cfg.downsample_padding,
        };
        down_blocks.push(match kind {
            DownBlockType::CrossAttnDownBlock2D => DownBlock::CrossAttn(cross_attn_down_block_2d(
                &down / i,
                &block_cfg,
                &resnet,
                &transformer(i),
            )),
            DownBlockType::DownBlock2D => {
                DownBlock::Plain(down_block_2d(&down / i, &block_cfg, &resnet))
            }
        });
    }

    let mid_block = cfg.mid_block_type.map(|_| {
        let mid_resnet = ResnetSettings {
            output_scale_factor: cfg.mid_block_scale_factor,
            ..resnet
        };
        // diffusers' mid block never passes only_cross_attention on.
        let mid_transformer = TransformerSettings {
            only_cross_attention: false,
            ..transformer(n - 1)
        };
        unet_mid_block_2d_cross_attn(
            &p / "mid_block",
            channels[n - 1],
            1,
            &mid_resnet,
            &mid_transformer,
        )
    });

    // The up path mirrors the down path: block i of it works at the resolution of
    // down block n-1-i and reads that block's settings.
    let up = &p / "up_blocks";
    let mut up_blocks = Vec::with_capacity(n);
    for (i, kind) in cfg.up_block_types.iter().enumerate() {
        let level = n - 1 - i;
        let block_cfg = UpBlockConfig {
            in_channels: channels[level.saturating_sub(1)],
            prev_output_channels: channels[(level + 1).min(n - 1)],
            out_channels: channels[level],
            num_layers: blocks.layers[level] + 1,
            add_upsample: i + 1 < n,
        };
        up_blocks.push(match kind {
            UpBlockType::CrossAttnUpBlock2D => UpBlock::CrossAttn(cross_attn_up_block_2d(
                &up / i,
                &block_cfg,
                &resnet,
                &transformer(level),
            )),
            UpBlockType::UpBlock2D => UpBlock::Plain(up_block_2d(&up / i, &block_cfg, &resnet)),
        });
    }

    UNet2DConditionModel {
        conv_in: conv2d(
            &p / "conv_in",
            cfg.in_channels,
            channels[0],
            cfg.conv_in_kernel,
        ),
        time_proj: Timesteps {
            num_channels: channels[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            downscale_freq_shift: cfg.freq_shift,
        },
        time_embedding: timestep_embedding(&p / "time_embedding", channels[0], time_embed_dim),
        down_blocks,
        mid_block,
        up_blocks,
        conv_norm_out: group_norm(
            &p / "conv_norm_out",
            cfg.norm_num_groups,
            channels[0],
            cfg.norm_eps,
        ),
        conv_out: conv2d(
            &p / "conv_out",
            channels[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
        ),
        gradient_checkpointing: false,
        center_input_sample: cfg.center_input_sample,
    }
}

impl UNet2DConditionModel {
    /// Recompute every resnet and spatial transformer of the down, mid and up blocks in
    /// the backward pass instead of keeping their activations, as diffusers'
    /// `enable_gradient_checkpointing` does (see [`super::checkpointing`]).
    pub fn set_gradient_checkpointing(&mut self, enabled: bool) {
        self.gradient_checkpointing = enabled;
        for block in &mut self.down_blocks {
            match block {
                DownBlock::CrossAttn(b) => b.gradient_checkpointing = enabled,
                DownBlock::Plain(b) => b.gradient_checkpointing = enabled,
            }
        }
        if let Some(mid) = &mut self.mid_block {
            mid.gradient_checkpointing = enabled;
        }
        for block in &mut self.up_blocks {
            match block {
                UpBlock::CrossAttn(b) => b.gradient_checkpointing = enabled,
                UpBlock::Plain(b) => b.gradient_checkpointing = enabled,
            }
        }
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// `sample` is the noisy latent `[B, C, H, W]`, `timesteps` one per sample (`[B]`,
    /// integer or float; a scalar applies to the whole batch), `encoder_hidden_states`
    /// the text embeddings `[B, S, cross_attention_dim]`. Returns `[B, out_channels, H, W]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Tensor {
        let batch = sample.size()[0];
        let timesteps = timesteps.to_device(sample.device());
        let timesteps = if timesteps.dim() == 0 {
            timesteps.expand([batch], false)
        } else {
            timesteps
        };
        let t_emb = self.time_proj.forward(&timesteps).to_kind(sample.kind());
        let emb = self.time_embedding.forward(&t_emb);

        let sample = if self.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        };
        let mut xs = self.conv_in.forward(&sample);
        let mut skips = vec![xs.shallow_clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = match block {
                DownBlock::CrossAttn(b) => b.forward(&xs, &emb, encoder_hidden_states),
                DownBlock::Plain(b) => b.forward(&xs, &emb),
            };
            xs = out;
            skips.extend(block_skips);
        }

        if let Some(mid) = &self.mid_block {
            xs = mid.forward(&xs, &emb, encoder_hidden_states);
        }

        for block in &self.up_blocks {
            let layers = match block {
                UpBlock::CrossAttn(b) => b.resnets.len(),
                UpBlock::Plain(b) => b.resnets.len(),
            };
            let mut block_skips = skips.split_off(skips.len() - layers);
            // Upsample to the size of the skips the next block will read, which is
            // not always twice this one when the input side is not a power of two.
            let upsample_size = skips.last().map(|s| {
                let size = s.size();
                [size[2], size[3]]
            });
            xs = match block {
                UpBlock::CrossAttn(b) => b.forward(
                    &xs,
                    &mut block_skips,
                    &emb,
                    encoder_hidden_states,
                    upsample_size,
                ),
                UpBlock::Plain(b) => b.forward(&xs, &mut block_skips, &emb, upsample_size),
            };
        }

        self.conv_out
            .forward(&self.conv_norm_out.forward(&xs).silu())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::PerBlock;
    use tch::{Device, Kind};

    fn tiny() -> UNetConfig {
        UNetConfig {
            block_out_channels: vec![8, 16],
            down_block_types: vec![
                DownBlockType::CrossAttnDownBlock2D,
                DownBlockType::DownBlock2D,
            ],
            up_block_types: vec![UpBlockType::UpBlock2D, UpBlockType::CrossAttnUpBlock2D],
            layers_per_block: PerBlock::One(1),
            norm_num_groups: 4,
            cross_attention_dim: PerBlock::One(6),
            attention_head_dim: PerBlock::Each(vec![2, 4]),
            ..Default::default()
        }
    }

    #[test]
    fn each_sample_uses_its_own_timestep() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = unet(vs.root(), &tiny());
        let opts = (Kind::Float, Device::Cpu);
        let sample = Tensor::randn([2, 4, 8, 8], opts);
        let context = Tensor::randn([2, 3, 6], opts);
        let both = model.forward(&sample, &Tensor::from_slice(&[10i64, 900]), &context);
        assert_eq!(both.size(), vec![2, 4, 8, 8]);
        for (i, t) in [10i64, 900].into_iter().enumerate() {
            let i = i as i64;
            let alone = model.forward(
                &sample.narrow(0, i, 1),
                &Tensor::from_slice(&[t]),
                &context.narrow(0, i, 1),
            );
            let err = (both.narrow(0, i, 1) - alone).abs().max().double_value(&[]);
            assert!(err < 1e-5, "sample {i}: {err}");
        }
        // A float timestep equal to the integer one gives the same output.
        let float_t = model.forward(&sample, &Tensor::from_slice(&[10f32, 900.]), &context);
        assert!(float_t.allclose(&both, 0.0, 1e-6, false));
        let scalar_t = model.forward(&sample, &Tensor::from(10i64), &context);
        assert!(
            scalar_t
                .narrow(0, 0, 1)
                .allclose(&both.narrow(0, 0, 1), 0.0, 1e-6, false)
        );
    }

    #[test]
    fn odd_latent_sizes_come_back_at_their_own_size() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = unet(vs.root(), &tiny());
        let opts = (Kind::Float, Device::Cpu);
        let out = model.forward(
            &Tensor::randn([1, 4, 7, 5], opts),
            &Tensor::from_slice(&[1i64]),
            &Tensor::randn([1, 3, 6], opts),
        );
        assert_eq!(out.size(), vec![1, 4, 7, 5]);
    }

    #[test]
    fn parameter_names_mirror_the_down_path_in_the_up_path() {
        let vs = nn::VarStore::new(Device::Cpu);
        unet(vs.root(), &tiny());
        let vars = vs.variables();
        let shape = |name: &str| {
            vars.get(name)
                .map(|t| t.size())
                .unwrap_or_else(|| panic!("missing {name}"))
        };
        assert_eq!(shape("time_embedding.linear_1.weight"), vec![32, 8]);
        assert_eq!(
            shape("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
            vec![8, 6]
        );
        assert_eq!(
            shape("down_blocks.0.downsamplers.0.conv.weight"),
            vec![8, 8, 3, 3]
        );
        assert_eq!(
            shape("mid_block.attentions.0.proj_in.weight"),
            vec![16, 16, 1, 1]
        );
        // Up block 0 (lowest resolution): resnet 0 sees the mid output and a 16-wide skip,
        // resnet 1 the 8-wide skip left by down block 0's downsampler.
        assert_eq!(
            shape("up_blocks.0.resnets.0.conv1.weight"),
            vec![16, 32, 3, 3]
        );
        assert_eq!(
            shape("up_blocks.0.resnets.1.conv1.weight"),
            vec![16, 24, 3, 3]
        );
        assert_eq!(
            shape("up_blocks.1.resnets.0.conv1.weight"),
            vec![8, 24, 3, 3]
        );
        assert_eq!(
            shape("up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight"),
            vec![8, 8]
        );
        assert!(!vars.contains_key("up_blocks.1.upsamplers.0.conv.weight"));
        assert!(!vars.contains_key("down_blocks.1.downsamplers.0.conv.weight"));
    }

    #[test]
    #[should_panic(expected = "attention_head_dim")]
    fn building_from_an_invalid_config_names_the_field() {
        let vs = nn::VarStore::new(Device::Cpu);
        unet(
            vs.root(),
            &UNetConfig {
                attention_head_dim: PerBlock::One(3),
                ..tiny()
            },
        );
    }
}
