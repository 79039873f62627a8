//! The renaming engine behind single files: prefix rules between original and diffusers
//! names, the per-part renames inside resnets and VAE attention, and the rule sets of the
//! UNet and VAE built from their layouts.

use std::collections::HashMap;

use tch::Tensor;

use super::single_file::{Named, UNetLayout, VaeLayout};

/// A tensor, or only its shape, so that name lists convert through the same code as weights.
pub trait Weight: Sized {
    fn dims(&self) -> Vec<i64>;
    fn reshaped(self, dims: &[i64]) -> Self;
    /// Equal parts along the first dimension.
    fn split_rows(self, parts: i64) -> Vec<Self>;
    fn cat_rows(parts: Vec<Self>) -> Self;
}

impl Weight for Tensor {
    fn dims(&self) -> Vec<i64> {
        self.size()
    }
    fn reshaped(self, dims: &[i64]) -> Self {
        self.reshape(dims)
    }
    fn split_rows(self, parts: i64) -> Vec<Self> {
        self.chunk(parts, 0)
    }
    fn cat_rows(parts: Vec<Self>) -> Self {
        Tensor::cat(&parts, 0)
    }
}

/// The shape of a tensor that is not there: what the full-size key lists hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape(pub Vec<i64>);

impl Weight for Shape {
    fn dims(&self) -> Vec<i64> {
        self.0.clone()
    }
    fn reshaped(self, dims: &[i64]) -> Self {
        Shape(dims.to_vec())
    }
    fn split_rows(self, parts: i64) -> Vec<Self> {
        let mut dims = self.0;
        dims[0] /= parts;
        (0..parts).map(|_| Shape(dims.clone())).collect()
    }
    fn cat_rows(parts: Vec<Self>) -> Self {
        let mut dims = parts[0].0.clone();
        dims[0] = parts.iter().map(|p| p.0[0]).sum();
        Shape(dims)
    }
}

/// Which naming a conversion produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Original,
    Diffusers,
}

/// How the rest of a name below a mapped prefix changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// Unchanged (transformer blocks, convolutions, embeddings).
    Plain,
    UnetResnet,
    VaeResnet,
    /// Also reshaped: 1×1 convolution weights in the original, linear ones in diffusers.
    VaeAttention,
}

/// (original, diffusers) module names inside each kind of part.
const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];
const VAE_RESNET: &[(&str, &str)] = &[
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
];
const VAE_ATTENTION: &[(&str, &str)] = &[
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
];

/// Prefix pairs, looked up by the longest prefix of a name on the side it comes from.
#[derive(Default)]
pub(super) struct Rules {
    pub(super) from_original: HashMap<String, (String, Part)>,
    from_diffusers: HashMap<String, (String, Part)>,
}

impl Rules {
    pub(super) fn add(
        &mut self,
        original: impl Into<String>,
        diffusers: impl Into<String>,
        part: Part,
    ) {
        let (original, diffusers) = (original.into(), diffusers.into());
        self.from_original
            .insert(original.clone(), (diffusers.clone(), part));
        self.from_diffusers.insert(diffusers, (original, part));
    }

    pub(super) fn rename(&self, key: &str, to: Side) -> Option<(String, Part)> {
        let table = match to {
            Side::Diffusers => &self.from_original,
            Side::Original => &self.from_diffusers,
        };
        let (prefix, suffix, (other, part)) = key
            .rmatch_indices('.')
            .map(|(i, _)| key.split_at(i + 1))
            .find_map(|(prefix, suffix)| table.get(prefix).map(|rule| (prefix, suffix, rule)))?;
        debug_assert!(key.starts_with(prefix));
        let names = match part {
            Part::Plain => return Some((format!("{other}{suffix}"), *part)),
            Part::UnetResnet => UNET_RESNET,
            Part::VaeResnet => VAE_RESNET,
            Part::VaeAttention => VAE_ATTENTION,
        };
        let (module, leaf) = suffix.rsplit_once('.')?;
        names.iter().find_map(|&(original, diffusers)| {
            let (from, into) = if to == Side::Diffusers {
                (original, diffusers)
            } else {
                (diffusers, original)
            };
            (module == from).then(|| (format!("{other}{into}.{leaf}"), *part))
        })
    }

    /// Renames every tensor of one network; `strip`/`add` are the prefixes of the file side.
    pub(super) fn convert<W: Weight>(
        &self,
        tensors: Named<W>,
        to: Side,
        strip: &str,
        add: &str,
    ) -> Result<Named<W>, String> {
        let mut out = Named::new();
        for (key, weight) in tensors {
            let name = key.strip_prefix(strip).unwrap_or(&key);
            let (renamed, part) = self.rename(name, to).ok_or_else(|| {
                let target = if to == Side::Diffusers {
                    "diffusers"
                } else {
                    "original SD"
                };
                format!("tensor `{strip}{name}` has no counterpart in the {target} layout")
            })?;
            let weight = if part == Part::VaeAttention && is_projection_weight(&renamed) {
                let dims = weight.dims();
                match (to, dims.len()) {
                    (Side::Diffusers, 3 | 4) => weight.reshaped(&dims[..2]),
                    (Side::Original, 2) => weight.reshaped(&[dims[0], dims[1], 1, 1]),
                    _ => weight,
                }
            } else {
                weight
            };
            let full = format!("{add}{renamed}");
            if out.insert(full.clone(), weight).is_some() {
                return Err(format!("two tensors map to `{full}`"));
            }
        }
        Ok(out)
    }
}

fn is_projection_weight(name: &str) -> bool {
    [
        "q.weight",
        "k.weight",
        "v.weight",
        "proj_out.weight",
        "to_q.weight",
        "to_k.weight",
        "to_v.weight",
        "to_out.0.weight",
    ]
    .iter()
    .any(|leaf| name.ends_with(&format!(".{leaf}")))
}

/// `prefix` + a number + `.`: the number and what follows.
pub(super) fn indexed<'a>(key: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let (number, rest) = key.strip_prefix(prefix)?.split_once('.')?;
    Some((number.parse().ok()?, rest))
}

pub(super) fn unet_rules(layout: &UNetLayout) -> Rules {
    use Part::*;
    let mut r = Rules::default();
    r.add("time_embed.0.", "time_embedding.linear_1.", Plain);
    r.add("time_embed.2.", "time_embedding.linear_2.", Plain);
    r.add("input_blocks.0.0.", "conv_in.", Plain);
    r.add("out.0.", "conv_norm_out.", Plain);
    r.add("out.2.", "conv_out.", Plain);
    let last = layout.down.len().saturating_sub(1);
    let mut k = 1;
    for (i, block) in layout.down.iter().enumerate() {
        for j in 0..block.layers {
            r.add(
                format!("input_blocks.{k}.0."),
                format!("down_blocks.{i}.resnets.{j}."),
                UnetResnet,
            );
            if block.attention {
                r.add(
                    format!("input_blocks.{k}.1."),
                    format!("down_blocks.{i}.attentions.{j}."),
                    Plain,
                );
            }
            k += 1;
        }
        if i < last {
            r.add(
                format!("input_blocks.{k}.0.op."),
                format!("down_blocks.{i}.downsamplers.0.conv."),
                Plain,
            );
            k += 1;
        }
    }
    if layout.mid {
        r.add("middle_block.0.", "mid_block.resnets.0.", UnetResnet);
        r.add("middle_block.1.", "mid_block.attentions.0.", Plain);
        r.add("middle_block.2.", "mid_block.resnets.1.", UnetResnet);
    }
    let mut k = 0;
    for (i, block) in layout.up.iter().enumerate() {
        for j in 0..block.layers {
            r.add(
                format!("output_blocks.{k}.0."),
                format!("up_blocks.{i}.resnets.{j}."),
                UnetResnet,
            );
            if block.attention {
                r.add(
                    format!("output_blocks.{k}.1."),
                    format!("up_blocks.{i}.attentions.{j}."),
                    Plain,
                );
            }
            if j + 1 == block.layers && i < last {
                let slot = if block.attention { 2 } else { 1 };
                r.add(
                    format!("output_blocks.{k}.{slot}.conv."),
                    format!("up_blocks.{i}.upsamplers.0.conv."),
                    Plain,
                );
            }
            k += 1;
        }
    }
    r
}

pub(super) fn vae_rules(layout: &VaeLayout) -> Rules {
    use Part::*;
    let mut r = Rules::default();
    for side in ["encoder", "decoder"] {
        r.add(
            format!("{side}.conv_in."),
            format!("{side}.conv_in."),
            Plain,
        );
        r.add(
            format!("{side}.conv_out."),
            format!("{side}.conv_out."),
            Plain,
        );
        r.add(
            format!("{side}.norm_out."),
            format!("{side}.conv_norm_out."),
            Plain,
        );
        r.add(
            format!("{side}.mid.block_1."),
            format!("{side}.mid_block.resnets.0."),
            VaeResnet,
        );
        r.add(
            format!("{side}.mid.attn_1."),
            format!("{side}.mid_block.attentions.0."),
            VaeAttention,
        );
        r.add(
            format!("{side}.mid.block_2."),
            format!("{side}.mid_block.resnets.1."),
            VaeResnet,
        );
    }
    let n = layout.blocks;
    for i in 0..n {
        for j in 0..layout.layers {
            r.add(
                format!("encoder.down.{i}.block.{j}."),
                format!("encoder.down_blocks.{i}.resnets.{j}."),
                VaeResnet,
            );
        }
        if i + 1 < n {
            r.add(
                format!("encoder.down.{i}.downsample.conv."),
                format!("encoder.down_blocks.{i}.downsamplers.0.conv."),
                Plain,
            );
        }
        // The original numbers decoder blocks from the output end, diffusers from the input.
        let o = n - 1 - i;
        for j in 0..=layout.layers {
            r.add(
                format!("decoder.up.{o}.block.{j}."),
                format!("decoder.up_blocks.{i}.resnets.{j}."),
                VaeResnet,
            );
        }
        if i + 1 < n {
            r.add(
                format!("decoder.up.{o}.upsample.conv."),
                format!("decoder.up_blocks.{i}.upsamplers.0.conv."),
                Plain,
            );
        }
    }
    r.add("quant_conv.", "quant_conv.", Plain);
    r.add("post_quant_conv.", "post_quant_conv.", Plain);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::single_file::BlockLayout;

    fn tiny_unet() -> UNetLayout {
        let block = |layers, attention| BlockLayout { layers, attention };
        UNetLayout {
            down: vec![block(2, true), block(2, false)],
            up: vec![block(3, false), block(3, true)],
            mid: true,
        }
    }

    #[test]
    fn unet_names_follow_the_block_structure() {
        let rules = unet_rules(&tiny_unet());
        let cases = [
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.bias",
                "down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "input_blocks.5.0.skip_connection.weight",
                "down_blocks.1.resnets.1.conv_shortcut.weight",
            ),
            (
                "middle_block.2.emb_layers.1.bias",
                "mid_block.resnets.1.time_emb_proj.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
                "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (original, diffusers) in cases {
            assert_eq!(
                rules.rename(original, Side::Diffusers).unwrap().0,
                diffusers
            );
            assert_eq!(rules.rename(diffusers, Side::Original).unwrap().0, original);
        }
        assert!(
            rules
                .rename("input_blocks.4.1.proj_in.weight", Side::Diffusers)
                .is_none()
        );
        assert!(
            rules
                .rename("input_blocks.1.0.in_layers.1.weight", Side::Diffusers)
                .is_none()
        );
    }

    #[test]
    fn vae_attention_becomes_linear_and_back() {
        let rules = vae_rules(&VaeLayout {
            blocks: 2,
            layers: 1,
        });
        let tensors = Named::from([
            (
                "encoder.mid.attn_1.q.weight".to_string(),
                Shape(vec![8, 8, 1, 1]),
            ),
            ("encoder.mid.attn_1.norm.weight".to_string(), Shape(vec![8])),
            (
                "decoder.up.1.upsample.conv.weight".to_string(),
                Shape(vec![8, 8, 3, 3]),
            ),
            (
                "decoder.up.0.block.1.nin_shortcut.weight".to_string(),
                Shape(vec![4, 8, 1, 1]),
            ),
        ]);
        let diffusers = rules
            .convert(tensors.clone(), Side::Diffusers, "", "")
            .unwrap();
        assert_eq!(
            diffusers["encoder.mid_block.attentions.0.to_q.weight"],
            Shape(vec![8, 8])
        );
        assert_eq!(
            diffusers["encoder.mid_block.attentions.0.group_norm.weight"],
            Shape(vec![8])
        );
        assert!(diffusers.contains_key("decoder.up_blocks.0.upsamplers.0.conv.weight"));
        assert!(diffusers.contains_key("decoder.up_blocks.1.resnets.1.conv_shortcut.weight"));
        assert_eq!(
            rules.convert(diffusers, Side::Original, "", "").unwrap(),
            tensors
        );
    }

    #[test]
    fn unet_layout_is_read_back_from_original_names() {
        let layout = tiny_unet();
        let names: Vec<String> = unet_rules(&layout)
            .from_original
            .into_keys()
            .map(|p| format!("{p}weight"))
            .collect();
        let inferred = UNetLayout::infer(names.iter().map(String::as_str)).unwrap();
        assert_eq!(inferred, layout);
    }
}
