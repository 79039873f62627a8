//! The CLIP text transformer that turns prompt tokens into the UNet's conditioning.
//!
//! Parameter paths are transformers' `CLIPTextModel` names with the `text_model.` prefix,
//! as Stable Diffusion repositories store them, so the VarStore loads real weights as is.
//! SD 1.x (quick_gelu, width 768) and SD 2.x (OpenCLIP ViT-H, gelu, width 1024, 23 layers:
//! the penultimate layer is baked into its config) differ only in their `config.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::checkpointing::{Shared, checkpoint_one};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// The activation inside each MLP: OpenAI's CLIP uses the sigmoid approximation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    QuickGelu,
    Gelu,
}

impl ClipActivation {
    fn apply(self, xs: &Tensor) -> Tensor {
        match self {
            ClipActivation::QuickGelu => xs * (xs * 1.702).sigmoid(),
            ClipActivation::Gelu => xs.gelu("none"),
        }
    }
}

/// `text_encoder/config.json` as transformers writes it; keys we do not use are ignored
/// and missing ones take transformers' `CLIPTextConfig` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    pub pad_token_id: i64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
    pub projection_dim: i64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
            projection_dim: 512,
        }
    }
}

/// Why a text-encoder config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClipConfigError {
    #[error("cannot read text encoder config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid text encoder config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "invalid text encoder config {path}: hidden_size {hidden_size} is not divisible by \
         num_attention_heads {heads}"
    )]
    Heads {
        path: PathBuf,
        hidden_size: i64,
        heads: i64,
    },
}

impl ClipTextConfig {
    /// The text encoder of Stable Diffusion 1.x (OpenAI CLIP ViT-L/14), as the v1.5 repo ships it.
    pub fn sd1() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_attention_heads: 12,
            projection_dim: 768,
            bos_token_id: 0,
            eos_token_id: 2,
            ..Self::default()
        }
    }

    /// The text encoder of Stable Diffusion 2.x (OpenCLIP ViT-H/14 without its last layer).
    pub fn sd2() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: ClipActivation::Gelu,
            projection_dim: 512,
            bos_token_id: 0,
            eos_token_id: 2,
            ..Self::default()
        }
    }

    /// Reads `config.json`, naming the file in any error.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ClipConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ClipConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| ClipConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if cfg.num_attention_heads <= 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(ClipConfigError::Heads {
                path: path.to_owned(),
                hidden_size: cfg.hidden_size,
                heads: cfg.num_attention_heads,
            });
        }
        Ok(cfg)
    }

    /// The config as transformers expects to find it in `text_encoder/config.json`.
    pub fn to_transformers_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("config serialises");
        let map = value.as_object_mut().expect("config is an object");
        map.insert("architectures".into(), serde_json::json!(["CLIPTextModel"]));
        map.insert("model_type".into(), "clip_text_model".into());
        map.insert("attention_dropout".into(), 0.0.into());
        map.insert("dropout".into(), 0.0.into());
        map.insert("initializer_factor".into(), 1.0.into());
        map.insert("initializer_range".into(), 0.02.into());
        value
    }

    fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// What the text encoder returns: per-token states (the UNet's conditioning) and the
/// state at the end-of-text token.
#[derive(Debug)]
pub struct ClipTextOutput {
    pub last_hidden_state: Tensor,
    pub pooled_output: Tensor,
}

/// Multi-head causal self-attention; q/k/v/out projections all carry biases.
#[derive(Debug)]
struct ClipAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
    head_dim: i64,
}

fn clip_attention(p: nn::Path, cfg: &ClipTextConfig) -> ClipAttention {
    let d = cfg.hidden_size;
    ClipAttention {
        q_proj: nn::linear(&p / "q_proj", d, d, Default::default()),
        k_proj: nn::linear(&p / "k_proj", d, d, Default::default()),
        v_proj: nn::linear(&p / "v_proj", d, d, Default::default()),
        out_proj: nn::linear(&p / "out_proj", d, d, Default::default()),
        heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim(),
    }
}

impl ClipAttention {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, s, d) = xs.size3().expect("hidden states are [batch, seq, width]");
        let split = |t: Tensor| t.view([b, s, self.heads, self.head_dim]).transpose(1, 2);
        let q = split(self.q_proj.forward(xs));
        let k = split(self.k_proj.forward(xs));
        let v = split(self.v_proj.forward(xs));
        // The default scale is head_dim^-0.5, the same as CLIP's.
        let attn = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, true, None, false,
        );
        self.out_proj
            .forward(&attn.transpose(1, 2).reshape([b, s, d]))
    }
}

#[derive(Debug)]
struct ClipMlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
    act: ClipActivation,
}

fn clip_mlp(p: nn::Path, cfg: &ClipTextConfig) -> ClipMlp {
    ClipMlp {
        fc1: nn::linear(
            &p / "fc1",
            cfg.hidden_size,
            cfg.intermediate_size,
            Default::default(),
        ),
        fc2: nn::linear(
            &p / "fc2",
            cfg.intermediate_size,
            cfg.hidden_size,
            Default::default(),
        ),
        act: cfg.hidden_act,
    }
}

impl Module for ClipMlp {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.fc2.forward(&self.act.apply(&self.fc1.forward(xs)))
    }
}

/// A pre-norm transformer layer: attention and MLP each behind a layer norm and a residual.
#[derive(Debug)]
struct ClipEncoderLayer {
    layer_norm1: nn::LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: nn::LayerNorm,
    mlp: ClipMlp,
}

fn layer_norm(p: nn::Path, cfg: &ClipTextConfig) -> nn::LayerNorm {
    let ln = nn::LayerNormConfig {
        eps: cfg.layer_norm_eps,
        ..Default::default()
    };
    nn::layer_norm(p, vec![cfg.hidden_size], ln)
}

fn clip_encoder_layer(p: nn::Path, cfg: &ClipTextConfig) -> ClipEncoderLayer {
    ClipEncoderLayer {
        layer_norm1: layer_norm(&p / "layer_norm1", cfg),
        self_attn: clip_attention(&p / "self_attn", cfg),
        layer_norm2: layer_norm(&p / "layer_norm2", cfg),
        mlp: clip_mlp(&p / "mlp", cfg),
    }
}

impl Module for ClipEncoderLayer {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs + self.self_attn.forward(&self.layer_norm1.forward(xs));
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs))
    }
}

/// transformers' `CLIPTextModel`: token + learned position embeddings, causal encoder,
/// final layer norm.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<Shared<ClipEncoderLayer>>,
    final_layer_norm: nn::LayerNorm,
    eos_token_id: i64,
    gradient_checkpointing: bool,
}

/// Builds the text encoder under `p` (normally the VarStore root), creating the
/// parameters at `text_model.*`.
pub fn clip_text_model(p: nn::Path, cfg: &ClipTextConfig) -> ClipTextModel {
    let p = &p / "text_model";
    let emb = &p / "embeddings";
    let layers = &p / "encoder" / "layers";
    ClipTextModel {
        token_embedding: nn::embedding(
            &emb / "token_embedding",
            cfg.vocab_size,
            cfg.hidden_size,
            Default::default(),
        ),
        position_embedding: nn::embedding(
            &emb / "position_embedding",
            cfg.max_position_embeddings,
            cfg.hidden_size,
            Default::default(),
        ),
        layers: (0..cfg.num_hidden_layers)
            .map(|i| Shared::new(clip_encoder_layer(&layers / i, cfg)))
            .collect(),
        final_layer_norm: layer_norm(&p / "final_layer_norm", cfg),
        eos_token_id: cfg.eos_token_id,
        gradient_checkpointing: false,
    }
}

impl ClipTextModel {
    /// Recompute each encoder layer in the backward pass instead of keeping its
    /// activations (see [`super::checkpointing`]).
    pub fn set_gradient_checkpointing(&mut self, enabled: bool) {
        self.gradient_checkpointing = enabled;
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// Encodes `input_ids` (`[batch, seq]`, int64, seq ≤ max_position_embeddings).
    pub fn forward(&self, input_ids: &Tensor) -> ClipTextOutput {
        self.forward_with_clip_skip(input_ids, 0)
    }

    /// Like [`forward`](Self::forward) but stops `clip_skip` layers before the end and
    /// applies the final layer norm there, as diffusers' `clip_skip` does.
    pub fn forward_with_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> ClipTextOutput {
        let seq = input_ids
            .size()
            .last()
            .copied()
            .expect("input_ids has a sequence dimension");
        let positions = Tensor::arange(seq, (Kind::Int64, input_ids.device()));
        let mut xs = self.token_embedding.forward(input_ids)
            + self.position_embedding.forward(&positions).unsqueeze(0);
        let depth = self.layers.len().saturating_sub(clip_skip);
        for layer in &self.layers[..depth] {
            xs = if self.gradient_checkpointing {
                let layer = layer.clone();
                checkpoint_one(&[&xs], move |t| layer.forward(&t[0]))
            } else {
                layer.forward(&xs)
            };
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs);
        let eos = self.eos_positions(input_ids);
        let rows = Tensor::arange(eos.size()[0], (Kind::Int64, input_ids.device()));
        let pooled_output = last_hidden_state.index(&[Some(rows), Some(eos)]);
        ClipTextOutput {
            last_hidden_state,
            pooled_output,
        }
    }

    /// Where each sequence ends. Configs with `eos_token_id == 2` predate transformers'
    /// fix and take the largest id (the end-of-text token is the largest in CLIP's vocab);
    /// others take the first occurrence of the end-of-text id.
    fn eos_positions(&self, input_ids: &Tensor) -> Tensor {
        if self.eos_token_id == 2 {
            input_ids.argmax(-1, false)
        } else {
            input_ids
                .eq(self.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny() -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 10,
            eos_token_id: 49,
            ..ClipTextConfig::default()
        }
    }

    #[test]
    fn parameter_names_match_transformers() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = clip_text_model(vs.root(), &tiny());
        let names = vs.variables();
        for name in [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.1.self_attn.q_proj.weight",
            "text_model.encoder.layers.0.self_attn.out_proj.bias",
            "text_model.encoder.layers.0.layer_norm1.weight",
            "text_model.encoder.layers.1.mlp.fc2.bias",
            "text_model.final_layer_norm.bias",
        ] {
            assert!(names.contains_key(name), "missing {name}");
        }
        assert_eq!(names.len(), 2 + 2 * 16 + 2);
        assert_eq!(
            names["text_model.encoder.layers.0.mlp.fc1.weight"].size(),
            [24, 16]
        );
    }

    #[test]
    fn states_are_causal_and_pooled_at_the_first_eos() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = clip_text_model(vs.root(), &tiny());
        let a = Tensor::from_slice(&[3i64, 7, 49, 49, 5]).unsqueeze(0);
        let b = Tensor::from_slice(&[3i64, 7, 49, 11, 12]).unsqueeze(0);
        let out_a = model.forward(&a);
        let out_b = model.forward(&b);
        // Changing later tokens must not change earlier states.
        let prefix = |t: &Tensor| t.narrow(1, 0, 3);
        let diff = (prefix(&out_a.last_hidden_state) - prefix(&out_b.last_hidden_state))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-6, "prefix changed by {diff}");
        let later = (out_a.last_hidden_state.narrow(1, 3, 2)
            - out_b.last_hidden_state.narrow(1, 3, 2))
        .abs()
        .max()
        .double_value(&[]);
        assert!(later > 1e-4);
        assert_eq!(out_a.pooled_output.size(), [1, 16]);
        let at_eos = out_a.last_hidden_state.get(0).get(2);
        assert!(
            out_a
                .pooled_output
                .get(0)
                .allclose(&at_eos, 0.0, 0.0, false)
        );
    }

    #[test]
    fn legacy_configs_pool_at_the_largest_id() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = clip_text_model(
            vs.root(),
            &ClipTextConfig {
                eos_token_id: 2,
                ..tiny()
            },
        );
        let ids = Tensor::from_slice(&[1i64, 2, 40, 3, 2]).unsqueeze(0);
        let out = model.forward(&ids);
        let at_max = out.last_hidden_state.get(0).get(2);
        assert!(out.pooled_output.get(0).allclose(&at_max, 0.0, 0.0, false));
    }

    #[test]
    fn config_reads_transformers_json_and_ignores_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut json = ClipTextConfig::sd2().to_transformers_json();
        json["torch_dtype"] = "float16".into();
        std::fs::write(&path, json.to_string()).unwrap();
        assert_eq!(
            ClipTextConfig::from_file(&path).unwrap(),
            ClipTextConfig::sd2()
        );

        std::fs::write(&path, r#"{"hidden_size": 10, "num_attention_heads": 3}"#).unwrap();
        let err = ClipTextConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("10"), "{err}");
    }
}
