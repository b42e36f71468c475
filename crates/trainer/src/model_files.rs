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
//! `HF_HUB_OFFLINE` mean what they mean to huggingface_hub.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use sdxl_model::unet::with_variant;

use crate::config::TrainConfig;
use crate::{Error, Result};

/// The components of an SDXL folder and the weight file each holds.
const COMPONENTS: [(&str, &str); 4] = [
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("vae", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "model.safetensors"),
    ("text_encoder_2", "model.safetensors"),
];

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

/// What to fetch from a hub repository.
#[derive(Debug, Clone, Copy)]
enum Wanted<'a> {
    /// A diffusers SDXL model: configs and weights (of the variant, where it exists).
    Model(Option<&'a str>),
    /// Only the components' configs (and the scheduler's, where it exists).
    Configs,
    /// One file.
    File(&'a str),
}

impl Wanted<'_> {
    /// The variant to read and the files to fetch, given which files exist (`has`).
    fn files(self, has: impl Fn(&str) -> bool) -> (Option<String>, Vec<String>) {
        match self {
            Wanted::Model(variant) => needed_files(variant, has),
            Wanted::Configs => {
                let mut files: Vec<String> = COMPONENTS
                    .iter()
                    .map(|(component, _)| format!("{component}/config.json"))
                    .collect();
                if has("scheduler/scheduler_config.json") {
                    files.push("scheduler/scheduler_config.json".to_owned());
                }
                (None, files)
            }
            Wanted::File(name) => (None, vec![name.to_owned()]),
        }
    }
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
    let (root, variant) = download(name_or_path, revision, Wanted::Model(variant))?;
    Ok(ModelFolder {
        root,
        variant,
        single_file: None,
    })
}

/// Downloads what `wanted` names from hub repository `repo_id` at `revision` (or finds it in the
/// cache offline); returns the snapshot folder and the variant read there.
fn download(
    repo_id: &str,
    revision: &str,
    wanted: Wanted<'_>,
) -> Result<(PathBuf, Option<String>)> {
    let offline = std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
    let cache = match std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        Some(folder) => hf_hub::Cache::new(PathBuf::from(folder)),
        None => hf_hub::Cache::from_env(),
    };
    if offline {
        return from_cache(&cache, repo_id, revision, wanted);
    }
    // As huggingface_hub does when the hub cannot be asked (no network, server down), a revision
    // the cache holds whole is used; otherwise the hub's error is the one worth reading.
    fetch(&cache, repo_id, revision, wanted)
        .or_else(|error| from_cache(&cache, repo_id, revision, wanted).map_err(|_| error))
}

fn hub_error(repo_id: &str, problem: String) -> Error {
    Error::Hub {
        repo: repo_id.to_owned(),
        problem,
    }
}

/// The variant to read and the files training needs, given which files exist (`has`).
fn needed_files(
    variant: Option<&str>,
    has: impl Fn(&str) -> bool,
) -> (Option<String>, Vec<String>) {
    let chosen_variant = variant.filter(|v| {
        has(&format!(
            "unet/{}",
            with_variant("diffusion_pytorch_model.safetensors", Some(v))
        ))
    });
    let mut wanted = vec!["model_index.json".to_owned()];
    if has("scheduler/scheduler_config.json") {
        wanted.push("scheduler/scheduler_config.json".to_owned());
    }
    for (component, weights) in COMPONENTS {
        wanted.push(format!("{component}/config.json"));
        wanted.push(format!(
            "{component}/{}",
            with_variant(weights, chosen_variant)
        ));
    }
    (chosen_variant.map(str::to_owned), wanted)
}

/// Online: lists the repository at `revision`, fetches what the cache's snapshot of that commit
/// lacks, and points the cache's ref for `revision` at the commit.
fn fetch(
    cache: &hf_hub::Cache,
    repo_id: &str,
    revision: &str,
    wanted: Wanted<'_>,
) -> Result<(PathBuf, Option<String>)> {
    let mut builder = ApiBuilder::from_env()
        .with_progress(true)
        .with_cache_dir(cache.path().clone());
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .map_err(|e| hub_error(repo_id, e.to_string()))?;
    let model = Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned());
    let repo = api.repo(model.clone());
    let info = repo.info().map_err(|e| hub_error(repo_id, e.to_string()))?;
    let listing: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if let Wanted::File(name) = wanted
        && !listing.iter().any(|f| f == name)
    {
        return Err(hub_error(
            repo_id,
            format!("has no file `{name}` at revision `{revision}`"),
        ));
    }
    let (chosen_variant, wanted) = wanted.files(|name| listing.iter().any(|f| f == name));
    // The snapshot of the commit the hub names now, not whatever the cache's ref last pointed at:
    // files cached from an older commit must not mix with (or stand in for) the current ones.
    let snapshot = cache
        .path()
        .join(model.folder_name())
        .join("snapshots")
        .join(&info.sha);
    for name in &wanted {
        if snapshot.join(name).is_file() {
            continue;
        }
        let path = repo
            .download(name)
            .map_err(|e| hub_error(repo_id, format!("`{name}`: {e}")))?;
        if !path.starts_with(&snapshot) {
            return Err(hub_error(
                repo_id,
                format!(
                    "`{name}` came from another commit than {}: the repository changed during the download",
                    info.sha
                ),
            ));
        }
    }
    cache.repo(model).create_ref(&info.sha).map_err(|e| {
        hub_error(
            repo_id,
            format!("writing the ref of `{revision}` in the cache: {e}"),
        )
    })?;
    Ok((snapshot, chosen_variant))
}

/// Offline: the snapshot the cache's ref for `revision` points at, which must hold every needed
/// file; the variant is chosen by what that snapshot holds.
fn from_cache(
    cache: &hf_hub::Cache,
    repo_id: &str,
    revision: &str,
    wanted: Wanted<'_>,
) -> Result<(PathBuf, Option<String>)> {
    let cached = cache.repo(Repo::with_revision(
        repo_id.to_owned(),
        RepoType::Model,
        revision.to_owned(),
    ));
    let (chosen_variant, wanted) = wanted.files(|name| cached.get(name).is_some());
    let mut root = None;
    for name in &wanted {
        let path = cached.get(name).ok_or_else(|| {
            hub_error(repo_id, format!("`{name}` of revision `{revision}` is not in the cache {} (HF_HUB_OFFLINE is set or the hub was not reached)", cache.path().display()))
        })?;
        // The snapshot folder: the file's path minus its name inside the repository.
        root = path
            .ancestors()
            .nth(name.split('/').count())
            .map(Path::to_path_buf);
    }
    let root = root.ok_or_else(|| hub_error(repo_id, "no files".into()))?;
    Ok((root, chosen_variant))
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
    let (snapshot, _) = download(&repo, revision, Wanted::File(&file))?;
    Ok(Some(snapshot.join(file)))
}

/// `(repository, revision, file)` of a hub file reference: `https://huggingface.co/<owner>/<repo>/
/// {blob,resolve}/<revision>/<file>` (also `hf.co`, and without the scheme) or
/// `<owner>/<repo>/<file>.safetensors` (revision from `--revision`).
pub fn hub_file(name: &str) -> Option<(String, Option<String>, String)> {
    let rest = name
        .strip_prefix("https://")
        .or_else(|| name.strip_prefix("http://"));
    let url = rest.unwrap_or(name);
    let url_path = url
        .strip_prefix("huggingface.co/")
        .or_else(|| url.strip_prefix("hf.co/"));
    if let Some(path) = url_path {
        let parts: Vec<&str> = path.splitn(5, '/').collect();
        return match parts.as_slice() {
            [owner, repo, "blob" | "resolve", revision, file] if !file.is_empty() => Some((
                format!("{owner}/{repo}"),
                Some((*revision).to_owned()),
                (*file).to_owned(),
            )),
            _ => None,
        };
    }
    if rest.is_some() || !name.to_ascii_lowercase().ends_with(".safetensors") {
        return None;
    }
    let parts: Vec<&str> = name.splitn(3, '/').collect();
    match parts.as_slice() {
        [owner, repo, file] if !owner.is_empty() && !repo.is_empty() && !owner.starts_with('.') => {
            Some((format!("{owner}/{repo}"), None, (*file).to_owned()))
        }
        _ => None,
    }
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
    Ok(download(name, "main", Wanted::Configs)?.0)
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
    fn hub_files_are_named_as_diffusers_names_them() {
        let some = |repo: &str, revision: Option<&str>, file: &str| {
            Some((
                repo.to_owned(),
                revision.map(str::to_owned),
                file.to_owned(),
            ))
        };
        assert_eq!(
            hub_file("https://huggingface.co/o/r/blob/main/sd_xl.safetensors"),
            some("o/r", Some("main"), "sd_xl.safetensors")
        );
        assert_eq!(
            hub_file("https://huggingface.co/o/r/resolve/abc123/sub/dir/m.safetensors"),
            some("o/r", Some("abc123"), "sub/dir/m.safetensors")
        );
        assert_eq!(
            hub_file("hf.co/o/r/blob/v1/m.safetensors"),
            some("o/r", Some("v1"), "m.safetensors")
        );
        assert_eq!(
            hub_file("o/r/m.safetensors"),
            some("o/r", None, "m.safetensors")
        );
        assert_eq!(hub_file("https://huggingface.co/o/r"), None);
        assert_eq!(
            hub_file("https://example.com/o/r/blob/main/m.safetensors"),
            None
        );
        assert_eq!(hub_file("stabilityai/stable-diffusion-xl-base-1.0"), None);
        assert_eq!(hub_file("./models/m.safetensors"), None);
        assert_eq!(hub_file("m.safetensors"), None);
        assert_eq!(
            base_model_name("https://huggingface.co/o/r/blob/main/m.safetensors"),
            "o/r"
        );
    }
}
