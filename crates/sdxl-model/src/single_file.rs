//! A whole SDXL model in one SGM / LDM single-file checkpoint (`sd_xl_base_1.0.safetensors` and the
//! community checkpoints built on it): the UNet under `model.diffusion_model.`, the VAE under
//! `first_stage_model.`, CLIP-L under `conditioner.embedders.0.transformer.` and OpenCLIP bigG under
//! `conditioner.embedders.1.model.`, as diffusers' `scripts/convert_diffusers_to_original_sdxl.py`
//! writes them and its `from_single_file` reads them.
//!
//! The file carries no configs. diffusers' `from_single_file` infers SDXL base's (`xl_base`) for such a
//! file, or takes a diffusers folder or repository with `config=`; [`SdxlConfigs`] is that choice.
//! Each component is loaded on its own by its loader ([`crate::unet::loading::load_unet`],
//! [`crate::clip::single_file`], [`crate::vae::single_file`]), one tensor at a time in the model's
//! element type; a component with a missing, unused or mis-shaped key under its prefix fails with
//! [`crate::Error::Load`] naming the file and the keys. Keys outside the four components (EMA copies, the
//! `v_pred` / `ztsnr` markers below) are listed by [`SingleFileCheckpoint::other_keys`].
//!
//! Community v-prediction checkpoints mark themselves with an empty tensor named `v_pred`, and those
//! trained with zero terminal SNR add `ztsnr`: ComfyUI's `comfy/supported_models.py` (`SDXL.model_type`)
//! samples such a file as v-prediction, with ZTSNR when `ztsnr` is present ([`Markers`]).

use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind};

use crate::Result;
use crate::clip::ClipTextConfig;
use crate::clip::single_file::{BIG_G_PREFIX, CLIP_L_PREFIX};
use crate::prompt::PromptEncoder;
use crate::schedulers::SchedulerConfig;
use crate::unet::loading::{UNetWeights, load_unet};
use crate::unet::{SGM_UNET_PREFIX, UNet2DConditionModel, UNetConfig};
use crate::vae::single_file::{VAE_PREFIX, load_vae};
use crate::vae::{AutoencoderKL, AutoencoderKLConfig, Upcast};
use crate::weights::TensorFile;

/// The key prefix of each component of an SGM single file, with the component's diffusers name.
pub const COMPONENT_PREFIXES: [(&str, &str); 4] = [
    ("unet", SGM_UNET_PREFIX),
    ("vae", VAE_PREFIX),
    ("text_encoder", CLIP_L_PREFIX),
    ("text_encoder_2", BIG_G_PREFIX),
];

/// The configs of the four components and the scheduler, which a single file does not carry.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SdxlConfigs {
    /// The UNet's.
    pub unet: UNetConfig,
    /// CLIP-L's.
    pub text_encoder: ClipTextConfig,
    /// OpenCLIP bigG's (with its projection).
    pub text_encoder_2: ClipTextConfig,
    /// The VAE's.
    pub vae: AutoencoderKLConfig,
    /// The scheduler's.
    pub scheduler: SchedulerConfig,
}

impl SdxlConfigs {
    /// `stabilityai/stable-diffusion-xl-base-1.0`'s configs, which diffusers' `from_single_file` infers
    /// for an SDXL base checkpoint (`xl_base`).
    pub fn sdxl_base() -> Self {
        Self {
            unet: UNetConfig::sdxl_base(),
            text_encoder: ClipTextConfig::clip_l(),
            text_encoder_2: ClipTextConfig::open_clip_big_g(),
            vae: AutoencoderKLConfig::sdxl(),
            scheduler: SchedulerConfig::sdxl(),
        }
    }

    /// The configs of a diffusers SDXL folder: `unet/`, `vae/`, `text_encoder/` and `text_encoder_2/`
    /// `config.json`, and `scheduler/scheduler_config.json` when present (else SDXL's), as diffusers'
    /// `from_single_file(…, config=folder)` reads them. Weight files need not be there.
    ///
    /// # Errors
    /// File and config errors naming the file.
    pub fn from_diffusers_folder(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let scheduler_file = root.join("scheduler").join("scheduler_config.json");
        Ok(Self {
            unet: UNetConfig::from_file(root.join("unet").join("config.json"))?,
            text_encoder: ClipTextConfig::from_file(root.join("text_encoder").join("config.json"))?,
            text_encoder_2: ClipTextConfig::from_file(
                root.join("text_encoder_2").join("config.json"),
            )?,
            vae: AutoencoderKLConfig::from_file(root.join("vae").join("config.json"))?,
            scheduler: if scheduler_file.is_file() {
                SchedulerConfig::from_file(&scheduler_file)?
            } else {
                SchedulerConfig::sdxl()
            },
        })
    }
}

/// The marker keys of community v-prediction checkpoints (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Markers {
    /// The file has a `v_pred` key: the model predicts v.
    pub v_pred: bool,
    /// The file has a `ztsnr` key: the model was trained with zero terminal SNR.
    pub ztsnr: bool,
}

/// An SGM single-file SDXL checkpoint whose header has been read, with the configs to build it by.
pub struct SingleFileCheckpoint {
    path: PathBuf,
    file: TensorFile,
    configs: SdxlConfigs,
}

impl std::fmt::Debug for SingleFileCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFileCheckpoint")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SingleFileCheckpoint {
    /// Reads the header of `path`.
    ///
    /// # Errors
    /// As [`TensorFile::open`].
    pub fn open(path: impl AsRef<Path>, configs: SdxlConfigs) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        Ok(Self {
            file: TensorFile::open(&path)?,
            path,
            configs,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configs the components are built by.
    pub fn configs(&self) -> &SdxlConfigs {
        &self.configs
    }

    /// The file's tensors.
    pub fn tensors(&self) -> &TensorFile {
        &self.file
    }

    /// The `v_pred` / `ztsnr` markers the file carries.
    ///
    /// # Errors
    /// Never in practice (the header was read by [`Self::open`]).
    pub fn markers(&self) -> Result<Markers> {
        let keys = self.file.keys()?;
        let has = |name: &str| keys.iter().any(|k| k == name);
        Ok(Markers {
            v_pred: has("v_pred"),
            ztsnr: has("ztsnr"),
        })
    }

    /// The keys of no component (not under any of [`COMPONENT_PREFIXES`]): nothing loads them.
    ///
    /// # Errors
    /// Never in practice (the header was read by [`Self::open`]).
    pub fn other_keys(&self) -> Result<Vec<String>> {
        Ok(self
            .file
            .keys()?
            .into_iter()
            .filter(|k| !COMPONENT_PREFIXES.iter().any(|(_, p)| k.starts_with(p)))
            .collect())
    }

    /// How many tensors the file holds under each component's prefix.
    ///
    /// # Errors
    /// Never in practice (the header was read by [`Self::open`]).
    pub fn component_keys(&self) -> Result<Vec<(&'static str, usize)>> {
        let keys = self.file.keys()?;
        Ok(COMPONENT_PREFIXES
            .iter()
            .map(|(name, prefix)| (*name, keys.iter().filter(|k| k.starts_with(prefix)).count()))
            .collect())
    }

    /// The UNet with its variables in `kind` on `device`, each tensor converted on its own.
    ///
    /// # Errors
    /// [`crate::Error::Load`] naming the file and the keys that do not match.
    pub fn load_unet(
        &self,
        device: Device,
        kind: Kind,
    ) -> Result<(VarStore, UNet2DConditionModel)> {
        load_unet(
            &self.configs.unet,
            &UNetWeights::SingleFile(self.path.clone()),
            device,
            kind,
        )
    }

    /// Both text encoders (and tokenizers) in `kind` on `device`.
    ///
    /// # Errors
    /// As [`PromptEncoder::from_single_file`].
    pub fn load_prompt_encoder(
        &self,
        device: Device,
        kind: Kind,
    ) -> Result<(PromptEncoder, [VarStore; 2])> {
        PromptEncoder::from_single_file(
            &self.file,
            [&self.configs.text_encoder, &self.configs.text_encoder_2],
            device,
            kind,
        )
    }

    /// The VAE, its weights' element type chosen from `kind` and `upcast` as
    /// [`AutoencoderKL::from_pretrained`] does.
    ///
    /// # Errors
    /// As [`load_vae`].
    pub fn load_vae(
        &self,
        device: Device,
        kind: Kind,
        upcast: Upcast,
    ) -> Result<(AutoencoderKL, VarStore)> {
        load_vae(&self.file, &self.configs.vae, device, kind, upcast)
    }
}
