//! Tensor names in the original Stable Diffusion layout (one file, as AUTOMATIC1111 and
//! ComfyUI read and write it) and their diffusers counterparts, in both directions.
//!
//! The mapping is built from a layout (how many blocks, how many layers in each, which
//! have attention), taken from the diffusers configs or read off the original names, so
//! any SD 1.x/2.x-shaped network maps, not only the full-size ones. Conversions only
//! rename, reshape and split/concatenate, so a round trip gives back identical bits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Value, json};
use tch::Tensor;

pub use super::key_rules::{Shape, Weight};
use super::key_rules::{Side, indexed, unet_rules, vae_rules};
use super::text_keys::{
    clip_from_original, clip_to_original, open_clip_from_original, open_clip_to_original,
};
use super::{CheckpointError, Configs, SdVersion, Tensors, default_scheduler};
use crate::models::UNetConfig;
use crate::models::clip::{ClipActivation, ClipTextConfig};
use crate::models::config::{DownBlockType, UpBlockType, VaeConfig};
use crate::schedulers::PredictionType;

/// Prefix of the UNet's tensors in a single file.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE's tensors in a single file.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of the text encoder's tensors in a single file.
pub const TEXT_PREFIX: &str = "cond_stage_model.";

/// Named weights of one network or one file.
pub type Named<W> = BTreeMap<String, W>;

/// The three networks of a pipeline, under diffusers names.
#[derive(Debug)]
pub struct Components<W> {
    pub unet: Named<W>,
    pub vae: Named<W>,
    pub text_encoder: Named<W>,
}

/// One down or up block of a UNet: its resnet count and whether each has attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockLayout {
    pub layers: usize,
    pub attention: bool,
}

/// The UNet's block structure: all the mapping needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetLayout {
    pub down: Vec<BlockLayout>,
    pub up: Vec<BlockLayout>,
    pub mid: bool,
}

/// The VAE's block structure (the encoder's; the decoder has one more layer per block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeLayout {
    pub blocks: usize,
    pub layers: usize,
}

/// Which text encoder a file holds, which also tells SD 1.x from SD 2.x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextLayout {
    /// OpenAI CLIP as transformers names it, under `cond_stage_model.transformer.`.
    Clip,
    /// OpenCLIP under `cond_stage_model.model.`, of which only the first `layers`
    /// resblocks are used (SD 2.x stops at the penultimate one).
    OpenClip { layers: usize },
}

/// Everything needed to map a whole single file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layouts {
    pub unet: UNetLayout,
    pub vae: VaeLayout,
    pub text: TextLayout,
}

impl UNetLayout {
    pub fn from_config(cfg: &UNetConfig) -> Result<Self, String> {
        let layers = cfg.blocks().map_err(|e| e.to_string())?.layers;
        let layers: Vec<usize> = layers.iter().map(|&l| l.max(0) as usize).collect();
        let down = cfg
            .down_block_types
            .iter()
            .zip(&layers)
            .map(|(t, &layers)| BlockLayout {
                layers,
                attention: *t == DownBlockType::CrossAttnDownBlock2D,
            })
            .collect();
        let up = cfg
            .up_block_types
            .iter()
            .zip(layers.iter().rev())
            .map(|(t, &layers)| BlockLayout {
                layers: layers + 1,
                attention: *t == UpBlockType::CrossAttnUpBlock2D,
            })
            .collect();
        Ok(UNetLayout {
            down,
            up,
            mid: cfg.mid_block_type.is_some(),
        })
    }

    /// Reads the blocks off original names (without the `model.diffusion_model.` prefix):
    /// a downsampler (`input_blocks.K.0.op`) closes each down block but the last.
    pub fn infer<'a>(keys: impl Iterator<Item = &'a str>) -> Result<Self, String> {
        let mut inputs: BTreeMap<usize, (bool, bool)> = BTreeMap::new();
        let mut outputs: BTreeMap<usize, bool> = BTreeMap::new();
        let mut mid = false;
        for key in keys {
            if let Some((k, rest)) = indexed(key, "input_blocks.") {
                let entry = inputs.entry(k).or_default();
                entry.0 |= rest.starts_with("0.op.");
                entry.1 |= rest.starts_with("1.");
            } else if let Some((k, rest)) = indexed(key, "output_blocks.") {
                *outputs.entry(k).or_default() |=
                    rest.starts_with("1.") && !rest.starts_with("1.conv.");
            } else if key.starts_with("middle_block.") {
                mid = true;
            }
        }
        let last = *inputs
            .keys()
            .next_back()
            .ok_or("it has no UNet input blocks")?;
        let mut down = Vec::new();
        let mut block = BlockLayout::default();
        for k in 1..=last {
            match inputs.get(&k) {
                Some((true, _)) => down.push(std::mem::take(&mut block)),
                other => {
                    block.layers += 1;
                    block.attention |= other.is_some_and(|e| e.1);
                }
            }
        }
        down.push(block);
        let mut up = Vec::new();
        let mut k = 0;
        for block in down.iter().rev() {
            let layers = block.layers + 1;
            let attention = (k..k + layers).any(|i| outputs.get(&i).copied().unwrap_or(false));
            up.push(BlockLayout { layers, attention });
            k += layers;
        }
        let found = outputs.keys().next_back().map_or(0, |&i| i + 1);
        if found != k {
            return Err(format!(
                "its UNet has {found} output blocks, but its input blocks call for {k}"
            ));
        }
        Ok(UNetLayout { down, up, mid })
    }
}

impl VaeLayout {
    pub fn from_config(cfg: &VaeConfig) -> Self {
        VaeLayout {
            blocks: cfg.block_out_channels.len(),
            layers: cfg.layers_per_block.max(0) as usize,
        }
    }

    /// Counts `encoder.down.I` and `encoder.down.0.block.J` in original names.
    pub fn infer<'a>(keys: impl Iterator<Item = &'a str>) -> Result<Self, String> {
        let mut blocks = BTreeSet::new();
        let mut layers = BTreeSet::new();
        for key in keys {
            if let Some((i, rest)) = indexed(key, "encoder.down.") {
                blocks.insert(i);
                if let Some((j, _)) = indexed(rest, "block.").filter(|_| i == 0) {
                    layers.insert(j);
                }
            }
        }
        if blocks.is_empty() {
            return Err("it has no VAE encoder blocks".into());
        }
        Ok(VaeLayout {
            blocks: blocks.len(),
            layers: layers.len(),
        })
    }
}

impl TextLayout {
    /// Tells the text encoder from full original names. A file with OpenCLIP's
    /// `text_projection` holds the complete ViT-H tower, whose last resblock SD 2.x never
    /// runs, so that one is left out; a file without it holds only the layers in use.
    pub fn infer<'a>(keys: impl Iterator<Item = &'a str>) -> Result<Self, String> {
        let mut clip = false;
        let mut open_clip = false;
        let mut projection = false;
        let mut resblocks = BTreeSet::new();
        for key in keys {
            let Some(rest) = key.strip_prefix(TEXT_PREFIX) else {
                continue;
            };
            if let Some(rest) = rest.strip_prefix("model.") {
                open_clip = true;
                projection |= rest == "text_projection";
                if let Some((i, _)) = indexed(rest, "transformer.resblocks.") {
                    resblocks.insert(i);
                }
            } else if rest.starts_with("transformer.") {
                clip = true;
            }
        }
        match (clip, open_clip) {
            (true, false) => Ok(TextLayout::Clip),
            (false, true) => {
                let layers = resblocks.len().saturating_sub(usize::from(projection));
                Ok(TextLayout::OpenClip { layers })
            }
            (true, true) => Err("it has both a CLIP and an OpenCLIP text encoder".into()),
            (false, false) => Err(format!(
                "it has no text encoder ({TEXT_PREFIX}transformer.* or {TEXT_PREFIX}model.*)"
            )),
        }
    }
}

impl Layouts {
    /// Layouts from the diffusers configs of the three networks; the text encoder's
    /// activation tells OpenAI CLIP (quick_gelu) from OpenCLIP (gelu).
    pub fn from_configs(unet: &Value, vae: &Value, text_encoder: &Value) -> Result<Self, String> {
        let unet =
            UNetConfig::from_json(&unet.to_string()).map_err(|e| format!("UNet config: {e}"))?;
        let vae = VaeConfig::from_json(&vae.to_string()).map_err(|e| format!("VAE config: {e}"))?;
        let text: ClipTextConfig = serde_json::from_value(text_encoder.clone())
            .map_err(|e| format!("text encoder config: {e}"))?;
        let text = match text.hidden_act {
            ClipActivation::QuickGelu => TextLayout::Clip,
            ClipActivation::Gelu => TextLayout::OpenClip {
                layers: text.num_hidden_layers.max(0) as usize,
            },
        };
        Ok(Layouts {
            unet: UNetLayout::from_config(&unet)?,
            vae: VaeLayout::from_config(&vae),
            text,
        })
    }

    /// Reads every layout off the names of a single file.
    pub fn infer<W>(tensors: &Named<W>) -> Result<Self, String> {
        let under =
            |prefix: &'static str| tensors.keys().filter_map(move |k| k.strip_prefix(prefix));
        Ok(Layouts {
            unet: UNetLayout::infer(under(UNET_PREFIX))?,
            vae: VaeLayout::infer(under(VAE_PREFIX))?,
            text: TextLayout::infer(tensors.keys().map(String::as_str))?,
        })
    }
}

/// Splits a single file into diffusers-named components.
///
/// Tensors outside the three networks (EMA copies, DDPM schedule buffers, the training
/// step) are left out, as is what the diffusers text encoder has no place for
/// (`position_ids`, OpenCLIP's projection, scale and unused last resblock). Any other
/// name inside a network is an error, so a checkpoint is never half understood.
pub fn from_original<W: Weight>(
    tensors: Named<W>,
    layouts: &Layouts,
    source: &Path,
) -> Result<Components<W>, CheckpointError> {
    let (mut unet, mut vae, mut text) = (Named::new(), Named::new(), Named::new());
    for (key, weight) in tensors {
        if key.starts_with(UNET_PREFIX) {
            unet.insert(key, weight);
        } else if key.starts_with(VAE_PREFIX) {
            vae.insert(key, weight);
        } else if let Some(rest) = key.strip_prefix(TEXT_PREFIX) {
            text.insert(rest.to_string(), weight);
        }
    }
    let fail = |message: String| CheckpointError::Invalid {
        path: source.to_path_buf(),
        message,
    };
    let unet = unet_rules(&layouts.unet)
        .convert(unet, Side::Diffusers, UNET_PREFIX, "")
        .map_err(fail)?;
    let vae = vae_rules(&layouts.vae)
        .convert(vae, Side::Diffusers, VAE_PREFIX, "")
        .map_err(fail)?;
    let text_encoder = match layouts.text {
        TextLayout::Clip => clip_from_original(text),
        TextLayout::OpenClip { layers } => open_clip_from_original(text, layers),
    }
    .map_err(fail)?;
    Ok(Components {
        unet,
        vae,
        text_encoder,
    })
}

/// Joins diffusers-named components into one file in the original layout; SD 1.x text
/// encoders are written under `cond_stage_model.transformer.text_model.`.
pub fn to_original<W: Weight>(
    components: Components<W>,
    layouts: &Layouts,
    source: &Path,
) -> Result<Named<W>, CheckpointError> {
    let fail = |message: String| CheckpointError::Invalid {
        path: source.to_path_buf(),
        message,
    };
    let mut out = unet_rules(&layouts.unet)
        .convert(components.unet, Side::Original, "", UNET_PREFIX)
        .map_err(fail)?;
    out.extend(
        vae_rules(&layouts.vae)
            .convert(components.vae, Side::Original, "", VAE_PREFIX)
            .map_err(fail)?,
    );
    let text = match layouts.text {
        TextLayout::Clip => clip_to_original(components.text_encoder),
        TextLayout::OpenClip { layers } => open_clip_to_original(components.text_encoder, layers),
    }
    .map_err(fail)?;
    out.extend(
        text.into_iter()
            .map(|(k, w)| (format!("{TEXT_PREFIX}{k}"), w)),
    );
    Ok(out)
}

/// Configs for a single file, which carries none: sizes are read off the tensor shapes;
/// what weights cannot show takes SD's own values (SD 1.x: 8 heads; SD 2.x: 64-wide heads,
/// upcast attention, 768 px for v-prediction).
pub(super) fn infer_configs(
    c: &Components<Tensor>,
    layouts: &Layouts,
    version: SdVersion,
    prediction: PredictionType,
    path: &Path,
) -> Result<Configs, CheckpointError> {
    let dim = |tensors: &Tensors, name: &str, axis: usize| -> Result<i64, CheckpointError> {
        tensors
            .get(name)
            .and_then(|t| t.size().get(axis).copied())
            .ok_or_else(|| {
                CheckpointError::invalid(
                    path,
                    format!("cannot size the model: tensor `{name}` is missing"),
                )
            })
    };
    let sd2 = version == SdVersion::Sd2;
    let big = sd2 && prediction == PredictionType::VPrediction;
    let unet_layout = &layouts.unet;
    let channels = (0..unet_layout.down.len())
        .map(|i| {
            dim(
                &c.unet,
                &format!("down_blocks.{i}.resnets.0.conv1.weight"),
                0,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let layers: Vec<usize> = unet_layout.down.iter().map(|b| b.layers).collect();
    let find = |suffix: &str| {
        c.unet
            .iter()
            .find(|(k, _)| k.ends_with(suffix))
            .map(|(_, t)| t.size())
    };
    let transformer_layers: Vec<usize> = (0..channels.len())
        .map(|i| {
            let prefix = format!("down_blocks.{i}.attentions.0.transformer_blocks.");
            let count = c
                .unet
                .keys()
                .filter(|k| k.starts_with(&prefix) && k.ends_with(".norm1.weight"))
                .count();
            count.max(1)
        })
        .collect();
    let heads: Value = if sd2 {
        json!(channels.iter().map(|c| (c / 64).max(1)).collect::<Vec<_>>())
    } else {
        json!(8)
    };
    let mut unet = serde_json::to_value(UNetConfig::default()).expect("config serialises");
    merge(
        &mut unet,
        json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": if big { 96 } else { 64 },
            "in_channels": dim(&c.unet, "conv_in.weight", 1)?,
            "out_channels": dim(&c.unet, "conv_out.weight", 0)?,
            "block_out_channels": channels,
            "layers_per_block": one_or_list(&layers),
            "transformer_layers_per_block": one_or_list(&transformer_layers),
            "down_block_types": unet_layout.down.iter()
                .map(|b| if b.attention { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect::<Vec<_>>(),
            "up_block_types": unet_layout.up.iter()
                .map(|b| if b.attention { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect::<Vec<_>>(),
            "mid_block_type": unet_layout.mid.then_some("UNetMidBlock2DCrossAttn"),
            "cross_attention_dim": find("attn2.to_k.weight").map_or(768, |s| s[1]),
            "use_linear_projection": find("proj_in.weight").is_some_and(|s| s.len() == 2),
            "attention_head_dim": heads,
            "upcast_attention": sd2,
        }),
    );

    let vae_channels = (0..layouts.vae.blocks)
        .map(|i| {
            dim(
                &c.vae,
                &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                0,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut vae = serde_json::to_value(VaeConfig::default()).expect("config serialises");
    merge(
        &mut vae,
        json!({
            "_class_name": "AutoencoderKL",
            "sample_size": if big { 768 } else { 512 },
            "in_channels": dim(&c.vae, "encoder.conv_in.weight", 1)?,
            "out_channels": dim(&c.vae, "decoder.conv_out.weight", 0)?,
            "latent_channels": dim(&c.vae, "decoder.conv_in.weight", 1)?,
            "block_out_channels": vae_channels,
            "layers_per_block": layouts.vae.layers,
            "down_block_types": vec!["DownEncoderBlock2D"; layouts.vae.blocks],
            "up_block_types": vec!["UpDecoderBlock2D"; layouts.vae.blocks],
            "use_quant_conv": c.vae.contains_key("quant_conv.weight"),
            "use_post_quant_conv": c.vae.contains_key("post_quant_conv.weight"),
            "mid_block_add_attention": c.vae.contains_key("encoder.mid_block.attentions.0.to_q.weight"),
        }),
    );

    let t = &c.text_encoder;
    let mut text = if sd2 {
        ClipTextConfig::sd2()
    } else {
        ClipTextConfig::sd1()
    };
    text.vocab_size = dim(t, "text_model.embeddings.token_embedding.weight", 0)?;
    text.hidden_size = dim(t, "text_model.embeddings.token_embedding.weight", 1)?;
    text.max_position_embeddings = dim(t, "text_model.embeddings.position_embedding.weight", 0)?;
    text.intermediate_size = dim(t, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?;
    text.num_hidden_layers = t
        .keys()
        .filter(|k| k.ends_with(".self_attn.q_proj.weight"))
        .count() as i64;
    if text.hidden_size % 64 == 0 {
        text.num_attention_heads = text.hidden_size / 64;
    } else if text.hidden_size % text.num_attention_heads != 0 {
        text.num_attention_heads = 1;
    }
    Ok(Configs {
        unet,
        vae,
        text_encoder: text.to_transformers_json(),
        scheduler: default_scheduler(version, prediction),
    })
}

fn one_or_list(values: &[usize]) -> Value {
    match values {
        [first, rest @ ..] if rest.iter().all(|v| v == first) => json!(first),
        _ => json!(values),
    }
}

fn merge(base: &mut Value, overrides: Value) {
    if let (Some(base), Value::Object(overrides)) = (base.as_object_mut(), overrides) {
        base.extend(overrides);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_layout_leaves_out_the_unused_last_openclip_block() {
        let full = [
            "cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
            "cond_stage_model.model.transformer.resblocks.1.ln_1.weight",
            "cond_stage_model.model.text_projection",
        ];
        assert_eq!(
            TextLayout::infer(full.into_iter()).unwrap(),
            TextLayout::OpenClip { layers: 1 }
        );
        assert_eq!(
            TextLayout::infer(full[..2].iter().copied()).unwrap(),
            TextLayout::OpenClip { layers: 2 }
        );
        let sd1 = ["cond_stage_model.transformer.embeddings.token_embedding.weight"];
        assert_eq!(
            TextLayout::infer(sd1.into_iter()).unwrap(),
            TextLayout::Clip
        );
    }
}
