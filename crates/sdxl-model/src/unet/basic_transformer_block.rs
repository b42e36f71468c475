//! The transformer layer of the UNet: self-attention, cross-attention and a GEGLU feed-forward.
//!
//! Follows diffusers' `models/attention.py` (`BasicTransformerBlock` with `norm_type="layer_norm"`,
//! `FeedForward`), `models/activations.py` (`GEGLU`) and the projections of `Attention` in
//! `models/attention_processor.py`. The attention itself is [`crate::attention::attention`].

use tch::nn::{self, Module};
use tch::Tensor;

use lora::Linear;

use crate::attention::{attention, AttentionBackend};
use crate::Result;

/// `Attention` as SDXL's transformer blocks use it: bias-free `to_q`, `to_k`, `to_v` and an output
/// projection `to_out.0` with bias (`to_out.1` is a dropout and has no weights).
#[derive(Debug)]
pub struct Attention {
    /// `to_q`: query projection.
    pub to_q: Linear,
    /// `to_k`: key projection, from the context width.
    pub to_k: Linear,
    /// `to_v`: value projection, from the context width.
    pub to_v: Linear,
    /// `to_out.0`: output projection.
    pub to_out: Linear,
    heads: i64,
}

impl Attention {
    /// Creates the projections under `path`; `context_dim` is the width keys and values are
    /// projected from (`query_dim` for self-attention).
    pub fn new(path: &nn::Path, query_dim: i64, context_dim: i64, heads: i64) -> Self {
        Self {
            to_q: Linear::new(&(path / "to_q"), query_dim, query_dim, false),
            to_k: Linear::new(&(path / "to_k"), context_dim, query_dim, false),
            to_v: Linear::new(&(path / "to_v"), context_dim, query_dim, false),
            to_out: Linear::new(&(path / "to_out" / 0), query_dim, query_dim, true),
            heads,
        }
    }

    /// Attends from `xs` to `context` (to `xs` itself when `None`).
    ///
    /// # Shapes
    /// `xs` `[B, L, query_dim]`, `context` `[B, Lc, context_dim]` → `[B, L, query_dim]`.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when the context does not fit the batch.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>, backend: AttentionBackend) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let out = attention(&self.to_q.forward(xs), &self.to_k.forward(context), &self.to_v.forward(context), self.heads, backend)?;
        Ok(self.to_out.forward(&out))
    }

    fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        f(&format!("{prefix}.to_q"), &mut self.to_q);
        f(&format!("{prefix}.to_k"), &mut self.to_k);
        f(&format!("{prefix}.to_v"), &mut self.to_v);
        f(&format!("{prefix}.to_out.0"), &mut self.to_out);
    }
}

/// `FeedForward` with a `GEGLU` input: `net.2(h · gelu(gate))` where `[h, gate] = net.0.proj(x)`.
#[derive(Debug)]
pub struct FeedForward {
    /// `net.0.proj`: `dim → 2 · 4·dim`, the value and gate halves side by side.
    pub proj: Linear,
    /// `net.2`: `4·dim → dim`.
    pub out: Linear,
}

impl FeedForward {
    /// Creates `net.0.proj` and `net.2` under `path` with the usual 4× inner width.
    pub fn new(path: &nn::Path, dim: i64) -> Self {
        let inner = 4 * dim;
        Self { proj: Linear::new(&(path / "net" / 0 / "proj"), dim, 2 * inner, true), out: Linear::new(&(path / "net" / 2), inner, dim, true) }
    }
}

impl Module for FeedForward {
    /// # Shapes
    /// `[B, L, dim]` → `[B, L, dim]`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let projected = self.proj.forward(xs);
        let halves = projected.chunk(2, -1);
        self.out.forward(&(&halves[0] * halves[1].gelu("none")))
    }
}

/// `BasicTransformerBlock`: pre-norm self-attention (`attn1`), cross-attention (`attn2`) and
/// feed-forward (`ff`), each added to its input.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    /// `attn1`: self-attention.
    pub attn1: Attention,
    norm2: nn::LayerNorm,
    /// `attn2`: cross-attention to the text states.
    pub attn2: Attention,
    norm3: nn::LayerNorm,
    /// `ff`: the GEGLU feed-forward.
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    /// Creates the block under `path`.
    pub fn new(path: &nn::Path, dim: i64, heads: i64, cross_attention_dim: i64, eps: f64) -> Self {
        let norm = |name: &str| nn::layer_norm(path / name, vec![dim], nn::LayerNormConfig { eps, ..Default::default() });
        Self {
            norm1: norm("norm1"),
            attn1: Attention::new(&(path / "attn1"), dim, dim, heads),
            norm2: norm("norm2"),
            attn2: Attention::new(&(path / "attn2"), dim, cross_attention_dim, heads),
            norm3: norm("norm3"),
            ff: FeedForward::new(&(path / "ff"), dim),
        }
    }

    /// # Shapes
    /// `xs` `[B, L, dim]`, `context` `[B, Lc, cross_attention_dim]` → `[B, L, dim]`.
    ///
    /// # Errors
    /// As [`Attention::forward`].
    pub fn forward(&self, xs: &Tensor, context: &Tensor, backend: AttentionBackend) -> Result<Tensor> {
        let xs = self.attn1.forward(&xs.apply(&self.norm1), None, backend)? + xs;
        let xs = self.attn2.forward(&xs.apply(&self.norm2), Some(context), backend)? + xs;
        Ok(self.ff.forward(&xs.apply(&self.norm3)) + xs)
    }

    /// Calls `f` with the block's linear layers, paths under `prefix`.
    pub fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.attn1.for_each_linear(&format!("{prefix}.attn1"), f);
        self.attn2.for_each_linear(&format!("{prefix}.attn2"), f);
        f(&format!("{prefix}.ff.net.0.proj"), &mut self.ff.proj);
        f(&format!("{prefix}.ff.net.2"), &mut self.ff.out);
    }
}
