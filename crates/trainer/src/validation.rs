//! Validation images: the UNet being trained (LoRA on, or off for the base model) sampled on the
//! validation prompt through the same sampler as [`sdxl_model::pipeline::Pipeline`] uses for final
//! inference, decoded by the VAE (the live one, or loaded with tiling for the purpose and freed).

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use sdxl_model::pipeline::{
    Denoiser, GenerateOptions, decode_images, grid_column, grid_row, save_png,
};
use sdxl_model::prompt::PromptEmbeds;
use sdxl_model::schedulers::SchedulerConfig;
use sdxl_model::unet::UNet2DConditionModel;
use sdxl_model::vae::{AutoencoderKL, AutoencoderKLConfig, Upcast, VaeTiling};

use crate::Result;
use crate::config::TrainConfig;
use crate::model::TrainModel;
use crate::model_files::ModelFolder;

/// The validation prompt's embeddings, computed with the text encoders before they are freed.
pub struct ValidationPrompt {
    /// The prompt.
    pub prompt: String,
    /// Its embeddings.
    pub positive: PromptEmbeds,
    /// The empty negative prompt's embeddings (zeros, as SDXL's pipeline makes them).
    pub negative: PromptEmbeds,
}

/// Makes validation images for a run.
pub struct Validator {
    prompt: ValidationPrompt,
    scheduler_config: SchedulerConfig,
    vae_config: AutoencoderKLConfig,
    vae_folder: PathBuf,
    variant: Option<String>,
    device: Device,
    kind: Kind,
    guidance_scale: f64,
    steps: usize,
    size: i64,
    images: i64,
    seed: u64,
}

impl Validator {
    /// A validator for `prompt` with the run's `--validation_*` settings, its resolution and seed.
    pub fn new(
        prompt: ValidationPrompt,
        config: &TrainConfig,
        folder: &ModelFolder,
        scheduler_config: SchedulerConfig,
        vae_config: AutoencoderKLConfig,
        (device, kind): (Device, Kind),
    ) -> Self {
        Self {
            prompt,
            scheduler_config,
            vae_config,
            vae_folder: folder.root.join("vae"),
            variant: folder.variant.clone(),
            device,
            kind,
            guidance_scale: config.validation_guidance_scale,
            steps: config.validation_inference_steps as usize,
            size: i64::from(config.resolution),
            images: i64::from(config.num_validation_images),
            seed: config.seed,
        }
    }

    /// One row of images from `unet` as it is now, written to `path` (PNG). `vae` is the live VAE
    /// when latents are encoded each step; otherwise one is loaded for the purpose.
    ///
    /// # Errors
    /// Model and image-file errors.
    pub fn save_images(
        &self,
        unet: &UNet2DConditionModel,
        vae: Option<&AutoencoderKL>,
        path: &Path,
    ) -> Result<()> {
        let latents = self.latents(unet)?;
        let rows = self.decode_rows(vae, std::slice::from_ref(&latents))?;
        if let Some(row) = rows.first() {
            save_png(row, path)?;
        }
        Ok(())
    }

    /// The base model's images (LoRA off) above the fine-tuned ones, same seeds and prompt.
    ///
    /// # Errors
    /// Model errors.
    pub fn compare(
        &self,
        model: &mut TrainModel,
        vae: Option<&AutoencoderKL>,
    ) -> Result<image::RgbImage> {
        model.set_training(false);
        model.set_lora_enabled(false)?;
        let base = self.latents(model.unet());
        model.set_lora_enabled(true)?;
        let tuned = self.latents(model.unet());
        model.set_training(true);
        Ok(grid_column(&self.decode_rows(vae, &[base?, tuned?])?)?)
    }

    /// Denoises validation latents with `unet`.
    fn latents(&self, unet: &UNet2DConditionModel) -> Result<Tensor> {
        let denoiser = Denoiser {
            unet,
            scheduler_config: &self.scheduler_config,
            vae_scale_factor: self.vae_config.downscale_factor(),
            device: self.device,
            kind: self.kind,
        };
        let options = GenerateOptions {
            prompts: vec![self.prompt.prompt.clone()],
            guidance_scale: self.guidance_scale,
            steps: self.steps,
            height: self.size,
            width: self.size,
            images_per_prompt: self.images,
            seed: self.seed,
            ..GenerateOptions::default()
        };
        Ok(tch::no_grad(|| {
            denoiser.denoise(&self.prompt.positive, &self.prompt.negative, &options)
        })?)
    }

    /// Decodes each batch of latents into one row of images, loading the VAE once for all of them
    /// unless `vae` is given.
    fn decode_rows(
        &self,
        vae: Option<&AutoencoderKL>,
        batches: &[Tensor],
    ) -> Result<Vec<image::RgbImage>> {
        let decode = |vae: &AutoencoderKL| -> Result<Vec<image::RgbImage>> {
            batches
                .iter()
                .map(|latents| {
                    let images = decode_images(vae, latents)?;
                    let row = (0..images.len())
                        .map(|i| images.to_rgb(i))
                        .collect::<sdxl_model::Result<Vec<_>>>()?;
                    Ok(grid_row(&row)?)
                })
                .collect()
        };
        if let Some(vae) = vae {
            return decode(vae);
        }
        let (mut vae, store) = AutoencoderKL::from_pretrained_variant(
            &self.vae_folder,
            self.variant.as_deref(),
            self.device,
            Kind::Float,
            Upcast::Always,
        )?;
        vae.set_tiling(Some(VaeTiling::default()))?;
        let rows = decode(&vae);
        drop((vae, store));
        crate::device::free_cache(self.device);
        rows
    }
}
