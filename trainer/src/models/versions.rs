//! The published configurations of Stable Diffusion 1.5 and 2.1 (768, v-prediction),
//! written down once: the benchmark and the full-size checks build from them. Real
//! model folders always bring their own `config.json`.

use crate::models::clip::ClipTextConfig;
use crate::models::config::{UNetConfig, VaeConfig};

const SD15_UNET: &str = r#"{"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false, "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;
const SD15_VAE: &str = r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"], "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;
const SD15_TEXT_ENCODER: &str = r#"{"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408}"#;

const SD21_UNET: &str = r#"{"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false, "cross_attention_dim": 1024, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4, "sample_size": 96, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "upcast_attention": true, "use_linear_projection": true}"#;
const SD21_VAE: &str = r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"], "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 768, "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;
const SD21_TEXT_ENCODER: &str = r#"{"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512, "torch_dtype": "float32", "vocab_size": 49408}"#;

/// A known Stable Diffusion architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownVersion {
    Sd15,
    Sd21,
}

impl KnownVersion {
    /// The UNet, VAE and text-encoder `config.json` texts.
    pub fn configs(self) -> (&'static str, &'static str, &'static str) {
        match self {
            KnownVersion::Sd15 => (SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER),
            KnownVersion::Sd21 => (SD21_UNET, SD21_VAE, SD21_TEXT_ENCODER),
        }
    }

    pub fn unet(self) -> UNetConfig {
        UNetConfig::from_json(self.configs().0).expect("the published UNet config parses")
    }

    pub fn vae(self) -> VaeConfig {
        VaeConfig::from_json(self.configs().1).expect("the published VAE config parses")
    }

    pub fn text_encoder(self) -> ClipTextConfig {
        serde_json::from_str(self.configs().2).expect("the published text-encoder config parses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_configs_parse() {
        for version in [KnownVersion::Sd15, KnownVersion::Sd21] {
            let unet = version.unet();
            assert_eq!(unet.block_out_channels, [320, 640, 1280, 1280]);
            assert_eq!(version.vae().downscale_factor(), 8);
            let text = version.text_encoder();
            assert!(text.num_hidden_layers == 12 || text.num_hidden_layers == 23);
        }
    }
}
