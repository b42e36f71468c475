//! The data plan: which dataset items each micro-step trains on, how they are placed and captioned,
//! and the generator seed of each micro-step — a pure function of `(seed, micro-step)`.
//!
//! The plan opens the dataset (`--dataset_name`, `--max_train_samples`, captions, crops, flips) and
//! deals it into batches with the data crate's [`Loader`], so a run resumed at micro-step `k` draws
//! exactly what an uninterrupted run draws there. It knows nothing of models.

mod share;
mod sources;

use std::ops::Range;
use std::sync::Arc;

use data::{Batch, Dataset, Loader, LoaderConfig, SampleKey};

use crate::Result;
use crate::config::TrainConfig;
use crate::config::kohya::KohyaDatasetConfig;
use crate::distributed::World;
use crate::step::LossWeights;
pub use share::share_rows;
use sources::caption_rules;

/// What one micro-step trains on.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroStep {
    /// The bucket every sample of the batch belongs to (an index into the dataset's bucket sizes).
    pub bucket: usize,
    /// Each sample's key, in batch order.
    pub keys: Vec<SampleKey>,
    /// Whether each sample is mirrored.
    pub flips: Vec<bool>,
    /// Each sample's prompt (caption or instance prompt, after dropout and shuffling).
    pub prompts: Vec<String>,
    /// Whether each sample is a class (prior-preservation) or regularization image.
    pub reg: Vec<bool>,
}

/// The run's batches, planned from its seed.
#[derive(Debug)]
pub struct Plan {
    loader: Loader,
    /// diffusers' prior preservation: the class images, `--train_batch_size` of them after the
    /// instance images of every micro-step.
    class_loader: Option<Loader>,
    /// Whether any sample is a class or regularization image (the loss then weighs samples).
    weighted: bool,
    seed: u64,
}

impl Plan {
    /// Opens the dataset of `config` (or of the kohya file `kohya`, with `--class_data_dir`'s class
    /// images under `--with_prior_preservation`) and plans batches of `--train_batch_size`
    /// (incomplete batches dropped: every micro-step has the same shapes).
    ///
    /// # Errors
    /// Dataset errors naming the row or file; a dataset without one full batch.
    pub fn open(config: &TrainConfig, kohya: Option<&KohyaDatasetConfig>) -> Result<Self> {
        Self::open_for_world(config, kohya, 1)
    }

    /// [`Plan::open`] for `world_size` processes: global batches of `--train_batch_size ×
    /// world_size` samples, dealt as one process with that batch would deal them; each rank takes
    /// its [`Plan::share`].
    ///
    /// # Errors
    /// As [`Plan::open`].
    pub fn open_for_world(
        config: &TrainConfig,
        kohya: Option<&KohyaDatasetConfig>,
        world_size: usize,
    ) -> Result<Self> {
        let mut subsets = match kohya {
            Some(file) => sources::kohya_subsets(file),
            None => vec![sources::main_subset(config)],
        };
        let class_subset = sources::class_subset(config).map(|class| {
            subsets.push(class);
            subsets.len() - 1
        });
        let data_config = sources::dataset_config(config)?;
        let dataset = Arc::new(Dataset::open_subsets(subsets, data_config)?);
        let mut loader_config = LoaderConfig::new(
            config.train_batch_size as usize * world_size.max(1),
            config.seed,
        );
        loader_config.drop_last = true;
        if config.dataloader_num_workers > 0 {
            loader_config.workers = config.dataloader_num_workers as usize;
        }
        let (class_items, items): (Vec<usize>, Vec<usize>) =
            (0..dataset.len()).partition(|&i| Some(dataset.items()[i].subset) == class_subset);
        let weighted = class_subset.is_some() || (0..dataset.len()).any(|i| dataset.is_reg(i));
        let class_loader = match class_subset {
            Some(_) => Some(Loader::over_items(
                Arc::clone(&dataset),
                loader_config,
                class_items,
            )?),
            None => None,
        };
        Ok(Self {
            loader: Loader::over_items(dataset, loader_config, items)?,
            class_loader,
            weighted,
            seed: config.seed,
        })
    }

    /// Samples per micro-step: `--train_batch_size`, twice that with prior preservation.
    pub fn batch_size(&self, config: &TrainConfig) -> usize {
        let per_loader = config.train_batch_size as usize;
        per_loader * if self.class_loader.is_some() { 2 } else { 1 }
    }

    /// The rows of the global micro-step `step` that `world`'s rank trains on (its instance
    /// images, then its class images under prior preservation); `step` comes from a plan opened
    /// for `world.world_size` processes ([`Plan::open_for_world`]).
    pub fn share(&self, step: &MicroStep, world: &World) -> MicroStep {
        let groups = if self.class_loader.is_some() { 2 } else { 1 };
        let per_rank = step.keys.len() / groups / world.world_size.max(1);
        step.select(&share_rows(per_rank, groups, world))
    }

    /// How the loss weighs the samples of `step`: `None` for the plain mean (no class or
    /// regularization images in the run); diffusers' prior-preservation loss with class images;
    /// kohya's per-sample weights with regularization subsets.
    pub fn loss_weights(&self, step: &MicroStep, prior_loss_weight: f64) -> Option<LossWeights> {
        if !self.weighted {
            return None;
        }
        Some(if self.class_loader.is_some() {
            LossWeights::dreambooth_prior(step.keys.len() / 2, prior_loss_weight)
        } else {
            LossWeights::kohya(&step.reg, prior_loss_weight)
        })
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        self.loader.dataset()
    }

    /// The buckets in use with their image counts, e.g. `1024x1024: 12, 832x1216: 3` (one entry
    /// without `--enable_bucket`).
    pub fn describe_buckets(&self) -> String {
        let dataset = self.dataset();
        let sizes = dataset.config().buckets.sizes();
        let mut counts = vec![0usize; sizes.len()];
        for item in dataset.items() {
            counts[item.bucket] += 1;
        }
        sizes
            .iter()
            .zip(&counts)
            .filter(|(_, n)| **n > 0)
            .map(|((w, h), n)| format!("{w}x{h}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Where prompts come from, in words, for the run's log.
    pub fn describe_prompts(config: &TrainConfig) -> String {
        let base = match &config.instance_prompt {
            Some(prompt) => format!("the instance prompt `{prompt}` for every image"),
            None => format!(
                "the dataset's captions (column `{}`, or `*{}` files in a folder)",
                config.caption_column, config.caption_extension
            ),
        };
        match caption_rules(config) {
            Some(rules) => format!("prompts: {base}, then per step {rules:?}"),
            None => format!("prompts: {base}"),
        }
    }

    /// The rows left out under `--skip_bad_images`, each as its error names it.
    pub fn skipped_rows(&self) -> Vec<String> {
        let skipped = self.dataset().skipped();
        skipped.iter().map(|s| s.error.to_string()).collect()
    }

    /// Batches per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.loader.steps_per_epoch()
    }

    /// The micro-steps `range` (global indices): items, bucket, flips and prompts of each. Each
    /// epoch's order is computed once.
    ///
    /// # Errors
    /// Dataset errors (an item outside the dataset).
    pub fn micro_steps(&self, range: Range<u64>) -> Result<Vec<MicroStep>> {
        let dataset = self.dataset();
        let mut instances = EpochCache::new(&self.loader);
        let mut classes = self.class_loader.as_ref().map(EpochCache::new);
        let mut steps = Vec::with_capacity((range.end.saturating_sub(range.start)) as usize);
        for index in range {
            let mut items = instances.items(index).to_vec();
            if let Some(classes) = classes.as_mut() {
                items.extend_from_slice(classes.items(index));
            }
            let keys: Vec<SampleKey> = items
                .iter()
                .enumerate()
                .map(|(slot, &item)| SampleKey {
                    seed: self.seed,
                    step: index,
                    slot: slot as u32,
                    item,
                })
                .collect();
            let flips = keys
                .iter()
                .map(|key| Ok(dataset.placement(key)?.flipped))
                .collect::<Result<Vec<bool>>>()?;
            let prompts = keys
                .iter()
                .map(|key| Ok(dataset.prompt(key)?))
                .collect::<Result<Vec<String>>>()?;
            let bucket = items
                .first()
                .map_or(0, |&item| dataset.items()[item].bucket);
            let class_start = self
                .class_loader
                .as_ref()
                .map_or(items.len(), |_| items.len() / 2);
            let reg = (0..items.len())
                .map(|slot| slot >= class_start || dataset.is_reg(items[slot]))
                .collect();
            steps.push(MicroStep {
                bucket,
                keys,
                flips,
                prompts,
                reg,
            });
        }
        Ok(steps)
    }

    /// Micro-step `index`'s batch, decoded and transformed (for latents encoded live).
    ///
    /// # Errors
    /// Decoding errors naming the row.
    pub fn batch(&self, index: u64) -> Result<Batch> {
        Ok(self.loader.batch(index)?)
    }

    /// The seed libtorch's generator gets before micro-step `index`.
    pub fn generator_seed(&self, index: u64) -> i64 {
        micro_step_seed(self.seed, index)
    }
}

/// A loader's epoch orders, computed once per epoch while a range of micro-steps is planned.
struct EpochCache<'l> {
    loader: &'l Loader,
    epoch: Option<(u64, Vec<Vec<usize>>)>,
}

impl<'l> EpochCache<'l> {
    fn new(loader: &'l Loader) -> Self {
        Self {
            loader,
            epoch: None,
        }
    }

    /// The items of the loader's micro-step `index`.
    fn items(&mut self, index: u64) -> &[usize] {
        let per_epoch = self.loader.steps_per_epoch();
        let wanted = index / per_epoch;
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != wanted) {
            self.epoch = Some((wanted, self.loader.epoch_plan(wanted)));
        }
        match &self.epoch {
            Some((_, order)) => &order[(index % per_epoch) as usize],
            None => &[],
        }
    }
}

/// Mixes the run's seed and a micro-step index into the generator seed of that micro-step
/// (SplitMix64's finaliser, so neighbouring steps get unrelated streams).
fn micro_step_seed(seed: u64, micro_step: u64) -> i64 {
    let mut z = seed
        ^ micro_step
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}
