//! Models on the Hugging Face hub: which names are repository ids, and fetching the files a loader
//! reads (with `hf-hub`, into the Hugging Face cache that Python's `huggingface_hub` shares).
//!
//! Every `from_pretrained` of this crate takes a local path or a repository id (see
//! [`crate::pretrained`]); for an id it fetches only the files that model reads — its `config.json`
//! and weights (of [`crate::pretrained::LoadOptions::variant`], single or sharded), and for a prompt
//! encoder or pipeline the tokenizers and scheduler config the repository has — at
//! [`crate::pretrained::LoadOptions::revision`]. The functions here serve callers that want other
//! sets: [`download_sdxl`] (what training reads), [`download_configs`], [`download_file`].
//!
//! `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE`, `HF_TOKEN` and `HF_HUB_OFFLINE` mean what they mean to
//! huggingface_hub. Online, the files come from the commit the revision names on the hub now (each
//! commit has its own snapshot folder); when the hub cannot be reached, a revision the cache holds
//! whole is used, as huggingface_hub does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::pretrained::with_variant;
use crate::{Error, Result};

/// The components of an SDXL repository and the weight file each holds.
const SDXL_COMPONENTS: [(&str, &str); 4] = [
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("vae", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "model.safetensors"),
    ("text_encoder_2", "model.safetensors"),
];

/// The files of a model folder's `tokenizer/` and `tokenizer_2/` that
/// [`crate::tokenizer::ClipTokenizer::from_folder`] reads, fetched where a repository has them.
pub(crate) const TOKENIZER_FILES_OF_BOTH: [&str; 10] = [
    "tokenizer/tokenizer.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/added_tokens.json",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/added_tokens.json",
];

/// Whether `name` has the form of a hub repository id (huggingface_hub's `validate_repo_id`): `name`
/// or `owner/name`, each part letters, digits, `-`, `_` and `.`, starting and ending with a letter,
/// digit or `_`, without `--` or `..`, at most 96 characters. Anything else (`/abs/path`, `./model`,
/// `~/model`, `a/b/c`, `model/`, a Windows path) is a local path.
pub fn is_repo_id(name: &str) -> bool {
    let part_ok = |part: &str| {
        let word = |c: char| c.is_alphanumeric() || c == '_';
        let (Some(first), Some(last)) = (part.chars().next(), part.chars().last()) else {
            return false;
        };
        word(first)
            && word(last)
            && part.chars().all(|c| word(c) || c == '-' || c == '.')
            && !part.contains("--")
            && !part.contains("..")
    };
    if name.chars().count() > 96 {
        return false;
    }
    match name.split_once('/') {
        Some((owner, repo)) => part_ok(owner) && part_ok(repo),
        None => part_ok(name),
    }
}

/// `(repository, revision, file)` of a hub file reference as diffusers' `from_single_file` takes it:
/// `https://huggingface.co/<owner>/<repo>/{blob,resolve}/<revision>/<file>` (also `hf.co`, and without
/// the scheme) or `<owner>/<repo>/<file>.safetensors` (no revision: the caller's).
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

/// Fetches what training and sampling read from the diffusers SDXL repository `repo_id` at
/// `revision`: `model_index.json`, `scheduler/scheduler_config.json` where it exists, and each
/// component's `config.json` and weights — of `variant` where the UNet's weights of that variant
/// exist, else the plain names. Returns the snapshot folder and the variant read there.
///
/// # Errors
/// [`Error::Hub`] naming the repository and the file.
pub fn download_sdxl(
    repo_id: &str,
    revision: &str,
    variant: Option<&str>,
) -> Result<(PathBuf, Option<String>)> {
    download(repo_id, revision, &Wanted::Sdxl(variant))
}

/// Fetches only the components' `config.json` (and `scheduler/scheduler_config.json` where it
/// exists) of the diffusers SDXL repository `repo_id` at `revision`, as a single-file checkpoint's
/// configs (diffusers' `from_single_file(…, config=)`); returns the snapshot folder.
///
/// # Errors
/// [`Error::Hub`] naming the repository and the file.
pub fn download_configs(repo_id: &str, revision: &str) -> Result<PathBuf> {
    Ok(download(repo_id, revision, &Wanted::Configs)?.0)
}

/// Fetches one file of repository `repo_id` at `revision`; returns its local path.
///
/// # Errors
/// [`Error::Hub`] naming the repository and the file (also when the repository has no such file).
pub fn download_file(repo_id: &str, revision: &str, file: &str) -> Result<PathBuf> {
    Ok(download(repo_id, revision, &Wanted::File(file))?
        .0
        .join(file))
}

/// One model folder of a repository and its weight file (the plain name; the variant is inserted).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part<'a> {
    /// The subfolder the caller named; `None`: the repository's root when it has `config.json`,
    /// else `default`.
    pub subfolder: Option<&'a str>,
    /// The subfolder tried when the root has no `config.json`.
    pub default: Option<&'a str>,
    /// The weight file's plain name (`diffusion_pytorch_model.safetensors`, `model.safetensors`).
    pub weights: &'a str,
}

/// What to fetch from a repository.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wanted<'a> {
    /// A diffusers SDXL model for training: configs and weights (of the variant, where it exists).
    Sdxl(Option<&'a str>),
    /// Only the SDXL components' configs (and the scheduler's, where it exists).
    Configs,
    /// One file.
    File(&'a str),
    /// Model folders, each with its `config.json` and the weights of `variant` (which must exist),
    /// plus those of `optional` the repository has.
    Parts {
        /// The folders.
        parts: &'a [Part<'a>],
        /// The weight variant.
        variant: Option<&'a str>,
        /// Files fetched where they exist.
        optional: &'a [&'a str],
    },
}

impl Wanted<'_> {
    /// The variant to read and the files to fetch, given which files exist (`has`); `Err` says
    /// which file is missing.
    fn files(self, has: impl Fn(&str) -> bool) -> std::result::Result<Files, String> {
        Ok(match self {
            Wanted::Sdxl(variant) => sdxl_files(variant, has),
            Wanted::Configs => {
                let mut files: Vec<String> = SDXL_COMPONENTS
                    .iter()
                    .map(|(component, _)| format!("{component}/config.json"))
                    .collect();
                if has("scheduler/scheduler_config.json") {
                    files.push("scheduler/scheduler_config.json".to_owned());
                }
                (None, files)
            }
            Wanted::File(name) => {
                if !has(name) {
                    return Err(format!("has no file `{name}`"));
                }
                (None, vec![name.to_owned()])
            }
            Wanted::Parts {
                parts,
                variant,
                optional,
            } => {
                let mut files = Vec::new();
                for part in parts {
                    files.extend(part_files(part, variant, &has)?);
                }
                files.extend(optional.iter().filter(|f| has(f)).map(|f| (*f).to_owned()));
                (variant.map(str::to_owned), files)
            }
        })
    }
}

/// The variant read and the files to fetch.
type Files = (Option<String>, Vec<String>);

/// The `config.json` and weight file (or index) of one model folder.
fn part_files(
    part: &Part<'_>,
    variant: Option<&str>,
    has: &impl Fn(&str) -> bool,
) -> std::result::Result<Vec<String>, String> {
    let folder = match (part.subfolder, part.default) {
        (Some(sub), _) => format!("{sub}/"),
        (None, _) if has("config.json") => String::new(),
        (None, Some(default)) if has(&format!("{default}/config.json")) => format!("{default}/"),
        (None, Some(default)) => {
            return Err(format!(
                "has neither `config.json` nor `{default}/config.json`"
            ));
        }
        (None, None) => return Err("has no `config.json` (name a subfolder)".to_owned()),
    };
    let config = format!("{folder}config.json");
    if !has(&config) {
        return Err(format!("has no `{config}`"));
    }
    let single = format!("{folder}{}", with_variant(part.weights, variant));
    let index = format!(
        "{folder}{}",
        with_variant(&format!("{}.index.json", part.weights), variant)
    );
    let weights = if has(&single) {
        single
    } else if has(&index) {
        index
    } else {
        return Err(format!("has neither `{single}` nor `{index}`"));
    };
    Ok(vec![config, weights])
}

/// The variant to read and the files training needs, given which files exist (`has`).
fn sdxl_files(variant: Option<&str>, has: impl Fn(&str) -> bool) -> Files {
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
    for (component, weights) in SDXL_COMPONENTS {
        wanted.push(format!("{component}/config.json"));
        wanted.push(format!(
            "{component}/{}",
            with_variant(weights, chosen_variant)
        ));
    }
    (chosen_variant.map(str::to_owned), wanted)
}

/// Whether a repository file is a sharded weights index (`….safetensors.index[.variant].json`).
fn is_index(name: &str) -> bool {
    name.contains(".safetensors.index.") && name.ends_with(".json")
}

/// The shards a downloaded index lists, as repository file names next to the index.
fn shards_of(repo_id: &str, name: &str, index: &Path) -> Result<Vec<String>> {
    let folder = name.rsplit_once('/').map_or("", |(folder, _)| folder);
    let shards = crate::unet::loading::index_shards(index)
        .map_err(|e| hub_error(repo_id, format!("`{name}`: {e}")))?;
    Ok(shards
        .into_iter()
        .map(|shard| {
            if folder.is_empty() {
                shard
            } else {
                format!("{folder}/{shard}")
            }
        })
        .collect())
}

/// Downloads what `wanted` names from hub repository `repo_id` at `revision` (or finds it in the
/// cache offline); returns the snapshot folder and the variant read there.
pub(crate) fn download(
    repo_id: &str,
    revision: &str,
    wanted: &Wanted<'_>,
) -> Result<(PathBuf, Option<String>)> {
    let offline = std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
    let cache = match std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        Some(folder) => hf_hub::Cache::new(PathBuf::from(folder)),
        None => hf_hub::Cache::from_env(),
    };
    if offline {
        return from_cache(&cache, repo_id, revision, *wanted);
    }
    // As huggingface_hub does when the hub cannot be asked (no network, server down), a revision
    // the cache holds whole is used; otherwise the hub's error is the one worth reading.
    fetch(&cache, repo_id, revision, *wanted)
        .or_else(|error| from_cache(&cache, repo_id, revision, *wanted).map_err(|_| error))
}

fn hub_error(repo_id: &str, problem: String) -> Error {
    Error::Hub {
        repo: repo_id.to_owned(),
        problem,
    }
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
    let listing: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let (chosen_variant, mut queue) = wanted
        .files(|name| listing.contains(name))
        .map_err(|problem| hub_error(repo_id, format!("{problem} at revision `{revision}`")))?;
    // The snapshot of the commit the hub names now, not whatever the cache's ref last pointed at:
    // files cached from an older commit must not mix with (or stand in for) the current ones.
    let snapshot = cache
        .path()
        .join(model.folder_name())
        .join("snapshots")
        .join(&info.sha);
    while let Some(name) = queue.pop() {
        let local = snapshot.join(&name);
        if !local.is_file() {
            let path = repo
                .download(&name)
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
        if is_index(&name) {
            queue.extend(shards_of(repo_id, &name, &local)?);
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
    let not_cached = |name: &str| {
        hub_error(
            repo_id,
            format!(
                "`{name}` of revision `{revision}` is not in the cache {} (HF_HUB_OFFLINE is set or the hub was not reached)",
                cache.path().display()
            ),
        )
    };
    let (chosen_variant, mut queue) = wanted
        .files(|name| cached.get(name).is_some())
        .map_err(|problem| {
            hub_error(
                repo_id,
                format!(
                    "{problem} in the cache {} at revision `{revision}` (HF_HUB_OFFLINE is set or the hub was not reached)",
                    cache.path().display()
                ),
            )
        })?;
    let mut root = None;
    while let Some(name) = queue.pop() {
        let path = cached.get(&name).ok_or_else(|| not_cached(&name))?;
        if is_index(&name) {
            queue.extend(shards_of(repo_id, &name, &path)?);
        }
        // The snapshot folder: the file's path minus its name inside the repository.
        root = path
            .ancestors()
            .nth(name.split('/').count())
            .map(Path::to_path_buf);
    }
    let root = root.ok_or_else(|| hub_error(repo_id, "no files".into()))?;
    Ok((root, chosen_variant))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn repo_ids_and_local_paths() {
        for id in [
            "stabilityai/stable-diffusion-xl-base-1.0",
            "gpt2",
            "o_1/r.2",
        ] {
            assert!(is_repo_id(id), "{id}");
        }
        for path in [
            "/abs/path",
            "./model",
            "../model",
            "~/model",
            "a/b/c",
            "model/",
            "C:\\models\\sdxl",
            "a--b/c",
            "a/b..c",
            "",
        ] {
            assert!(!is_repo_id(path), "{path}");
        }
    }

    #[test]
    fn parts_choose_the_folder_and_the_variant_file() {
        let listing = [
            "config.json",
            "diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors.index.json",
        ];
        let has = |name: &str| listing.contains(&name);
        let part = |subfolder| Part {
            subfolder,
            default: Some("vae"),
            weights: "diffusion_pytorch_model.safetensors",
        };
        assert_eq!(
            part_files(&part(None), Some("fp16"), &has).unwrap(),
            ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
        );
        assert_eq!(
            part_files(&part(Some("vae")), None, &has).unwrap(),
            [
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors.index.json"
            ]
        );
        let missing = part_files(&part(None), None, &has).unwrap_err();
        assert!(
            missing.contains("`diffusion_pytorch_model.safetensors`"),
            "{missing}"
        );
        let no_config = part_files(&part(Some("unet")), None, &has).unwrap_err();
        assert!(no_config.contains("`unet/config.json`"), "{no_config}");
    }
}
