//! LoRA and DoRA adapters for libtorch linear layers.
//!
//! - [`Linear`]: the linear layer every model of the workspace uses; it carries any number of
//!   [`Adapter`]s (LoRA or DoRA), which can be enabled, disabled, merged and unmerged.
//! - [`Conv2d`]: the same for 2-D convolutions (LoCon: `A` a convolution with the base kernel's
//!   size, stride and padding, `B` a 1×1 convolution), as peft's `lora.Conv2d` and kohya's LoRA.
//! - [`HasLinears`]: how models expose their linear layers (and convolutions) by module path.
//! - [`inject`] and [`LoraConfig`]: peft-style injection by module-path patterns, plus
//!   model-wide [`merge`], [`unmerge`], [`set_enabled`], [`trainable_variables`].
//! - [`attach_rows`] / [`detach_rows`]: several adapter sets on one model at once, each applied
//!   to its own rows of the batch (K training runs on one frozen base in one forward pass).
//! - [`ComputeCopies`]: bf16 copies of the adapters for mixed-precision training (one cast per
//!   optimizer step instead of one per use).
//! - [`quantize_base_fp8`]: frozen base weights stored in fp8 (one scale per tensor), computed in
//!   their original type; adapters on top train as usual.
//! - [`LoraState`] and [`format`](mod@format): the adapter weights of a model, keyed by component and module
//!   path, read from and written to the diffusers, peft and kohya file layouts.
//!
//! The crate knows nothing of SDXL: renaming tables (e.g. SGM block names) are supplied by the
//! caller as a [`format::BlockRenames`].
//!
//! ```
//! use lora::{HasLinears, Linear, LoraConfig};
//! use tch::nn::{Module, VarStore};
//! use tch::{Device, Kind, Tensor};
//!
//! /// A model exposing one attention projection by its diffusers path.
//! struct Attn { to_q: Linear }
//! impl HasLinears for Attn {
//!     fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
//!         f("attn1.to_q", &mut self.to_q);
//!     }
//! }
//!
//! let base = VarStore::new(Device::Cpu);
//! let mut model = Attn { to_q: Linear::new(&(base.root() / "attn1" / "to_q"), 8, 8, false) };
//! let adapters = VarStore::new(Device::Cpu);
//! let report = lora::inject(&mut model, &adapters.root(), "default", &LoraConfig::unet_attention(4))?;
//! assert_eq!(report.adapted.len(), 1);
//! assert_eq!(lora::trainable_variables(&mut model).len(), 2); // A and B, never the base weight
//!
//! let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
//! let side_path = model.to_q.forward(&x);
//! lora::merge(&mut model, None)?;
//! assert!(model.to_q.forward(&x).allclose(&side_path, 1e-5, 1e-6, false));
//! lora::unmerge(&mut model)?;
//! # Ok::<(), lora::Error>(())
//! ```

#![warn(missing_docs)]

mod adapter;
mod conv;
mod copies;
mod error;
pub mod format;
mod fp8;
mod inject;
mod layer;
mod linear;
mod randomness;
mod rows;
mod state;
mod targets;

pub use adapter::{Adapter, Scaling};
pub use conv::Conv2d;
pub use copies::ComputeCopies;
pub use error::{Error, Result};
pub use fp8::{Fp8Product, Fp8Products, Fp8Report, quantize_base_fp8, set_fp8_products};
pub use inject::{
    DetachedAdapters, Init, InjectionReport, LoraConfig, attach, detach, inject, inject_with,
    merge, module_path, set_compute_kind, set_enabled, set_multiplier, set_randomness,
    set_training, trainable_variables, unmerge,
};
pub use linear::{HasLinears, Linear};
pub use randomness::{DefaultGenerator, Randomness};
pub use rows::{attach_rows, detach_rows};

/// For authors of models built on [`Linear`]: projections that read the same input (attention's
/// `to_q`, `to_k`, `to_v`) share one weight buffer and run, with their adapters, as one matrix
/// product. Replacing a packed layer's weight tensor ends the sharing.
pub mod packing {
    pub use crate::linear::{fused_forward, pack_weights};
}
pub use state::{Component, LoraState, ModuleLora};
pub use targets::{
    TEXT_ENCODER_ATTENTION_TARGETS, TEXT_ENCODER_MLP_TARGETS, UNET_ATTENTION_TARGETS,
    UNET_FEED_FORWARD_TARGETS, UNET_RESNET_TARGETS, UNET_TRANSFORMER_TARGETS,
};
