//! `dreambooth-trainer tiny-model`: a complete diffusers folder with random weights and
//! CLIP's tokenizer: tiny for tests and the demo, or the full SD 1.5 / 2.1 architecture
//! for benchmarks of whole sessions on machines that cannot download real weights.

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
use crate::models::versions::KnownVersion;
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
    let text = text_config(variant);
    let architecture = Architecture {
        unet: unet_config(variant, text.hidden_size),
        vae: vae_config(),
        text,
        sd2: variant == TinyVariant::Sd2,
    };
    write_random_model(out, &architecture, seed, Precision::Fp32)
}

/// The published SD 1.5 or 2.1 architecture with random weights, stored in fp16
/// (half the bytes to write and read; training upcasts as it does for real fp16 folders).
pub fn write_full_size_model(
    out: &Path,
    version: KnownVersion,
    seed: i64,
) -> Result<(), CheckpointError> {
    let (unet, vae, _) = version.configs();
    let parse = |json: &str| serde_json::from_str::<Value>(json).expect("published config");
    let architecture = Architecture {
        unet: parse(unet),
        vae: parse(vae),
        text: version.text_encoder(),
        sd2: version == KnownVersion::Sd21,
    };
    write_random_model(out, &architecture, seed, Precision::Fp16)
}

struct Architecture {
    unet: Value,
    vae: Value,
    text: ClipTextConfig,
    /// SD 2.x: OpenCLIP tokenizer padding and v-prediction.
    sd2: bool,
}

fn write_random_model(
    out: &Path,
    architecture: &Architecture,
    seed: i64,
    precision: Precision,
) -> Result<(), CheckpointError> {
    tch::manual_seed(seed);
    let Architecture {
        unet: unet_json,
        vae: vae_json,
        text,
        sd2,
    } = architecture;
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
    clip_text_model(text_vs.root(), text);

    let tokenizer_dir =
        crate::tokenizer::bundled_tokenizer_dir(*sd2).map_err(|e| CheckpointError::io(out, e))?;

    let (version, prediction) = if *sd2 {
        (SdVersion::Sd2, PredictionType::VPrediction)
    } else {
        (SdVersion::Sd1, PredictionType::Epsilon)
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
        unet: component(&unet_vs, unet_json.clone()),
        text_encoder: component(&text_vs, text.to_transformers_json()),
        vae: component(&vae_vs, vae_json.clone()),
        scheduler: crate::checkpoint::default_scheduler(version, prediction),
        tokenizer: Some(tokenizer_dir),
    };
    save_diffusers_folder(&model, out, precision)
}
