//! The data plan: which dataset items each micro-step trains on, how they are placed and captioned,
//! and the generator seed of each micro-step — a pure function of `(seed, micro-step)`.
//!
//! The plan opens the dataset (`--dataset_name`, `--max_train_samples`, captions, crops, flips) and
//! deals it into batches with the data crate's [`Loader`], so a run resumed at micro-step `k` draws
//! exactly what an uninterrupted run draws there. It knows nothing of models.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use data::{
    Batch, CaptionFolder, CaptionRules, CaptionSource, Columns, CropMode, Dataset, DatasetConfig,
    FolderLayout, HubDataset, Loader, LoaderConfig, SampleKey, Selection, Source,
};

use crate::Result;
use crate::config::TrainConfig;

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
}

/// The run's batches, planned from its seed.
#[derive(Debug)]
pub struct Plan {
    loader: Loader,
    seed: u64,
}

impl Plan {
    /// Opens the dataset of `config` and plans batches of `--train_batch_size` (incomplete
    /// batches dropped: every micro-step has the same shapes).
    ///
    /// # Errors
    /// Dataset errors naming the row or file; a dataset without one full batch.
    pub fn open(config: &TrainConfig) -> Result<Self> {
        let dataset = Arc::new(open_dataset(config)?);
        let mut loader_config = LoaderConfig::new(config.train_batch_size as usize, config.seed);
        loader_config.drop_last = true;
        if config.dataloader_num_workers > 0 {
            loader_config.workers = config.dataloader_num_workers as usize;
        }
        Ok(Self {
            loader: Loader::new(dataset, loader_config)?,
            seed: config.seed,
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
        let per_epoch = self.steps_per_epoch();
        let mut epoch: Option<(u64, Vec<Vec<usize>>)> = None;
        let mut steps = Vec::with_capacity((range.end.saturating_sub(range.start)) as usize);
        for index in range {
            let wanted = index / per_epoch;
            let order = match &epoch {
                Some((e, order)) if *e == wanted => order,
                _ => &epoch.insert((wanted, self.loader.epoch_plan(wanted))).1,
            };
            let items = &order[(index % per_epoch) as usize];
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
            steps.push(MicroStep {
                bucket,
                keys,
                flips,
                prompts,
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

/// `--dataset_name`: a local folder (parquet files, an imagefolder, or images with `.txt` captions)
/// or a hub dataset id.
fn dataset_source(config: &TrainConfig) -> Source {
    let columns = Columns {
        image: config.image_column.clone(),
        caption: Some(config.caption_column.clone()),
    };
    let path = Path::new(&config.dataset_name);
    if !path.is_dir() {
        return Source::Hub(HubDataset {
            columns,
            ..HubDataset::new(config.dataset_name.clone())
        });
    }
    let mut parquet = Vec::new();
    for folder in [path.to_owned(), path.join("data")] {
        if let Ok(entries) = std::fs::read_dir(&folder) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "parquet") {
                    parquet.push(entry.path());
                }
            }
        }
    }
    parquet.sort();
    if !parquet.is_empty() {
        Source::Parquet {
            files: parquet,
            columns,
        }
    } else if path.join("metadata.jsonl").is_file() {
        Source::ImageFolder {
            root: path.to_owned(),
            caption_column: Some(config.caption_column.clone()),
        }
    } else {
        Source::CaptionFolder(CaptionFolder {
            read_captions: config.instance_prompt.is_none(),
            caption_extension: config.caption_extension.clone(),
            layout: FolderLayout::detect(path),
            ..CaptionFolder::new(path)
        })
    }
}

/// kohya's caption rules from the caption flags; `None` when they change nothing.
fn caption_rules(config: &TrainConfig) -> Option<CaptionRules> {
    let rules = CaptionRules {
        caption_prefix: config.caption_prefix.clone(),
        caption_suffix: config.caption_suffix.clone(),
        caption_dropout_rate: config.caption_dropout_rate,
        shuffle_caption: config.shuffle_caption,
        keep_tokens: config.keep_tokens as usize,
        keep_tokens_separator: config.keep_tokens_separator.clone(),
        caption_separator: config.caption_separator.clone(),
        caption_tag_dropout_rate: config.caption_tag_dropout_rate,
    };
    (rules != CaptionRules::default()).then_some(rules)
}

fn open_dataset(config: &TrainConfig) -> Result<Dataset> {
    let mut data_config = if config.enable_bucket {
        DatasetConfig::kohya(&config.bucket_config())?
    } else {
        DatasetConfig::new(config.resolution)?
    };
    data_config.selection = match config.max_train_samples {
        Some(n) => Selection::First(n as usize),
        None => Selection::All,
    };
    data_config.captions.source = match &config.instance_prompt {
        Some(prompt) => CaptionSource::Instance(prompt.clone()),
        None => CaptionSource::Column,
    };
    data_config.captions.kohya = caption_rules(config);
    data_config.transform.crop = if config.center_crop {
        CropMode::Center
    } else {
        CropMode::Random
    };
    data_config.transform.random_flip = config.random_flip;
    data_config.transform.allow_upscale = !config.no_upscale;
    data_config.skip_bad_rows = config.skip_bad_images;
    Ok(Dataset::open(&dataset_source(config), data_config)?)
}
