//! diffusers folders: `model_index.json` and one subfolder per component, each with its
//! `config.json` and weights, read as diffusers and transformers save them and written
//! back so both load the result.
//!
//! Names are normalised on the way in, so the models see one spelling: text-encoder
//! tensors get the `text_model.` prefix transformers 5 leaves off, its `position_ids`
//! buffer is dropped, and VAE attention written by older diffusers (`query`, `key`,
//! `value`, `proj_attn`, sometimes as 1×1 convolutions) takes today's linear names.

use std::path::{Path, PathBuf};

use dreambooth_api::spec::Precision;
use serde_json::{Value, json};

use super::{
    CheckpointError, Component, LoadedModel, SdVersion, SourceKind, Tensors, read_ckpt, read_json,
    read_safetensors, write_safetensors,
};

/// The weight files each component may have, in the order diffusers prefers them.
fn candidates(component: &str) -> Vec<String> {
    let (safetensors, bin) = match component {
        "text_encoder" => ("model", "pytorch_model"),
        _ => ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    };
    vec![
        format!("{safetensors}.safetensors"),
        format!("{safetensors}.fp16.safetensors"),
        format!("{safetensors}.safetensors.index.json"),
        format!("{safetensors}.fp16.safetensors.index.json"),
        format!("{bin}.bin"),
        format!("{bin}.fp16.bin"),
    ]
}

/// Reads one component's config and weights (a sharded index reads every shard).
pub fn read_component(root: &Path, name: &str) -> Result<Component, CheckpointError> {
    let dir = root.join(name);
    let config = read_json(&dir.join("config.json"))?;
    let tried = candidates(name);
    let file = tried
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| CheckpointError::Invalid {
            path: dir.clone(),
            message: format!("no {name} weights: looked for {}", tried.join(", ")),
        })?;
    let mut tensors = Tensors::new();
    for shard in shards(&file)? {
        let part = if shard.extension().is_some_and(|e| e == "bin") {
            read_ckpt(&shard)?.tensors
        } else {
            read_safetensors(&shard)?
        };
        tensors.extend(part);
    }
    let tensors = match name {
        "text_encoder" => normalize_text_encoder(tensors),
        "vae" => normalize_vae(tensors),
        _ => tensors,
    };
    Ok(Component {
        tensors,
        config,
        weights: file,
    })
}

/// The files behind a weights path: itself, or every shard its index names.
fn shards(file: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    if !file.to_string_lossy().ends_with(".index.json") {
        return Ok(vec![file.to_path_buf()]);
    }
    let index = read_json(file)?;
    let map = index["weight_map"]
        .as_object()
        .ok_or_else(|| CheckpointError::Invalid {
            path: file.to_path_buf(),
            message: "sharded index without a `weight_map`".into(),
        })?;
    let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
    names.sort_unstable();
    names.dedup();
    let dir = file.parent().unwrap_or(Path::new("."));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Reads a whole diffusers Stable Diffusion folder.
pub fn read_diffusers_folder(root: &Path) -> Result<LoadedModel, CheckpointError> {
    let index = root.join("model_index.json");
    if !index.is_file() && !root.join("unet").is_dir() {
        return Err(CheckpointError::Invalid {
            path: root.to_path_buf(),
            message: "not a diffusers folder: it has neither model_index.json nor unet/".into(),
        });
    }
    let unet = read_component(root, "unet")?;
    let text_encoder = read_component(root, "text_encoder")?;
    let vae = read_component(root, "vae")?;
    let version = if text_encoder.config["hidden_act"] == "gelu"
        || unet.config["cross_attention_dim"] == 1024
    {
        SdVersion::Sd2
    } else {
        SdVersion::Sd1
    };
    let scheduler_path = root.join("scheduler").join("scheduler_config.json");
    let scheduler = if scheduler_path.is_file() {
        read_json(&scheduler_path)?
    } else {
        super::default_scheduler(version, crate::schedulers::PredictionType::Epsilon)
    };
    let prediction_type = super::scheduler_prediction(&scheduler);
    let tokenizer = Some(root.join("tokenizer")).filter(|d| d.is_dir());
    Ok(LoadedModel {
        source: root.to_path_buf(),
        kind: SourceKind::DiffusersFolder,
        version,
        prediction_type,
        unet,
        text_encoder,
        vae,
        scheduler,
        tokenizer,
    })
}

/// transformers 4 saved `text_model.*`, transformers 5 saves without it; both load.
pub fn normalize_text_encoder(tensors: Tensors) -> Tensors {
    tensors
        .into_iter()
        .filter(|(name, _)| !name.ends_with("position_ids"))
        .map(|(name, t)| {
            let named = if name.starts_with("text_model.") {
                name
            } else {
                format!("text_model.{name}")
            };
            (named, t)
        })
        .collect()
}

/// Old diffusers VAE attention names and conv-shaped weights become today's.
pub fn normalize_vae(tensors: Tensors) -> Tensors {
    const OLD: [(&str, &str); 4] = [
        ("query", "to_q"),
        ("key", "to_k"),
        ("value", "to_v"),
        ("proj_attn", "to_out.0"),
    ];
    tensors
        .into_iter()
        .map(|(name, t)| {
            let Some((module, leaf)) = name.rsplit_once('.') else {
                return (name, t);
            };
            if !module.contains(".attentions.") {
                return (name, t);
            }
            let (parent, last) = module.rsplit_once('.').unwrap_or(("", module));
            let renamed = OLD
                .iter()
                .find(|(old, _)| *old == last)
                .map(|(_, new)| format!("{parent}.{new}.{leaf}"));
            let name = renamed.unwrap_or(name);
            let is_projection = ["to_q", "to_k", "to_v", "to_out.0"]
                .iter()
                .any(|p| name.ends_with(&format!(".{p}.weight")));
            let t = if is_projection && t.dim() > 2 {
                t.flatten(1, -1)
            } else {
                t
            };
            (name, t)
        })
        .collect()
}

/// Writes a diffusers folder: each network's config and weights in `precision`, the
/// scheduler config, the tokenizer copied if the model has one, and `model_index.json`.
/// Files keep their plain names whatever the precision, which diffusers loads as is.
pub fn save_diffusers_folder(
    model: &LoadedModel,
    out: &Path,
    precision: Precision,
) -> Result<(), CheckpointError> {
    let parts = [
        ("unet", "diffusion_pytorch_model.safetensors", &model.unet),
        ("text_encoder", "model.safetensors", &model.text_encoder),
        ("vae", "diffusion_pytorch_model.safetensors", &model.vae),
    ];
    for (name, file, component) in parts {
        let dir = out.join(name);
        write_json(&dir.join("config.json"), &component.config)?;
        write_safetensors(&dir.join(file), &component.tensors, precision)?;
    }
    write_json(
        &out.join("scheduler").join("scheduler_config.json"),
        &model.scheduler,
    )?;
    if let Some(tokenizer) = &model.tokenizer {
        copy_dir(tokenizer, &out.join("tokenizer"))?;
    }
    let class =
        |v: &Value, fallback: &str| v["_class_name"].as_str().unwrap_or(fallback).to_string();
    let tokenizer = if model.tokenizer.is_some() {
        json!(["transformers", "CLIPTokenizer"])
    } else {
        json!([null, null])
    };
    let index = json!({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", class(&model.unet.config, "UNet2DConditionModel")],
        "vae": ["diffusers", class(&model.vae.config, "AutoencoderKL")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": tokenizer,
        "scheduler": ["diffusers", class(&model.scheduler, "DDIMScheduler")],
        "safety_checker": [null, null],
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
    });
    write_json(&out.join("model_index.json"), &index)
}

fn write_json(path: &Path, value: &Value) -> Result<(), CheckpointError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| CheckpointError::io(parent, e))?;
    }
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(path, text + "\n").map_err(|e| CheckpointError::io(path, e))
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(to).map_err(|e| CheckpointError::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| CheckpointError::io(from, e))? {
        let entry = entry.map_err(|e| CheckpointError::io(from, e))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if source.is_dir() {
            copy_dir(&source, &target)?;
        } else {
            std::fs::copy(&source, &target).map_err(|e| CheckpointError::io(&source, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn text_encoder_names_are_normalised_either_way() {
        let tensors = Tensors::from([
            (
                "embeddings.token_embedding.weight".to_string(),
                Tensor::zeros([4, 2], tch::kind::FLOAT_CPU),
            ),
            (
                "text_model.final_layer_norm.weight".to_string(),
                Tensor::zeros([2], tch::kind::FLOAT_CPU),
            ),
            (
                "text_model.embeddings.position_ids".to_string(),
                Tensor::zeros([1, 4], tch::kind::INT64_CPU),
            ),
        ]);
        let names: Vec<String> = normalize_text_encoder(tensors).into_keys().collect();
        assert_eq!(
            names,
            [
                "text_model.embeddings.token_embedding.weight",
                "text_model.final_layer_norm.weight"
            ]
        );
    }

    #[test]
    fn old_vae_attention_names_become_linear_projections() {
        let tensors = Tensors::from([
            (
                "encoder.mid_block.attentions.0.query.weight".to_string(),
                Tensor::ones([8, 8, 1, 1], tch::kind::FLOAT_CPU),
            ),
            (
                "encoder.mid_block.attentions.0.proj_attn.bias".to_string(),
                Tensor::ones([8], tch::kind::FLOAT_CPU),
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.weight".to_string(),
                Tensor::ones([8], tch::kind::FLOAT_CPU),
            ),
            (
                "encoder.conv_in.weight".to_string(),
                Tensor::ones([8, 3, 3, 3], tch::kind::FLOAT_CPU),
            ),
        ]);
        let out = normalize_vae(tensors);
        assert_eq!(
            out["encoder.mid_block.attentions.0.to_q.weight"].size(),
            [8, 8]
        );
        assert!(out.contains_key("encoder.mid_block.attentions.0.to_out.0.bias"));
        assert!(out.contains_key("encoder.mid_block.attentions.0.group_norm.weight"));
        assert_eq!(out["encoder.conv_in.weight"].size(), [8, 3, 3, 3]);
    }
}
