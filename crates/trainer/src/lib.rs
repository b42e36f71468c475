//! The SDXL LoRA training loop.
//!
//! This crate will hold the training configuration and loop, the noise schedule and loss,
//! checkpoints and exact resume, logging and validation.

#![warn(missing_docs)]

pub mod checkpoint;
mod error;
pub mod logs;
pub mod lr_scheduler;

pub use error::{Error, Result};
