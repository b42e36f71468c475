//! The SDXL LoRA trainer: [`TrainConfig`] (diffusers' `train_dreambooth_lora_sdxl.py` flags, a
//! TOML file, or builder-style `with_<flag>` setters) and [`Trainer`], which runs it to a LoRA file.
//!
//! ```
//! use trainer::{TrainConfig, Trainer};
//!
//! // The repository's tiny SDXL-shaped model and demo dataset, on the CPU.
//! let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
//! let out = std::env::temp_dir().join(format!("trainer-doc-{}", std::process::id()));
//! let config = TrainConfig::tiny_demo(
//!     &repo.join("tests/fixtures/tiny-sdxl"),
//!     &repo.join("examples/data/tiny-naruto"),
//!     &out,
//! )
//! .with_max_train_steps(2)
//! .with_gradient_accumulation_steps(1)
//! .with_checkpointing_steps(2)
//! .with_validation_prompt(None);
//! let summary = Trainer::new(config)?.run()?;
//! assert_eq!(summary.steps_run, 2);
//! assert!(summary.lora_file.exists()); // diffusers' pytorch_lora_weights.safetensors
//! # std::fs::remove_dir_all(&out).ok();
//! # Ok::<(), trainer::Error>(())
//! ```
//!
//! The run goes in stages (docs/TRAINING.md, "What a run does"); the public modules are the ones a
//! caller may use on their own:
//!
//! - [`config`]: flags, TOML files, validation of values;
//! - [`class_images`]: the class images of prior preservation, generated where missing;
//! - [`plan`]: which items each micro-step trains on — a pure function of (seed, micro-step);
//! - [`model`]: the UNet with its LoRA; [`model_files`]: finding a model's files (folder, hub id,
//!   single file);
//! - [`step`]: the objective (noise, timesteps, loss) of a micro-step;
//! - [`distributed`]: data parallelism (torchrun's world, collectives, `--nproc_per_node`);
//! - [`run`]: the loop (graphs, logging, checkpoints, validation, resume); [`checkpoint`]: its
//!   checkpoint folders; [`logs`]: its metrics and TensorBoard files;
//! - [`sweep`]: K variants of a run trained in one process on one frozen base (`--sweep`);
//! - [`lr_scheduler`]: diffusers' learning-rate schedules; [`estimate`]: memory and time before a
//!   run; [`kohya_metadata`]: the kohya file's header.
//!
//! The conditioning computed once before training, the output files, validation images, the
//! output folder's lock and single-file loading are internal to the run.

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
pub(crate) mod output_dir;
pub(crate) mod outputs;
pub mod plan;
pub(crate) mod prepare;
mod rng;
pub mod run;
pub(crate) mod single_file;
pub mod step;
pub mod sweep;
pub(crate) mod throughput;
pub(crate) mod validation;

pub use config::TrainConfig;
pub use error::{Error, Result};
pub use run::{RunSummary, Trainer, TrainerState};
