//! Umbrella crate of the SDXL LoRA toolkit: it re-exports the workspace's libraries, holds the
//! `sdxl-lora` command line ([`cli`], the binary in `src/bin/sdxl-lora.rs`) and owns the cross-crate
//! examples, benches and integration tests.
//!
//! Library users normally depend on the individual crates: [`sdxl_model`], [`lora`],
//! [`optim8bit`], [`data`] and [`trainer`].

#![warn(missing_docs)]

pub mod cli;

pub use {data, lora, optim8bit, sdxl_model, trainer};
