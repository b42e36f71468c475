//! Stable Diffusion XL 1.0 on libtorch.
//!
//! This crate will hold the models (UNet-XL, VAE-XL, the CLIP-L and OpenCLIP-bigG text encoders),
//! their configs and loaders, the schedulers and the text-to-image pipeline. Module paths follow
//! diffusers and transformers so that variable names equal safetensors keys.
//!
//! Text to image end to end: [`pipeline::Pipeline`] (prompts, guidance, schedulers, LoRA on/off, PNG).

#![warn(missing_docs)]

pub mod attention;
pub mod clip;
mod config_file;
mod error;
mod mapped_load;
pub mod pipeline;
pub mod pretrained;
pub mod prompt;
pub mod schedulers;
pub mod single_file;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
