//! kohya sd-scripts' dataset configuration (`--dataset_config file.toml`), read into typed,
//! fully resolved structs.
//!
//! The schema and the inheritance follow `library/config_util.py` of
//! [kohya-ss/sd-scripts](https://github.com/kohya-ss/sd-scripts) at commit
//! `48d368fa557731ad0488c07304dfeba8c07910eb` ([`UPSTREAM_COMMIT`]): `ConfigSanitizer` (which keys
//! each table accepts) and `BlueprintGenerator.generate_params_by_fallbacks` (a subset's value comes
//! from the subset, else its `[[datasets]]` table, else `[general]`, else kohya's command-line
//! default; a dataset's value from the dataset, else `[general]`, else the default).
//!
//! ```toml
//! [general]
//! shuffle_caption = true
//! caption_extension = ".txt"
//! keep_tokens = 1
//!
//! [[datasets]]
//! resolution = 1024          # or [width, height]
//! batch_size = 2
//! enable_bucket = true
//!
//!   [[datasets.subsets]]
//!   image_dir = "train/sks_dog"
//!   class_tokens = "sks dog"
//!   num_repeats = 10
//!
//!   [[datasets.subsets]]
//!   image_dir = "reg/dog"
//!   class_tokens = "dog"
//!   is_reg = true
//! ```
//!
//! Only DreamBooth-style subsets (`image_dir` with caption files) are supported. Every key kohya
//! accepts that we do not implement yet (e.g. `color_aug`, `face_crop_aug_range`,
//! `token_warmup_step`, `metadata_file`, `secondary_separator`, `enable_wildcard`, `alpha_mask`)
//! is an error naming the key and its table, except when it holds kohya's own do-nothing value
//! (`color_aug = false`, `token_warmup_step = 0`, …), which gives kohya's behaviour unchanged.
//! Unknown keys (typos), keys in a table kohya does not accept them in and bad values are errors
//! too; all problems of a file are reported at once ([`KohyaConfigError::Invalid`]).
//!
//! Values kohya would take from its command line when neither the file nor `[general]` sets them
//! are resolved to kohya's command-line defaults, except `resolution`, which stays `None` (kohya
//! requires `--resolution` then).

use std::fmt;
use std::path::{Path, PathBuf};

use data::CaptionRules;
use toml::Table;

/// The sd-scripts commit whose `library/config_util.py` this module follows.
pub const UPSTREAM_COMMIT: &str = "48d368fa557731ad0488c07304dfeba8c07910eb";

/// A kohya dataset configuration: its `[[datasets]]`, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaDatasetConfig {
    /// The datasets, each with its resolved settings and subsets.
    pub datasets: Vec<KohyaDataset>,
}

/// One `[[datasets]]` table, resolved through `[general]` and kohya's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaDataset {
    /// `resolution` as `(width, height)` (an integer `n` means `(n, n)`); `None` when neither the
    /// dataset nor `[general]` sets it (kohya then uses `--resolution`).
    pub resolution: Option<(u32, u32)>,
    /// `batch_size` (default 1, kohya's `--train_batch_size`).
    pub batch_size: u32,
    /// `enable_bucket`: aspect-ratio buckets (default off).
    pub enable_bucket: bool,
    /// `min_bucket_reso` (default 256), as written: kohya rounds it down to a multiple of
    /// `bucket_reso_steps` when it builds the buckets.
    pub min_bucket_reso: u32,
    /// `max_bucket_reso` (default 1024), as written: kohya rounds it up to a multiple of
    /// `bucket_reso_steps`.
    pub max_bucket_reso: u32,
    /// `bucket_reso_steps` (default 64).
    pub bucket_reso_steps: u32,
    /// `bucket_no_upscale` (default off).
    pub bucket_no_upscale: bool,
    /// The `[[datasets.subsets]]`, in file order.
    pub subsets: Vec<KohyaSubset>,
}

/// One `[[datasets.subsets]]` table (DreamBooth style), resolved through its dataset,
/// `[general]` and kohya's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaSubset {
    /// `image_dir` as written (kohya reads it relative to the working directory; it reads only the
    /// images directly in it, not in subfolders).
    pub image_dir: PathBuf,
    /// `is_reg`: regularisation (prior-preservation) images (default off).
    pub is_reg: bool,
    /// `class_tokens`: the caption of an image without a caption file (default none: an empty
    /// caption).
    pub class_tokens: Option<String>,
    /// `caption_extension` with its leading dot (added when missing, as kohya does); kohya's
    /// default is `.caption`.
    pub caption_extension: String,
    /// `num_repeats`: how often each image appears per epoch (default 1).
    pub num_repeats: u32,
    /// `flip_aug`: random horizontal flips (default off).
    pub flip_aug: bool,
    /// `random_crop`: random instead of centre crops (default off).
    pub random_crop: bool,
    /// `cache_info`: kohya keeps image sizes and captions in `metadata_cache.json` to start faster;
    /// it changes no sample, and nothing here reads or writes that file.
    pub cache_info: bool,
    /// `caption_prefix`, `caption_suffix`, `caption_dropout_rate`, `shuffle_caption`,
    /// `keep_tokens`, `keep_tokens_separator` (empty: `None`), `caption_separator` (default `","`),
    /// `caption_tag_dropout_rate`.
    pub captions: CaptionRules,
}

/// One problem of a configuration: the key's place (`datasets[0].subsets[1].color_aug`) and what
/// is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key, with its table: `general.x`, `datasets[i].x` or `datasets[i].subsets[j].x`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a kohya dataset configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KohyaConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("{}not TOML: {message}", file_prefix(file.as_deref()))]
    Syntax {
        /// The file, if read from one.
        file: Option<PathBuf>,
        /// What the TOML parser said.
        message: String,
    },
    /// The TOML does not make a configuration we support; every problem is listed.
    #[error("{}{}", file_prefix(file.as_deref()), list(problems))]
    Invalid {
        /// The file, if read from one.
        file: Option<PathBuf>,
        /// The problems, in the order of the tables.
        problems: Vec<Problem>,
    },
}

fn file_prefix(file: Option<&Path>) -> String {
    file.map(|f| format!("{}: ", f.display()))
        .unwrap_or_default()
}

fn list(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut text = format!("{} problems in the kohya dataset config:", many.len());
            for problem in many {
                text.push_str("\n  ");
                text.push_str(&problem.to_string());
            }
            text
        }
    }
}

impl KohyaDatasetConfig {
    /// Reads and resolves the TOML file `path`.
    ///
    /// # Errors
    /// [`KohyaConfigError`] naming the file and, for a bad configuration, every problem.
    pub fn from_file(path: &Path) -> Result<Self, KohyaConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| KohyaConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|error| match error {
            KohyaConfigError::Syntax { message, .. } => KohyaConfigError::Syntax {
                file: Some(path.to_path_buf()),
                message,
            },
            KohyaConfigError::Invalid { problems, .. } => KohyaConfigError::Invalid {
                file: Some(path.to_path_buf()),
                problems,
            },
            io => io,
        })
    }

    /// Parses and resolves a configuration's TOML text.
    ///
    /// # Errors
    /// [`KohyaConfigError::Syntax`] or [`KohyaConfigError::Invalid`] with every problem.
    pub fn from_toml_str(text: &str) -> Result<Self, KohyaConfigError> {
        let root: Table = toml::from_str(text).map_err(|e| KohyaConfigError::Syntax {
            file: None,
            message: e.message().to_owned(),
        })?;
        let mut problems = Vec::new();
        let config = resolve::resolve(&root, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(KohyaConfigError::Invalid {
                file: None,
                problems,
            })
        }
    }
}

mod resolve;
mod schema;
pub(crate) use schema::edit_distance;
#[cfg(test)]
mod tests;

impl crate::TrainConfig {
    /// With `--dataset_config`: reads the kohya file and takes from it what kohya's trainer would —
    /// the resolution (when the file sets one), the batch size, the bucket settings, the flips and
    /// crops of its subsets — and trains on its subsets' captions (no instance prompt). One training
    /// shape set per run: every `[[datasets]]` must agree on these, and the subsets on `flip_aug`
    /// and `random_crop`. Without it, the config is returned unchanged.
    ///
    /// # Errors
    /// [`crate::Error::DatasetConfig`] naming the file and every problem; [`crate::Error::InvalidOption`]
    /// naming the key where the datasets disagree.
    pub fn resolve_dataset_config(mut self) -> crate::Result<(Self, Option<KohyaDatasetConfig>)> {
        let Some(path) = self.dataset_config.clone() else {
            return Ok((self, None));
        };
        let file = KohyaDatasetConfig::from_file(&path)?;
        let disagree = |key: &str| crate::Error::InvalidOption {
            option: "--dataset_config",
            problem: format!(
                "{}: the datasets (or subsets) differ in `{key}`; this trainer runs one shape set per run",
                path.display()
            ),
        };
        let Some(first) = file.datasets.first() else {
            return Err(disagree("datasets (there are none)"));
        };
        for other in &file.datasets[1..] {
            let shape = |d: &KohyaDataset| {
                (
                    d.resolution,
                    d.batch_size,
                    d.enable_bucket,
                    d.min_bucket_reso,
                    d.max_bucket_reso,
                )
            };
            if shape(other) != shape(first)
                || (other.bucket_reso_steps, other.bucket_no_upscale)
                    != (first.bucket_reso_steps, first.bucket_no_upscale)
            {
                return Err(disagree("resolution, batch_size or bucket settings"));
            }
        }
        if let Some((width, height)) = first.resolution {
            if width != height {
                return Err(disagree(
                    "resolution (only square resolutions are supported)",
                ));
            }
            self.resolution = width;
        }
        self.train_batch_size = first.batch_size;
        self.enable_bucket = first.enable_bucket;
        self.min_bucket_reso = first.min_bucket_reso;
        self.max_bucket_reso = first.max_bucket_reso;
        self.bucket_reso_steps = first.bucket_reso_steps;
        self.bucket_no_upscale = first.bucket_no_upscale;
        let subsets: Vec<&KohyaSubset> = file.datasets.iter().flat_map(|d| &d.subsets).collect();
        let same = |f: fn(&KohyaSubset) -> bool| subsets.iter().all(|s| f(s) == f(subsets[0]));
        if !same(|s| s.flip_aug) {
            return Err(disagree("flip_aug"));
        }
        if !same(|s| s.random_crop) {
            return Err(disagree("random_crop"));
        }
        if let Some(subset) = subsets.first() {
            self.random_flip = subset.flip_aug;
            self.center_crop = !subset.random_crop;
        }
        self.instance_prompt = None;
        self.max_train_samples = None;
        Ok((self, Some(file)))
    }
}
