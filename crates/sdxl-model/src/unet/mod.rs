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

pub use basic_transformer_block::{Attention, BasicTransformerBlock, FeedForward};
pub use config::{DownBlockKind, Level, TextTimeConfig, UNetConfig, UNetConfigJson, UpBlockKind};
pub use embeddings::{TimestepEmbedding, timestep_embedding};
pub use flops::{FlopShape, UNetFlops};
pub use resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
pub use sgm::{SGM_UNET_PREFIX, sgm_unet_table, to_sgm};
pub use transformer_2d::{Transformer2DModel, TransformerSpec};
pub use unet_2d_blocks::{DownBlock, MidBlock, UpBlock};
pub use unet_2d_condition::{CheckpointedForward, InputGrads, UNet2DConditionModel, UNetInputs};
