//! Umbrella crate of the SDXL LoRA toolkit: it re-exports the workspace's libraries and owns the
//! cross-crate examples, benches and integration tests.
//!
//! Library users normally depend on the individual crates: [`sdxl_model`], [`lora`],
//! [`optim8bit`], [`data`] and [`trainer`].

#![warn(missing_docs)]

pub use {data, lora, optim8bit, sdxl_model, trainer};
