//! The transformer layer of the UNet: self-attention, cross-attention and a GEGLU feed-forward.
//!
//! Follows diffusers' `models/attention.py` (`BasicTransformerBlock` with `norm_type="layer_norm"`,
//! `FeedForward`), `models/activations.py` (`GEGLU`) and the projections of `Attention` in
//! `models/attention_processor.py`. The attention itself is [`crate::attention::attention`].

use tch::Tensor;
use tch::nn::{self, Module};

use lora::Linear;

use crate::Result;
use crate::attention::{AttentionBackend, attention};

/// `Attention` as SDXL's transformer blocks use it: bias-free `to_q`, `to_k`, `to_v` and an output
/// projection `to_out.0` with bias (`to_out.1` is a dropout and has no weights).
#[derive(Debug)]
pub struct Attention {
    /// `to_q`: query projection.
    pub(crate) to_q: Linear,
    /// `to_k`: key projection, from the context width.
    pub(crate) to_k: Linear,
    /// `to_v`: value projection, from the context width.
    pub(crate) to_v: Linear,
    /// `to_out.0`: output projection.
    pub(crate) to_out: Linear,
    heads: i64,
}

impl Attention {
    /// Creates the projections under `path`; `context_dim` is the width keys and values of a
    /// cross-attention are projected from (`None`: a self-attention, from `query_dim`).
    ///
    /// The projections that read the same input share one weight buffer ([`lora::packing::pack_weights`]:
    /// `to_q`, `to_k` and `to_v` for self-attention, `to_k` and `to_v` for cross-attention), so that
    /// [`Self::forward`] projects them with one matrix product while the layout lasts.
    pub fn new(path: &nn::Path, query_dim: i64, context_dim: Option<i64>, heads: i64) -> Self {
        let cross = context_dim.is_some();
        let context_dim = context_dim.unwrap_or(query_dim);
        let mut attention = Self {
            to_q: Linear::new(&(path / "to_q"), query_dim, query_dim, false),
            to_k: Linear::new(&(path / "to_k"), context_dim, query_dim, false),
            to_v: Linear::new(&(path / "to_v"), context_dim, query_dim, false),
            to_out: Linear::new(&(path / "to_out" / 0), query_dim, query_dim, true),
            heads,
        };
        let Self {
            to_q, to_k, to_v, ..
        } = &mut attention;
        // By role, not width: a cross-attention whose context is as wide as its queries still
        // projects them from different inputs.
        if !cross {
            lora::packing::pack_weights(&mut [to_q, to_k, to_v]);
        } else {
            lora::packing::pack_weights(&mut [to_k, to_v]);
        }
        attention
    }

    /// Attends from `xs` to `context` (to `xs` itself when `None`).
    ///
    /// # Shapes
    /// `xs` `[B, L, query_dim]`, `context` `[B, Lc, context_dim]` → `[B, L, query_dim]`.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when the context does not fit the batch.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        backend: AttentionBackend,
    ) -> Result<Tensor> {
        // Packed projections of one input in one product (with their LoRA, see `lora::packing::fused_forward`);
        // one by one where that declines.
        let (query, key, value) = match context {
            None => match lora::packing::fused_forward(&[&self.to_q, &self.to_k, &self.to_v], xs)
                .as_deref()
            {
                Some([q, k, v]) => (q.shallow_clone(), k.shallow_clone(), v.shallow_clone()),
                _ => (
                    self.to_q.forward(xs),
                    self.to_k.forward(xs),
                    self.to_v.forward(xs),
                ),
            },
            Some(context) => {
                let query = self.to_q.forward(xs);
                match lora::packing::fused_forward(&[&self.to_k, &self.to_v], context).as_deref() {
                    Some([k, v]) => (query, k.shallow_clone(), v.shallow_clone()),
                    _ => (
                        query,
                        self.to_k.forward(context),
                        self.to_v.forward(context),
                    ),
                }
            }
        };
        let out = attention(&query, &key, &value, self.heads, backend)?;
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
    pub(crate) proj: Linear,
    /// `net.2`: `4·dim → dim`.
    pub(crate) out: Linear,
}

impl FeedForward {
    /// Creates `net.0.proj` and `net.2` under `path` with the usual 4× inner width.
    pub fn new(path: &nn::Path, dim: i64) -> Self {
        let inner = 4 * dim;
        Self {
            proj: Linear::new(&(path / "net" / 0 / "proj"), dim, 2 * inner, true),
            out: Linear::new(&(path / "net" / 2), inner, dim, true),
        }
    }
}

impl Module for FeedForward {
    /// # Shapes
    /// `[B, L, dim]` → `[B, L, dim]`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let projected = self.proj.forward(xs);
        // On CUDA one pass each way with libtorch's arithmetic (`torch_cuda::geglu`); elsewhere, or
        // where its kernels are unavailable, libtorch's chunk, GELU and product.
        let gated = if projected.device().is_cuda() {
            torch_cuda::geglu::geglu(&projected)
                .unwrap_or_else(|_| torch_cuda::geglu::geglu_reference(&projected))
        } else {
            torch_cuda::geglu::geglu_reference(&projected)
        };
        self.out.forward(&gated)
    }
}

/// `BasicTransformerBlock`: pre-norm self-attention (`attn1`), cross-attention (`attn2`) and
/// feed-forward (`ff`), each added to its input.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    /// `attn1`: self-attention.
    pub(crate) attn1: Attention,
    norm2: nn::LayerNorm,
    /// `attn2`: cross-attention to the text states.
    pub(crate) attn2: Attention,
    norm3: nn::LayerNorm,
    /// `ff`: the GEGLU feed-forward.
    pub(crate) ff: FeedForward,
}

impl BasicTransformerBlock {
    /// Creates the block under `path`.
    pub fn new(path: &nn::Path, dim: i64, heads: i64, cross_attention_dim: i64, eps: f64) -> Self {
        let norm = |name: &str| {
            nn::layer_norm(
                path / name,
                vec![dim],
                nn::LayerNormConfig {
                    eps,
                    ..Default::default()
                },
            )
        };
        Self {
            norm1: norm("norm1"),
            attn1: Attention::new(&(path / "attn1"), dim, None, heads),
            norm2: norm("norm2"),
            attn2: Attention::new(&(path / "attn2"), dim, Some(cross_attention_dim), heads),
            norm3: norm("norm3"),
            ff: FeedForward::new(&(path / "ff"), dim),
        }
    }

    /// # Shapes
    /// `xs` `[B, L, dim]`, `context` `[B, Lc, cross_attention_dim]` → `[B, L, dim]`.
    ///
    /// # Errors
    /// As [`Attention::forward`].
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        backend: AttentionBackend,
    ) -> Result<Tensor> {
        let xs = self.attn1.forward(&xs.apply(&self.norm1), None, backend)? + xs;
        let xs = self
            .attn2
            .forward(&xs.apply(&self.norm2), Some(context), backend)?
            + xs;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// `Attention::forward` with the projections one by one, for comparison.
    fn one_by_one(a: &Attention, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(xs);
        let out = attention(
            &a.to_q.forward(xs),
            &a.to_k.forward(context),
            &a.to_v.forward(context),
            a.heads,
            AttentionBackend::Fused,
        )
        .unwrap();
        a.to_out.forward(&out)
    }

    #[test]
    fn projections_of_one_input_are_packed_and_fused_with_their_lora() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut self_attention = Attention::new(&(vs.root() / "attn1"), 16, None, 2);
        let mut cross_attention = Attention::new(&(vs.root() / "attn2"), 16, Some(24), 2);
        tch::no_grad(|| {
            for (_, var) in vs.variables() {
                var.shallow_clone()
                    .copy_(&Tensor::randn(var.size(), (Kind::Float, Device::Cpu)));
            }
        });
        let xs = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let context = Tensor::randn([2, 3, 24], (Kind::Float, Device::Cpu));
        for with_lora in [false, true] {
            if with_lora {
                let lora_vs = nn::VarStore::new(Device::Cpu);
                let config =
                    lora::LoraConfig::with_targets(2, &["to_q", "to_k", "to_v", "to_out.0"]);
                for (name, attention) in [
                    ("attn1", &mut self_attention),
                    ("attn2", &mut cross_attention),
                ] {
                    let mut holder = Holder(attention, name);
                    lora::inject(&mut holder, &lora_vs.root(), "default", &config).unwrap();
                }
                // Gaussian init leaves B at zero: give B values so that the LoRA path counts.
                tch::no_grad(|| {
                    for (_, var) in lora_vs.variables() {
                        var.shallow_clone()
                            .copy_(&Tensor::randn(var.size(), (Kind::Float, Device::Cpu)));
                    }
                });
            }
            let a = &self_attention;
            assert!(
                lora::packing::fused_forward(&[&a.to_q, &a.to_k, &a.to_v], &xs).is_some(),
                "self-attention not fused"
            );
            let c = &cross_attention;
            assert!(
                lora::packing::fused_forward(&[&c.to_k, &c.to_v], &context).is_some(),
                "cross-attention keys/values not fused"
            );
            for (attention, ctx) in [(a, None), (c, Some(&context))] {
                let fused = attention
                    .forward(&xs, ctx, AttentionBackend::Fused)
                    .unwrap();
                let single = one_by_one(attention, &xs, ctx);
                let diff = (&fused - &single).abs().max().double_value(&[]);
                let scale = single.abs().max().double_value(&[]);
                assert!(
                    diff <= 1e-5 * scale,
                    "LoRA {with_lora}: max |Δ| {diff} of {scale}"
                );
            }
        }
    }

    /// Lets `lora::inject` see one attention's projections under `name`.
    struct Holder<'a>(&'a mut Attention, &'a str);

    impl lora::HasLinears for Holder<'_> {
        fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
            self.0.for_each_linear(self.1, f);
        }
    }
}
