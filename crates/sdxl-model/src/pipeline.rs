//! SDXL text-to-image: prompts → latents → images, with classifier-free guidance, a scheduler chosen
//! at run time, and LoRA adapters that can be scaled or switched off without reloading the base model.
//!
//! Follows diffusers `pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py`
//! (`StableDiffusionXLPipeline.__call__`) for the text-to-image path:
//!
//! 1. encode the prompts; without a negative prompt the negative conditioning is zeros
//!    (`force_zeros_for_empty_prompt`);
//! 2. the time ids are `[h, w, 0, 0, h, w]` for the target size, the same for both halves of the batch;
//! 3. the initial latents are unit Gaussian noise times the scheduler's `init_noise_sigma`;
//! 4. with guidance (`guidance_scale > 1`) the UNet sees the batch `[uncond, cond]` and the prediction
//!    is `uncond + scale · (cond − uncond)`;
//! 5. the VAE decodes `latents / scaling_factor`, and images map from [−1, 1] to [0, 255].
//!
//! The denoising loop reads no tensor values on the host, so it can run on the GPU without
//! synchronising; only the final conversion to 8-bit images copies to the host.
//!
//! A crate depending on `sdxl-model` and `lora` generates an image, then the same image with a LoRA
//! (here the tiny test models and LoRA of `tests/fixtures`; give a real SDXL diffusers folder instead):
//!
//! ```
//! use sdxl_model::pipeline::{GenerateOptions, Pipeline};
//! use sdxl_model::pretrained::LoadOptions;
//!
//! let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
//! let mut pipe = Pipeline::from_pretrained(fixtures.join("tiny-sdxl"), &LoadOptions::default())?.model;
//! let options = GenerateOptions::default()
//!     .with_prompts(vec!["a watercolor painting of a fox in the snow".into()])
//!     .with_steps(2)
//!     .with_height(64)
//!     .with_width(64)
//!     .with_seed(7);
//! let base = pipe.generate(&options)?;
//!
//! let file = lora::format::read(fixtures.join("lora/tiny-sdxl-diffusers.safetensors"), Default::default())?;
//! pipe.load_lora(&file.state, "style")?;
//! pipe.set_lora_multiplier("style", 0.8)?;
//! let styled = pipe.generate(&options)?;
//! assert_ne!(base.to_rgb(0)?, styled.to_rgb(0)?);
//! styled.save_png(0, std::env::temp_dir().join("sdxl-pipeline-doc.png"))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod compat;
mod label;
mod memory;

use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use torch_cuda::graph::{CaptureMode, CudaGraph};

use lora::{Component, HasLinears, LoraState};

use crate::hub::{Part, TOKENIZER_FILES_OF_BOTH, Wanted};
use crate::pretrained::{LoadOptions, Loaded, Source, locate, single_file_configs};
use crate::prompt::{PromptEmbeds, PromptEncoder, add_time_ids, add_time_ids_tensor};
use crate::schedulers::{self, SchedulerConfig, SchedulerKind};
use crate::single_file::{SdxlConfigs, SingleFileCheckpoint};
use crate::unet::{UNet2DConditionModel, UNetInputs};
use crate::vae::{AutoencoderKL, VaeTiling};
use crate::weights::LoadReport;
use crate::{Error, Result};
/// The 8-bit RGB buffer the image functions here take and return (the `image` crate's), for crates
/// that do not depend on `image` themselves.
pub use image::RgbImage;
pub use label::{GLYPH_ADVANCE, LINE_HEIGHT, draw_text, label_scale, labeled_grid, text_size};
pub use memory::{GenerationMemory, LARGE_GENERATION_BYTES, MAX_GENERATION_BYTES};

/// What to generate: prompts, guidance, size, steps, sampler and randomness.
///
/// Outside this crate, start from [`GenerateOptions::default`] (diffusers' SDXL defaults) and set
/// what differs with the `with_*` setters (or by assigning the public fields):
///
/// ```
/// use sdxl_model::pipeline::GenerateOptions;
/// use sdxl_model::schedulers::SchedulerKind;
/// let options = GenerateOptions::default()
///     .with_prompts(vec!["Naruto style anime character".into()])
///     .with_steps(30)
///     .with_scheduler(SchedulerKind::DpmSolverMultistepKarras)
///     .with_seed(7);
/// assert_eq!((options.steps, options.width, options.seed), (30, 1024, 7));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct GenerateOptions {
    /// One prompt per image (times [`Self::images_per_prompt`]).
    pub prompts: Vec<String>,
    /// One negative prompt per prompt; `None` gives SDXL's all-zero negative conditioning.
    pub negative_prompts: Option<Vec<String>>,
    /// Classifier-free guidance scale; guidance is off at 1 or below (one UNet batch instead of two).
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    /// Steps are Flawed", section 3.4; 0.7 there): the guided prediction is mixed with itself rescaled
    /// to the standard deviation of the text-conditioned one, against the over-exposure of zero-terminal-SNR
    /// models. 0 (the default) leaves it as it is; used only with guidance.
    pub guidance_rescale: f64,
    /// Denoising steps.
    pub steps: usize,
    /// Image height in pixels: a positive multiple of the VAE's downscale factor (8).
    pub height: i64,
    /// Image width in pixels: a positive multiple of the VAE's downscale factor (8).
    pub width: i64,
    /// Images per prompt, generated in one batch.
    pub images_per_prompt: i64,
    /// Seeds the call's own CPU generator ([`torch_cuda::rng::Generator`]), which draws the initial
    /// noise and then any ancestral noise: `generator=torch.Generator().manual_seed(seed)` in
    /// diffusers draws the same numbers. Independent of libtorch's process-wide generator, so
    /// pipelines generating in several threads give what each gives alone.
    pub seed: u64,
    /// One seed per image, in batch order (prompt by prompt, then image by image): each image draws
    /// its initial noise and then its ancestral noise from a generator of its own, as diffusers does
    /// when given a list of generators (`generator=[torch.Generator().manual_seed(s) for s in
    /// image_seeds]`) and as A1111 does for a batch. An image then depends only on its own seed, not
    /// on the batch it shares; [`Self::seed`] is not used. `None` (the default): one generator seeded
    /// with [`Self::seed`] draws the whole batch's noise.
    pub image_seeds: Option<Vec<u64>>,
    /// The sampler.
    pub scheduler: SchedulerKind,
    /// Unit Gaussian initial latents `[batch, 4, height/8, width/8]` to use instead of seeded noise
    /// (diffusers' `latents=` argument; the pipeline still multiplies them by `init_noise_sigma`).
    pub initial_noise: Option<Tensor>,
    /// Captures the UNet call (the guidance batch) as a CUDA graph after the first step and replays it
    /// for the others: one launch per step instead of a few thousand. CUDA only; the latents equal an
    /// eager run's (same kernels on the same inputs).
    pub cuda_graph: bool,
    /// Called on the host after each denoising step (diffusers' `callback_on_step_end`, for progress).
    pub on_step: Option<OnStep>,
}

/// A denoising-step callback: `(steps done, steps in all)` after each step. It runs on the host and
/// is given no tensor, so the loop stays asynchronous: on a GPU the step it reports may still be
/// computing (a progress bar runs ahead of the device by the queue's depth, then waits at the decode).
#[derive(Clone)]
pub struct OnStep(pub std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>);

impl OnStep {
    /// Wraps `callback`.
    pub fn new(callback: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(callback))
    }
}

impl std::fmt::Debug for OnStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnStep(..)")
    }
}

impl Default for GenerateOptions {
    /// diffusers' SDXL defaults: 1024×1024, 50 Euler steps, guidance 5.
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            negative_prompts: None,
            guidance_scale: 5.0,
            guidance_rescale: 0.0,
            steps: 50,
            height: 1024,
            width: 1024,
            images_per_prompt: 1,
            seed: 0,
            image_seeds: None,
            scheduler: SchedulerKind::EulerDiscrete,
            initial_noise: None,
            cuda_graph: false,
            on_step: None,
        }
    }
}

impl GenerateOptions {
    /// Sets [`Self::prompts`].
    #[must_use]
    pub fn with_prompts(mut self, prompts: Vec<String>) -> Self {
        self.prompts = prompts;
        self
    }

    /// Sets [`Self::negative_prompts`].
    #[must_use]
    pub fn with_negative_prompts(mut self, negative_prompts: Option<Vec<String>>) -> Self {
        self.negative_prompts = negative_prompts;
        self
    }

    /// Sets [`Self::guidance_scale`].
    #[must_use]
    pub fn with_guidance_scale(mut self, guidance_scale: f64) -> Self {
        self.guidance_scale = guidance_scale;
        self
    }

    /// Sets [`Self::guidance_rescale`].
    #[must_use]
    pub fn with_guidance_rescale(mut self, guidance_rescale: f64) -> Self {
        self.guidance_rescale = guidance_rescale;
        self
    }

    /// Sets [`Self::steps`].
    #[must_use]
    pub fn with_steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// Sets [`Self::height`].
    #[must_use]
    pub fn with_height(mut self, height: i64) -> Self {
        self.height = height;
        self
    }

    /// Sets [`Self::width`].
    #[must_use]
    pub fn with_width(mut self, width: i64) -> Self {
        self.width = width;
        self
    }

    /// Sets [`Self::images_per_prompt`].
    #[must_use]
    pub fn with_images_per_prompt(mut self, images_per_prompt: i64) -> Self {
        self.images_per_prompt = images_per_prompt;
        self
    }

    /// Sets [`Self::seed`].
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets [`Self::image_seeds`].
    #[must_use]
    pub fn with_image_seeds(mut self, image_seeds: Option<Vec<u64>>) -> Self {
        self.image_seeds = image_seeds;
        self
    }

    /// Sets [`Self::scheduler`].
    #[must_use]
    pub fn with_scheduler(mut self, scheduler: SchedulerKind) -> Self {
        self.scheduler = scheduler;
        self
    }

    /// Sets [`Self::initial_noise`].
    #[must_use]
    pub fn with_initial_noise(mut self, initial_noise: Option<Tensor>) -> Self {
        self.initial_noise = initial_noise;
        self
    }

    /// Sets [`Self::cuda_graph`].
    #[must_use]
    pub fn with_cuda_graph(mut self, cuda_graph: bool) -> Self {
        self.cuda_graph = cuda_graph;
        self
    }

    /// Sets [`Self::on_step`].
    #[must_use]
    pub fn with_on_step(mut self, on_step: Option<OnStep>) -> Self {
        self.on_step = on_step;
        self
    }
}

/// An 8-bit RGB image batch as the pipeline returns it.
#[derive(Debug)]
pub struct Images {
    /// `[batch, 3, height, width]` `Kind::Uint8` on the CPU.
    pub chw: Tensor,
}

impl Images {
    /// The batch as `[batch, height, width, 3]` `Kind::Uint8`.
    pub fn hwc(&self) -> Tensor {
        self.chw.permute([0, 2, 3, 1]).contiguous()
    }

    /// How many images the batch holds.
    pub fn len(&self) -> usize {
        self.chw.size().first().copied().unwrap_or(0) as usize
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `index` as an `image` crate buffer.
    ///
    /// # Errors
    /// [`Error::Shape`] for an index past the batch.
    pub fn to_rgb(&self, index: usize) -> Result<image::RgbImage> {
        if index >= self.len() {
            return Err(Error::Shape {
                what: "image index".into(),
                expected: format!("below {}", self.len()),
                actual: index.to_string(),
            });
        }
        let hwc = self.hwc().get(index as i64);
        let (height, width, _) = hwc.size3()?;
        let count = (height * width * 3) as usize;
        let mut bytes = vec![0u8; count];
        hwc.copy_data_u8(&mut bytes, count);
        image::RgbImage::from_raw(width as u32, height as u32, bytes).ok_or_else(|| Error::Shape {
            what: "image buffer".into(),
            expected: format!("{height}×{width}×3 bytes"),
            actual: "a different length".into(),
        })
    }

    /// Writes image `index` as a PNG file, atomically (temporary file, then rename).
    ///
    /// # Errors
    /// As [`Self::to_rgb`]; [`Error::Image`] when encoding or writing fails.
    pub fn save_png(&self, index: usize, path: impl AsRef<Path>) -> Result<()> {
        save_png(&self.to_rgb(index)?, path)
    }
}

/// Writes an RGB buffer as a PNG file, atomically (temporary file in the same folder, then rename).
///
/// # Errors
/// [`Error::Image`] naming the file when encoding or writing fails.
pub fn save_png(image: &image::RgbImage, path: impl AsRef<Path>) -> Result<()> {
    save_png_with_text(image, path, &[])
}

/// [`save_png`] with text chunks, `(keyword, text)` each: `tEXt` when the text is Latin-1, else
/// `iTXt` (UTF-8), as PIL's `PngInfo.add_text` writes them — A1111 and ComfyUI read the generation
/// settings from such a chunk (`parameters`).
///
/// # Errors
/// [`Error::Image`] naming the file when encoding or writing fails (a keyword PNG refuses: empty,
/// over 79 bytes, not Latin-1).
pub fn save_png_with_text(
    image: &image::RgbImage,
    path: impl AsRef<Path>,
    text: &[(&str, &str)],
) -> Result<()> {
    let path = path.as_ref();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let image_error = |source| Error::Image {
        path: path.to_owned(),
        source,
    };
    let encoding_error = |error: png::EncodingError| {
        image_error(image::ImageError::Encoding(
            image::error::EncodingError::new(image::ImageFormat::Png.into(), error),
        ))
    };
    let write = || -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(|source| Error::Io {
            path: tmp.clone(),
            source,
        })?;
        let mut encoder =
            png::Encoder::new(std::io::BufWriter::new(file), image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for &(keyword, value) in text {
            let latin1 = value.chars().all(|c| u32::from(c) <= 0xff);
            if latin1 {
                encoder.add_text_chunk(keyword.to_owned(), value.to_owned())
            } else {
                encoder.add_itxt_chunk(keyword.to_owned(), value.to_owned())
            }
            .map_err(encoding_error)?;
        }
        let mut writer = encoder.write_header().map_err(encoding_error)?;
        writer
            .write_image_data(image.as_raw())
            .map_err(encoding_error)?;
        writer.finish().map_err(encoding_error)
    };
    // A failed write or rename (a full disk) leaves no temporary file behind.
    let saved = write().and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    });
    if saved.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    saved
}

/// The SDXL text-to-image pipeline: text encoders, UNet, VAE and the scheduler config.
///
/// The components are checked against each other when the pipeline is built ([`Pipeline::new`]), so
/// they are reached through accessors rather than public fields: [`Pipeline::unet`],
/// [`Pipeline::vae`], [`Pipeline::prompt_encoder`] to read, the `_mut` twins to change a component
/// in place (its attention backend, adapters, tiling). To use other components, build another
/// pipeline.
#[derive(Debug)]
pub struct Pipeline {
    /// Both tokenizers and text encoders.
    pub(crate) prompt_encoder: PromptEncoder,
    /// The denoiser.
    pub(crate) unet: UNet2DConditionModel,
    /// The decoder of latents (tile it with [`AutoencoderKL::set_tiling`] for large images).
    pub(crate) vae: AutoencoderKL,
    /// The scheduler config every run builds its sampler from (SDXL's by default); a config, so it
    /// may be replaced or changed (prediction type, timestep spacing) freely.
    pub scheduler_config: SchedulerConfig,
    device: Device,
    kind: Kind,
}

impl Pipeline {
    /// Assembles a pipeline from loaded parts; `kind` is the element type the UNet computes in.
    ///
    /// # Errors
    /// [`Error::Incompatible`] naming the config keys when the parts do not fit together: text
    /// encoders whose hidden sizes do not add up to the UNet's `cross_attention_dim`, a pooled
    /// embedding and time ids of other widths than the UNet's `add_embedding` takes, or a VAE with
    /// other latent channels than the UNet denoises.
    pub fn new(
        prompt_encoder: PromptEncoder,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler_config: SchedulerConfig,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        compat::check_components(&prompt_encoder, unet.config(), vae.config())?;
        Ok(Self {
            prompt_encoder,
            unet,
            vae,
            scheduler_config,
            device,
            kind,
        })
    }

    /// Both tokenizers and text encoders.
    pub fn prompt_encoder(&self) -> &PromptEncoder {
        &self.prompt_encoder
    }

    /// The text encoders, to change in place (their adapters).
    pub fn prompt_encoder_mut(&mut self) -> &mut PromptEncoder {
        &mut self.prompt_encoder
    }

    /// The denoiser.
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The denoiser, to change in place (attention backend, adapters, fp8 weights).
    pub fn unet_mut(&mut self) -> &mut UNet2DConditionModel {
        &mut self.unet
    }

    /// The latents' decoder.
    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    /// The latents' decoder, to change in place ([`AutoencoderKL::set_tiling`]).
    pub fn vae_mut(&mut self) -> &mut AutoencoderKL {
        &mut self.vae
    }

    /// Loads a whole SDXL model as diffusers' `StableDiffusionXLPipeline.from_pretrained` and
    /// `from_single_file` do. `name` is one of (see [`crate::pretrained`] for how names are told
    /// apart):
    /// - a diffusers SDXL folder: `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/` (the weights of
    ///   [`LoadOptions::variant`]), `tokenizer/` and `tokenizer_2/` where present (else the shipped
    ///   tokenizers), `scheduler/scheduler_config.json` where present (else SDXL's);
    /// - a hub repository id of one, whose files of that list alone are fetched;
    /// - an SGM single-file checkpoint (local, or a hub file): every component from the one file,
    ///   the configs and scheduler config of [`LoadOptions::single_file_config`] (a diffusers
    ///   folder or repository; SDXL base 1.0's when `None`).
    ///
    /// The weights go to [`LoadOptions::device`] in [`LoadOptions::kind`], the VAE's in fp32 where
    /// [`LoadOptions::vae_upcast`] says so. The stores are text encoders, UNet, VAE; the report
    /// holds every component's, keys prefixed with its folder (`unet/…`).
    ///
    /// # Errors
    /// [`Error::NoSuchFolder`], [`Error::Hub`] naming the path or repository; the loaders' errors,
    /// naming the file or the keys that do not match; as [`Self::new`].
    pub fn from_pretrained(
        name: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Loaded<Self, [VarStore; 4]>> {
        let mut parts = crate::prompt::TEXT_ENCODER_PARTS.to_vec();
        for subfolder in ["unet", "vae"] {
            parts.push(Part {
                subfolder: Some(subfolder),
                default: None,
                weights: "diffusion_pytorch_model.safetensors",
            });
        }
        let mut optional = TOKENIZER_FILES_OF_BOTH.to_vec();
        optional.push("scheduler/scheduler_config.json");
        let wanted = Wanted::Parts {
            parts: &parts,
            variant: options.variant.as_deref(),
            optional: &optional,
        };
        match locate(name.as_ref(), options, &wanted)? {
            Source::Folder(root) => Self::from_root(&root, options),
            Source::File(path) => {
                let configs = match single_file_configs(options)? {
                    Some(root) => SdxlConfigs::from_diffusers_folder(root)?,
                    None => SdxlConfigs::sdxl_base(),
                };
                Self::from_single_file(&SingleFileCheckpoint::open(path, configs)?, options)
            }
        }
    }

    /// Loads the local diffusers SDXL folder `root`.
    fn from_root(root: &Path, options: &LoadOptions) -> Result<Loaded<Self, [VarStore; 4]>> {
        let Loaded {
            model: prompt_encoder,
            store: [vs_1, vs_2],
            mut report,
        } = PromptEncoder::from_root(root, options)?;
        let component = |name: &str| LoadOptions {
            subfolder: Some(name.to_owned()),
            ..options.clone()
        };
        let unet = UNet2DConditionModel::from_pretrained(root, &component("unet"))?;
        report.absorb("unet", unet.report);
        let vae = AutoencoderKL::from_pretrained(root, &component("vae"))?;
        report.absorb("vae", vae.report);
        let scheduler_file = root.join("scheduler").join("scheduler_config.json");
        let scheduler_config = if scheduler_file.exists() {
            SchedulerConfig::from_file(&scheduler_file)?
        } else {
            SchedulerConfig::sdxl()
        };
        let model = Self::new(
            prompt_encoder,
            unet.model,
            vae.model,
            scheduler_config,
            options.device,
            options.kind,
        )?;
        Ok(Loaded {
            model,
            store: [vs_1, vs_2, unet.store, vae.store],
            report,
        })
    }

    /// Loads an opened SGM single-file checkpoint (UNet, both text encoders and the VAE from the one
    /// file, the configs and the scheduler config from [`SingleFileCheckpoint::configs`]).
    fn from_single_file(
        checkpoint: &SingleFileCheckpoint,
        options: &LoadOptions,
    ) -> Result<Loaded<Self, [VarStore; 4]>> {
        let (device, kind) = (options.device, options.kind);
        let (prompt_encoder, [vs_1, vs_2]) = checkpoint.load_prompt_encoder(device, kind)?;
        let (vs_unet, unet) = checkpoint.load_unet(device, kind)?;
        let (vae, vs_vae) = checkpoint.load_vae(device, kind, options.vae_upcast)?;
        let scheduler_config = checkpoint.configs().scheduler.clone();
        let model = Self::new(prompt_encoder, unet, vae, scheduler_config, device, kind)?;
        let stores = [vs_1, vs_2, vs_unet, vs_vae];
        let mut report = LoadReport::default();
        for (name, store) in ["text_encoder", "text_encoder_2", "unet", "vae"]
            .iter()
            .zip(&stores)
        {
            // Each loader fails unless it matched every variable: all were loaded.
            report.absorb(
                name,
                LoadReport {
                    loaded: store.variables().len(),
                    ..LoadReport::default()
                },
            );
        }
        Ok(Loaded {
            model,
            store: stores,
            report,
        })
    }

    /// Decodes in overlapping tiles when the image is larger than one tile (`None`: never).
    ///
    /// # Errors
    /// As [`AutoencoderKL::set_tiling`].
    pub fn set_vae_tiling(&mut self, tiling: Option<VaeTiling>) -> Result<()> {
        self.vae.set_tiling(tiling)
    }

    /// The models a LoRA can adapt, with the component each is.
    fn adaptable(&mut self) -> [(Component, &mut dyn HasLinears); 3] {
        let unet: &mut dyn HasLinears = &mut self.unet;
        let (text_encoder, text_encoder_2) = self.prompt_encoder.text_encoders_mut();
        [
            (Component::Unet, unet),
            (Component::TextEncoder, text_encoder),
            (Component::TextEncoder2, text_encoder_2),
        ]
    }

    /// The layer paths of every adaptable model, for resolving kohya-named LoRA files
    /// ([`lora::format::ReadOptions::module_names`]), with the UNet's SGM block names attached
    /// ([`crate::unet::sgm_unet_table`]): kohya files in either UNet spelling load (what kohya's
    /// trainer and ours write, and what diffusers' `convert_state_dict_to_kohya` writes).
    pub fn lora_module_names(&mut self) -> lora::format::ModuleNames {
        let mut names = lora::format::ModuleNames::new();
        let table = crate::unet::sgm_unet_table(self.unet.config());
        names.set_block_renames(lora::format::BlockRenames::new(table));
        for (component, model) in self.adaptable() {
            names.add_model(component, model);
        }
        names
    }

    /// Attaches a LoRA as adapter `name` to every component it has modules for, at multiplier 1.
    /// Several LoRAs under different names add up. Returns how many layers got the adapter.
    ///
    /// # Errors
    /// [`Error::Lora`] naming the modules the models lack or the layer that refused (shape, duplicate name).
    pub fn load_lora(&mut self, state: &LoraState, name: &str) -> Result<usize> {
        let components = state.components();
        let mut count = 0;
        for (component, model) in self.adaptable() {
            if components.contains(&component) {
                count += state.apply(model, component, name, false)?;
            }
        }
        Ok(count)
    }

    /// Scales adapter `name` in every component (0 gives the base model's outputs exactly).
    ///
    /// # Errors
    /// [`Error::Lora`] when no layer has the adapter.
    pub fn set_lora_multiplier(&mut self, name: &str, multiplier: f64) -> Result<()> {
        let mut found = 0;
        for (_, model) in self.adaptable() {
            found += lora::set_multiplier(model, name, multiplier).unwrap_or(0);
        }
        if found == 0 {
            // Ask once more to get the lora crate's error naming the adapter.
            lora::set_multiplier(&mut self.unet, name, multiplier)?;
        }
        Ok(())
    }

    /// Switches adapter `name` on or off in every component without unloading it.
    ///
    /// # Errors
    /// [`Error::Lora`] when no layer has the adapter.
    pub fn set_lora_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        let mut found = 0;
        for (_, model) in self.adaptable() {
            found += lora::set_enabled(model, name, enabled).unwrap_or(0);
        }
        if found == 0 {
            lora::set_enabled(&mut self.unet, name, enabled)?;
        }
        Ok(())
    }

    /// Stores the UNet's base weights in fp8 (e4m3, a scale per tensor), each layer still computing
    /// in the pipeline's kind: every linear layer ([`lora::quantize_base_fp8`]) and every convolution
    /// ([`UNet2DConditionModel::quantize_convs_fp8`]); norms and biases keep their type. About half the
    /// UNet's bf16 bytes; each layer widens its weight before its product, so it saves memory, not
    /// time, unless [`Self::set_fp8_products`] asks for fp8 products. LoRAs loaded before or after
    /// stay in the pipeline's kind. Returns the linear layers'
    /// report, then the convolutions'.
    ///
    /// # Errors
    /// [`Error::Lora`] for a layer with a merged adapter (quantize before merging), libtorch errors.
    pub fn quantize_unet_fp8(&mut self) -> Result<[lora::Fp8Report; 2]> {
        let linears = lora::quantize_base_fp8(&mut self.unet)?;
        let convs = self.unet.quantize_convs_fp8()?;
        Ok([linears, convs])
    }

    /// Sets how the UNet's fp8-stored linear layers compute ([`lora::Fp8Products`]): widened to the
    /// pipeline's kind (the default), or fp8 × fp8 products with the input quantized per call, on
    /// fp8 tensor cores. Returns how many layers are fp8 (none before [`Self::quantize_unet_fp8`]).
    /// Convolutions always widen.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for fp8 products ([`lora::Fp8Products::Scaled`] or `ScaledBy`) on a
    /// CUDA device without fp8 tensor cores (compute capability below 8.9) or in a kind other than
    /// bf16 or fp16.
    pub fn set_fp8_products(&mut self, products: lora::Fp8Products) -> Result<usize> {
        if products != lora::Fp8Products::Widened {
            if !matches!(self.kind, Kind::BFloat16 | Kind::Half) {
                return Err(Error::InvalidSetting {
                    setting: "fp8 products",
                    value: format!("{:?}", self.kind),
                    expected: "a pipeline in bf16 or fp16",
                });
            }
            if let Some(problem) = torch_cuda::fp8::unsupported_device(self.device) {
                return Err(Error::InvalidSetting {
                    setting: "fp8 products",
                    value: problem,
                    expected: "a GPU with fp8 tensor cores (compute capability 8.9 or newer: Ada, \
                               Hopper, Blackwell) or the CPU",
                });
            }
        }
        Ok(lora::set_fp8_products(&mut self.unet, products))
    }

    /// The pipeline's UNet and scheduler config, borrowed for a denoising run.
    pub fn denoiser(&self) -> Denoiser<'_> {
        Denoiser {
            unet: &self.unet,
            scheduler_config: &self.scheduler_config,
            vae_scale_factor: self.vae.config().downscale_factor(),
            device: self.device,
            kind: self.kind,
        }
    }

    /// The shape of the initial latents for these options.
    pub fn latent_shape(&self, options: &GenerateOptions) -> [i64; 4] {
        self.denoiser().latent_shape(options)
    }

    /// A lower bound of the memory generating `options` needs ([`GenerationMemory`]); [`Self::latents`]
    /// refuses an estimate above [`MAX_GENERATION_BYTES`] before it makes any tensor.
    pub fn memory_estimate(&self, options: &GenerateOptions) -> GenerationMemory {
        let unet_channels = self
            .unet
            .config()
            .levels
            .first()
            .map_or(1, |level| level.channels);
        GenerationMemory::estimate(
            options,
            unet_channels,
            (self.vae.config(), self.vae.weight_kind()),
            self.kind,
            self.vae.tile_side(),
        )
    }

    /// Runs the denoising loop and returns the final latents (diffusers' `output_type="latent"`).
    ///
    /// # Shapes
    /// `n` prompts, `k` images per prompt → `[n·k, 4, height/8, width/8]` in the pipeline's kind.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for a size that is not a multiple of 8 or needs more memory than
    /// [`MAX_GENERATION_BYTES`], no prompts or a bad batch;
    /// [`Error::Shape`] for `initial_noise` of another shape or negatives of another count;
    /// scheduler and model errors.
    pub fn latents(&self, options: &GenerateOptions) -> Result<Tensor> {
        self.denoiser().check(options)?;
        self.memory_estimate(options).check(options)?;
        let (positive, negative) = tch::no_grad(|| {
            self.prompt_encoder
                .encode_with_negative(&options.prompts, options.negative_prompts.as_deref())
        })?;
        self.denoise(&positive, &negative, options)
    }

    /// The denoising loop on already encoded prompts (`positive` and `negative`: one row per prompt).
    ///
    /// # Errors
    /// As [`Self::latents`].
    pub fn denoise(
        &self,
        positive: &PromptEmbeds,
        negative: &PromptEmbeds,
        options: &GenerateOptions,
    ) -> Result<Tensor> {
        self.denoiser().denoise(positive, negative, options)
    }

    /// Decodes latents into 8-bit images: `latents / scaling_factor` through the VAE (in the VAE's
    /// weight type, tiled when enabled), then [−1, 1] → [0, 255] rounded.
    ///
    /// # Shapes
    /// `[batch, 4, h, w]` → images `[batch, 3, 8h, 8w]`.
    ///
    /// # Errors
    /// As [`AutoencoderKL::decode`].
    pub fn decode(&self, latents: &Tensor) -> Result<Images> {
        decode_images(&self.vae, latents)
    }

    /// Prompts to images: [`Self::latents`] then [`Self::decode`].
    ///
    /// # Errors
    /// As [`Self::latents`] and [`Self::decode`].
    pub fn generate(&self, options: &GenerateOptions) -> Result<Images> {
        self.decode(&self.latents(options)?)
    }
}

/// What the denoising loop needs, borrowed: a UNet, the scheduler config, the VAE's downscale factor,
/// and where and in which element type the UNet computes. A [`Pipeline`] lends one
/// ([`Pipeline::denoiser`]); a trainer builds one around the UNet it trains, to sample validation
/// images with the same sampler as final inference without keeping text encoders loaded.
#[derive(Debug, Clone, Copy)]
pub struct Denoiser<'a> {
    /// The denoiser (with whatever adapters it carries).
    pub unet: &'a UNet2DConditionModel,
    /// The config every run builds its sampler from.
    pub scheduler_config: &'a SchedulerConfig,
    /// Pixels per latent (8 for SDXL's VAE).
    pub vae_scale_factor: i64,
    /// The UNet's device.
    pub device: Device,
    /// The element type the UNet computes in.
    pub kind: Kind,
}

impl Denoiser<'_> {
    /// Checks the size and batch settings before any model runs.
    fn check(&self, options: &GenerateOptions) -> Result<()> {
        let factor = self.vae_scale_factor;
        for (setting, value) in [("height", options.height), ("width", options.width)] {
            if value <= 0 || value % factor != 0 {
                return Err(Error::InvalidSetting {
                    setting,
                    value: value.to_string(),
                    expected: "a positive multiple of the VAE's downscale factor (8 for SDXL)",
                });
            }
        }
        if options.images_per_prompt < 1 {
            return Err(Error::InvalidSetting {
                setting: "images_per_prompt",
                value: options.images_per_prompt.to_string(),
                expected: "at least 1",
            });
        }
        if !options.guidance_scale.is_finite() {
            return Err(Error::InvalidSetting {
                setting: "guidance_scale",
                value: options.guidance_scale.to_string(),
                expected: "a finite number",
            });
        }
        if !(0.0..=1.0).contains(&options.guidance_rescale) {
            return Err(Error::InvalidSetting {
                setting: "guidance_rescale",
                value: options.guidance_rescale.to_string(),
                expected: "a number in [0, 1]",
            });
        }
        Ok(())
    }

    /// The shape of the initial latents for these options.
    pub fn latent_shape(&self, options: &GenerateOptions) -> [i64; 4] {
        let factor = self.vae_scale_factor;
        let batch = options.prompts.len() as i64 * options.images_per_prompt;
        [
            batch,
            self.unet.config().in_channels,
            options.height / factor,
            options.width / factor,
        ]
    }

    /// The denoising loop on already encoded prompts (`positive` and `negative`: one row per prompt).
    ///
    /// # Errors
    /// As [`Pipeline::latents`].
    pub fn denoise(
        &self,
        positive: &PromptEmbeds,
        negative: &PromptEmbeds,
        options: &GenerateOptions,
    ) -> Result<Tensor> {
        self.check(options)?;
        let shape = self.latent_shape(options);
        let prompts = positive.context.size().first().copied().unwrap_or(0);
        if prompts == 0 || prompts != options.prompts.len() as i64 {
            return Err(Error::Shape {
                what: "prompt embeddings".into(),
                expected: format!(
                    "one row per prompt ({}, at least one)",
                    options.prompts.len()
                ),
                actual: format!("{:?}", positive.context.size()),
            });
        }
        // One seeded stream for the initial noise and then any ancestral step noise, as diffusers'
        // CPU generator: a generator of this call's own (others drawing in other threads change
        // nothing), through `torch_cuda::portable`: PyTorch's numbers on every CPU.
        // With `image_seeds`, one generator per image, each drawing its image's slice.
        let mut generators = match &options.image_seeds {
            None => vec![torch_cuda::rng::Generator::new(options.seed)?],
            Some(seeds) if seeds.len() as i64 == shape[0] => seeds
                .iter()
                .map(|&seed| torch_cuda::rng::Generator::new(seed))
                .collect::<std::result::Result<_, _>>()?,
            Some(seeds) => {
                return Err(Error::Shape {
                    what: "image seeds".into(),
                    expected: format!("one per image ({})", shape[0]),
                    actual: seeds.len().to_string(),
                });
            }
        };
        let initial = match &options.initial_noise {
            Some(noise) if noise.size() == shape => noise.shallow_clone(),
            Some(noise) => {
                return Err(Error::Shape {
                    what: "initial noise".into(),
                    expected: format!("{shape:?}"),
                    actual: format!("{:?}", noise.size()),
                });
            }
            None => draw_noise(&mut generators, &shape)?,
        };
        let mut scheduler = schedulers::build(options.scheduler, self.scheduler_config)?;
        scheduler.set_timesteps(options.steps)?;

        let guided = options.guidance_scale > 1.0;
        let repeat = |t: &Tensor| {
            t.repeat_interleave_self_int(options.images_per_prompt, Some(0), None::<i64>)
        };
        let (context, pooled) = (repeat(&positive.context), repeat(&positive.pooled));
        let (context, pooled) = if guided {
            let (neg_context, neg_pooled) = (repeat(&negative.context), repeat(&negative.pooled));
            (
                Tensor::cat(&[neg_context, context], 0),
                Tensor::cat(&[neg_pooled, pooled], 0),
            )
        } else {
            (context, pooled)
        };
        let context = context.to_device(self.device).to_kind(self.kind);
        let pooled = pooled.to_device(self.device).to_kind(self.kind);
        let size = (options.height, options.width);
        let rows = vec![add_time_ids(size, (0, 0), size); context.size()[0] as usize];
        let time_ids = add_time_ids_tensor(&rows, self.kind, self.device);

        // Fallible ops on the tensors whose size the user chose: an allocation that fails is an error.
        let mut latents = initial
            .f_to_device(self.device)?
            .f_to_kind(self.kind)?
            .f_mul_scalar(scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        let mut unet = DenoisingCall::new(
            self.unet,
            self.device,
            options.cuda_graph,
            (&context, &pooled, &time_ids),
        )?;
        tch::no_grad(|| -> Result<()> {
            for (done, &t) in timesteps.iter().enumerate() {
                let model_input = if guided {
                    Tensor::f_cat(&[&latents, &latents], 0)?
                } else {
                    latents.shallow_clone()
                };
                let model_input = scheduler.scale_model_input(&model_input)?;
                let prediction = unet.predict(&model_input, t)?;
                let prediction = if guided {
                    let halves = prediction.chunk(2, 0);
                    let guided = &halves[0] + (&halves[1] - &halves[0]) * options.guidance_scale;
                    if options.guidance_rescale > 0.0 {
                        rescale_noise_cfg(&guided, &halves[1], options.guidance_rescale)?
                    } else {
                        guided
                    }
                } else {
                    prediction
                };
                // diffusers draws a stochastic step's noise on the generator's device (the CPU)
                // in float32 here, then moves it to the latents.
                let noise = if scheduler.is_stochastic() {
                    let drawn = draw_noise(&mut generators, &latents.size())?;
                    Some(drawn.f_to_device(self.device)?.f_to_kind(latents.kind())?)
                } else {
                    None
                };
                latents = scheduler.step(&prediction, &latents, noise.as_ref())?;
                if let Some(on_step) = &options.on_step {
                    (on_step.0)(done + 1, timesteps.len());
                }
            }
            Ok(())
        })?;
        Ok(latents)
    }
}

/// Unit Gaussian noise of `shape` on the CPU in float32: all of it from the one generator, or with a
/// generator per image, each image's slice `[1, …]` from its own (diffusers' `randn_tensor` with a list).
fn draw_noise(generators: &mut [torch_cuda::rng::Generator], shape: &[i64]) -> Result<Tensor> {
    if let [generator] = generators {
        return Ok(torch_cuda::portable::randn_with(generator, shape)?);
    }
    let mut one = shape.to_vec();
    if let Some(first) = one.first_mut() {
        *first = 1;
    }
    let slices = generators
        .iter_mut()
        .map(|generator| torch_cuda::portable::randn_with(generator, &one))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&slices, 0)?)
}

/// The denoising loop's UNet call: eager, or (`cuda_graph`) eager for the first step, then captured
/// on static inputs and replayed. The conditioning tensors are the same at every step, so the graph
/// reads them where they are; the sample and the timestep are copied into the static inputs.
struct DenoisingCall<'a> {
    unet: &'a UNet2DConditionModel,
    conditioning: (&'a Tensor, &'a Tensor, &'a Tensor),
    device: Device,
    /// `Some(device index)` with `cuda_graph`.
    graph_device: Option<usize>,
    /// Once captured: the static sample and timestep, the graph and its output.
    captured: Option<(Tensor, Tensor, CudaGraph, Tensor)>,
}

impl<'a> DenoisingCall<'a> {
    fn new(
        unet: &'a UNet2DConditionModel,
        device: Device,
        cuda_graph: bool,
        conditioning: (&'a Tensor, &'a Tensor, &'a Tensor),
    ) -> Result<Self> {
        let graph_device = match (cuda_graph, device) {
            (false, _) => None,
            (true, Device::Cuda(index)) => Some(index),
            (true, device) => {
                return Err(Error::InvalidSetting {
                    setting: "cuda_graph",
                    value: format!("true on {device:?}"),
                    expected: "a CUDA device (CUDA graphs record GPU work)",
                });
            }
        };
        Ok(Self {
            unet,
            conditioning,
            device,
            graph_device,
            captured: None,
        })
    }

    fn eager(&self, sample: &Tensor, timestep: &Tensor) -> Result<Tensor> {
        let (context, pooled, time_ids) = self.conditioning;
        self.unet.forward(&UNetInputs {
            sample,
            timesteps: timestep,
            encoder_hidden_states: context,
            text_embeds: Some(pooled),
            time_ids: Some(time_ids),
        })
    }

    /// The UNet's prediction for `sample` at timestep `t`. With a graph the returned tensor is the
    /// graph's output, overwritten by the next call.
    fn predict(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let timestep = Tensor::from(t as f32).f_to_device(self.device)?;
        let graph_error = |e: torch_cuda::Error| Error::CudaGraph(e.to_string());
        if let Some((static_sample, static_timestep, graph, output)) = &mut self.captured {
            static_sample.f_copy_(sample)?;
            static_timestep.f_copy_(&timestep)?;
            graph.replay().map_err(graph_error)?;
            return Ok(output.shallow_clone());
        }
        // Eager (the first step with `cuda_graph` too: it warms up libtorch's lazy initialisation and
        // cuDNN's algorithm choice, which must not happen inside a capture).
        let prediction = self.eager(sample, &timestep)?;
        if let Some(index) = self.graph_device {
            let (static_sample, static_timestep) =
                (sample.f_detach_copy()?, timestep.f_detach_copy()?);
            let (graph, output) = CudaGraph::capture(index, None, CaptureMode::Global, || {
                self.eager(&static_sample, &static_timestep)
            })
            .map_err(graph_error)?;
            self.captured = Some((static_sample, static_timestep, graph, output?));
        }
        Ok(prediction)
    }
}

/// diffusers' `rescale_noise_cfg`: `guided · (σ_text / σ_guided)` mixed with `guided` by `rescale`, each
/// σ the standard deviation (Bessel-corrected, as `torch.std`) of one sample over all its other dimensions.
///
/// # Shapes
/// `guided`, `text`: `[batch, …]` → `[batch, …]`.
///
/// # Errors
/// libtorch errors (tensors of different shapes).
pub fn rescale_noise_cfg(guided: &Tensor, text: &Tensor, rescale: f64) -> Result<Tensor> {
    let dims: Vec<i64> = (1..guided.dim() as i64).collect();
    let std_text = text.f_std_dim(dims.as_slice(), true, true)?;
    let std_guided = guided.f_std_dim(dims.as_slice(), true, true)?;
    let rescaled = guided.f_mul(&std_text.f_div(&std_guided)?)?;
    Ok(rescaled
        .f_mul_scalar(rescale)?
        .f_add(&guided.f_mul_scalar(1.0 - rescale)?)?)
}

/// Decodes latents into 8-bit images: `latents / scaling_factor` through `vae` (in its weight type,
/// tiled when enabled), then [−1, 1] → [0, 255] rounded.
///
/// # Shapes
/// `[batch, 4, h, w]` → images `[batch, 3, 8h, 8w]`.
///
/// # Errors
/// As [`AutoencoderKL::decode`].
pub fn decode_images(vae: &AutoencoderKL, latents: &Tensor) -> Result<Images> {
    let images =
        tch::no_grad(|| vae.decode(&vae.unscale_latents(&latents.to_kind(vae.weight_kind()))))?;
    let chw = ((images.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .to_device(Device::Cpu);
    Ok(Images { chw })
}

/// Places images side by side in one row (equal heights), e.g. the base model's image left of the
/// LoRA's for the same seed and prompt.
///
/// # Errors
/// [`Error::Shape`] when no images are given or their heights differ.
pub fn grid_row(images: &[image::RgbImage]) -> Result<image::RgbImage> {
    let height = images
        .first()
        .map(|i| i.height())
        .ok_or_else(|| Error::Shape {
            what: "grid images".into(),
            expected: "at least one image".into(),
            actual: "none".into(),
        })?;
    if let Some(other) = images.iter().find(|i| i.height() != height) {
        return Err(Error::Shape {
            what: "grid images".into(),
            expected: format!("height {height}"),
            actual: format!("height {}", other.height()),
        });
    }
    let width = images.iter().map(|i| i.width()).sum();
    let mut grid = image::RgbImage::new(width, height);
    let mut left = 0;
    for image in images {
        image::imageops::replace(&mut grid, image, i64::from(left), 0);
        left += image.width();
    }
    Ok(grid)
}

/// Stacks rows of equal width top to bottom.
///
/// # Errors
/// [`Error::Shape`] when no rows are given or their widths differ.
pub fn grid_column(rows: &[image::RgbImage]) -> Result<image::RgbImage> {
    let width = rows
        .first()
        .map(|i| i.width())
        .ok_or_else(|| Error::Shape {
            what: "grid rows".into(),
            expected: "at least one row".into(),
            actual: "none".into(),
        })?;
    if let Some(other) = rows.iter().find(|i| i.width() != width) {
        return Err(Error::Shape {
            what: "grid rows".into(),
            expected: format!("width {width}"),
            actual: format!("width {}", other.width()),
        });
    }
    let height = rows.iter().map(|i| i.height()).sum();
    let mut grid = image::RgbImage::new(width, height);
    let mut top = 0;
    for row in rows {
        image::imageops::replace(&mut grid, row, 0, i64::from(top));
        top += row.height();
    }
    Ok(grid)
}
