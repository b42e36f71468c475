//! The SDXL LoRA trainer, in stages (docs/TRAINING.md, "What a run does"):
//!
//! - [`config`]: flags, TOML files, validation of values;
//! - [`class_images`]: the class images of prior preservation, generated where missing;
//! - [`plan`]: which items each micro-step trains on — a pure function of (seed, micro-step);
//! - [`prepare`]: the conditioning computed once (prompt embeddings, latents);
//! - [`model`]: the UNet with its LoRA;
//! - [`step`]: the graph-capturable micro-step and optimizer step;
//! - [`distributed`]: data parallelism (torchrun's world, collectives, `--nproc_per_node`);
//! - [`run`]: the loop (graphs, logging, checkpoints, validation, resume);
//! - [`outputs`]: LoRA files, model card, plots; [`kohya_metadata`]: the kohya file's header.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod class_images;
pub mod config;
mod device;
pub mod distributed;
mod error;
pub mod estimate;
pub mod kohya_metadata;
pub mod logs;
pub mod lr_scheduler;
pub mod model;
pub mod model_files;
pub mod output_dir;
pub mod outputs;
pub mod plan;
pub mod prepare;
mod rng;
pub mod run;
pub mod single_file;
pub mod step;
pub mod throughput;
pub mod validation;

pub use config::TrainConfig;
pub use error::{Error, Result};
pub use run::{RunSummary, Trainer, TrainerState};
