//! AutoencoderKL, the SDXL VAE: images ↔ latents, with tiling and batch slicing.
//!
//! Follows diffusers `models/autoencoders/autoencoder_kl.py` (`AutoencoderKL`) and
//! `models/autoencoders/vae.py` (`DiagonalGaussianDistribution`). Variable names equal the keys of
//! diffusers' `vae/diffusion_pytorch_model.safetensors`, so the file loads without renaming.
//!
//! The SDXL VAE overflows in fp16 (`force_upcast` in its config); [`Upcast`] keeps its weights in
//! fp32 while inputs and outputs stay in the caller's type.

mod blocks;
mod coder;
pub mod single_file;
mod tiling;

use std::path::Path;

use serde::Deserialize;
use tch::nn;
use tch::{Kind, Tensor};

pub use blocks::{
    DownEncoderBlock2D, ResnetBlock2D, UNetMidBlock2D, UpDecoderBlock2D, VaeAttention,
};
pub use coder::{Decoder, Encoder};
pub use tiling::VaeTiling;

use crate::attention::AttentionBackend;
use crate::pretrained::{LoadOptions, Loaded, model_folder, with_variant};
use crate::weights::{TensorFile, load_into};
use crate::{Error, Result};

/// `sample_size` may be one number or `[height, width]` in diffusers configs; tiling uses the first.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
enum SampleSize {
    Square(i64),
    HeightWidth([i64; 2]),
}

/// The `vae/config.json` of a diffusers AutoencoderKL, field names as there. Unknown keys
/// (`_class_name`, `latents_mean`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: i64,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: i64,
    /// One `DownEncoderBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// One `UpDecoderBlock2D` per level.
    pub up_block_types: Vec<String>,
    /// Widths of the levels, from the image side.
    pub block_out_channels: Vec<i64>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub layers_per_block: i64,
    /// Activation; only `silu` exists in SDXL-family VAEs.
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Latent channels (4 for SDXL).
    pub latent_channels: i64,
    /// Groups of every group norm.
    pub norm_num_groups: i64,
    /// The image size the VAE was trained at: the default tile size.
    #[serde(default = "default_sample_size")]
    sample_size: SampleSize,
    /// Latents are `scaling_factor × (z − shift_factor)` of the VAE's sample `z`.
    pub scaling_factor: f64,
    /// See `scaling_factor`; absent (`null`) for SDXL.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether the model must run in fp32 when loaded in fp16.
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// Whether the 1×1 `quant_conv` follows the encoder.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether the 1×1 `post_quant_conv` precedes the decoder.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their attention layer.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> i64 {
    3
}
fn silu() -> String {
    "silu".into()
}
fn yes() -> bool {
    true
}
fn default_sample_size() -> SampleSize {
    SampleSize::Square(32)
}

impl AutoencoderKLConfig {
    /// `stabilityai/stable-diffusion-xl-base-1.0/vae/config.json`.
    pub fn sdxl() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: silu(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::Square(1024),
            scaling_factor: 0.13025,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    /// A three-level VAE of widths 16/32/32 for tests (the `tiny-sdxl/vae` fixture's shape).
    pub fn tiny() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 3],
            up_block_types: vec!["UpDecoderBlock2D".into(); 3],
            block_out_channels: vec![16, 32, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            sample_size: SampleSize::Square(32),
            ..Self::sdxl()
        }
    }

    /// Reads a diffusers `config.json` and checks it.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::ConfigJson`], or [`Error::InvalidConfig`] from [`Self::validate`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let config: Self = crate::config_file::read_config_json(path.as_ref())?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects configs this implementation cannot build.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let invalid =
            |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return invalid("block_out_channels", "must not be empty".into());
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return invalid(
                "down_block_types",
                format!("`{t}` is not supported (only DownEncoderBlock2D)"),
            );
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return invalid(
                "up_block_types",
                format!("`{t}` is not supported (only UpDecoderBlock2D)"),
            );
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return invalid(
                "down_block_types",
                format!("need one down and one up block per level ({levels})"),
            );
        }
        if self.act_fn != "silu" {
            return invalid(
                "act_fn",
                format!("`{}` is not supported (only silu)", self.act_fn),
            );
        }
        if self.norm_num_groups <= 0 {
            return invalid(
                "norm_num_groups",
                format!("{} is not positive", self.norm_num_groups),
            );
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c <= 0 || c % self.norm_num_groups != 0)
        {
            return invalid(
                "block_out_channels",
                format!("{c} is not a positive multiple of norm_num_groups"),
            );
        }
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
        ] {
            if value <= 0 {
                return invalid(field, format!("{value} is not positive"));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return invalid(
                "scaling_factor",
                format!("{} is not a finite non-zero number", self.scaling_factor),
            );
        }
        Ok(())
    }

    /// The image size the VAE was trained at (the first entry when the config gives two).
    pub fn sample_size(&self) -> i64 {
        match self.sample_size {
            SampleSize::Square(size) | SampleSize::HeightWidth([size, _]) => size,
        }
    }

    /// How many pixels one latent covers per side: `2^(levels − 1)` (8 for SDXL).
    pub fn downscale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Where the VAE's weights live relative to the type it is loaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upcast {
    /// Keep the weights in fp32 when asked for fp16 and the config says `force_upcast` (diffusers'
    /// pipelines do the same).
    FromConfig,
    /// Always keep the weights in fp32.
    Always,
    /// Keep the weights in the type asked for.
    Never,
}

/// The element type a VAE loaded in `kind` keeps its weights in.
fn weight_kind_for(config: &AutoencoderKLConfig, kind: Kind, upcast: Upcast) -> Kind {
    let keep_fp32 = match upcast {
        Upcast::Always => true,
        Upcast::FromConfig => kind == Kind::Half && config.force_upcast,
        Upcast::Never => false,
    };
    if keep_fp32 { Kind::Float } else { kind }
}

/// A diagonal Gaussian over latents, as the encoder returns it.
#[derive(Debug)]
pub struct DiagonalGaussian {
    /// The mean, `[batch, latent_channels, h, w]`.
    pub mean: Tensor,
    /// The log-variance, clamped to [−30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments `[batch, 2·latent_channels, h, w]` into mean and log-variance.
    fn from_moments(moments: &Tensor) -> Self {
        let latent_channels = moments.size()[1] / 2;
        let mean = moments.narrow(1, 0, latent_channels);
        let logvar = moments
            .narrow(1, latent_channels, latent_channels)
            .clamp(-30.0, 20.0);
        Self { mean, logvar }
    }

    /// The standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// `mean + std · noise` for caller-supplied standard normal `noise` of the mean's shape: tch exposes
    /// no `torch.Generator`, so a reproducible sample takes its noise from the caller.
    ///
    /// # Errors
    /// [`Error::Shape`] when `noise` does not have the mean's shape.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.size() != self.mean.size() {
            return Err(Error::Shape {
                what: "posterior noise".into(),
                expected: format!("{:?}", self.mean.size()),
                actual: format!("{:?}", noise.size()),
            });
        }
        Ok(&self.mean + self.std() * noise.to_kind(self.mean.kind()))
    }

    /// `mean + std · ε` with ε drawn from libtorch's default generator on the mean's device.
    pub fn sample(&self) -> Tensor {
        &self.mean + self.std() * self.mean.randn_like()
    }
}

/// diffusers `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
    tiling: Option<VaeTiling>,
    slicing: bool,
}

impl AutoencoderKL {
    /// Creates the model's variables under `path` (the root, for a diffusers file).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for configs [`AutoencoderKLConfig::validate`] rejects.
    pub fn new(path: &nn::Path, config: &AutoencoderKLConfig) -> Result<Self> {
        config.validate()?;
        let moments = 2 * config.latent_channels;
        let latents = config.latent_channels;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(&(path / "encoder"), config),
            decoder: Decoder::new(&(path / "decoder"), config),
            quant_conv: config
                .use_quant_conv
                .then(|| blocks::conv2d(path / "quant_conv", moments, moments, 1, 1, 0)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| blocks::conv2d(path / "post_quant_conv", latents, latents, 1, 1, 0)),
            tiling: None,
            slicing: false,
        })
    }

    /// Loads a VAE as diffusers' `AutoencoderKL.from_pretrained` does: `name` is a diffusers `vae/`
    /// folder (`config.json` and `diffusion_pytorch_model.safetensors`, or the file of
    /// [`LoadOptions::variant`]), a diffusers SDXL folder holding one (or [`LoadOptions::subfolder`]),
    /// or a hub repository id of either, whose VAE files alone are fetched (see
    /// [`crate::pretrained`]). The weights go to [`LoadOptions::device`] in [`LoadOptions::kind`], in
    /// fp32 where [`LoadOptions::vae_upcast`] says so.
    ///
    /// # Errors
    /// [`Error::NoSuchFolder`], [`Error::Hub`], [`Error::WeightFiles`] naming the folder or
    /// repository; file and config errors; [`Error::Load`] when the file's tensors do not match the
    /// model one to one.
    pub fn from_pretrained(name: impl AsRef<Path>, options: &LoadOptions) -> Result<Loaded<Self>> {
        const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
        let folder = model_folder(name.as_ref(), options, Some("vae"), WEIGHTS)?;
        let config = AutoencoderKLConfig::from_file(folder.join("config.json"))?;
        let mut store = nn::VarStore::new(options.device);
        let model = Self::new(&store.root(), &config)?;
        let file =
            TensorFile::open(folder.join(with_variant(WEIGHTS, options.variant.as_deref())))?;
        let report = load_into(&store, &[file], str::to_owned)?;
        store.set_kind(weight_kind_for(&config, options.kind, options.vae_upcast));
        Ok(Loaded {
            model,
            store,
            report,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Encodes and decodes in overlapping tiles whenever an input is larger than one tile (`None`
    /// turns tiling off). Bounds peak memory at the cost of small seam differences.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for an overlap outside [0, 1) or a tile size that is not a positive
    /// multiple of [`AutoencoderKLConfig::downscale_factor`]; tiling is then left as it was.
    pub fn set_tiling(&mut self, tiling: Option<VaeTiling>) -> Result<()> {
        if let Some(tiling) = &tiling {
            tiling.validate(&self.config)?;
        }
        self.tiling = tiling;
        Ok(())
    }

    /// The tile side in pixels when tiling is on.
    pub fn tile_side(&self) -> Option<i64> {
        self.tiling
            .as_ref()
            .map(|t| t.sample_tile.unwrap_or_else(|| self.config.sample_size()))
    }

    /// Encodes and decodes one sample of the batch at a time.
    pub fn set_slicing(&mut self, slicing: bool) {
        self.slicing = slicing;
    }

    /// Chooses the kernels of the mid blocks' attention.
    pub fn set_attention_backend(&mut self, backend: AttentionBackend) {
        self.encoder.set_backend(backend);
        self.decoder.set_backend(backend);
    }

    /// The element type the model computes in (its weights').
    pub fn weight_kind(&self) -> Kind {
        self.encoder.kind()
    }

    fn check_input(&self, what: &str, xs: &Tensor, channels: i64) -> Result<()> {
        match xs.size().as_slice() {
            &[batch, c, h, w] if c == channels && batch > 0 && h > 0 && w > 0 => Ok(()),
            other => Err(Error::Shape {
                what: what.into(),
                expected: format!("[batch, {channels}, height, width]"),
                actual: format!("{other:?}"),
            }),
        }
    }

    /// Encoder moments (before the Gaussian split) of one batch, tiled when enabled and large enough.
    fn moments(&self, images: &Tensor) -> Result<Tensor> {
        if let Some(tiling) = &self.tiling {
            let (_, _, height, width) = images.size4()?;
            let tile = tiling.sample_tile(&self.config);
            if height > tile || width > tile {
                return tiling.encode(self, images);
            }
        }
        self.encode_tile(images)
    }

    pub(crate) fn encode_tile(&self, images: &Tensor) -> Result<Tensor> {
        let moments = self.encoder.forward(images)?;
        Ok(match &self.quant_conv {
            Some(conv) => moments.apply(conv),
            None => moments,
        })
    }

    pub(crate) fn decode_tile(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = match &self.post_quant_conv {
            Some(conv) => latents.apply(conv),
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&latents)
    }

    /// Encodes images in [−1, 1] into the latent posterior (unscaled: see [`Self::scale_latents`]).
    /// The posterior is in the weights' element type.
    ///
    /// # Shapes
    /// `[batch, in_channels, h, w]` → mean and log-variance `[batch, latent_channels, h/8, w/8]` (SDXL).
    ///
    /// # Errors
    /// [`Error::Shape`] for inputs that are not `[batch, in_channels, h, w]`.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        self.check_input("VAE encode input", images, self.config.in_channels)?;
        let images = images.to_kind(self.weight_kind());
        let moments = if self.slicing {
            let slices = images
                .split(1, 0)
                .iter()
                .map(|x| self.moments(x))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&slices, 0)
        } else {
            self.moments(&images)?
        };
        Ok(DiagonalGaussian::from_moments(&moments))
    }

    /// Decodes (unscaled) latents into images, returned in the latents' element type.
    ///
    /// # Shapes
    /// `[batch, latent_channels, h, w]` → `[batch, out_channels, 8h, 8w]` (SDXL).
    ///
    /// # Errors
    /// [`Error::Shape`] for inputs that are not `[batch, latent_channels, h, w]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_input("VAE decode input", latents, self.config.latent_channels)?;
        let io_kind = latents.kind();
        let latents = latents.to_kind(self.weight_kind());
        let decode_batch = |z: &Tensor| -> Result<Tensor> {
            if let Some(tiling) = &self.tiling {
                let (_, _, height, width) = z.size4()?;
                let tile = tiling.latent_tile(&self.config);
                if height > tile || width > tile {
                    return tiling.decode(self, z);
                }
            }
            self.decode_tile(z)
        };
        let images = if self.slicing {
            let slices = latents
                .split(1, 0)
                .iter()
                .map(decode_batch)
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&slices, 0)
        } else {
            decode_batch(&latents)?
        };
        Ok(images.to_kind(io_kind))
    }

    /// VAE sample → UNet latents: `scaling_factor · (z − shift_factor)`.
    pub fn scale_latents(&self, z: &Tensor) -> Tensor {
        (z - self.config.shift_factor.unwrap_or(0.0)) * self.config.scaling_factor
    }

    /// UNet latents → VAE sample, the inverse of [`Self::scale_latents`].
    pub fn unscale_latents(&self, latents: &Tensor) -> Tensor {
        latents / self.config.scaling_factor + self.config.shift_factor.unwrap_or(0.0)
    }
}

impl lora::HasLinears for AutoencoderKL {
    fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut lora::Linear)) {
        self.encoder
            .mid_block_mut()
            .for_each_linear("encoder.mid_block.", f);
        self.decoder
            .mid_block_mut()
            .for_each_linear("decoder.mid_block.", f);
    }
}
