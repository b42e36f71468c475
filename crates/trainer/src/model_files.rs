//! Finding the base model: a local diffusers SDXL folder, or a hub repository whose needed files are
//! downloaded (with `hf-hub`, into the Hugging Face cache that Python's `huggingface_hub` shares); or
//! a single-file SGM checkpoint ([`resolve_model`]): a local `.safetensors` path (as kohya's scripts
//! take it), or a hub file named as diffusers' `from_single_file` takes it,
//! `https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>` (`/resolve/` too), or
//! `<owner>/<repo>/<file>.safetensors` at `--revision`, downloaded alone. `crate::single_file` reads
//! the models of either.
//!
//! Only what training and sampling read is fetched: each component's `config.json` and weights (the
//! `--variant` file, e.g. `model.fp16.safetensors`, when the repository has it), and
//! `scheduler/scheduler_config.json`. `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE`, `HF_TOKEN` and
//! `HF_HUB_OFFLINE` mean what they mean to huggingface_hub. The downloads are
//! [`sdxl_model::hub`]'s.

use std::path::{Path, PathBuf};

use sdxl_model::hub::{download_configs, download_file, download_sdxl};
use sdxl_model::pretrained::with_variant;

pub use sdxl_model::hub::hub_file;

use crate::config::TrainConfig;
use crate::{Error, Result};

/// A resolved base model: its folder and the weight variant to read there, or a single file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFolder {
    /// The diffusers folder (a hub snapshot, or the user's folder); for a single file, the folder
    /// holding it. Read the models through the methods of `crate::single_file`, which know both.
    pub root: PathBuf,
    /// The variant whose weight files exist there (`None`: the plain names).
    pub variant: Option<String>,
    /// The single-file checkpoint, when the model is one.
    pub single_file: Option<SingleFileModel>,
}

/// A single-file SGM checkpoint and where its components' configs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SingleFileModel {
    /// The `.safetensors` file (the user's, or the hub cache's).
    pub path: PathBuf,
    /// A diffusers folder with the components' `config.json` (`--single_file_config`); `None`: SDXL
    /// base's configs.
    pub config_folder: Option<PathBuf>,
}

/// The variant to use in `root`: `wanted` when its UNet file exists, else none (diffusers' folders
/// saved without variants are common locally).
fn local_variant(root: &Path, wanted: Option<&str>) -> Option<String> {
    let wanted = wanted?;
    let unet = root.join("unet");
    let exists = unet
        .join(with_variant(
            "diffusion_pytorch_model.safetensors",
            Some(wanted),
        ))
        .is_file()
        || unet
            .join(with_variant(
                "diffusion_pytorch_model.safetensors.index.json",
                Some(wanted),
            ))
            .is_file();
    exists.then(|| wanted.to_owned())
}

/// Resolves `--pretrained_model_name_or_path`: an existing folder is used as is; anything else is a
/// hub repository id whose needed files are fetched (or found in the cache when offline).
///
/// `variant` is used where its UNet weights exist: in the folder, in the repository's file list, or
/// (with `HF_HUB_OFFLINE`) in the cache; otherwise the plain file names are read. Online, the files
/// come from the commit `revision` names on the hub now; when the hub cannot be reached, a revision
/// the cache holds whole is used, as huggingface_hub does.
///
/// # Errors
/// [`Error::Hub`] naming the repository and the file; [`Error::InvalidOption`] for a folder without
/// `unet/config.json`.
pub fn resolve(name_or_path: &str, revision: &str, variant: Option<&str>) -> Result<ModelFolder> {
    let local = Path::new(name_or_path);
    if local.is_dir() {
        if !local.join("unet").join("config.json").is_file() {
            return Err(Error::InvalidOption {
                option: "--pretrained_model_name_or_path",
                problem: format!(
                    "{} is not a diffusers SDXL folder (no unet/config.json)",
                    local.display()
                ),
            });
        }
        return Ok(ModelFolder {
            root: local.to_owned(),
            variant: local_variant(local, variant),
            single_file: None,
        });
    }
    let (root, variant) = download_sdxl(name_or_path, revision, variant).map_err(hub)?;
    Ok(ModelFolder {
        root,
        variant,
        single_file: None,
    })
}

/// The trainer's error for a failed download: [`Error::Hub`] for the hub's (naming the repository).
fn hub(error: sdxl_model::Error) -> Error {
    match error {
        sdxl_model::Error::Hub { repo, problem } => Error::Hub { repo, problem },
        other => other.into(),
    }
}

/// Resolves `--pretrained_model_name_or_path` (and `--single_file_config`): a single file as the
/// module documentation says, else [`resolve`].
///
/// # Errors
/// [`Error::InvalidOption`] for a `.safetensors` name that is neither a file nor a hub file, or
/// `--single_file_config` without a single file or without configs; [`Error::Hub`] as
/// [`resolve`].
pub fn resolve_model(config: &TrainConfig) -> Result<ModelFolder> {
    let name = config.pretrained_model_name_or_path.as_str();
    let Some(path) = single_file_path(name, &config.revision)? else {
        if config.single_file_config.is_some() {
            return Err(Error::InvalidOption {
                option: "--single_file_config",
                problem: format!("`{name}` is not a single-file checkpoint (a .safetensors file)"),
            });
        }
        return resolve(name, &config.revision, config.variant.as_deref());
    };
    let config_folder = match &config.single_file_config {
        Some(configs) => Some(config_folder(configs)?),
        None => None,
    };
    Ok(ModelFolder {
        root: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        variant: None,
        single_file: Some(SingleFileModel {
            path,
            config_folder,
        }),
    })
}

/// The local path of a single file named by `name`, downloading a hub file; `None` when `name` is
/// not a single file.
fn single_file_path(name: &str, revision: &str) -> Result<Option<PathBuf>> {
    let local = Path::new(name);
    if local.is_file() {
        return Ok(Some(local.to_owned()));
    }
    let Some((repo, file_revision, file)) = hub_file(name) else {
        if name.to_ascii_lowercase().ends_with(".safetensors") {
            return Err(Error::InvalidOption {
                option: "--pretrained_model_name_or_path",
                problem: format!(
                    "`{name}` is not a file, nor a hub file (`https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>` or `<owner>/<repo>/<file>.safetensors`)"
                ),
            });
        }
        return Ok(None);
    };
    let revision = file_revision.as_deref().unwrap_or(revision);
    Ok(Some(download_file(&repo, revision, &file).map_err(hub)?))
}

/// `--single_file_config`: a local diffusers folder with `unet/config.json`, or a hub repository
/// whose configs are fetched (at its `main` revision).
fn config_folder(name: &str) -> Result<PathBuf> {
    let local = Path::new(name);
    if local.is_dir() {
        if !local.join("unet").join("config.json").is_file() {
            return Err(Error::InvalidOption {
                option: "--single_file_config",
                problem: format!(
                    "{} is not a diffusers SDXL folder (no unet/config.json)",
                    local.display()
                ),
            });
        }
        return Ok(local.to_owned());
    }
    download_configs(name, "main").map_err(hub)
}

/// The base model's name for the model card: a hub file's repository, else the name as given.
pub fn base_model_name(name_or_path: &str) -> String {
    hub_file(name_or_path).map_or_else(|| name_or_path.to_owned(), |(repo, _, _)| repo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_folders_are_used_as_they_are() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl");
        assert!(
            fixtures.is_dir(),
            "missing fixture {}: regenerate it with `tools/fixtures/regenerate.sh --only tiny_sdxl`",
            fixtures.display()
        );
        let found = resolve(fixtures.to_str().unwrap(), "main", Some("fp16")).unwrap();
        // The fixture has no fp16 files: the plain names are read.
        assert_eq!(
            found,
            ModelFolder {
                root: fixtures.clone(),
                variant: None,
                single_file: None,
            }
        );
        let err = resolve(fixtures.join("unet").to_str().unwrap(), "main", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--pretrained_model_name_or_path") && err.contains("unet/config.json"),
            "{err}"
        );
    }

    #[test]
    fn base_model_names() {
        assert_eq!(
            base_model_name("https://huggingface.co/o/r/blob/main/m.safetensors"),
            "o/r"
        );
        assert_eq!(base_model_name("./models/m"), "./models/m");
    }
}
