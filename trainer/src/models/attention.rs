//! Attention in the image networks: multi-head attention (`Attention`), the transformer
//! block that attends to itself and to the text (`BasicTransformerBlock`), and the
//! spatial transformer that wraps those blocks around a feature map
//! (`Transformer2DModel`). Attention runs through libtorch's fused
//! `scaled_dot_product_attention`.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::resnet::{conv2d, group_norm};

/// Shape and options of one [`Attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub query_dim: i64,
    /// Width of the keys' and values' source; `None` for self-attention.
    pub cross_attention_dim: Option<i64>,
    pub heads: i64,
    pub dim_head: i64,
    /// Biases on `to_q`/`to_k`/`to_v` (the VAE has them, the UNet does not).
    pub bias: bool,
    /// Compute attention in float32 when the inputs are half or bfloat16: SD 2.x
    /// at 768 overflows in fp16 otherwise.
    pub upcast: bool,
    /// `(groups, eps)` of a group norm applied to `[B, C, H, W]` inputs before
    /// attending, with the input added back afterwards (the VAE's mid-block attention).
    pub spatial_norm: Option<(i64, f64)>,
}

#[derive(Debug)]
pub struct Attention {
    pub group_norm: Option<nn::GroupNorm>,
    pub to_q: nn::Linear,
    pub to_k: nn::Linear,
    pub to_v: nn::Linear,
    /// `to_out.0` in diffusers (`to_out.1` is a parameter-free dropout).
    pub to_out: nn::Linear,
    heads: i64,
    upcast: bool,
}

pub fn attention(p: nn::Path, cfg: &AttentionConfig) -> Attention {
    let inner = cfg.heads * cfg.dim_head;
    let kv_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
    let qkv = nn::LinearConfig {
        bias: cfg.bias,
        ..Default::default()
    };
    Attention {
        group_norm: cfg
            .spatial_norm
            .map(|(groups, eps)| group_norm(&p / "group_norm", groups, cfg.query_dim, eps)),
        to_q: nn::linear(&p / "to_q", cfg.query_dim, inner, qkv),
        to_k: nn::linear(&p / "to_k", kv_dim, inner, qkv),
        to_v: nn::linear(&p / "to_v", kv_dim, inner, qkv),
        to_out: nn::linear(
            &p / "to_out" / "0",
            inner,
            cfg.query_dim,
            Default::default(),
        ),
        heads: cfg.heads,
        upcast: cfg.upcast,
    }
}

impl Attention {
    /// `xs` is `[B, L, query_dim]`; `context` (`[B, S, cross_attention_dim]`) supplies
    /// keys and values for cross-attention, `None` attends to `xs` itself.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(xs);
        let batch = xs.size()[0];
        let split_heads = |t: Tensor| {
            t.view([batch, -1, self.heads, t.size()[2] / self.heads])
                .transpose(1, 2)
        };
        let q = split_heads(self.to_q.forward(xs));
        let k = split_heads(self.to_k.forward(context));
        let v = split_heads(self.to_v.forward(context));
        let kind = q.kind();
        let upcast = self.upcast && matches!(kind, Kind::Half | Kind::BFloat16);
        let (q, k, v) = if upcast {
            (
                q.to_kind(Kind::Float),
                k.to_kind(Kind::Float),
                v.to_kind(Kind::Float),
            )
        } else {
            (q, k, v)
        };
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let out = out.transpose(1, 2).flatten(2, 3).to_kind(kind);
        self.to_out.forward(&out)
    }

    /// Self-attention over the pixels of a `[B, C, H, W]` map, with the group norm
    /// and the residual connection of the VAE's mid block.
    pub fn forward_spatial(&self, xs: &Tensor) -> Tensor {
        let (b, c, h, w) = xs
            .size4()
            .expect("spatial attention input must be [B, C, H, W]");
        let normed = match &self.group_norm {
            Some(norm) => norm.forward(xs),
            None => xs.shallow_clone(),
        };
        let tokens = normed.reshape([b, c, h * w]).transpose(1, 2);
        let out = self.forward(&tokens, None);
        out.transpose(1, 2).reshape([b, c, h, w]) + xs
    }
}

/// The transformer MLP: GEGLU (`net.0.proj`, a gated GELU doubling the width) then
/// a linear layer back (`net.2`).
#[derive(Debug)]
pub struct FeedForward {
    pub geglu_proj: nn::Linear,
    pub out: nn::Linear,
}

pub fn feed_forward(p: nn::Path, dim: i64, mult: i64) -> FeedForward {
    let inner = dim * mult;
    FeedForward {
        geglu_proj: nn::linear(
            &p / "net" / "0" / "proj",
            dim,
            inner * 2,
            Default::default(),
        ),
        out: nn::linear(&p / "net" / "2", inner, dim, Default::default()),
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let projected = self.geglu_proj.forward(xs).chunk(2, -1);
        let gated = &projected[0] * projected[1].gelu("none");
        self.out.forward(&gated)
    }
}

/// Options shared by the transformer blocks of one spatial transformer.
#[derive(Debug, Clone, Copy)]
pub struct TransformerBlockConfig {
    pub dim: i64,
    pub heads: i64,
    pub dim_head: i64,
    pub cross_attention_dim: i64,
    /// `attn1` attends to the text instead of the image (diffusers' `only_cross_attention`).
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

/// Self-attention, cross-attention to the text, then the MLP, each pre-normed
/// with a LayerNorm and added back to its input.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    pub norm1: nn::LayerNorm,
    pub attn1: Attention,
    pub norm2: nn::LayerNorm,
    pub attn2: Attention,
    pub norm3: nn::LayerNorm,
    pub ff: FeedForward,
    only_cross_attention: bool,
}

pub fn basic_transformer_block(p: nn::Path, cfg: &TransformerBlockConfig) -> BasicTransformerBlock {
    let layer_norm = |name: &str| nn::layer_norm(&p / name, vec![cfg.dim], Default::default());
    let attn = |name: &str, cross: bool| {
        let attn_cfg = AttentionConfig {
            query_dim: cfg.dim,
            cross_attention_dim: cross.then_some(cfg.cross_attention_dim),
            heads: cfg.heads,
            dim_head: cfg.dim_head,
            bias: false,
            upcast: cfg.upcast_attention,
            spatial_norm: None,
        };
        attention(&p / name, &attn_cfg)
    };
    BasicTransformerBlock {
        norm1: layer_norm("norm1"),
        attn1: attn("attn1", cfg.only_cross_attention),
        norm2: layer_norm("norm2"),
        attn2: attn("attn2", true),
        norm3: layer_norm("norm3"),
        ff: feed_forward(&p / "ff", cfg.dim, 4),
        only_cross_attention: cfg.only_cross_attention,
    }
}

impl BasicTransformerBlock {
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let self_context = self.only_cross_attention.then_some(context);
        let xs = self.attn1.forward(&self.norm1.forward(xs), self_context) + xs;
        let xs = self.attn2.forward(&self.norm2.forward(&xs), Some(context)) + xs;
        self.ff.forward(&self.norm3.forward(&xs)) + xs
    }
}

/// Shape and options of one [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub in_channels: i64,
    pub heads: i64,
    pub dim_head: i64,
    pub num_layers: i64,
    pub cross_attention_dim: i64,
    pub norm_num_groups: i64,
    /// SD 2.x projects in and out with linear layers, SD 1.x with 1×1 convs.
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

/// A projection that is a linear layer on tokens or a 1×1 conv on the feature map.
#[derive(Debug)]
pub enum Projection {
    Linear(nn::Linear),
    Conv(nn::Conv2D),
}

impl Projection {
    fn new(p: nn::Path, input: i64, output: i64, linear: bool) -> Self {
        if linear {
            Projection::Linear(nn::linear(p, input, output, Default::default()))
        } else {
            Projection::Conv(conv2d(p, input, output, 1))
        }
    }
}

/// The spatial transformer: the feature map becomes a sequence of pixels, passes
/// through the transformer blocks, and is added back to itself.
#[derive(Debug)]
pub struct Transformer2DModel {
    pub norm: nn::GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

pub fn transformer_2d_model(p: nn::Path, cfg: &Transformer2DConfig) -> Transformer2DModel {
    let inner = cfg.heads * cfg.dim_head;
    let block_cfg = TransformerBlockConfig {
        dim: inner,
        heads: cfg.heads,
        dim_head: cfg.dim_head,
        cross_attention_dim: cfg.cross_attention_dim,
        only_cross_attention: cfg.only_cross_attention,
        upcast_attention: cfg.upcast_attention,
    };
    let blocks = &p / "transformer_blocks";
    Transformer2DModel {
        // diffusers fixes this eps at 1e-6 whatever the UNet's norm_eps.
        norm: group_norm(&p / "norm", cfg.norm_num_groups, cfg.in_channels, 1e-6),
        proj_in: Projection::new(
            &p / "proj_in",
            cfg.in_channels,
            inner,
            cfg.use_linear_projection,
        ),
        transformer_blocks: (0..cfg.num_layers)
            .map(|i| basic_transformer_block(&blocks / i, &block_cfg))
            .collect(),
        proj_out: Projection::new(
            &p / "proj_out",
            inner,
            cfg.in_channels,
            cfg.use_linear_projection,
        ),
    }
}

impl Transformer2DModel {
    /// `xs` is `[B, C, H, W]`, `context` the text embeddings `[B, S, cross_attention_dim]`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let (b, _, h, w) = xs
            .size4()
            .expect("Transformer2DModel input must be [B, C, H, W]");
        let normed = self.norm.forward(xs);
        let to_tokens = |t: &Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        };
        let to_map = |t: &Tensor| {
            let c = t.size()[2];
            t.reshape([b, h, w, c]).permute([0, 3, 1, 2])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)),
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context);
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens).contiguous()),
            Projection::Linear(linear) => to_map(&linear.forward(&tokens)).contiguous(),
        };
        out + xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn names(vs: &nn::VarStore) -> Vec<String> {
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        names
    }

    #[test]
    fn attention_matches_explicit_softmax() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = AttentionConfig {
            query_dim: 8,
            cross_attention_dim: Some(6),
            heads: 2,
            dim_head: 4,
            bias: false,
            upcast: false,
            spatial_norm: None,
        };
        let attn = attention(vs.root(), &cfg);
        let xs = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 3, 6], (Kind::Float, Device::Cpu));
        let got = attn.forward(&xs, Some(&ctx));

        let heads = |t: Tensor| t.view([2, -1, 2, 4]).transpose(1, 2);
        let q = heads(attn.to_q.forward(&xs));
        let k = heads(attn.to_k.forward(&ctx));
        let v = heads(attn.to_v.forward(&ctx));
        let weights = (q.matmul(&k.transpose(-1, -2)) / 2.0).softmax(-1, Kind::Float);
        let expected = attn
            .to_out
            .forward(&weights.matmul(&v).transpose(1, 2).reshape([2, 5, 8]));
        let err = (got - expected).abs().max().double_value(&[]);
        assert!(err < 1e-5, "max abs error {err}");
    }

    #[test]
    fn upcast_attention_keeps_the_input_kind() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = AttentionConfig {
            query_dim: 8,
            cross_attention_dim: None,
            heads: 2,
            dim_head: 4,
            bias: true,
            upcast: true,
            spatial_norm: Some((2, 1e-6)),
        };
        let attn = attention(vs.root(), &cfg);
        let xs = Tensor::randn([1, 8, 3, 3], (Kind::Float, Device::Cpu));
        assert_eq!(attn.forward_spatial(&xs).size(), vec![1, 8, 3, 3]);
        let mut vs = vs;
        vs.bfloat16();
        let out = attn.forward_spatial(&xs.to_kind(Kind::BFloat16));
        assert_eq!(out.kind(), Kind::BFloat16);
    }

    #[test]
    fn transformer_parameter_names_follow_diffusers() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = Transformer2DConfig {
            in_channels: 8,
            heads: 2,
            dim_head: 4,
            num_layers: 1,
            cross_attention_dim: 6,
            norm_num_groups: 4,
            use_linear_projection: true,
            only_cross_attention: false,
            upcast_attention: false,
        };
        let t = transformer_2d_model(vs.root(), &cfg);
        let names = names(&vs);
        for expected in [
            "norm.weight",
            "proj_in.weight",
            "proj_in.bias",
            "transformer_blocks.0.attn1.to_q.weight",
            "transformer_blocks.0.attn2.to_k.weight",
            "transformer_blocks.0.attn2.to_out.0.bias",
            "transformer_blocks.0.ff.net.0.proj.weight",
            "transformer_blocks.0.ff.net.2.weight",
            "transformer_blocks.0.norm3.bias",
            "proj_out.weight",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "missing {expected} in {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n.contains("to_q.bias")), "{names:?}");
        assert_eq!(
            vs.variables()["transformer_blocks.0.attn2.to_k.weight"].size(),
            vec![8, 6]
        );
        let xs = Tensor::randn([2, 8, 3, 5], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 7, 6], (Kind::Float, Device::Cpu));
        assert_eq!(t.forward(&xs, &ctx).size(), vec![2, 8, 3, 5]);
    }
}
