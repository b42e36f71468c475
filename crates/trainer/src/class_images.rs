//! Class images for prior preservation (`--with_prior_preservation`), as diffusers' DreamBooth
//! script (`train_dreambooth_lora_sdxl.py`) makes them: when `--class_data_dir` holds fewer than
//! `--num_class_images` images, the missing ones are generated with the base model from
//! `--class_prompt`, `--sample_batch_size` at a time, with the pipeline's defaults (the script calls
//! it with the prompt alone: the UNet's `sample_size` times the VAE's scale factor, 1024 px for
//! SDXL; 50 steps of the model folder's scheduler, which `--class_inference_steps` — a flag the
//! script does not have — can change; guidance 5; zero negative conditioning). Each
//! image is written as `{index}-{sha1}.jpg` — its index after the images already there, and the
//! SHA-1 of its RGB pixels (PIL's `tobytes()`) — so the next run counts it and generates only what
//! is still missing. docs/TRAINING.md, "Prior preservation", has the sources and the differences.
//!
//! Unlike the script, whose images come from the global generator after `set_seed`, image `i` of
//! the folder starts from its own initial noise, drawn from libtorch's CPU generator seeded with
//! `--seed + i`: a rerun regenerates the same images however many were already there (bit for bit
//! when the batches are the same; another batch size changes the last bits of the arithmetic, so
//! the pixels may differ by a level or so).

use std::path::{Path, PathBuf};

use sha1::{Digest, Sha1};
use tch::{Device, Kind, Tensor};

use sdxl_model::pipeline::{GenerateOptions, Pipeline};
use sdxl_model::schedulers::SchedulerKind;
use sdxl_model::vae::Upcast;

use crate::config::TrainConfig;
use crate::model_files::ModelFolder;
use crate::{Error, Result};

/// What counts as an image in the folder (what the dataset loader reads).
const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// PIL's default JPEG quality, which the script's `image.save(…jpg)` uses.
const JPEG_QUALITY: u8 = 75;

/// The class images of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassImages {
    /// `--class_data_dir`.
    pub folder: PathBuf,
    /// Every image in it (png, jpg, jpeg, webp; not in subfolders), sorted by path.
    pub paths: Vec<PathBuf>,
    /// How many of them this call generated.
    pub generated: u64,
}

/// Makes sure `--class_data_dir` holds at least `--num_class_images` images, generating the missing
/// ones with the base model in `model` on `device`, its UNet and text encoders in `kind` (diffusers
/// uses fp16 on a GPU, fp32 on the CPU; `--prior_generation_precision`), and freeing it afterwards.
/// The folder is created if needed. Call it when `--with_prior_preservation` is on, before training
/// loads its own models.
///
/// # Errors
/// [`Error::InvalidOption`] when `--class_data_dir` or `--class_prompt` is unset;
/// [`Error::ClassImages`] naming the folder or file that cannot be created, read or written;
/// model errors from loading the pipeline or generating.
pub fn ensure_class_images(
    config: &TrainConfig,
    model: &ModelFolder,
    device: Device,
    kind: Kind,
) -> Result<ClassImages> {
    let missing_option = |option: &'static str| Error::InvalidOption {
        option,
        problem: "needed to make class images (--with_prior_preservation)".into(),
    };
    let folder = config
        .class_data_dir
        .as_deref()
        .ok_or_else(|| missing_option("--class_data_dir"))?;
    let prompt = config
        .class_prompt
        .as_deref()
        .ok_or_else(|| missing_option("--class_prompt"))?;
    std::fs::create_dir_all(folder).map_err(|e| folder_error(folder, "cannot create it", &e))?;
    let existing = list_images(folder)?.len() as u64;
    let missing = config.num_class_images.saturating_sub(existing);
    if missing > 0 {
        let mut pipeline = model.pipeline(device, kind, Upcast::FromConfig)?;
        // The run's prediction type and, with --zero_terminal_snr, ZTSNR sampling.
        pipeline.scheduler_config = crate::single_file::training_scheduler_config(config, model)?;
        let generator = Generator {
            pipeline: &pipeline,
            folder,
            prompt,
            seed: config.seed,
            steps: config.class_inference_steps as usize,
            guidance_rescale: crate::single_file::guidance_rescale(config),
        };
        let generated = generator.run(existing, missing, config.sample_batch_size.max(1));
        drop(pipeline);
        crate::device::free_cache(device);
        generated?;
    }
    Ok(ClassImages {
        folder: folder.to_owned(),
        paths: list_images(folder)?,
        generated: missing,
    })
}

/// The images directly in `folder`, sorted.
///
/// # Errors
/// [`Error::ClassImages`] when the folder cannot be read.
pub fn list_images(folder: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(folder).map_err(|e| folder_error(folder, "cannot read it", &e))?;
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| folder_error(folder, "cannot read it", &e))?;
        let path = entry.path();
        let is_file = entry
            .file_type()
            .map_err(|e| folder_error(&path, "cannot read it", &e))?
            .is_file();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if is_file && is_image {
            images.push(path);
        }
    }
    images.sort();
    Ok(images)
}

fn folder_error(path: &Path, what: &str, error: &std::io::Error) -> Error {
    Error::ClassImages {
        path: path.to_owned(),
        problem: format!("{what}: {error}"),
    }
}

/// Generates class images into a folder.
struct Generator<'a> {
    pipeline: &'a Pipeline,
    folder: &'a Path,
    prompt: &'a str,
    seed: u64,
    steps: usize,
    /// `--validation_guidance_rescale` (0.7 by default with `--zero_terminal_snr`).
    guidance_rescale: f64,
}

impl Generator<'_> {
    /// Images `first .. first + count` of the folder, `batch` at a time, with a progress bar.
    fn run(&self, first: u64, count: u64, batch: u32) -> Result<()> {
        let progress = crate::logs::progress_bar(
            count,
            "Generating class images {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        );
        let end = first + count;
        let mut start = first;
        while start < end {
            let size = u64::from(batch).min(end - start);
            self.batch(start, size)?;
            progress.inc(size);
            start += size;
        }
        progress.finish_and_clear();
        Ok(())
    }

    /// What `StableDiffusionXLPipeline.__call__` uses for `count` prompts given alone, starting
    /// from `initial_noise`.
    fn default_options(
        &self,
        count: usize,
        initial_noise: Option<Tensor>,
    ) -> Result<GenerateOptions> {
        let factor = self.pipeline.vae().config().downscale_factor();
        // `default_sample_size`: the UNet's `sample_size`, 128 when the config has none.
        let size = self.pipeline.unet().config().sample_size.unwrap_or(128) * factor;
        let scheduler = match &self.pipeline.scheduler_config.class_name {
            Some(name) => name.parse::<SchedulerKind>()?,
            None => SchedulerKind::EulerDiscrete,
        };
        Ok(GenerateOptions::default()
            .with_prompts(vec![self.prompt.to_owned(); count])
            .with_height(size)
            .with_width(size)
            .with_scheduler(scheduler)
            .with_steps(self.steps)
            .with_guidance_rescale(self.guidance_rescale)
            .with_initial_noise(initial_noise))
    }

    /// Generates images `first .. first + count` and writes them.
    fn batch(&self, first: u64, count: u64) -> Result<()> {
        let indices: Vec<u64> = (first..first + count).collect();
        let shape = self
            .pipeline
            .latent_shape(&self.default_options(indices.len(), None)?);
        let mut options =
            self.default_options(indices.len(), Some(self.initial_noise(shape, &indices)?))?;
        // Only an ancestral scheduler would draw more noise, from this seed.
        options.seed = self.seed.wrapping_add(first);
        let images = tch::no_grad(|| self.pipeline.generate(&options))?;
        for (row, &index) in indices.iter().enumerate() {
            self.write(&images.to_rgb(row)?, index)?;
        }
        Ok(())
    }

    /// One unit Gaussian latent per image, each from a CPU generator of its own seeded with
    /// `seed + index` (`torch.Generator().manual_seed(seed + index)`).
    fn initial_noise(&self, shape: [i64; 4], indices: &[u64]) -> Result<Tensor> {
        let [_, channels, height, width] = shape;
        let noise = indices
            .iter()
            .map(|&index| {
                let mut generator = torch_cuda::rng::Generator::new(self.seed.wrapping_add(index))?;
                torch_cuda::portable::randn_with(&mut generator, &[1, channels, height, width])
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::Random)?;
        Ok(Tensor::f_cat(&noise, 0)?)
    }

    /// Writes image `index` as `{index}-{sha1 of its pixels}.jpg`, atomically (a hidden temporary
    /// file in the folder, then a rename).
    fn write(&self, image: &image::RgbImage, index: u64) -> Result<PathBuf> {
        let hash: String = Sha1::digest(image.as_raw())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let name = format!("{index}-{hash}.jpg");
        let path = self.folder.join(&name);
        let tmp = self.folder.join(format!(".{name}.tmp"));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY)
            .encode_image(image)
            .map_err(|e| Error::ClassImages {
                path: path.clone(),
                problem: format!("cannot encode it as JPEG: {e}"),
            })?;
        let written = std::fs::write(&tmp, &bytes)
            .map_err(|e| folder_error(&tmp, "cannot write it", &e))
            .and_then(|()| {
                std::fs::rename(&tmp, &path)
                    .map_err(|e| folder_error(&path, "cannot rename it", &e))
            });
        if written.is_err() {
            // A failed write (a full disk) leaves no temporary file behind.
            let _ = std::fs::remove_file(&tmp);
        }
        written.map(|()| path)
    }
}
