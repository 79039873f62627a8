//! The architecture of each network, read from the model's own diffusers `config.json`,
//! so SD 1.x, SD 2.x and their fine-tunes build without code changes. Field names and
//! defaults are diffusers'; keys we do not use are ignored, and features we do not
//! implement are refused by name instead of being silently dropped.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A config that cannot be read, parsed, or built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read model config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid model config {path}: field `{field}`: {source}")]
    Parse {
        path: PathBuf,
        field: String,
        source: serde_json::Error,
    },
    #[error("{}field `{field}` {message}", location(.path))]
    Invalid {
        path: Option<PathBuf>,
        field: String,
        message: String,
    },
}

fn location(path: &Option<PathBuf>) -> String {
    match path {
        Some(path) => format!("model config {}: ", path.display()),
        None => "model config: ".to_string(),
    }
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: None,
            field: field.into(),
            message: message.into(),
        }
    }

    fn in_file(self, file: &Path) -> Self {
        match self {
            ConfigError::Invalid {
                path: None,
                field,
                message,
            } => ConfigError::Invalid {
                path: Some(file.to_path_buf()),
                field,
                message,
            },
            other => other,
        }
    }
}

/// Reads a JSON config, reporting the path of the field that does not parse.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_json(&text).map_err(|(field, source)| ConfigError::Parse {
        path: path.to_path_buf(),
        field,
        source,
    })
}

fn parse_json<T: DeserializeOwned>(text: &str) -> Result<T, (String, serde_json::Error)> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| (e.path().to_string(), e.into_inner()))
}

/// A model config read from `path` and checked by `validate`; errors name the file and
/// the field.
fn read_validated<T: DeserializeOwned>(
    path: &Path,
    validate: fn(&T) -> Result<(), ConfigError>,
) -> Result<T, ConfigError> {
    let cfg: T = read_json(path)?;
    validate(&cfg).map_err(|e| e.in_file(path))?;
    Ok(cfg)
}

/// A model config parsed from JSON held in memory and checked by `validate`.
fn parse_validated<T: DeserializeOwned>(
    text: &str,
    validate: fn(&T) -> Result<(), ConfigError>,
) -> Result<T, ConfigError> {
    let cfg: T = parse_json(text).map_err(|(field, source)| ConfigError::Parse {
        path: PathBuf::from("<json>"),
        field,
        source,
    })?;
    validate(&cfg)?;
    Ok(cfg)
}

fn ensure(ok: bool, field: &str, message: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(field, message()))
    }
}

fn only(field: &str, value: &str, supported: &str) -> Result<(), ConfigError> {
    ensure(value == supported, field, || {
        format!("= {value:?} is not supported, only {supported:?}")
    })
}

fn check_groups(groups: i64, channels: &[i64]) -> Result<(), ConfigError> {
    for (i, &c) in channels.iter().enumerate() {
        ensure(groups > 0 && c % groups == 0, "norm_num_groups", || {
            format!("= {groups} does not divide block_out_channels[{i}] = {c}")
        })?;
    }
    Ok(())
}

/// diffusers lets many per-block settings be one value for all blocks or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected one value for all blocks or a list with one per block"
)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// One value per block; a list must have exactly `blocks` entries.
    pub fn resolve(&self, blocks: usize, field: &str) -> Result<Vec<T>, ConfigError> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); blocks]),
            PerBlock::Each(list) if list.len() == blocks => Ok(list.clone()),
            PerBlock::Each(list) => Err(ConfigError::invalid(
                field,
                format!("has {} entries but there are {blocks} blocks", list.len()),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    CrossAttnDownBlock2D,
    DownBlock2D,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    CrossAttnUpBlock2D,
    UpBlock2D,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MidBlockType {
    UNetMidBlock2DCrossAttn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VaeDownBlockType {
    DownEncoderBlock2D,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VaeUpBlockType {
    UpDecoderBlock2D,
}

/// Keys of other diffusers UNets (SDXL, class-conditioned, LCM) whose features we
/// do not implement: refused when set rather than silently ignored.
const REFUSED_UNET_FEATURES: [&str; 13] = [
    "cross_attention_norm",
    "class_embed_type",
    "num_class_embeds",
    "addition_embed_type",
    "addition_time_embed_dim",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "time_cond_proj_dim",
    "timestep_post_act",
    "time_embedding_act_fn",
    "projection_class_embeddings_input_dim",
    "class_embeddings_concat",
    "reverse_transformer_layers_per_block",
];

/// `unet/config.json` of a diffusers `UNet2DConditionModel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: Option<i64>,
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<DownBlockType>,
    /// `null` means no mid block, as in diffusers.
    pub mid_block_type: Option<MidBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: PerBlock<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<i64>,
    pub transformer_layers_per_block: PerBlock<i64>,
    /// Despite its name, diffusers uses this as the number of heads when
    /// `num_attention_heads` is absent (every SD 1.x/2.x config relies on that).
    pub attention_head_dim: PerBlock<i64>,
    pub num_attention_heads: Option<PerBlock<i64>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<i64>,
    pub conv_in_kernel: i64,
    pub conv_out_kernel: i64,
    pub attention_type: String,
    /// Keys we do not read, kept so that a config written back is the one read.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Default for UNetConfig {
    /// diffusers' own defaults, which are the SD 1.x architecture.
    fn default() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        UNetConfig {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                DownBlock2D,
            ],
            mid_block_type: Some(MidBlockType::UNetMidBlock2DCrossAttn),
            up_block_types: vec![
                UpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
            ],
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".into(),
            other: Default::default(),
        }
    }
}

/// The per-block settings of a [`UNetConfig`], each list indexed by down block.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetBlocks {
    pub layers: Vec<i64>,
    pub heads: Vec<i64>,
    pub cross_attention_dim: Vec<i64>,
    pub transformer_layers: Vec<i64>,
    pub only_cross_attention: Vec<bool>,
}

impl UNetConfig {
    /// Reads and validates `unet/config.json`; errors name the file and the field.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        read_validated(path.as_ref(), Self::validate)
    }

    /// Parses and validates a UNet config held in memory.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        parse_validated(text, Self::validate)
    }

    /// The time embedding width: 4× the first block's channels unless configured.
    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }

    /// Resolves every int-or-list setting to one value per block.
    pub fn blocks(&self) -> Result<UNetBlocks, ConfigError> {
        let n = self.block_out_channels.len();
        let heads = match &self.num_attention_heads {
            Some(heads) => heads.resolve(n, "num_attention_heads")?,
            None => self.attention_head_dim.resolve(n, "attention_head_dim")?,
        };
        Ok(UNetBlocks {
            layers: self.layers_per_block.resolve(n, "layers_per_block")?,
            heads,
            cross_attention_dim: self.cross_attention_dim.resolve(n, "cross_attention_dim")?,
            transformer_layers: self
                .transformer_layers_per_block
                .resolve(n, "transformer_layers_per_block")?,
            only_cross_attention: self
                .only_cross_attention
                .resolve(n, "only_cross_attention")?,
        })
    }

    /// Checks that [`crate::models::unet::unet`] can build this architecture.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for field in REFUSED_UNET_FEATURES {
            match self.other.get(field) {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
                Some(value) => {
                    return Err(ConfigError::invalid(
                        field,
                        format!("= {value} is not supported (SD 1.x/2.x UNets leave it null)"),
                    ));
                }
            }
        }
        only("act_fn", &self.act_fn, "silu")?;
        only(
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
            "default",
        )?;
        only(
            "time_embedding_type",
            &self.time_embedding_type,
            "positional",
        )?;
        only("attention_type", &self.attention_type, "default")?;
        ensure(!self.dual_cross_attention, "dual_cross_attention", || {
            "= true is not supported".into()
        })?;
        let n = self.block_out_channels.len();
        ensure(n > 0, "block_out_channels", || "is empty".into())?;
        for (field, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            ensure(len == n, field, || {
                format!("has {len} entries but block_out_channels has {n}")
            })?;
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            ensure(k > 0 && k % 2 == 1, field, || {
                format!("= {k} must be odd and positive")
            })?;
        }
        check_groups(self.norm_num_groups, &self.block_out_channels)?;
        let heads_field = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let blocks = self.blocks()?;
        for (i, (&channels, &heads)) in self
            .block_out_channels
            .iter()
            .zip(&blocks.heads)
            .enumerate()
        {
            ensure(
                heads > 0 && channels % heads == 0,
                &format!("{heads_field}[{i}]"),
                || format!("= {heads} heads do not divide block_out_channels[{i}] = {channels}"),
            )?;
        }
        Ok(())
    }
}

/// `vae/config.json` of a diffusers `AutoencoderKL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub down_block_types: Vec<VaeDownBlockType>,
    pub up_block_types: Vec<VaeUpBlockType>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub act_fn: String,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub sample_size: Option<i64>,
    /// Latents are multiplied by this before the UNet sees them.
    pub scaling_factor: f64,
    /// Subtracted before scaling (SD3/Flux VAEs); absent for SD 1.x/2.x.
    pub shift_factor: Option<f64>,
    /// diffusers runs this VAE in fp32 even in fp16 pipelines, because it overflows.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// Keys we do not read (`latents_mean`, `_class_name`...), kept so that a config
    /// written back is the one read.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![VaeDownBlockType::DownEncoderBlock2D],
            up_block_types: vec![VaeUpBlockType::UpDecoderBlock2D],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            other: Default::default(),
        }
    }
}

impl VaeConfig {
    /// Reads and validates `vae/config.json`; errors name the file and the field.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        read_validated(path.as_ref(), Self::validate)
    }

    /// Parses and validates a VAE config held in memory.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        parse_validated(text, Self::validate)
    }

    /// How much smaller latents are than images: one halving per down block but the last.
    pub fn downscale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len().max(1) - 1)
    }

    /// Checks that [`crate::models::vae::autoencoder_kl`] can build this architecture.
    pub fn validate(&self) -> Result<(), ConfigError> {
        only("act_fn", &self.act_fn, "silu")?;
        let n = self.block_out_channels.len();
        ensure(n > 0, "block_out_channels", || "is empty".into())?;
        for (field, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            ensure(len == n, field, || {
                format!("has {len} entries but block_out_channels has {n}")
            })?;
        }
        check_groups(self.norm_num_groups, &self.block_out_channels)?;
        ensure(self.layers_per_block > 0, "layers_per_block", || {
            "must be at least 1".into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD21_UNET: &str = r#"{
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
        "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true,
        "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
        "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": null,
        "only_cross_attention": false, "out_channels": 4, "sample_size": 96,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "upcast_attention": true, "use_linear_projection": true
    }"#;

    #[test]
    fn sd21_config_reads_head_counts_from_attention_head_dim() {
        let cfg = UNetConfig::from_json(SD21_UNET).unwrap();
        let blocks = cfg.blocks().unwrap();
        assert_eq!(blocks.heads, vec![5, 10, 20, 20]);
        assert_eq!(blocks.cross_attention_dim, vec![1024; 4]);
        assert_eq!(blocks.layers, vec![2; 4]);
        assert!(cfg.use_linear_projection && cfg.upcast_attention);
        assert_eq!(cfg.sample_size, Some(96));
        assert_eq!(cfg.time_embed_dim(), 1280);
        assert_eq!(
            cfg.mid_block_type,
            Some(MidBlockType::UNetMidBlock2DCrossAttn)
        );
    }

    #[test]
    fn unknown_keys_are_ignored_and_written_back() {
        let cfg =
            UNetConfig::from_json(r#"{"_class_name": "UNet2DConditionModel", "new_knob": [1, 2]}"#)
                .unwrap();
        assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
        let json = serde_json::to_value(&cfg).unwrap();
        assert_eq!(json["new_knob"], serde_json::json!([1, 2]));
        assert_eq!(UNetConfig::from_json(&json.to_string()).unwrap(), cfg);
    }

    #[test]
    fn num_attention_heads_wins_over_attention_head_dim() {
        let cfg = UNetConfig::from_json(r#"{"num_attention_heads": 10, "attention_head_dim": 8}"#)
            .unwrap();
        assert_eq!(cfg.blocks().unwrap().heads, vec![10; 4]);
    }

    #[test]
    fn unknown_block_type_names_the_field() {
        let json = r#"{"down_block_types": ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]}"#;
        let err = UNetConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("down_block_types[1]"), "{err}");
        assert!(err.contains("SimpleCrossAttnDownBlock2D"), "{err}");
    }

    #[test]
    fn class_embeddings_are_refused_by_name() {
        let err = UNetConfig::from_json(r#"{"class_embed_type": "timestep"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("class_embed_type"), "{err}");
        let err = UNetConfig::from_json(r#"{"addition_embed_type": "text_time"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("addition_embed_type"), "{err}");
    }

    #[test]
    fn head_list_of_wrong_length_is_refused() {
        let err = UNetConfig::from_json(r#"{"attention_head_dim": [5, 10]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("attention_head_dim") && err.contains("2 entries"),
            "{err}"
        );
    }

    #[test]
    fn from_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("unet").join("config.json");
        let err = UNetConfig::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");

        let bad = dir.path().join("config.json");
        std::fs::write(&bad, r#"{"act_fn": "gelu"}"#).unwrap();
        let err = UNetConfig::from_file(&bad).unwrap_err().to_string();
        assert!(
            err.contains(&bad.display().to_string()) && err.contains("act_fn"),
            "{err}"
        );

        std::fs::write(&bad, r#"{"block_out_channels": [64, "x"]}"#).unwrap();
        let err = VaeConfig::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("block_out_channels[1]"), "{err}");
    }

    #[test]
    fn sd_vae_config_parses_and_downscales_by_eight() {
        let json = r#"{
            "_class_name": "AutoencoderKL", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 768, "scaling_factor": 0.18215,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
        }"#;
        let cfg = VaeConfig::from_json(json).unwrap();
        assert_eq!(cfg.downscale_factor(), 8);
        assert_eq!(cfg.scaling_factor, 0.18215);
        assert!(cfg.mid_block_add_attention && cfg.force_upcast && cfg.shift_factor.is_none());
    }
}
