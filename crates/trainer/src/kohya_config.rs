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

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use data::CaptionRules;
use toml::{Table, Value};

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
        let config = resolve(&root, &mut problems);
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

// ---------------------------------------------------------------------------------------------
// The schema

/// Which tables accept a key (kohya's `ConfigSanitizer` schemas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// `DATASET_ASCENDABLE_SCHEMA`: `[general]` and `[[datasets]]`.
    Dataset,
    /// The subset "ascendable" schemas: `[general]`, `[[datasets]]` and `[[datasets.subsets]]`.
    Subset,
    /// The subset "distinct" schemas: `[[datasets.subsets]]` only.
    SubsetOnly,
}

/// The table a key was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableKind {
    General,
    Dataset,
    Subset,
}

impl Level {
    fn allows(self, table: TableKind) -> bool {
        match self {
            Level::Dataset => table != TableKind::Subset,
            Level::Subset => true,
            Level::SubsetOnly => table == TableKind::Subset,
        }
    }

    fn where_allowed(self) -> &'static str {
        match self {
            Level::Dataset => "kohya reads it per dataset: put it in [[datasets]] or [general]",
            Level::Subset => "",
            Level::SubsetOnly => "kohya reads it only in [[datasets.subsets]]",
        }
    }
}

/// How a supported key's value is read.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    /// An integer of at least `min`.
    Count(i64),
    /// An integer or float in `[0, 1]`.
    Rate,
    /// A string; `true`: not empty.
    Text(bool),
    /// An integer or `[width, height]`, positive.
    Resolution,
}

const SUPPORTED: &[(&str, Level, Kind)] = &[
    ("resolution", Level::Dataset, Kind::Resolution),
    ("batch_size", Level::Dataset, Kind::Count(1)),
    ("enable_bucket", Level::Dataset, Kind::Bool),
    ("min_bucket_reso", Level::Dataset, Kind::Count(1)),
    ("max_bucket_reso", Level::Dataset, Kind::Count(1)),
    ("bucket_reso_steps", Level::Dataset, Kind::Count(1)),
    ("bucket_no_upscale", Level::Dataset, Kind::Bool),
    ("num_repeats", Level::Subset, Kind::Count(1)),
    ("shuffle_caption", Level::Subset, Kind::Bool),
    ("keep_tokens", Level::Subset, Kind::Count(0)),
    ("keep_tokens_separator", Level::Subset, Kind::Text(false)),
    ("caption_separator", Level::Subset, Kind::Text(true)),
    ("caption_prefix", Level::Subset, Kind::Text(false)),
    ("caption_suffix", Level::Subset, Kind::Text(false)),
    ("flip_aug", Level::Subset, Kind::Bool),
    ("random_crop", Level::Subset, Kind::Bool),
    ("caption_dropout_rate", Level::Subset, Kind::Rate),
    ("caption_tag_dropout_rate", Level::Subset, Kind::Rate),
    ("caption_extension", Level::Subset, Kind::Text(true)),
    ("class_tokens", Level::Subset, Kind::Text(false)),
    ("cache_info", Level::Subset, Kind::Bool),
    ("image_dir", Level::SubsetOnly, Kind::Text(true)),
    ("is_reg", Level::SubsetOnly, Kind::Bool),
];

/// Keys kohya accepts that we do not implement, with the value (kohya's default) that makes each
/// do nothing, if TOML can write it.
const UNSUPPORTED: &[(&str, Level, Inert)] = &[
    ("color_aug", Level::Subset, Inert::False),
    ("face_crop_aug_range", Level::Subset, Inert::Never),
    ("secondary_separator", Level::Subset, Inert::Never),
    ("enable_wildcard", Level::Subset, Inert::False),
    ("token_warmup_min", Level::Subset, Inert::One),
    ("token_warmup_step", Level::Subset, Inert::Zero),
    ("custom_attributes", Level::Subset, Inert::EmptyTable),
    ("resize_interpolation", Level::Subset, Inert::Never),
    ("caption_dropout_every_n_epochs", Level::Subset, Inert::Zero),
    ("network_multiplier", Level::Dataset, Inert::One),
    ("validation_split", Level::Dataset, Inert::Zero),
    ("validation_seed", Level::Dataset, Inert::Never),
    ("alpha_mask", Level::SubsetOnly, Inert::False),
    ("metadata_file", Level::SubsetOnly, Inert::Never),
    ("conditioning_data_dir", Level::SubsetOnly, Inert::Never),
];

/// Command-line options of kohya that are not dataset-config keys (kohya refuses them in the file).
const COMMAND_LINE_ONLY: &[&str] = &[
    "train_data_dir",
    "reg_data_dir",
    "in_json",
    "dataset_repeats",
    "train_batch_size",
    "prior_loss_weight",
    "debug_dataset",
    "max_token_length",
];

#[derive(Debug, Clone, Copy)]
enum Inert {
    False,
    Zero,
    One,
    EmptyTable,
    Never,
}

impl Inert {
    fn holds(self, value: &Value) -> bool {
        let number = match value {
            Value::Integer(i) => Some(*i as f64),
            Value::Float(x) => Some(*x),
            _ => None,
        };
        match self {
            Inert::False => matches!(value, Value::Boolean(false)),
            Inert::Zero => number == Some(0.0),
            Inert::One => number == Some(1.0),
            Inert::EmptyTable => matches!(value, Value::Table(t) if t.is_empty()),
            Inert::Never => false,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Inert::False => " (only `false`, kohya's default, is accepted)",
            Inert::Zero => " (only 0, kohya's default, is accepted)",
            Inert::One => " (only 1, kohya's default, is accepted)",
            Inert::EmptyTable => " (only an empty table is accepted)",
            Inert::Never => "",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading tables

/// A parsed value of a supported key.
#[derive(Debug, Clone, PartialEq)]
enum Parsed {
    Bool(bool),
    Count(u32),
    Rate(f64),
    Text(String),
    Resolution(u32, u32),
}

/// The supported keys a table sets.
type Layer = BTreeMap<&'static str, Parsed>;

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn parse_value(kind: Kind, value: &Value) -> Result<Parsed, String> {
    let expected = |what: &str| format!("expected {what}, found {}", type_name(value));
    match (kind, value) {
        (Kind::Bool, Value::Boolean(b)) => Ok(Parsed::Bool(*b)),
        (Kind::Bool, _) => Err(expected("true or false")),
        (Kind::Count(min), Value::Integer(n)) => {
            if *n < min {
                Err(format!("must be at least {min}, found {n}"))
            } else {
                u32::try_from(*n)
                    .map(Parsed::Count)
                    .map_err(|_| format!("{n} is too large"))
            }
        }
        (Kind::Count(_), _) => Err(expected("an integer")),
        (Kind::Rate, Value::Integer(_) | Value::Float(_)) => {
            let rate = match value {
                Value::Integer(n) => *n as f64,
                Value::Float(x) => *x,
                _ => f64::NAN,
            };
            if (0.0..=1.0).contains(&rate) {
                Ok(Parsed::Rate(rate))
            } else {
                Err(format!("{rate} is not a probability between 0 and 1"))
            }
        }
        (Kind::Rate, _) => Err(expected("a number between 0 and 1")),
        (Kind::Text(non_empty), Value::String(s)) => {
            if non_empty && s.is_empty() {
                Err("must not be empty".into())
            } else {
                Ok(Parsed::Text(s.clone()))
            }
        }
        (Kind::Text(_), _) => Err(expected("a string")),
        (Kind::Resolution, Value::Integer(_)) => {
            let side = positive(value).ok_or_else(|| format!("{value} is not a positive size"))?;
            Ok(Parsed::Resolution(side, side))
        }
        (Kind::Resolution, Value::Array(items)) => match items.as_slice() {
            [w, h] => match (positive(w), positive(h)) {
                (Some(w), Some(h)) => Ok(Parsed::Resolution(w, h)),
                _ => Err(format!(
                    "[{w}, {h}] is not a pair of positive integer sizes"
                )),
            },
            _ => Err(format!(
                "expected an integer or [width, height], found an array of {}",
                items.len()
            )),
        },
        (Kind::Resolution, _) => Err(expected("an integer or [width, height]")),
    }
}

fn positive(value: &Value) -> Option<u32> {
    match value {
        Value::Integer(n) if *n > 0 => u32::try_from(*n).ok(),
        _ => None,
    }
}

/// Reads the keys of one table into a layer, reporting every key it cannot take.
/// `subsets` of a dataset table is skipped (read by the caller).
fn read_layer(table: &Table, place: &str, at: TableKind, problems: &mut Vec<Problem>) -> Layer {
    let mut layer = Layer::new();
    // In key order whatever map the `toml` crate was built with.
    let mut entries: Vec<(&String, &Value)> = table.iter().collect();
    entries.sort_by_key(|(key, _)| *key);
    for (key, value) in entries {
        let mut report = |message: String| {
            problems.push(Problem {
                key: format!("{place}{key}"),
                message,
            });
        };
        if key == "subsets" {
            if at != TableKind::Dataset {
                report("only allowed in a [[datasets]] table".into());
            }
            continue;
        }
        if let Some(&(name, level, kind)) = SUPPORTED.iter().find(|(name, ..)| name == key) {
            if !level.allows(at) {
                report(format!("not allowed here ({})", level.where_allowed()));
                continue;
            }
            match parse_value(kind, value) {
                Ok(parsed) => {
                    layer.insert(name, parsed);
                }
                Err(message) => report(message),
            }
        } else if let Some(&(_, level, inert)) = UNSUPPORTED.iter().find(|(name, ..)| name == key) {
            if !level.allows(at) {
                report(format!(
                    "not allowed here ({}), and not supported",
                    level.where_allowed()
                ));
            } else if !inert.holds(value) {
                report(format!("not supported{}", inert.describe()));
            }
        } else if COMMAND_LINE_ONLY.contains(&key.as_str()) {
            report("a kohya command-line option, not a dataset config key".into());
        } else {
            report(unknown(key));
        }
    }
    layer
}

/// "unknown key", with the closest known key when it looks like a typo.
fn unknown(key: &str) -> String {
    let known = SUPPORTED
        .iter()
        .map(|(name, ..)| *name)
        .chain(UNSUPPORTED.iter().map(|(name, ..)| *name))
        .chain(["general", "datasets", "subsets"]);
    let best = known
        .map(|name| (edit_distance(key, name), name))
        .min()
        .filter(|&(distance, name)| distance <= 2.max(name.len() / 4));
    match best {
        Some((_, name)) => format!("unknown key (did you mean `{name}`?)"),
        None => "unknown key".into(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Resolving

/// The first layer that sets `key`.
fn pick<'a>(layers: &[&'a Layer], key: &str) -> Option<&'a Parsed> {
    layers.iter().find_map(|layer| layer.get(key))
}

fn flag(layers: &[&Layer], key: &str) -> bool {
    matches!(pick(layers, key), Some(Parsed::Bool(true)))
}

fn count(layers: &[&Layer], key: &str, default: u32) -> u32 {
    match pick(layers, key) {
        Some(Parsed::Count(n)) => *n,
        _ => default,
    }
}

fn rate(layers: &[&Layer], key: &str) -> f64 {
    match pick(layers, key) {
        Some(Parsed::Rate(r)) => *r,
        _ => 0.0,
    }
}

fn text(layers: &[&Layer], key: &str) -> Option<String> {
    match pick(layers, key) {
        Some(Parsed::Text(s)) => Some(s.clone()),
        _ => None,
    }
}

fn is_missing_or_empty(value: Option<&Value>) -> bool {
    match value {
        None => true,
        Some(Value::Array(items)) => items.is_empty(),
        Some(_) => false,
    }
}

/// An array of tables, reporting other kinds.
fn tables<'a>(value: Option<&'a Value>, key: &str, problems: &mut Vec<Problem>) -> Vec<&'a Table> {
    match value {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::Table(table) => out.push(table),
                    other => problems.push(Problem {
                        key: format!("{key}[{i}]"),
                        message: format!("expected a table, found {}", type_name(other)),
                    }),
                }
            }
            out
        }
        Some(other) => {
            problems.push(Problem {
                key: key.to_owned(),
                message: format!("expected an array of tables, found {}", type_name(other)),
            });
            Vec::new()
        }
    }
}

fn resolve(root: &Table, problems: &mut Vec<Problem>) -> KohyaDatasetConfig {
    let mut keys: Vec<&String> = root.keys().collect();
    keys.sort();
    for key in keys {
        if key != "general" && key != "datasets" {
            problems.push(Problem {
                key: key.clone(),
                message: if COMMAND_LINE_ONLY.contains(&key.as_str()) {
                    "a kohya command-line option, not a dataset config key".into()
                } else if SUPPORTED.iter().any(|(n, ..)| n == key)
                    || UNSUPPORTED.iter().any(|(n, ..)| n == key)
                {
                    "must be inside [general], [[datasets]] or [[datasets.subsets]]".into()
                } else {
                    unknown(key)
                },
            });
        }
    }
    let empty = Table::new();
    let general = match root.get("general") {
        None => &empty,
        Some(Value::Table(table)) => table,
        Some(other) => {
            problems.push(Problem {
                key: "general".into(),
                message: format!("expected a table, found {}", type_name(other)),
            });
            &empty
        }
    };
    let general = read_layer(general, "general.", TableKind::General, problems);
    if is_missing_or_empty(root.get("datasets")) {
        problems.push(Problem {
            key: "datasets".into(),
            message: "no [[datasets]] table".into(),
        });
    }
    let dataset_tables = tables(root.get("datasets"), "datasets", problems);
    let mut datasets = Vec::new();
    for (i, table) in dataset_tables.into_iter().enumerate() {
        let place = format!("datasets[{i}]");
        let layer = read_layer(table, &format!("{place}."), TableKind::Dataset, problems);
        let layers = [&layer, &general];
        if is_missing_or_empty(table.get("subsets")) {
            problems.push(Problem {
                key: format!("{place}.subsets"),
                message: "no [[datasets.subsets]] table".into(),
            });
        }
        let subset_tables = tables(table.get("subsets"), &format!("{place}.subsets"), problems);
        let mut subsets: Vec<KohyaSubset> = Vec::new();
        for (j, subset_table) in subset_tables.into_iter().enumerate() {
            let subset_place = format!("{place}.subsets[{j}]");
            let own = read_layer(
                subset_table,
                &format!("{subset_place}."),
                TableKind::Subset,
                problems,
            );
            let Some(subset) = resolve_subset(&[&own, &layer, &general], &subset_place, problems)
            else {
                continue;
            };
            if let Some(first) = subsets.iter().position(|s| s.image_dir == subset.image_dir) {
                problems.push(Problem {
                    key: format!("{subset_place}.image_dir"),
                    message: format!(
                        "the same folder as {place}.subsets[{first}] (kohya would ignore this subset)"
                    ),
                });
            }
            subsets.push(subset);
        }
        let min_bucket_reso = count(&layers, "min_bucket_reso", 256);
        let max_bucket_reso = count(&layers, "max_bucket_reso", 1024);
        if min_bucket_reso > max_bucket_reso {
            problems.push(Problem {
                key: format!("{place}.min_bucket_reso"),
                message: format!("{min_bucket_reso} is above max_bucket_reso {max_bucket_reso}"),
            });
        }
        datasets.push(KohyaDataset {
            resolution: match pick(&layers, "resolution") {
                Some(Parsed::Resolution(w, h)) => Some((*w, *h)),
                _ => None,
            },
            batch_size: count(&layers, "batch_size", 1),
            enable_bucket: flag(&layers, "enable_bucket"),
            min_bucket_reso,
            max_bucket_reso,
            bucket_reso_steps: count(&layers, "bucket_reso_steps", 64),
            bucket_no_upscale: flag(&layers, "bucket_no_upscale"),
            subsets,
        });
    }
    KohyaDatasetConfig { datasets }
}

fn resolve_subset(
    layers: &[&Layer],
    place: &str,
    problems: &mut Vec<Problem>,
) -> Option<KohyaSubset> {
    let Some(image_dir) = text(&layers[..1], "image_dir") else {
        problems.push(Problem {
            key: format!("{place}.image_dir"),
            message: "missing (every subset needs its image folder)".into(),
        });
        return None;
    };
    let mut caption_extension =
        text(layers, "caption_extension").unwrap_or_else(|| ".caption".into());
    if !caption_extension.starts_with('.') {
        caption_extension.insert(0, '.');
    }
    Some(KohyaSubset {
        image_dir: PathBuf::from(image_dir),
        is_reg: flag(layers, "is_reg"),
        class_tokens: text(layers, "class_tokens"),
        caption_extension,
        num_repeats: count(layers, "num_repeats", 1),
        flip_aug: flag(layers, "flip_aug"),
        random_crop: flag(layers, "random_crop"),
        cache_info: flag(layers, "cache_info"),
        captions: CaptionRules {
            caption_prefix: text(layers, "caption_prefix"),
            caption_suffix: text(layers, "caption_suffix"),
            caption_dropout_rate: rate(layers, "caption_dropout_rate"),
            shuffle_caption: flag(layers, "shuffle_caption"),
            keep_tokens: count(layers, "keep_tokens", 0) as usize,
            keep_tokens_separator: text(layers, "keep_tokens_separator").filter(|s| !s.is_empty()),
            caption_separator: text(layers, "caption_separator").unwrap_or_else(|| ",".into()),
            caption_tag_dropout_rate: rate(layers, "caption_tag_dropout_rate"),
        },
    })
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// A config as kohya's documentation writes them: two training subsets and a regularisation
    /// subset in one dataset, and a second dataset at another resolution.
    const REALISTIC: &str = r#"
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = 1024
batch_size = 2
enable_bucket = true
min_bucket_reso = 512
max_bucket_reso = 2048
bucket_reso_steps = 64
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = "train/10_sks dog"
  class_tokens = "sks dog"
  num_repeats = 10
  keep_tokens_separator = "|||"
  caption_dropout_rate = 0.05

  [[datasets.subsets]]
  image_dir = "train/closeups"
  num_repeats = 4
  caption_extension = "caption"
  caption_tag_dropout_rate = 0.1
  caption_prefix = "sks dog,"
  random_crop = true
  flip_aug = false
  color_aug = false

  [[datasets.subsets]]
  is_reg = true
  image_dir = "reg/dog"
  class_tokens = "dog"
  shuffle_caption = false

[[datasets]]
resolution = [896, 1152]
caption_separator = ";"
keep_tokens = 0

  [[datasets.subsets]]
  image_dir = "style"
  cache_info = true
"#;

    fn subset(image_dir: &str) -> KohyaSubset {
        KohyaSubset {
            image_dir: image_dir.into(),
            is_reg: false,
            class_tokens: None,
            caption_extension: ".caption".into(),
            num_repeats: 1,
            flip_aug: false,
            random_crop: false,
            cache_info: false,
            captions: CaptionRules::default(),
        }
    }

    #[test]
    fn a_realistic_config_resolves_every_key() {
        let config = KohyaDatasetConfig::from_toml_str(REALISTIC).unwrap();
        let general_captions = CaptionRules {
            shuffle_caption: true,
            keep_tokens: 1,
            ..CaptionRules::default()
        };
        let expected = KohyaDatasetConfig {
            datasets: vec![
                KohyaDataset {
                    resolution: Some((1024, 1024)),
                    batch_size: 2,
                    enable_bucket: true,
                    min_bucket_reso: 512,
                    max_bucket_reso: 2048,
                    bucket_reso_steps: 64,
                    bucket_no_upscale: true,
                    subsets: vec![
                        KohyaSubset {
                            class_tokens: Some("sks dog".into()),
                            caption_extension: ".txt".into(),
                            num_repeats: 10,
                            flip_aug: true,
                            captions: CaptionRules {
                                keep_tokens_separator: Some("|||".into()),
                                caption_dropout_rate: 0.05,
                                ..general_captions.clone()
                            },
                            ..subset("train/10_sks dog")
                        },
                        KohyaSubset {
                            caption_extension: ".caption".into(),
                            num_repeats: 4,
                            random_crop: true,
                            captions: CaptionRules {
                                caption_tag_dropout_rate: 0.1,
                                caption_prefix: Some("sks dog,".into()),
                                ..general_captions.clone()
                            },
                            ..subset("train/closeups")
                        },
                        KohyaSubset {
                            is_reg: true,
                            class_tokens: Some("dog".into()),
                            caption_extension: ".txt".into(),
                            flip_aug: true,
                            captions: CaptionRules {
                                shuffle_caption: false,
                                ..general_captions.clone()
                            },
                            ..subset("reg/dog")
                        },
                    ],
                },
                KohyaDataset {
                    resolution: Some((896, 1152)),
                    batch_size: 1,
                    enable_bucket: false,
                    min_bucket_reso: 256,
                    max_bucket_reso: 1024,
                    bucket_reso_steps: 64,
                    bucket_no_upscale: false,
                    subsets: vec![KohyaSubset {
                        caption_extension: ".txt".into(),
                        flip_aug: true,
                        cache_info: true,
                        captions: CaptionRules {
                            caption_separator: ";".into(),
                            keep_tokens: 0,
                            ..general_captions.clone()
                        },
                        ..subset("style")
                    }],
                },
            ],
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn subsets_inherit_from_their_dataset_then_general_then_kohya_defaults() {
        let text = r#"
[general]
num_repeats = 3
resolution = 768
batch_size = 4
caption_prefix = "general"
keep_tokens_separator = ""

[[datasets]]
num_repeats = 5
batch_size = 8
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "b"
  num_repeats = 7
  caption_prefix = "own"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "c"
"#;
        let config = KohyaDatasetConfig::from_toml_str(text).unwrap();
        let [first, second] = config.datasets.as_slice() else {
            panic!("{config:?}")
        };
        assert_eq!((first.batch_size, second.batch_size), (8, 4));
        assert_eq!(first.resolution, Some((768, 768)));
        assert_eq!(second.resolution, Some((768, 768)));
        let repeats: Vec<u32> = config
            .datasets
            .iter()
            .flat_map(|d| d.subsets.iter().map(|s| s.num_repeats))
            .collect();
        assert_eq!(repeats, [5, 7, 3]);
        let prefixes: Vec<_> = config
            .datasets
            .iter()
            .flat_map(|d| d.subsets.iter().map(|s| s.captions.caption_prefix.clone()))
            .collect();
        assert_eq!(
            prefixes,
            [
                Some("general".into()),
                Some("own".into()),
                Some("general".into())
            ]
        );
        // An empty separator is kohya's "off"; everything unset is kohya's command-line default.
        let c = &second.subsets[0];
        assert_eq!(c.captions.keep_tokens_separator, None);
        assert_eq!(c.caption_extension, ".caption");
        assert_eq!(c.captions.caption_separator, ",");
        assert!(!c.is_reg && c.class_tokens.is_none());
        assert_eq!(
            (
                second.enable_bucket,
                second.min_bucket_reso,
                second.max_bucket_reso,
                second.bucket_reso_steps
            ),
            (false, 256, 1024, 64)
        );

        // No resolution anywhere: left to the command line, as in kohya.
        let config = KohyaDatasetConfig::from_toml_str(
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"x\"",
        )
        .unwrap();
        assert_eq!(config.datasets[0].resolution, None);
    }

    fn problems(text: &str) -> Vec<String> {
        match KohyaDatasetConfig::from_toml_str(text) {
            Err(KohyaConfigError::Invalid { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsupported_keys_are_all_named_with_their_tables() {
        let text = r#"
[general]
token_warmup_step = 0.5
enable_wildcard = false
[[datasets]]
face_crop_aug_range = [2.0, 4.0]
  [[datasets.subsets]]
  image_dir = "a"
  token_warmup_min = 1
  [[datasets.subsets]]
  image_dir = "b"
  color_aug = true
  secondary_separator = ";;;"
  alpha_mask = true
  [[datasets.subsets]]
  metadata_file = "meta.json"
  image_dir = "c"
"#;
        assert_eq!(
            problems(text),
            [
                "general.token_warmup_step: not supported (only 0, kohya's default, is accepted)",
                "datasets[0].face_crop_aug_range: not supported",
                "datasets[0].subsets[1].alpha_mask: not supported (only `false`, kohya's default, is accepted)",
                "datasets[0].subsets[1].color_aug: not supported (only `false`, kohya's default, is accepted)",
                "datasets[0].subsets[1].secondary_separator: not supported",
                "datasets[0].subsets[2].metadata_file: not supported",
            ]
        );
    }

    #[test]
    fn unknown_and_misplaced_keys_are_named() {
        let text = r#"
reolution = 512
[general]
image_dir = "a"
prior_loss_weight = 1.0
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  num_repeat = 3
  batch_size = 2
  shufle_caption = true
  frobnicate = 1
"#;
        assert_eq!(
            problems(text),
            [
                "reolution: unknown key (did you mean `resolution`?)",
                "general.image_dir: not allowed here (kohya reads it only in [[datasets.subsets]])",
                "general.prior_loss_weight: a kohya command-line option, not a dataset config key",
                "datasets[0].subsets[0].batch_size: not allowed here (kohya reads it per dataset: put it in [[datasets]] or [general])",
                "datasets[0].subsets[0].frobnicate: unknown key",
                "datasets[0].subsets[0].num_repeat: unknown key (did you mean `num_repeats`?)",
                "datasets[0].subsets[0].shufle_caption: unknown key (did you mean `shuffle_caption`?)",
            ]
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let text = r#"
[general]
caption_dropout_rate = 1.5
[[datasets]]
resolution = [512]
batch_size = 0
min_bucket_reso = 1024
max_bucket_reso = 512
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 0
  [[datasets.subsets]]
  num_repeats = "10"
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = -1
  caption_separator = ""
  shuffle_caption = "yes"
"#;
        assert_eq!(
            problems(text),
            [
                "general.caption_dropout_rate: 1.5 is not a probability between 0 and 1",
                "datasets[0].batch_size: must be at least 1, found 0",
                "datasets[0].resolution: expected an integer or [width, height], found an array of 1",
                "datasets[0].subsets[0].num_repeats: must be at least 1, found 0",
                "datasets[0].subsets[1].num_repeats: expected an integer, found a string",
                "datasets[0].subsets[1].image_dir: missing (every subset needs its image folder)",
                "datasets[0].subsets[2].caption_separator: must not be empty",
                "datasets[0].subsets[2].keep_tokens: must be at least 0, found -1",
                "datasets[0].subsets[2].shuffle_caption: expected true or false, found a string",
                "datasets[0].subsets[2].image_dir: the same folder as datasets[0].subsets[0] (kohya would ignore this subset)",
                "datasets[0].min_bucket_reso: 1024 is above max_bucket_reso 512",
            ]
        );
    }

    #[test]
    fn missing_tables_syntax_errors_and_files_are_reported() {
        assert_eq!(problems(""), ["datasets: no [[datasets]] table"]);
        assert_eq!(
            problems("[[datasets]]\nbatch_size = 1"),
            ["datasets[0].subsets: no [[datasets.subsets]] table"]
        );
        assert_eq!(
            problems("general = 3\ndatasets = [1]"),
            [
                "general: expected a table, found an integer",
                "datasets[0]: expected a table, found an integer",
            ]
        );
        let error = KohyaDatasetConfig::from_toml_str("[general\n").unwrap_err();
        assert!(
            matches!(error, KohyaConfigError::Syntax { .. }),
            "{error:?}"
        );

        let dir = std::env::temp_dir().join(format!("kohya-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("dataset.toml");
        std::fs::write(
            &file,
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"a\"\ncolor_aug = true\n",
        )
        .unwrap();
        let message = KohyaDatasetConfig::from_file(&file)
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            format!(
                "{}: datasets[0].subsets[0].color_aug: not supported (only `false`, kohya's default, is accepted)",
                file.display()
            )
        );
        std::fs::write(
            &file,
            "[[datasets]]\n[[datasets.subsets]]\ncolor_aug = true\n",
        )
        .unwrap();
        let message = KohyaDatasetConfig::from_file(&file)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(
                "2 problems in the kohya dataset config:\n  datasets[0].subsets[0].color_aug"
            ),
            "{message}"
        );
        let message = KohyaDatasetConfig::from_file(&dir.join("absent.toml"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("absent.toml"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
