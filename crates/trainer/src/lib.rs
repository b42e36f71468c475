//! The SDXL LoRA training loop.
//!
//! This crate will hold the training configuration and loop, the noise schedule and loss,
//! checkpoints and exact resume, logging and validation.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
mod error;
pub mod estimate;
pub mod kohya_config;
pub mod logs;
pub mod lr_scheduler;
pub mod model_files;
pub mod prepare;
pub mod run;
pub mod step;

pub use config::TrainConfig;
pub use error::{Error, Result};
pub use run::{RunSummary, Trainer, TrainerState};
