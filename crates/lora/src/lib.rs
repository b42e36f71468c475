//! LoRA and DoRA adapters for libtorch linear layers.
//!
//! - [`Linear`]: the linear layer every model of the workspace uses; it carries any number of
//!   [`Adapter`]s (LoRA or DoRA), which can be enabled, disabled, merged and unmerged.
//! - [`HasLinears`]: how models expose their linear layers by module path.
//! - [`inject`] and [`LoraConfig`]: peft-style injection by module-path patterns, plus
//!   model-wide [`merge`], [`unmerge`], [`set_enabled`], [`trainable_variables`].
//! - [`LoraState`] and [`format`](mod@format): the adapter weights of a model, keyed by component and module
//!   path, read from and written to the diffusers, peft and kohya file layouts.
//!
//! The crate knows nothing of SDXL: renaming tables (e.g. SGM block names) are supplied by the
//! caller as a [`format::BlockRenames`].

#![warn(missing_docs)]

mod adapter;
mod error;
pub mod format;
mod inject;
mod linear;
mod state;

pub use adapter::{Adapter, Scaling};
pub use error::{Error, Result};
pub use inject::{
    InjectionReport, Init, LoraConfig, TEXT_ENCODER_ATTENTION_TARGETS, TEXT_ENCODER_MLP_TARGETS,
    UNET_ATTENTION_TARGETS, UNET_FEED_FORWARD_TARGETS, inject, matches_suffix, merge, module_path, set_enabled,
    set_multiplier, set_training, trainable_variables, unmerge,
};
pub use linear::{HasLinears, Linear};
pub use state::{Component, LoraState, ModuleLora};
