//! Resolving a file's layers (subset, dataset, `[general]`, kohya's defaults) into datasets and
//! subsets.

use std::path::PathBuf;

use data::CaptionRules;
use toml::{Table, Value};

use super::schema::*;
use super::{KohyaDataset, KohyaDatasetConfig, KohyaSubset, Problem};

pub(super) fn resolve(root: &Table, problems: &mut Vec<Problem>) -> KohyaDatasetConfig {
    check_top_level(root, problems);
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
        let subsets = resolve_subsets(table, &place, [&layer, &general], problems);
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

/// Every root key but `general` and `datasets` is a problem: a command-line option, a key in the
/// wrong table, or unknown.
fn check_top_level(root: &Table, problems: &mut Vec<Problem>) {
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
}

/// The subsets of `datasets[…]` at `place`, each resolved through its own table, then `layers`
/// (the dataset's and `[general]`).
fn resolve_subsets(
    table: &Table,
    place: &str,
    [layer, general]: [&Layer; 2],
    problems: &mut Vec<Problem>,
) -> Vec<KohyaSubset> {
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
        let Some(subset) = resolve_subset(&[&own, layer, general], &subset_place, problems) else {
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
    subsets
}

pub(super) fn resolve_subset(
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
        captions: CaptionRules::default()
            .with_caption_prefix(text(layers, "caption_prefix"))
            .with_caption_suffix(text(layers, "caption_suffix"))
            .with_caption_dropout_rate(rate(layers, "caption_dropout_rate"))
            .with_shuffle_caption(flag(layers, "shuffle_caption"))
            .with_keep_tokens(count(layers, "keep_tokens", 0) as usize)
            .with_keep_tokens_separator(
                text(layers, "keep_tokens_separator").filter(|s| !s.is_empty()),
            )
            .with_caption_separator(text(layers, "caption_separator").unwrap_or_else(|| ",".into()))
            .with_caption_tag_dropout_rate(rate(layers, "caption_tag_dropout_rate")),
    })
}
