//! The spatial transformer of the UNet's attention blocks.
//!
//! Follows diffusers' `models/transformers/transformer_2d.py` (`Transformer2DModel` for continuous
//! inputs): group norm, projection into tokens (`proj_in`, linear or 1×1 convolution), a stack of
//! [`BasicTransformerBlock`]s, projection back (`proj_out`) and a residual connection.

use tch::Tensor;
use tch::nn::{self, Module};

use lora::{Conv2d, Linear};

use super::basic_transformer_block::BasicTransformerBlock;
use super::resnet::{conv2d, group_norm};
use crate::Result;
use crate::attention::AttentionBackend;
use crate::norm::GroupNorm;

/// `proj_in` / `proj_out`: linear on tokens (SDXL) or a 1×1 convolution on the feature map (SD 1.x).
#[derive(Debug)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// `Transformer2DModel` over a `[B, C, H, W]` feature map.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    /// `transformer_blocks`.
    pub(crate) transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// What a [`Transformer2DModel`] is built from.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    /// Channels of the feature map (= heads × head width).
    pub channels: i64,
    /// Attention heads.
    pub heads: i64,
    /// Number of [`BasicTransformerBlock`]s.
    pub layers: i64,
    /// Width of the cross-attention context.
    pub cross_attention_dim: i64,
    /// Groups of the input group norm.
    pub groups: i64,
    /// Epsilon of the transformer blocks' layer norms.
    pub norm_eps: f64,
    /// Linear (true) or 1×1 convolution projections.
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    /// Creates the model's variables under `path`.
    pub fn new(path: &nn::Path, spec: TransformerSpec) -> Self {
        let c = spec.channels;
        let projection = |name: &str| {
            if spec.use_linear_projection {
                Projection::Linear(Linear::new(&(path / name), c, c, true))
            } else {
                Projection::Conv(conv2d(&(path / name), c, c, 1, 1, 0))
            }
        };
        Self {
            // diffusers fixes this norm's epsilon at 1e-6, independent of `norm_eps`.
            norm: group_norm(path / "norm", spec.groups, c, 1e-6),
            proj_in: projection("proj_in"),
            transformer_blocks: (0..spec.layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &(path / "transformer_blocks" / i),
                        c,
                        spec.heads,
                        spec.cross_attention_dim,
                        spec.norm_eps,
                    )
                })
                .collect(),
            proj_out: projection("proj_out"),
        }
    }

    /// # Shapes
    /// `xs` `[B, C, H, W]`, `context` `[B, Lc, cross_attention_dim]` → `[B, C, H, W]`.
    ///
    /// # Errors
    /// As [`BasicTransformerBlock::forward`].
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        backend: AttentionBackend,
    ) -> Result<Tensor> {
        let mut tokens = self.enter(xs)?;
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context, backend)?;
        }
        self.leave(&tokens, xs)
    }

    /// The stage before the blocks: group norm, then the input projection, as tokens. With
    /// [`Self::leave`] around the blocks it is [`Self::forward`] in parts (gradient checkpointing
    /// makes each part a segment).
    ///
    /// # Shapes
    /// `xs` `[B, C, H, W]` → `[B, H·W, C]`.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when `xs` is not 4-dimensional.
    pub fn enter(&self, xs: &Tensor) -> Result<Tensor> {
        let [b, c, h, w] = map_size(xs)?;
        let to_tokens = |t: Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let normed = xs.apply(&self.norm);
        Ok(match &self.proj_in {
            Projection::Linear(linear) => linear.forward(&to_tokens(normed)),
            Projection::Conv(conv) => to_tokens(normed.apply(conv)),
        })
    }

    /// The stage after the blocks: output projection back to a map, plus the residual `xs` (the
    /// input of [`Self::enter`]).
    ///
    /// # Shapes
    /// `tokens` `[B, H·W, C]`, `xs` `[B, C, H, W]` → `[B, C, H, W]`.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when `xs` is not 4-dimensional.
    pub fn leave(&self, tokens: &Tensor, xs: &Tensor) -> Result<Tensor> {
        let [b, c, h, w] = map_size(xs)?;
        let to_map = |t: Tensor| t.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
        let out = match &self.proj_out {
            Projection::Linear(linear) => to_map(linear.forward(tokens)),
            Projection::Conv(conv) => to_map(tokens.shallow_clone()).contiguous().apply(conv),
        };
        // diffusers makes the map contiguous (NCHW) before the residual; a channels-last model keeps
        // it channels-last (the permuted view already is), so the add needs no layout copy.
        if torch_cuda::group_norm::is_channels_last(xs) {
            Ok(out + xs)
        } else {
            Ok(out.contiguous() + xs)
        }
    }

    /// Calls `f` with every linear layer, paths under `prefix` (the 1×1 convolution projections of
    /// non-linear-projection models are convolutions, not linear layers, and are not visited).
    pub fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        if let Projection::Linear(linear) = &mut self.proj_in {
            f(&format!("{prefix}.proj_in"), linear);
        }
        for (i, block) in self.transformer_blocks.iter_mut().enumerate() {
            block.for_each_linear(&format!("{prefix}.transformer_blocks.{i}"), f);
        }
        if let Projection::Linear(linear) = &mut self.proj_out {
            f(&format!("{prefix}.proj_out"), linear);
        }
    }

    /// Calls `f` with the 1×1 convolution projections of non-linear-projection models (SDXL has none).
    pub fn for_each_conv(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        for (name, projection) in [
            ("proj_in", &mut self.proj_in),
            ("proj_out", &mut self.proj_out),
        ] {
            if let Projection::Conv(conv) = projection {
                f(&format!("{prefix}.{name}"), conv);
            }
        }
    }
}

fn map_size(xs: &Tensor) -> Result<[i64; 4]> {
    <[i64; 4]>::try_from(xs.size()).map_err(|size| crate::Error::Shape {
        what: "Transformer2DModel input".to_owned(),
        expected: "[B, C, H, W]".to_owned(),
        actual: format!("{size:?}"),
    })
}
