//! Dataset repositories on the Hugging Face hub, downloaded with the `hf-hub` crate into the
//! standard cache that Python's `huggingface_hub` shares (`<cache>/datasets--org--name/{blobs,
//! refs,snapshots}`; see huggingface_hub's `file_download.py` and hf-hub's `api/sync.rs`).
//!
//! The parquet shards under a prefix (`data/` as the `datasets` library pushes them) are the dataset.
//! Offline, the same shards are found through `refs/<revision>` and the snapshot folder, with no
//! network access at all.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::source::Columns;
use crate::{Error, Result};

/// A dataset repository on the hub (or on a server standing in for it through `HF_ENDPOINT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDataset {
    /// Repository id, e.g. `lambdalabs/naruto-blip-captions`.
    pub repo_id: String,
    /// Branch, tag or commit; default `main`.
    pub revision: String,
    /// Folder inside the repository whose `.parquet` files are the shards; default `data/`.
    pub prefix: String,
    /// Column names inside the shards.
    pub columns: Columns,
    /// Never touch the network; use the cache only. `HF_HUB_OFFLINE=1` has the same effect.
    pub offline: bool,
    /// The hub's address; default `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// The hub cache folder; default `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub` (huggingface_hub's order).
    pub cache_dir: Option<PathBuf>,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubDataset {
    /// The `main` revision of `repo_id`, its `data/*.parquet` shards, columns `image` and `text`.
    pub fn new(repo_id: impl Into<String>) -> Self {
        Self {
            repo_id: repo_id.into(),
            revision: "main".into(),
            prefix: "data/".into(),
            columns: Columns::default(),
            offline: false,
            endpoint: None,
            cache_dir: None,
            progress: true,
        }
    }

    /// The hub cache folder this dataset is read from and written to, as an absolute path.
    pub fn cache_root(&self) -> Result<PathBuf> {
        let env = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = self
            .cache_dir
            .clone()
            .or_else(|| env("HF_HUB_CACHE"))
            .or_else(|| env("HF_HOME").map(|home| home.join("hub")))
            .or_else(|| env("HOME").map(|home| home.join(".cache/huggingface/hub")))
            .ok_or_else(|| Error::InvalidOption {
                option: "cache_dir",
                problem: "none given and neither HF_HUB_CACHE, HF_HOME nor HOME is set".into(),
            })?;
        // hf-hub builds relative symlinks between absolute paths and asserts they are absolute.
        std::path::absolute(&root).map_err(|e| Error::io(&root, e))
    }

    /// This repository's folder in the cache (`datasets--org--name`).
    pub fn repo_folder(&self) -> Result<PathBuf> {
        Ok(self.cache_root()?.join(self.repo().folder_name()))
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(
            self.repo_id.clone(),
            RepoType::Dataset,
            self.revision.clone(),
        )
    }

    fn offline(&self) -> bool {
        self.offline
            || std::env::var("HF_HUB_OFFLINE")
                .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
    }

    /// The local paths of the shards, downloading what the cache lacks unless offline.
    ///
    /// When the hub cannot be asked (no network, server down) but the cache holds the revision, the
    /// cached shards are used, as huggingface_hub does; without a cached copy the hub's error is
    /// returned.
    pub fn resolve(&self) -> Result<Vec<PathBuf>> {
        if self.offline() {
            return self.resolve_from_cache();
        }
        match self.download() {
            Err(error @ Error::Hub { .. }) => self.resolve_from_cache().map_err(|_| error),
            other => other,
        }
    }

    fn hub_error(&self, source: hf_hub::api::sync::ApiError) -> Error {
        Error::Hub {
            repo: self.repo_id.clone(),
            source: Box::new(source),
        }
    }

    fn download(&self) -> Result<Vec<PathBuf>> {
        let cache_root = self.cache_root()?;
        let mut builder = ApiBuilder::from_env()
            .with_cache_dir(cache_root)
            .with_progress(self.progress);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        if let Ok(token) = std::env::var("HF_TOKEN") {
            builder = builder.with_token(Some(token));
        }
        let api = builder.build().map_err(|e| self.hub_error(e))?;
        let repo = api.repo(self.repo());
        let info = repo.info().map_err(|e| self.hub_error(e))?;
        let mut shards: Vec<String> = info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|name| self.is_shard(name))
            .collect();
        shards.sort();
        if shards.is_empty() {
            return Err(Error::EmptySelection {
                reason: format!(
                    "hub dataset `{}` has no `{}*.parquet` files",
                    self.repo_id, self.prefix
                ),
            });
        }
        let snapshot = self.repo_folder()?.join("snapshots").join(&info.sha);
        shards
            .iter()
            .map(|name| {
                let cached = snapshot.join(name);
                if cached.is_file() {
                    Ok(cached)
                } else {
                    repo.download(name).map_err(|e| self.hub_error(e))
                }
            })
            .collect()
    }

    fn resolve_from_cache(&self) -> Result<Vec<PathBuf>> {
        let folder = self.repo_folder()?;
        let not_cached = |reason: String| Error::NotCached {
            repo: self.repo_id.clone(),
            revision: self.revision.clone(),
            cache: folder.clone(),
            reason,
        };
        let is_commit =
            self.revision.len() == 40 && self.revision.bytes().all(|b| b.is_ascii_hexdigit());
        let commit = if is_commit {
            self.revision.clone()
        } else {
            let reference = folder.join("refs").join(&self.revision);
            std::fs::read_to_string(&reference)
                .map_err(|e| not_cached(format!("{}: {e}", reference.display())))?
                .trim()
                .to_owned()
        };
        let snapshot = folder.join("snapshots").join(&commit);
        let mut shards = Vec::new();
        collect_files(&snapshot, &snapshot, &mut shards).map_err(|e| not_cached(e.to_string()))?;
        shards.retain(|(relative, _)| self.is_shard(relative));
        shards.sort();
        if shards.is_empty() {
            return Err(not_cached(format!(
                "snapshot {commit} holds no `{}*.parquet` files",
                self.prefix
            )));
        }
        Ok(shards.into_iter().map(|(_, path)| path).collect())
    }

    fn is_shard(&self, name: &str) -> bool {
        name.starts_with(&self.prefix) && name.ends_with(".parquet")
    }
}

/// Lists the files below `folder` as (path relative to `base` with `/` separators, full path).
fn collect_files(base: &Path, folder: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for entry in std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))? {
        let path = entry.map_err(|e| Error::io(folder, e))?.path();
        // Snapshot entries are symlinks into blobs/: follow them.
        if path.is_dir() {
            collect_files(base, &path, out)?;
        } else if let Ok(relative) = path.strip_prefix(base) {
            let relative = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>();
            out.push((relative.join("/"), path));
        }
    }
    Ok(())
}
