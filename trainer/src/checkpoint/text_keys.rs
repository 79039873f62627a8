//! Text encoder names in single files: OpenAI CLIP (SD 1.x) keeps transformers' names
//! below `cond_stage_model.transformer.`; OpenCLIP (SD 2.x) has its own, with q/k/v fused
//! into one `in_proj`.

use super::key_rules::{Part, Rules, Side, Weight, indexed};
use super::single_file::{Named, TEXT_PREFIX};

/// SD 1.x: transformers' names below `transformer.`, with or without `text_model.`.
pub(super) fn clip_from_original<W>(text: Named<W>) -> Result<Named<W>, String> {
    let mut out = Named::new();
    for (key, weight) in text {
        let rest = key.strip_prefix("transformer.").ok_or_else(|| {
            format!("tensor `{TEXT_PREFIX}{key}` is not part of a CLIP text encoder")
        })?;
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        if rest.ends_with("position_ids") {
            continue;
        }
        if out.insert(format!("text_model.{rest}"), weight).is_some() {
            return Err(format!("tensor `text_model.{rest}` appears twice"));
        }
    }
    Ok(out)
}

pub(super) fn clip_to_original<W>(text: Named<W>) -> Result<Named<W>, String> {
    text.into_iter()
        .map(|(key, weight)| match key.strip_prefix("text_model.") {
            Some(_) => Ok((format!("transformer.{key}"), weight)),
            None => Err(format!(
                "text encoder tensor `{key}` is not below `text_model.`"
            )),
        })
        .collect()
}

/// The OpenCLIP modules that are plain renames, per layer (original, diffusers).
const OPEN_CLIP_LAYER: &[(&str, &str)] = &[
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
];
const POSITIONS: (&str, &str) = (
    "model.positional_embedding",
    "text_model.embeddings.position_embedding.weight",
);
const QKV: [&str; 3] = ["q_proj", "k_proj", "v_proj"];

fn open_clip_rules(layers: usize) -> Rules {
    let mut r = Rules::default();
    r.add(
        "model.token_embedding.",
        "text_model.embeddings.token_embedding.",
        Part::Plain,
    );
    r.add(
        "model.ln_final.",
        "text_model.final_layer_norm.",
        Part::Plain,
    );
    for i in 0..layers {
        for (original, diffusers) in OPEN_CLIP_LAYER {
            r.add(
                format!("model.transformer.resblocks.{i}.{original}"),
                format!("text_model.encoder.layers.{i}.{diffusers}"),
                Part::Plain,
            );
        }
    }
    r
}

/// SD 2.x: OpenCLIP's fused `in_proj` becomes separate q/k/v projections.
pub(super) fn open_clip_from_original<W: Weight>(
    text: Named<W>,
    layers: usize,
) -> Result<Named<W>, String> {
    let rules = open_clip_rules(layers);
    let mut rest = Named::new();
    let mut out = Named::new();
    for (key, weight) in text {
        let block = indexed(&key, "model.transformer.resblocks.");
        if matches!(block, Some((i, _)) if i >= layers)
            || [
                "model.text_projection",
                "model.logit_scale",
                "model.attn_mask",
            ]
            .contains(&key.as_str())
        {
            continue;
        }
        if key == POSITIONS.0 {
            out.insert(POSITIONS.1.to_string(), weight);
        } else if let Some((i, leaf @ ("attn.in_proj_weight" | "attn.in_proj_bias"))) = block {
            let leaf = if leaf.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            for (name, part) in QKV.iter().zip(weight.split_rows(3)) {
                out.insert(
                    format!("text_model.encoder.layers.{i}.self_attn.{name}.{leaf}"),
                    part,
                );
            }
        } else {
            rest.insert(format!("{TEXT_PREFIX}{key}"), weight);
        }
    }
    out.extend(rules.convert(rest, Side::Diffusers, TEXT_PREFIX, "")?);
    Ok(out)
}

pub(super) fn open_clip_to_original<W: Weight>(
    mut text: Named<W>,
    layers: usize,
) -> Result<Named<W>, String> {
    let mut out = Named::new();
    if let Some(positions) = text.remove(POSITIONS.1) {
        out.insert(POSITIONS.0.to_string(), positions);
    }
    for i in 0..layers {
        for leaf in ["weight", "bias"] {
            let names =
                QKV.map(|name| format!("text_model.encoder.layers.{i}.self_attn.{name}.{leaf}"));
            let parts: Vec<W> = names.iter().filter_map(|n| text.remove(n)).collect();
            match parts.len() {
                0 => {}
                3 => {
                    out.insert(
                        format!("model.transformer.resblocks.{i}.attn.in_proj_{leaf}"),
                        W::cat_rows(parts),
                    );
                }
                _ => {
                    return Err(format!(
                        "layer {i} of the text encoder lacks one of {}",
                        names.join(", ")
                    ));
                }
            }
        }
    }
    out.extend(open_clip_rules(layers).convert(text, Side::Original, "", "")?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::single_file::Shape;

    #[test]
    fn open_clip_in_proj_splits_and_joins() {
        let text = Named::from([
            (
                "model.transformer.resblocks.0.attn.in_proj_weight".to_string(),
                Shape(vec![12, 4]),
            ),
            (
                "model.transformer.resblocks.0.attn.in_proj_bias".to_string(),
                Shape(vec![12]),
            ),
            (
                "model.transformer.resblocks.0.mlp.c_fc.weight".to_string(),
                Shape(vec![16, 4]),
            ),
            (
                "model.transformer.resblocks.1.ln_1.weight".to_string(),
                Shape(vec![4]),
            ),
            ("model.positional_embedding".to_string(), Shape(vec![77, 4])),
            ("model.text_projection".to_string(), Shape(vec![4, 4])),
        ]);
        let diffusers = open_clip_from_original(text, 1).unwrap();
        assert_eq!(
            diffusers["text_model.encoder.layers.0.self_attn.k_proj.weight"],
            Shape(vec![4, 4])
        );
        assert_eq!(
            diffusers["text_model.encoder.layers.0.self_attn.v_proj.bias"],
            Shape(vec![4])
        );
        assert!(diffusers.contains_key("text_model.encoder.layers.0.mlp.fc1.weight"));
        assert_eq!(
            diffusers.len(),
            8,
            "resblock 1 and the projection are dropped: {diffusers:?}"
        );
        let back = open_clip_to_original(diffusers, 1).unwrap();
        assert_eq!(
            back["model.transformer.resblocks.0.attn.in_proj_weight"],
            Shape(vec![12, 4])
        );
        assert_eq!(back.len(), 4);
    }
}
