//! What is computed once before training: the text conditioning of every prompt the plan uses
//! (both CLIP encoders, then the encoders are freed; with `--train_text_encoder` only the token
//! ids, since the encoders train and encode every micro-step) and, with `--cache_latents`, each image's latent
//! posterior — both mirror images with `--random_flip` — (the VAE in fp32, through the data crate's
//! content-keyed cache, in memory or on disk with `--cache_latents_to_disk`, then the VAE is freed).
//!
//! diffusers' DreamBooth script does the same: it encodes the instance prompt once and, with
//! `--cache_latents`, keeps each image's `latent_dist` and draws a fresh sample from it every step.
//! Everything here ends as device tensors indexed by row, so a training step only gathers rows: no
//! host data enters the step beyond two index tensors.
//!
//! In a data-parallel run the work is shared out by rank ([`crate::distributed::cache_share`]:
//! contiguous blocks in rank order) and every rank ends with the same tables as one process would
//! build, row for row and bit for bit: the prompts in the one-process batches of eight, the images
//! one by one, each through the same encoders on one rank only, then gathered in rank order
//! (`Collective::all_gather`, each block padded to the largest and trimmed after). With
//! `--cache_latents_to_disk` each rank writes its share into the cache folder, waits at a barrier,
//! and reads every entry back. The validation prompt is encoded on rank 0, which validates, alone.
//! A fingerprint of the prompt list and of the dataset is compared first, so a rank that planned
//! other data is an error naming it, not a silently mixed table.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use data::{Dataset, TensorCache};
use sdxl_model::prompt::PromptEncoder;
use sdxl_model::tokenizer::ClipTokenizer;
use sdxl_model::vae::{AutoencoderKL, AutoencoderKLConfig, Upcast};

use crate::Result;
use crate::checkpoint::io_error;
use crate::config::TrainConfig;
use crate::device::free_cache;
use crate::distributed::{Collective, cache_share};
use crate::logs::say;
use crate::model_files::ModelFolder;
use crate::plan::MicroStep;
use crate::validation::ValidationPrompt;

use latents::LatentEncoder;
pub use latents::{BucketLatents, CachedLatents, time_ids_of};

mod latents;
mod share;
#[cfg(test)]
mod tests;

/// Where the clean latents of a step come from.
pub enum Latents {
    /// Encoded once before training; the VAE is gone.
    Cached(CachedLatents),
    /// Random crops: the VAE stays and encodes every step.
    Live {
        /// The VAE (fp32).
        vae: Box<AutoencoderKL>,
        /// Its weights.
        store: VarStore,
    },
}

impl Latents {
    /// The VAE when it stays loaded.
    pub fn live_vae(&self) -> Option<&AutoencoderKL> {
        match self {
            Self::Live { vae, .. } => Some(vae),
            Self::Cached(_) => None,
        }
    }
}

/// Encodes every distinct prompt of `steps` (the whole run's plan, so a resumed run builds the
/// same table) and the validation prompt (`--validation_prompt`), then frees the text encoders.
/// With `--train_text_encoder` the table holds token ids instead ([`tokenize_prompts`]).
///
/// In a data-parallel run (`group` of several ranks) each rank encodes its share of the prompts
/// and every rank ends with the whole table, row for row the one-process table
/// ([`encode_prompts_shared`]). The validation prompt is encoded on rank 0 alone, which validates;
/// the other ranks get it without embeddings.
///
/// # Errors
/// Text-encoder loading and encoding errors; a rank that plans other prompts; transport errors.
pub fn prepare_text(
    config: &TrainConfig,
    folder: &ModelFolder,
    steps: &[MicroStep],
    device: Device,
    kind: Kind,
    group: &dyn Collective,
    frozen: Option<&FrozenModels>,
) -> Result<(TextConditioning, Option<ValidationPrompt>)> {
    let unencoded = |prompt: &String| ValidationPrompt {
        prompt: prompt.clone(),
        embeds: None,
    };
    if config.train_text_encoder {
        let prompts = steps.iter().flat_map(|step| step.prompts.iter());
        let text = tokenize_prompts(prompts, device)?;
        say(format!(
            "{} distinct prompt(s) tokenized; the text encoders train and encode every micro-step",
            text.prompts.len()
        ));
        return Ok((text, config.validation_prompt.as_ref().map(unencoded)));
    }
    let encode = |encoder: &PromptEncoder| -> Result<_> {
        let prompts = steps.iter().flat_map(|step| step.prompts.iter());
        let text = encode_prompts_shared(encoder, prompts, (device, kind), group)?;
        let validation = match &config.validation_prompt {
            Some(prompt) if group.rank() == 0 => {
                let (positive, negative) = tch::no_grad(|| {
                    encoder.encode_with_negative(std::slice::from_ref(prompt), None)
                })?;
                Some(ValidationPrompt {
                    prompt: prompt.clone(),
                    embeds: Some((positive, negative)),
                })
            }
            Some(prompt) => Some(unencoded(prompt)),
            None => None,
        };
        Ok((text, validation))
    };
    let prepared = match frozen {
        Some(frozen) => frozen.with_encoder(folder, (device, kind), encode)?,
        None => {
            let (encoder, stores) = folder.prompt_encoder(device, kind)?;
            let prepared = encode(&encoder)?;
            drop((encoder, stores));
            free_cache(device);
            prepared
        }
    };
    let table = prepared.0.table.bytes();
    let shared = if group.world_size() > 1 {
        format!(", shared out over {} ranks", group.world_size())
    } else {
        String::new()
    };
    say(format!(
        "{} distinct prompt(s) encoded{shared} ({:.1} MiB on the device); text encoders {}",
        prepared.0.prompts.len(),
        table as f64 / (1u64 << 20) as f64,
        match frozen {
            Some(_) => "kept for the sweep's other variants",
            None => "freed",
        }
    ));
    Ok(prepared)
}

/// Loads the VAE (in fp32, as diffusers' script keeps it) and, with `--cache_latents`, encodes
/// every item (both mirror images with `--random_flip`) and frees it. Returns the latents and the
/// VAE's config.
///
/// In a data-parallel run (`group` of several ranks) each rank encodes its [`cache_share`] of the
/// items and every rank ends with the one-process [`CachedLatents`]: in memory the ranks' blocks of
/// each bucket are gathered; on disk each rank writes its share into the cache folder, waits for
/// the others, and reads every entry back.
///
/// # Errors
/// VAE loading and encoding errors, cache-folder errors, dataset errors naming the row; a rank
/// with another dataset; transport errors.
pub fn prepare_latents(
    config: &TrainConfig,
    folder: &ModelFolder,
    dataset: &Dataset,
    device: Device,
    group: &dyn Collective,
    frozen: Option<&FrozenModels>,
) -> Result<(Latents, AutoencoderKLConfig)> {
    if !config.cache_latents {
        let (vae, store) = folder.vae(device, Kind::Float, Upcast::Always)?;
        let vae_config = vae.config().clone();
        let vae = Box::new(vae);
        return Ok((Latents::Live { vae, store }, vae_config));
    }
    let encode = |vae: &AutoencoderKL| -> Result<_> {
        let (cached, report) = encode_latents(config, folder, dataset, vae, (device, group))?;
        Ok((cached, report, vae.config().clone()))
    };
    let (cached, report, vae_config) = match frozen {
        Some(frozen) => frozen.with_vae(folder, device, encode)?,
        None => {
            let (vae, store) = folder.vae(device, Kind::Float, Upcast::Always)?;
            let encoded = encode(&vae)?;
            drop((vae, store));
            free_cache(device);
            encoded
        }
    };
    let place = if config.cache_latents_to_disk {
        format!(" in {}", latents_cache_dir(config).display())
    } else {
        String::new()
    };
    let vae_now = match frozen {
        Some(_) => "VAE kept for the sweep's other variants",
        None => "VAE freed",
    };
    say(format!("latents cached{place} ({report}); {vae_now}"));
    Ok((Latents::Cached(cached.into_device(device)), vae_config))
}

/// Every item's latent posterior through `vae` (`--cache_latents`), with the cache's report.
fn encode_latents(
    config: &TrainConfig,
    folder: &ModelFolder,
    dataset: &Dataset,
    vae: &AutoencoderKL,
    (device, group): (Device, &dyn Collective),
) -> Result<(CachedLatents, String)> {
    let (cache, encoder_id) = if config.cache_latents_to_disk {
        let dir = latents_cache_dir(config);
        let id = format!("{}|fp32", folder.vae_identity(true)?);
        (TensorCache::on_disk(&dir)?, id)
    } else {
        let id = format!("{}|fp32", folder.vae_identity(false)?);
        (TensorCache::in_memory(), id)
    };
    let encoder = LatentEncoder {
        vae,
        encoder_id: &encoder_id,
        dataset,
        cache: &cache,
        flips: if config.random_flip { 2 } else { 1 },
        seed: config.seed,
        device,
    };
    let (cached, report) = if group.world_size() == 1 {
        let cached = encoder.encode(0..dataset.len())?;
        let report = format!("{} reused, {} encoded", cache.hits(), cache.misses());
        (cached, report)
    } else if config.cache_latents_to_disk {
        share::encode_latents_on_disk(&encoder, group)?
    } else {
        share::encode_latents_in_memory(&encoder, group)?
    };
    Ok((cached, report))
}

/// The frozen text encoders and VAE, loaded once for every variant of a sweep to prepare its
/// conditioning with, and freed when they are all set up (a run of its own loads them for its
/// preparation and frees them after).
#[derive(Default)]
pub(crate) struct FrozenModels {
    encoder: RefCell<Option<(PromptEncoder, [VarStore; 2])>>,
    vae: RefCell<Option<(AutoencoderKL, VarStore)>>,
}

impl FrozenModels {
    /// `f` on the text encoders of `folder` in `kind`, loaded at the first call.
    fn with_encoder<R>(
        &self,
        folder: &ModelFolder,
        (device, kind): (Device, Kind),
        f: impl FnOnce(&PromptEncoder) -> Result<R>,
    ) -> Result<R> {
        let mut slot = self.encoder.borrow_mut();
        let loaded = match slot.take() {
            Some(loaded) => loaded,
            None => folder.prompt_encoder(device, kind)?,
        };
        let (encoder, _) = slot.insert(loaded);
        f(encoder)
    }

    /// `f` on the fp32 VAE of `folder`, loaded at the first call.
    fn with_vae<R>(
        &self,
        folder: &ModelFolder,
        device: Device,
        f: impl FnOnce(&AutoencoderKL) -> Result<R>,
    ) -> Result<R> {
        let mut slot = self.vae.borrow_mut();
        let loaded = match slot.take() {
            Some(loaded) => loaded,
            None => folder.vae(device, Kind::Float, Upcast::Always)?,
        };
        let (vae, _) = slot.insert(loaded);
        f(vae)
    }
}

/// `--latents_cache_dir`, else `latents/` in the toolkit's cache folder (`$SDXL_LORA_CACHE`, else
/// `$XDG_CACHE_HOME/sdxl-lora-rs`, else `~/.cache/sdxl-lora-rs`).
pub fn latents_cache_dir(config: &TrainConfig) -> PathBuf {
    if let Some(dir) = &config.latents_cache_dir {
        return dir.clone();
    }
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let root = env("SDXL_LORA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            env("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("sdxl-lora-rs")
        });
    root.join("latents")
}

/// SHA-256 over the names and contents of the files of `folder` (a VAE's config and weights), so
/// cached latents follow the weights, not the path.
pub(crate) fn hash_folder(folder: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(io_error(folder))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        hasher.update(name.unwrap_or_default().as_bytes());
        let mut file = std::fs::File::open(&path).map_err(io_error(&path))?;
        std::io::copy(&mut file, &mut hasher).map_err(io_error(&path))?;
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The text conditioning of the run's prompts.
#[derive(Debug)]
pub struct TextConditioning {
    /// The distinct prompts, in first-use order.
    pub prompts: Vec<String>,
    /// One row per distinct prompt.
    pub table: PromptTable,
    rows: HashMap<String, i64>,
}

/// What the prompt table holds, one row per distinct prompt.
#[derive(Debug)]
pub enum PromptTable {
    /// The embeddings, encoded once by the frozen text encoders.
    Embeddings {
        /// Per-token context `[prompts, 77, 2048]`, in the UNet's kind.
        context: Tensor,
        /// Pooled embedding `[prompts, 1280]`, in the UNet's kind.
        pooled: Tensor,
    },
    /// Token ids for the text encoders being trained (`--train_text_encoder`).
    TokenIds {
        /// The first tokenizer's ids `[prompts, 77]` int64.
        ids: Tensor,
        /// The second tokenizer's ids `[prompts, 77]` int64.
        ids_2: Tensor,
    },
}

impl PromptTable {
    /// Device bytes of the table.
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        match self {
            Self::Embeddings { context, pooled } => size(context) + size(pooled),
            Self::TokenIds { ids, ids_2 } => size(ids) + size(ids_2),
        }
    }
}

impl TextConditioning {
    /// The row of `prompt` in [`Self::table`].
    pub fn row(&self, prompt: &str) -> Option<i64> {
        self.rows.get(prompt).copied()
    }
}

/// Each distinct prompt once, in first-use order, and its row.
fn distinct_prompts<'p>(
    prompts: impl IntoIterator<Item = &'p String>,
) -> (Vec<String>, HashMap<String, i64>) {
    let mut rows: HashMap<String, i64> = HashMap::new();
    let mut distinct = Vec::new();
    for prompt in prompts {
        if !rows.contains_key(prompt) {
            rows.insert(prompt.clone(), distinct.len() as i64);
            distinct.push(prompt.clone());
        }
    }
    (distinct, rows)
}

/// Tokenizes every distinct prompt of `prompts` with both of SDXL's tokenizers, in first-use order
/// (diffusers' `tokenize_prompt`: padded to 77, truncated), onto `device`.
///
/// # Errors
/// Tokenizer errors.
pub fn tokenize_prompts<'p>(
    prompts: impl IntoIterator<Item = &'p String>,
    device: Device,
) -> Result<TextConditioning> {
    let (distinct, rows) = distinct_prompts(prompts);
    let first = ClipTokenizer::sdxl_first()?;
    let second = ClipTokenizer::sdxl_second()?;
    let table = PromptTable::TokenIds {
        ids: first.encode_batch(&distinct, device)?,
        ids_2: second.encode_batch(&distinct, device)?,
    };
    Ok(TextConditioning {
        prompts: distinct,
        table,
        rows,
    })
}

/// How many prompts the text encoders take at once.
const PROMPT_BATCH: usize = 8;

/// Encodes every distinct prompt of `prompts` once, eight at a time, in first-use order.
///
/// # Errors
/// Text-encoder errors.
#[cfg(test)]
pub fn encode_prompts<'p>(
    encoder: &PromptEncoder,
    prompts: impl IntoIterator<Item = &'p String>,
    device: Device,
    kind: Kind,
) -> Result<TextConditioning> {
    encode_prompts_shared(
        encoder,
        prompts,
        (device, kind),
        &crate::distributed::SingleProcess,
    )
}

/// [`encode_prompts`] shared out over the ranks of `group`: the batches of eight prompts (the
/// ones a single process encodes) are the units [`cache_share`] deals, rank `r` encodes its
/// block, and the blocks are gathered in rank order, so every rank ends with the one-process table.
///
/// # Errors
/// Text-encoder errors; a rank with another prompt list ([`crate::Error::Collective`]); transport errors.
pub fn encode_prompts_shared<'p>(
    encoder: &PromptEncoder,
    prompts: impl IntoIterator<Item = &'p String>,
    (device, kind): (Device, Kind),
    group: &dyn Collective,
) -> Result<TextConditioning> {
    let (distinct, rows) = distinct_prompts(prompts);
    let batches: Vec<&[String]> = distinct.chunks(PROMPT_BATCH).collect();
    let mine = if group.world_size() > 1 {
        let parts = distinct.iter().map(String::as_bytes);
        share::check_same_list(group, "prompt list", parts)?;
        cache_share(batches.len(), &share::world_of(group))
    } else {
        0..batches.len()
    };
    let (mut contexts, mut pooled) = (Vec::new(), Vec::new());
    for batch in &batches[mine] {
        let embeds = tch::no_grad(|| encoder.encode(batch, None, None))?;
        contexts.push(embeds.context.to_device(device).to_kind(kind));
        pooled.push(embeds.pooled.to_device(device).to_kind(kind));
    }
    let local = |parts: &[Tensor]| (!parts.is_empty()).then(|| Tensor::cat(parts, 0));
    let (context, pooled) = (local(&contexts), local(&pooled));
    let table = match (context, pooled) {
        (Some(context), Some(pooled)) if group.world_size() == 1 => {
            PromptTable::Embeddings { context, pooled }
        }
        (context, pooled) => {
            let counts = share::share_counts(group, batches.len(), |range| {
                batches[range].iter().map(|batch| batch.len()).sum()
            });
            let gather = |rows: Option<&Tensor>, dims| {
                share::gather_blocks(group, rows, &counts, (dims, kind, device))
            };
            PromptTable::Embeddings {
                context: gather(context.as_ref(), 3)?,
                pooled: gather(pooled.as_ref(), 2)?,
            }
        }
    };
    Ok(TextConditioning {
        prompts: distinct,
        table,
        rows,
    })
}
