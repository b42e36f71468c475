//! Validation images: the UNet being trained (LoRA on, or off for the base model) sampled on the
//! validation prompt through the same sampler as [`sdxl_model::pipeline::Pipeline`] uses for final
//! inference, decoded by the VAE (the live one, or loaded with tiling for the purpose and freed).

use std::path::Path;

use tch::{Device, Kind, Tensor};

use sdxl_model::pipeline::{
    Denoiser, GenerateOptions, decode_images, grid_column, grid_row, save_png,
};
use sdxl_model::prompt::PromptEmbeds;
use sdxl_model::schedulers::SchedulerConfig;
use sdxl_model::vae::{AutoencoderKL, AutoencoderKLConfig, Upcast, VaeTiling};

use crate::Result;
use crate::config::TrainConfig;
use crate::model::TrainModel;
use crate::model_files::ModelFolder;

/// The validation prompt and its embeddings.
pub struct ValidationPrompt {
    /// The prompt.
    pub prompt: String,
    /// Its embeddings and the empty negative prompt's (zeros, as SDXL's pipeline makes them),
    /// computed with the frozen text encoders before they are freed; `None` with
    /// `--train_text_encoder`: encoded at each validation by the encoders being trained. Also
    /// `None` on the ranks other than 0 of a data-parallel run: they never validate.
    pub embeds: Option<(PromptEmbeds, PromptEmbeds)>,
}

/// Makes validation images for a run.
pub struct Validator {
    prompt: ValidationPrompt,
    scheduler_config: SchedulerConfig,
    vae_config: AutoencoderKLConfig,
    model: ModelFolder,
    device: Device,
    kind: Kind,
    guidance_scale: f64,
    guidance_rescale: f64,
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
            model: folder.clone(),
            device,
            kind,
            guidance_scale: config.validation_guidance_scale,
            guidance_rescale: crate::single_file::guidance_rescale(config),
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
        model: &TrainModel,
        vae: Option<&AutoencoderKL>,
        path: &Path,
    ) -> Result<()> {
        let latents = self.latents(model, self.seed)?;
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
        let base = self.latents(model, self.seed);
        model.set_lora_enabled(true)?;
        let tuned = self.latents(model, self.seed);
        model.set_training(true);
        Ok(grid_column(&self.decode_rows(vae, &[base?, tuned?])?)?)
    }

    /// One row of images of `model` (LoRA on, or off for the base model) on seed `seed`, without
    /// adapter dropout: a sweep's rows, compared on one seed.
    ///
    /// # Errors
    /// Model errors.
    pub fn row(
        &self,
        model: &mut TrainModel,
        vae: Option<&AutoencoderKL>,
        (seed, lora): (u64, bool),
    ) -> Result<image::RgbImage> {
        model.set_training(false);
        let latents = match lora {
            true => self.latents(model, seed),
            false => model
                .set_lora_enabled(false)
                .and_then(|()| self.latents(model, seed))
                .and_then(|latents| model.set_lora_enabled(true).map(|()| latents)),
        };
        model.set_training(true);
        let rows = self.decode_rows(vae, &[latents?])?;
        rows.into_iter()
            .next()
            .ok_or_else(|| crate::Error::InvalidOption {
                option: "--validation_prompt",
                problem: "gave no images".into(),
            })
    }

    /// Denoises validation latents with the model's UNet on `seed`, on the prompt as its text
    /// encoders (when trained) encode it now.
    fn latents(&self, model: &TrainModel, seed: u64) -> Result<Tensor> {
        let encoded;
        let (positive, negative) = match (&self.prompt.embeds, model.text_encoders()) {
            (Some((positive, negative)), _) => (positive, negative),
            (None, Some(text)) => {
                let prompt = std::slice::from_ref(&self.prompt.prompt);
                encoded = tch::no_grad(|| text.encoder().encode_with_negative(prompt, None))?;
                (&encoded.0, &encoded.1)
            }
            (None, None) => {
                return Err(crate::Error::InvalidOption {
                    option: "--validation_prompt",
                    problem: "was not encoded (no text encoders)".into(),
                });
            }
        };
        let unet = model.unet();
        let denoiser = Denoiser {
            unet: &unet,
            scheduler_config: &self.scheduler_config,
            vae_scale_factor: self.vae_config.downscale_factor(),
            device: self.device,
            kind: self.kind,
        };
        let options = GenerateOptions::default()
            .with_prompts(vec![self.prompt.prompt.clone()])
            .with_guidance_scale(self.guidance_scale)
            .with_guidance_rescale(self.guidance_rescale)
            .with_steps(self.steps)
            .with_height(self.size)
            .with_width(self.size)
            .with_images_per_prompt(self.images)
            .with_seed(seed);
        Ok(tch::no_grad(|| {
            denoiser.denoise(positive, negative, &options)
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
        let (mut vae, store) = self.model.vae(self.device, Kind::Float, Upcast::Always)?;
        vae.set_tiling(Some(VaeTiling::default()))?;
        let rows = decode(&vae);
        drop((vae, store));
        crate::device::free_cache(self.device);
        rows
    }
}
