//! Content-keyed caches of encoded tensors (VAE latents, text embeddings).
//!
//! A key is the SHA-256 of everything the cached value depends on: the encoder's identity, the
//! image's content hash, the target and resized sizes, the crop and the flip (or the prompt text).
//! An edited image, another resolution or another VAE therefore gets another key and is encoded
//! afresh; nothing is ever invalidated by date or name. Flipped and unflipped crops are separate
//! entries: a VAE is not equivariant to mirroring, so flipping a cached latent would not be exact.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::dataset::Sample;
use crate::{Error, Result};

/// The identity of a cached value: a hex SHA-256 over named parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds a [`CacheKey`] from named parts; each part is length-prefixed so no two different lists
/// of parts hash the same bytes.
#[derive(Debug, Clone)]
pub struct CacheKeyBuilder {
    hasher: Sha256,
}

impl CacheKeyBuilder {
    /// A key of kind `kind` (e.g. `"latents"`, `"text"`).
    pub fn new(kind: &str) -> Self {
        Self {
            hasher: Sha256::new(),
        }
        .part("kind", kind.as_bytes())
    }

    /// Adds a named part.
    pub fn part(mut self, name: &str, value: &[u8]) -> Self {
        for bytes in [name.as_bytes(), value] {
            self.hasher.update((bytes.len() as u64).to_le_bytes());
            self.hasher.update(bytes);
        }
        self
    }

    /// Adds a named number.
    pub fn number(self, name: &str, value: u64) -> Self {
        self.part(name, &value.to_le_bytes())
    }

    /// The key.
    pub fn finish(self) -> CacheKey {
        let digest = self.hasher.finalize();
        CacheKey(digest.iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl CacheKey {
    /// The key of a sample's latents under the encoder `encoder_id` (e.g. the VAE's path and its
    /// weights' hash, plus its dtype): image content, sizes, crop and flip.
    pub fn latents(encoder_id: &str, sample: &Sample) -> Self {
        CacheKeyBuilder::new("latents")
            .part("encoder", encoder_id.as_bytes())
            .part("image_sha256", &sample.content_hash)
            .number("original_height", u64::from(sample.original_size.0))
            .number("original_width", u64::from(sample.original_size.1))
            .number("resized_height", u64::from(sample.resized_size.0))
            .number("resized_width", u64::from(sample.resized_size.1))
            .number("target_height", u64::from(sample.target_size.0))
            .number("target_width", u64::from(sample.target_size.1))
            // Sign-extended: a corner of 0 or more keys as it always has, kohya's -1 apart from all.
            .number("crop_top", sample.crop_top_left.0 as u64)
            .number("crop_left", sample.crop_top_left.1 as u64)
            .number("flipped", u64::from(sample.flipped))
            .finish()
    }

    /// The key of a prompt's embeddings under the text encoder(s) `encoder_id`.
    pub fn text(encoder_id: &str, prompt: &str) -> Self {
        CacheKeyBuilder::new("text")
            .part("encoder", encoder_id.as_bytes())
            .part("prompt", prompt.as_bytes())
            .finish()
    }

    /// The hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Named tensors, as one cache entry holds them (e.g. `latents`, or `context` and `pooled`).
pub type Entry = Vec<(String, Tensor)>;

enum Store {
    Memory(Mutex<HashMap<CacheKey, Entry>>),
    Disk(PathBuf),
}

/// A cache of tensors by [`CacheKey`], in memory or as safetensors files in a folder.
pub struct TensorCache {
    store: Store,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl fmt::Debug for TensorCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let store = match &self.store {
            Store::Memory(_) => "memory".to_owned(),
            Store::Disk(folder) => folder.display().to_string(),
        };
        f.debug_struct("TensorCache")
            .field("store", &store)
            .field("hits", &self.hits())
            .finish()
    }
}

impl TensorCache {
    /// A cache in memory.
    pub fn in_memory() -> Self {
        Self::with_store(Store::Memory(Mutex::new(HashMap::new())))
    }

    /// A cache in `folder` (created if needed): one `<key>.safetensors` per entry, written atomically.
    pub fn on_disk(folder: impl Into<PathBuf>) -> Result<Self> {
        let folder = folder.into();
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        Ok(Self::with_store(Store::Disk(folder)))
    }

    fn with_store(store: Store) -> Self {
        Self {
            store,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Lookups answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that ran the encoder.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// The entry for `key`, computing and storing it with `compute` if absent. Errors of `compute`
    /// pass through unchanged; nothing is stored then.
    pub fn get_or_insert_with<E: From<Error>>(
        &self,
        key: &CacheKey,
        compute: impl FnOnce() -> Result<Entry, E>,
    ) -> Result<Entry, E> {
        if let Some(entry) = self.get(key)? {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(entry);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let entry = compute()?;
        self.insert(key, &entry)?;
        Ok(entry)
    }

    /// The entry for `key`, if cached.
    pub fn get(&self, key: &CacheKey) -> Result<Option<Entry>> {
        match &self.store {
            Store::Memory(map) => {
                let map = map
                    .lock()
                    .map_err(|_| Error::Worker("cache lock poisoned".into()))?;
                Ok(map.get(key).map(|entry| {
                    entry
                        .iter()
                        .map(|(n, t)| (n.clone(), t.shallow_clone()))
                        .collect()
                }))
            }
            Store::Disk(folder) => {
                let path = entry_path(folder, key);
                if path.is_file() {
                    Ok(Some(Tensor::read_safetensors(&path)?))
                } else {
                    Ok(None)
                }
            }
        }
    }

    fn insert(&self, key: &CacheKey, entry: &Entry) -> Result<()> {
        match &self.store {
            Store::Memory(map) => {
                let copy = entry
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect();
                map.lock()
                    .map_err(|_| Error::Worker("cache lock poisoned".into()))?
                    .insert(key.clone(), copy);
                Ok(())
            }
            Store::Disk(folder) => {
                let path = entry_path(folder, key);
                // Unique per process and thread so concurrent writers of one key (the ranks of a
                // data-parallel run share a cache folder) never share a temporary file.
                let writer = (std::process::id(), std::thread::current().id());
                let temporary = path.with_extension(format!("{}-{:?}.tmp", writer.0, writer.1));
                let cpu: Vec<(String, Tensor)> = entry
                    .iter()
                    .map(|(n, t)| Ok((n.clone(), t.f_to_device(tch::Device::Cpu)?.f_contiguous()?)))
                    .collect::<Result<_>>()?;
                Tensor::write_safetensors(&cpu, &temporary)?;
                std::fs::rename(&temporary, &path).map_err(|e| Error::io(&path, e))
            }
        }
    }
}

fn entry_path(folder: &Path, key: &CacheKey) -> PathBuf {
    folder.join(format!("{key}.safetensors"))
}
