//! UNet-XL: diffusers' `UNet2DConditionModel` as SDXL configures it.
//!
//! [`UNetConfig`] reads `unet/config.json`; [`UNet2DConditionModel`] builds the layers on a
//! `tch::nn::Path` so that variable names equal diffusers' safetensors keys;
//! [`UNet2DConditionModel::from_pretrained`] loads one, and [`loading`] has its lower levels (a config
//! built in code, weights into an existing store): a
//! diffusers folder (plain, variant such as `.fp16`, or sharded) or an SGM single-file checkpoint, with the
//! diffusers ↔ SGM key table in [`sgm`]. Attention runs on any of the backends of [`crate::attention`];
//! [`UNet2DConditionModel::forward_checkpointed`] trades compute for activation memory in training.

mod basic_transformer_block;
pub(crate) mod checkpoint;
pub mod config;
mod embeddings;
pub mod flops;
pub mod loading;
mod resnet;
pub mod sgm;
mod transformer_2d;
mod unet_2d_blocks;
mod unet_2d_condition;

pub use config::{DownBlockKind, Level, TextTimeConfig, UNetConfig, UNetConfigJson, UpBlockKind};
pub use embeddings::timestep_embedding;
pub use flops::{FlopShape, UNetFlops};
pub use sgm::{SGM_UNET_PREFIX, sgm_unet_table, to_sgm};
pub use unet_2d_condition::{CheckpointedForward, InputGrads, UNet2DConditionModel, UNetInputs};

/// How fp8-stored linear layers should multiply in fp8 in this build ([`lora::set_fp8_products`],
/// [`crate::pipeline::Pipeline::set_fp8_products`]): by torch-cuda's differentiable product
/// ([`lora::Fp8Products::ScaledBy`]: every input, gradients included, its quantization in two
/// kernels of our own on CUDA; `backward` says how it computes the input's gradient) where the build
/// has torch-cuda's shim, else by `lora`'s own ([`lora::Fp8Products::Scaled`]: inputs that need no
/// gradient). The forward values are the same either way.
pub fn fp8_products(backward: torch_cuda::fp8::Backward) -> lora::Fp8Products {
    if !torch_cuda::shim_compiled() {
        return lora::Fp8Products::Scaled;
    }
    lora::Fp8Products::ScaledBy(match backward {
        torch_cuda::fp8::Backward::Widened => fp8_product_widened_backward,
        torch_cuda::fp8::Backward::Fp8 => fp8_product_fp8_backward,
    })
}

/// torch-cuda's differentiable fp8 product with `lora`'s signature, its backward by the widened weight.
fn fp8_product_widened_backward(
    x: &tch::Tensor,
    weight: &tch::Tensor,
    scale: &tch::Tensor,
    bias: Option<&tch::Tensor>,
) -> std::result::Result<tch::Tensor, String> {
    torch_cuda::fp8::linear(x, weight, scale, bias, torch_cuda::fp8::Backward::Widened)
        .map_err(|e| e.to_string())
}

/// The same with an fp8 backward (the output gradient in e5m2).
fn fp8_product_fp8_backward(
    x: &tch::Tensor,
    weight: &tch::Tensor,
    scale: &tch::Tensor,
    bias: Option<&tch::Tensor>,
) -> std::result::Result<tch::Tensor, String> {
    torch_cuda::fp8::linear(x, weight, scale, bias, torch_cuda::fp8::Backward::Fp8)
        .map_err(|e| e.to_string())
}

/// The UNet's building blocks, diffusers' classes of the same names (`Attention`, `ResnetBlock2D`,
/// `Transformer2DModel`, the down/mid/up blocks, …), for models of one's own built from them. Their
/// sub-layers are the UNet's business: a block is built with its `new` and run with its forward.
pub mod blocks {
    pub use super::basic_transformer_block::{Attention, BasicTransformerBlock, FeedForward};
    pub use super::embeddings::TimestepEmbedding;
    pub use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
    pub use super::transformer_2d::{Transformer2DModel, TransformerSpec};
    pub use super::unet_2d_blocks::{DownBlock, MidBlock, UpBlock};
}
