//! What every `from_pretrained` of this crate takes and gives back: where the weights go
//! ([`LoadOptions`]: device, element type, file variant, the configs a single file lacks) and the
//! loaded model with the store that owns its variables and the loader's report ([`Loaded`]).
//!
//! Follows the keyword arguments of diffusers' `ModelMixin.from_pretrained` (`torch_dtype`,
//! `variant`, `device_map`) and its `from_single_file(…, config=)`.

use std::path::PathBuf;

use tch::nn::VarStore;
use tch::{Device, Kind};

use crate::weights::LoadReport;

/// Where and how a model's weights are loaded.
///
/// Build it with [`Default`] and the setters, or with struct update syntax inside this crate:
///
/// ```
/// use sdxl_model::pretrained::LoadOptions;
/// use tch::{Device, Kind};
///
/// let options = LoadOptions::default().device(Device::Cpu).kind(Kind::BFloat16).variant("fp16");
/// assert_eq!(options.variant.as_deref(), Some("fp16"));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LoadOptions {
    /// The device the variables are created on (default: the CPU).
    pub device: Device,
    /// The element type the variables are created in (diffusers' `torch_dtype`; default fp32).
    pub kind: Kind,
    /// The weight file variant (`Some("fp16")` reads `diffusion_pytorch_model.fp16.safetensors`);
    /// `None` reads the plain names.
    pub variant: Option<String>,
    /// For a single-file checkpoint: a diffusers SDXL folder whose `unet/config.json` (and the other
    /// components' configs) describe it, as diffusers' `from_single_file(…, config=)`; `None` means
    /// SDXL base 1.0's configs.
    pub single_file_config: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            kind: Kind::Float,
            variant: None,
            single_file_config: None,
        }
    }
}

impl LoadOptions {
    /// Sets [`Self::device`].
    #[must_use]
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Sets [`Self::kind`].
    #[must_use]
    pub fn kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// Sets [`Self::variant`].
    #[must_use]
    pub fn variant(mut self, variant: impl Into<String>) -> Self {
        self.variant = Some(variant.into());
        self
    }

    /// Sets [`Self::single_file_config`].
    #[must_use]
    pub fn single_file_config(mut self, folder: impl Into<PathBuf>) -> Self {
        self.single_file_config = Some(folder.into());
        self
    }
}

/// A model as a `from_pretrained` returns it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Loaded<M> {
    /// The model.
    pub model: M,
    /// The store that owns the model's variables (freeze it for LoRA training; keep it alive as long
    /// as the model).
    pub store: VarStore,
    /// What the loader matched: every variable loaded, and the file keys it left alone (for a single
    /// file, those of the other components are not counted).
    pub report: LoadReport,
}
