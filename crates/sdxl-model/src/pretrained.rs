//! What every `from_pretrained` of this crate takes and gives back: where the weights go
//! ([`LoadOptions`]: device, element type, file variant, the configs a single file lacks) and the
//! loaded model with the store that owns its variables and the loader's report ([`Loaded`]).
//!
//! Follows the keyword arguments of diffusers' `ModelMixin.from_pretrained` (`torch_dtype`,
//! `variant`, `revision`, `subfolder`, `device_map`) and its `from_single_file(…, config=)`.
//!
//! Every `from_pretrained` takes a name as diffusers does: an existing folder (or, for the UNet and
//! the pipeline, an SGM single file) is read in place; a name of the form of a hub repository id
//! ([`crate::hub::is_repo_id`]: `owner/name`) is fetched from the hub, only the files that model
//! reads ([`crate::hub`]); a hub file (`https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>`
//! or `<owner>/<repo>/<file>.safetensors`) is a single file fetched alone; anything else is a local
//! path that does not exist, [`crate::Error::NoSuchFolder`].

use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind};

use crate::hub::{self, Part, Wanted};
use crate::vae::Upcast;
use crate::weights::LoadReport;
use crate::{Error, Result};

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
/// assert_eq!(options.revision, "main");
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
    /// (a local folder or a hub repository id, whose configs alone are fetched.)
    pub single_file_config: Option<PathBuf>,
    /// The hub revision (branch, tag or commit) a repository id is read at (default `main`);
    /// unused for local paths.
    pub revision: String,
    /// The model's folder inside the named folder or repository (diffusers' `subfolder=`, e.g.
    /// `text_encoder_2`); `None`: the folder itself when it has `config.json`, else the model's
    /// usual subfolder (`unet/`, `vae/`; the text encoders have none). Unused by the prompt encoder
    /// and the pipeline, which read their components' usual subfolders.
    pub subfolder: Option<String>,
    /// Whether a VAE keeps fp32 weights when loaded in another kind (default
    /// [`Upcast::FromConfig`], as diffusers' pipelines); unused by the other models.
    pub vae_upcast: Upcast,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            kind: Kind::Float,
            variant: None,
            single_file_config: None,
            revision: "main".to_owned(),
            subfolder: None,
            vae_upcast: Upcast::FromConfig,
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

    /// Sets [`Self::revision`].
    #[must_use]
    pub fn revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    /// Sets [`Self::subfolder`].
    #[must_use]
    pub fn subfolder(mut self, subfolder: impl Into<String>) -> Self {
        self.subfolder = Some(subfolder.into());
        self
    }

    /// Sets [`Self::vae_upcast`].
    #[must_use]
    pub fn vae_upcast(mut self, upcast: Upcast) -> Self {
        self.vae_upcast = upcast;
        self
    }
}

/// A diffusers weight or index file name with `variant` inserted before the last extension as
/// diffusers does (`diffusion_pytorch_model.fp16.safetensors`,
/// `diffusion_pytorch_model.safetensors.index.fp16.json`); the name itself for `None`.
pub fn with_variant(name: &str, variant: Option<&str>) -> String {
    match (variant, name.rsplit_once('.')) {
        (Some(v), Some((stem, ext))) => format!("{stem}.{v}.{ext}"),
        _ => name.to_owned(),
    }
}

/// What a name given to a `from_pretrained` is, once hub names are fetched.
#[derive(Debug)]
pub(crate) enum Source {
    /// A folder (the user's, or a hub snapshot holding the needed files).
    Folder(PathBuf),
    /// A single-file checkpoint (the user's, or fetched from the hub).
    File(PathBuf),
}

/// Resolves `name` (see the module documentation): an existing path as it is, a hub file fetched,
/// a repository id's snapshot holding what `wanted` names, else [`Error::NoSuchFolder`].
pub(crate) fn locate(name: &Path, options: &LoadOptions, wanted: &Wanted<'_>) -> Result<Source> {
    if name.is_file() {
        return Ok(Source::File(name.to_owned()));
    }
    if name.exists() {
        return Ok(Source::Folder(name.to_owned()));
    }
    let text = name.to_str().unwrap_or_default();
    if let Some((repo, revision, file)) = hub::hub_file(text) {
        let revision = revision.as_deref().unwrap_or(&options.revision);
        return Ok(Source::File(hub::download_file(&repo, revision, &file)?));
    }
    if hub::is_repo_id(text) {
        let (root, _) = hub::download(text, &options.revision, wanted)?;
        return Ok(Source::Folder(root));
    }
    Err(Error::NoSuchFolder {
        path: name.to_owned(),
    })
}

/// Resolves the name of one model folder ([`LoadOptions::subfolder`], else the folder itself when
/// it has `config.json`, else `default`) to the local folder holding its `config.json`.
pub(crate) fn model_folder(
    name: &Path,
    options: &LoadOptions,
    default: Option<&str>,
    weights: &str,
) -> Result<PathBuf> {
    let part = [Part {
        subfolder: options.subfolder.as_deref(),
        default,
        weights,
    }];
    let wanted = Wanted::Parts {
        parts: &part,
        variant: options.variant.as_deref(),
        optional: &[],
    };
    match locate(name, options, &wanted)? {
        Source::Folder(root) => pick_folder(&root, options.subfolder.as_deref(), default),
        Source::File(path) => Err(Error::WeightFiles {
            path,
            reason: "a file, not a model folder".into(),
        }),
    }
}

/// The folder of [`LoadOptions::single_file_config`]: a local folder, or a hub repository whose
/// configs alone are fetched (at its `main` revision; [`LoadOptions::revision`] is the checkpoint's).
///
/// # Errors
/// [`Error::NoSuchFolder`] for a local path that does not exist; [`Error::Hub`].
pub(crate) fn single_file_configs(options: &LoadOptions) -> Result<Option<PathBuf>> {
    let Some(name) = &options.single_file_config else {
        return Ok(None);
    };
    if name.exists() {
        return Ok(Some(name.clone()));
    }
    match name.to_str().filter(|text| hub::is_repo_id(text)) {
        Some(repo) => Ok(Some(hub::download_configs(repo, "main")?)),
        None => Err(Error::NoSuchFolder { path: name.clone() }),
    }
}

/// `root/subfolder`, or `root` when it has `config.json`, or `root/default` when that has one.
pub(crate) fn pick_folder(
    root: &Path,
    subfolder: Option<&str>,
    default: Option<&str>,
) -> Result<PathBuf> {
    let has_config = |folder: &Path| folder.join("config.json").is_file();
    let chosen = match (subfolder, default) {
        (Some(sub), _) => Some(root.join(sub)),
        (None, _) if has_config(root) => Some(root.to_owned()),
        (None, Some(default)) => Some(root.join(default)),
        (None, None) => None,
    };
    match chosen {
        Some(folder) if has_config(&folder) => Ok(folder),
        _ => Err(Error::WeightFiles {
            path: root.to_owned(),
            reason: match (subfolder, default) {
                (Some(sub), _) => format!("no `{sub}/config.json`"),
                (None, Some(default)) => {
                    format!("neither `config.json` nor `{default}/config.json` exists")
                }
                (None, None) => {
                    "no `config.json` (name the model's subfolder with `LoadOptions::subfolder`)"
                        .to_owned()
                }
            },
        }),
    }
}

/// A model as a `from_pretrained` returns it. `S` is the store, or for models of several parts
/// (the prompt encoder, the pipeline) the stores, that own its variables.
#[derive(Debug)]
#[non_exhaustive]
pub struct Loaded<M, S = VarStore> {
    /// The model.
    pub model: M,
    /// The store that owns the model's variables (freeze it for LoRA training; keep it alive as long
    /// as the model).
    pub store: S,
    /// What the loader matched: every variable loaded, and the file keys it left alone (for a single
    /// file, those of the other components are not counted). For a model of several parts, their
    /// reports together, each key prefixed with its part's folder (`text_encoder_2/…`).
    pub report: LoadReport,
}

impl LoadReport {
    /// Adds `other`'s counts and keys to this report, each key prefixed with `part` and `/`.
    pub(crate) fn absorb(&mut self, part: &str, other: LoadReport) {
        let prefixed = |key: String| format!("{part}/{key}");
        self.loaded += other.loaded;
        self.missing.extend(other.missing.into_iter().map(prefixed));
        self.unused.extend(other.unused.into_iter().map(prefixed));
        self.mismatched.extend(
            other
                .mismatched
                .into_iter()
                .map(|(key, model, file)| (prefixed(key), model, file)),
        );
    }
}
