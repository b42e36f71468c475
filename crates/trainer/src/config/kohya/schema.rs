//! The keys kohya's dataset files accept (its `ConfigSanitizer` schemas), which of them we support,
//! and how values are read.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::Problem;

// ---------------------------------------------------------------------------------------------
// The schema

/// Which tables accept a key (kohya's `ConfigSanitizer` schemas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    /// `DATASET_ASCENDABLE_SCHEMA`: `[general]` and `[[datasets]]`.
    Dataset,
    /// The subset "ascendable" schemas: `[general]`, `[[datasets]]` and `[[datasets.subsets]]`.
    Subset,
    /// The subset "distinct" schemas: `[[datasets.subsets]]` only.
    SubsetOnly,
}

/// The table a key was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TableKind {
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
pub(super) enum Kind {
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

pub(super) const SUPPORTED: &[(&str, Level, Kind)] = &[
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
pub(super) const UNSUPPORTED: &[(&str, Level, Inert)] = &[
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
pub(super) const COMMAND_LINE_ONLY: &[&str] = &[
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
pub(super) enum Inert {
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
pub(super) enum Parsed {
    Bool(bool),
    Count(u32),
    Rate(f64),
    Text(String),
    Resolution(u32, u32),
}

/// The supported keys a table sets.
pub(super) type Layer = BTreeMap<&'static str, Parsed>;

pub(super) fn type_name(value: &Value) -> &'static str {
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

pub(super) fn parse_value(kind: Kind, value: &Value) -> Result<Parsed, String> {
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

pub(super) fn positive(value: &Value) -> Option<u32> {
    match value {
        Value::Integer(n) if *n > 0 => u32::try_from(*n).ok(),
        _ => None,
    }
}

/// Reads the keys of one table into a layer, reporting every key it cannot take.
/// `subsets` of a dataset table is skipped (read by the caller).
pub(super) fn read_layer(
    table: &Table,
    place: &str,
    at: TableKind,
    problems: &mut Vec<Problem>,
) -> Layer {
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
pub(super) fn unknown(key: &str) -> String {
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

/// The Levenshtein distance of `a` and `b`, in characters.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
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
pub(super) fn pick<'a>(layers: &[&'a Layer], key: &str) -> Option<&'a Parsed> {
    layers.iter().find_map(|layer| layer.get(key))
}

pub(super) fn flag(layers: &[&Layer], key: &str) -> bool {
    matches!(pick(layers, key), Some(Parsed::Bool(true)))
}

pub(super) fn count(layers: &[&Layer], key: &str, default: u32) -> u32 {
    match pick(layers, key) {
        Some(Parsed::Count(n)) => *n,
        _ => default,
    }
}

pub(super) fn rate(layers: &[&Layer], key: &str) -> f64 {
    match pick(layers, key) {
        Some(Parsed::Rate(r)) => *r,
        _ => 0.0,
    }
}

pub(super) fn text(layers: &[&Layer], key: &str) -> Option<String> {
    match pick(layers, key) {
        Some(Parsed::Text(s)) => Some(s.clone()),
        _ => None,
    }
}

pub(super) fn is_missing_or_empty(value: Option<&Value>) -> bool {
    match value {
        None => true,
        Some(Value::Array(items)) => items.is_empty(),
        Some(_) => false,
    }
}

/// An array of tables, reporting other kinds.
pub(super) fn tables<'a>(
    value: Option<&'a Value>,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Vec<&'a Table> {
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
