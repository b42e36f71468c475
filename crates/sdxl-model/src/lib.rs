//! Stable Diffusion XL 1.0 on libtorch: the models (UNet-XL, VAE-XL, the CLIP-L and OpenCLIP-bigG
//! text encoders), their configs and loaders (diffusers folders, variants, shards, SGM single
//! files), both tokenizers, the schedulers and the text-to-image pipeline. Module paths follow
//! diffusers and transformers so that variable names equal safetensors keys.
//!
//! Text to image end to end: [`pipeline::Pipeline`] (prompts, guidance, schedulers, LoRA on/off,
//! PNG). Every model — the UNet, the VAE, each text encoder, the prompt encoder, the pipeline — loads
//! the same way, `from_pretrained(folder_or_hub_id, &LoadOptions)` ([`pretrained`]: device, element
//! type, variant, revision; a hub id fetches only that model's files, [`hub`]), returning the model,
//! the store owning its variables and the load report (here the repository's tiny SDXL-shaped UNet,
//! on the CPU):
//!
//! ```
//! use sdxl_model::pretrained::LoadOptions;
//! use sdxl_model::unet::{UNet2DConditionModel, UNetInputs};
//! use tch::{Device, Kind, Tensor};
//!
//! let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl");
//! let unet = UNet2DConditionModel::from_pretrained(&tiny, &LoadOptions::default())?;
//! assert!(unet.report.is_complete());
//! let config = unet.model.config();
//! let options = (Kind::Float, Device::Cpu);
//! let sample = Tensor::randn([1, config.in_channels, 8, 8], options);
//! let context = Tensor::randn([1, 77, config.cross_attention_dim], options);
//! let text_time = config.text_time.expect("SDXL's UNet has the text_time conditioning");
//! let text_embeds = Tensor::randn([1, text_time.projection_input_dim - 6 * text_time.time_embed_dim], options);
//! let time_ids = Tensor::from_slice(&[64f32, 64., 0., 0., 64., 64.]).view([1, 6]);
//! let inputs = UNetInputs {
//!     sample: &sample,
//!     timesteps: &Tensor::from_slice(&[999i64]),
//!     encoder_hidden_states: &context,
//!     text_embeds: Some(&text_embeds),
//!     time_ids: Some(&time_ids),
//! };
//! let prediction = tch::no_grad(|| unet.model.forward(&inputs))?;
//! assert_eq!(prediction.size(), sample.size());
//! # Ok::<(), sdxl_model::Error>(())
//! ```

#![warn(missing_docs)]

pub mod attention;
pub mod clip;
mod config_file;
mod error;
pub mod hub;
mod mapped_load;
pub mod norm;
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
