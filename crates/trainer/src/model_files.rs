//! Finding the base model: a local diffusers SDXL folder, or a hub repository whose needed files are
//! downloaded (with `hf-hub`, into the Hugging Face cache that Python's `huggingface_hub` shares).
//!
//! Only what training and sampling read is fetched: each component's `config.json` and weights (the
//! `--variant` file, e.g. `model.fp16.safetensors`, when the repository has it), and
//! `scheduler/scheduler_config.json`. `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE`, `HF_TOKEN` and
//! `HF_HUB_OFFLINE` mean what they mean to huggingface_hub.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use sdxl_model::unet::with_variant;

use crate::{Error, Result};

/// The components of an SDXL folder and the weight file each holds.
const COMPONENTS: [(&str, &str); 4] = [
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("vae", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "model.safetensors"),
    ("text_encoder_2", "model.safetensors"),
];

/// A resolved base model: its folder and the weight variant to read there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFolder {
    /// The diffusers folder (a hub snapshot, or the user's folder).
    pub root: PathBuf,
    /// The variant whose weight files exist there (`None`: the plain names).
    pub variant: Option<String>,
}

/// The variant to use in `root`: `wanted` when its UNet file exists, else none (diffusers' folders
/// saved without variants are common locally).
fn local_variant(root: &Path, wanted: Option<&str>) -> Option<String> {
    let wanted = wanted?;
    let unet = root.join("unet");
    let exists = unet.join(with_variant("diffusion_pytorch_model.safetensors", Some(wanted))).is_file()
        || unet.join(with_variant("diffusion_pytorch_model.safetensors.index.json", Some(wanted))).is_file();
    exists.then(|| wanted.to_owned())
}

/// Resolves `--pretrained_model_name_or_path`: an existing folder is used as is; anything else is a
/// hub repository id whose needed files are fetched (or found in the cache when offline).
///
/// `variant` is used where its UNet weights exist: in the folder, in the repository's file list, or
/// (with `HF_HUB_OFFLINE`) in the cache; otherwise the plain file names are read.
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
                problem: format!("{} is not a diffusers SDXL folder (no unet/config.json)", local.display()),
            });
        }
        return Ok(ModelFolder { root: local.to_owned(), variant: local_variant(local, variant) });
    }
    download(name_or_path, revision, variant)
}

fn download(repo_id: &str, revision: &str, variant: Option<&str>) -> Result<ModelFolder> {
    let hub_error = |problem: String| Error::Hub { repo: repo_id.to_owned(), problem };
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
    let mut builder = ApiBuilder::from_env().with_progress(true);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let cache = match std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        Some(folder) => hf_hub::Cache::new(PathBuf::from(folder)),
        None => hf_hub::Cache::from_env(),
    };
    builder = builder.with_cache_dir(cache.path().clone());
    let api = builder.build().map_err(|e| hub_error(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned()));
    let cached = cache.repo(Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned()));
    let listing: Option<Vec<String>> = if offline {
        None
    } else {
        Some(repo.info().map_err(|e| hub_error(e.to_string()))?.siblings.into_iter().map(|s| s.rfilename).collect())
    };
    // Online the repository's listing says what exists; offline the cache does (a repository
    // without the variant was cached under the plain names, and offline must choose those again).
    let has = |name: &str| match &listing {
        Some(files) => files.iter().any(|f| f == name),
        None => cached.get(name).is_some(),
    };
    let chosen_variant = variant.filter(|v| has(&format!("unet/{}", with_variant("diffusion_pytorch_model.safetensors", Some(v)))));
    let mut wanted = vec!["model_index.json".to_owned()];
    if has("scheduler/scheduler_config.json") {
        wanted.push("scheduler/scheduler_config.json".to_owned());
    }
    for (component, weights) in COMPONENTS {
        wanted.push(format!("{component}/config.json"));
        wanted.push(format!("{component}/{}", with_variant(weights, chosen_variant)));
    }
    let mut root = None;
    for name in &wanted {
        let path = if offline {
            cached.get(name).ok_or_else(|| hub_error(format!("`{name}` is not in the cache and HF_HUB_OFFLINE is set")))?
        } else {
            repo.get(name).map_err(|e| hub_error(format!("`{name}`: {e}")))?
        };
        // The snapshot folder: the file's path minus its name inside the repository.
        let depth = name.split('/').count();
        root = path.ancestors().nth(depth).map(Path::to_path_buf);
    }
    let root = root.ok_or_else(|| hub_error("no files".into()))?;
    Ok(ModelFolder { root, variant: chosen_variant.map(str::to_owned) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_folders_are_used_as_they_are() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl");
        let found = resolve(fixtures.to_str().unwrap(), "main", Some("fp16")).unwrap();
        // The fixture has no fp16 files: the plain names are read.
        assert_eq!(found, ModelFolder { root: fixtures.clone(), variant: None });
        let err = resolve(fixtures.join("unet").to_str().unwrap(), "main", None).unwrap_err().to_string();
        assert!(err.contains("--pretrained_model_name_or_path") && err.contains("unet/config.json"), "{err}");
    }
}
