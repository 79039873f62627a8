//! `dreambooth-trainer tiny-model`: a complete diffusers folder with tiny random weights
//! and CLIP's tokenizer, for tests and the demo (real weights need a download).

use std::path::{Path, PathBuf};

use dreambooth_api::spec::Precision;
use serde_json::{Value, json};
use tch::{Device, nn};

use crate::checkpoint::{
    CheckpointError, Component, LoadedModel, SdVersion, SourceKind, save_diffusers_folder,
    var_store_tensors,
};
use crate::models::clip::{ClipTextConfig, clip_text_model};
use crate::models::config::{UNetConfig, VaeConfig};
use crate::models::unet::unet;
use crate::models::vae::autoencoder_kl;
use crate::schedulers::PredictionType;

/// CLIP's own vocabulary, so a tiny model's single file works without a tokenizer folder
/// exactly as a real one does (its 49408×32 token embedding is most of the weights).
const VOCAB_SIZE: i64 = 49408;
const END_OF_TEXT: i64 = 49407;

/// Which generation the tiny model imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyVariant {
    /// Conv projections, one head size, quick_gelu text encoder, epsilon.
    Sd1,
    /// Linear projections, per-block heads, gelu text encoder, v-prediction.
    Sd2,
}

fn unet_config(variant: TinyVariant, context: i64) -> Value {
    let mut config = json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": context,
        "attention_head_dim": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    });
    if variant == TinyVariant::Sd2 {
        config["attention_head_dim"] = json!([4, 8]);
        config["use_linear_projection"] = json!(true);
        config["upcast_attention"] = json!(true);
    }
    config
}

fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "scaling_factor": 0.18215,
    })
}

fn text_config(variant: TinyVariant) -> ClipTextConfig {
    let sd2 = variant == TinyVariant::Sd2;
    let config = json!({
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": if sd2 { "gelu" } else { "quick_gelu" },
        "layer_norm_eps": 1e-5,
        "bos_token_id": END_OF_TEXT - 1,
        "eos_token_id": END_OF_TEXT,
        "pad_token_id": if sd2 { 0 } else { END_OF_TEXT },
        "projection_dim": 32,
    });
    serde_json::from_value(config).expect("the tiny text config parses")
}

/// Builds the three networks with random weights from `seed` and writes the folder.
pub fn write_tiny_model(
    out: &Path,
    variant: TinyVariant,
    seed: i64,
) -> Result<(), CheckpointError> {
    tch::manual_seed(seed);
    let text = text_config(variant);
    let unet_json = unet_config(variant, text.hidden_size);
    let vae_json = vae_config();
    let invalid = |e: &dyn std::fmt::Display| CheckpointError::invalid(out, e.to_string());

    let unet_vs = nn::VarStore::new(Device::Cpu);
    unet(
        unet_vs.root(),
        &UNetConfig::from_json(&unet_json.to_string()).map_err(|e| invalid(&e))?,
    );
    let vae_vs = nn::VarStore::new(Device::Cpu);
    autoencoder_kl(
        vae_vs.root(),
        &VaeConfig::from_json(&vae_json.to_string()).map_err(|e| invalid(&e))?,
    );
    let text_vs = nn::VarStore::new(Device::Cpu);
    clip_text_model(text_vs.root(), &text);

    let tokenizer_dir = crate::tokenizer::bundled_tokenizer_dir(variant == TinyVariant::Sd2)
        .map_err(|e| CheckpointError::io(out, e))?;

    let (version, prediction) = match variant {
        TinyVariant::Sd1 => (SdVersion::Sd1, PredictionType::Epsilon),
        TinyVariant::Sd2 => (SdVersion::Sd2, PredictionType::VPrediction),
    };
    let component = |vs: &nn::VarStore, config: Value| Component {
        tensors: var_store_tensors(vs),
        config,
        weights: PathBuf::from("(random weights)"),
    };
    let model = LoadedModel {
        source: out.to_path_buf(),
        kind: SourceKind::DiffusersFolder,
        version,
        prediction_type: prediction,
        unet: component(&unet_vs, unet_json),
        text_encoder: component(&text_vs, text.to_transformers_json()),
        vae: component(&vae_vs, vae_json),
        scheduler: crate::checkpoint::default_scheduler(version, prediction),
        tokenizer: Some(tokenizer_dir),
    };
    save_diffusers_folder(&model, out, Precision::Fp32)
}
