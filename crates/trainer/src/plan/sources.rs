//! Where the plan's images come from: the subsets of the dataset — `--dataset_name` with the caption
//! flags, or the subsets of a kohya `--dataset_config` file — and, with `--with_prior_preservation`,
//! the class images.

use std::path::Path;

use data::{
    CaptionFolder, CaptionRules, CaptionSource, Captions, Columns, CropMode, DatasetConfig,
    FolderLayout, HubDataset, Selection, Source, Subset,
};

use crate::Result;
use crate::config::TrainConfig;
use crate::config::kohya::{KohyaDatasetConfig, KohyaSubset};

/// The shared part of every subset: buckets (or diffusers' square), crops, flips, upscaling and
/// what to do with bad rows.
pub(super) fn dataset_config(config: &TrainConfig) -> Result<DatasetConfig> {
    let mut data_config = if config.enable_bucket {
        DatasetConfig::kohya(&config.bucket_config())?
    } else {
        DatasetConfig::new(config.resolution)?
    };
    data_config.transform.crop = if config.center_crop {
        CropMode::Center
    } else {
        CropMode::Random
    };
    data_config.transform.random_flip = config.random_flip;
    data_config.transform.allow_upscale = !config.no_upscale;
    data_config.skip_bad_rows = config.skip_bad_images;
    Ok(data_config)
}

/// `--dataset_name` as one subset, with `--max_train_samples`, the instance prompt or captions and
/// the caption flags.
pub(super) fn main_subset(config: &TrainConfig) -> Subset {
    let captions = Captions::default()
        .with_source(match &config.instance_prompt {
            Some(prompt) => CaptionSource::Instance(prompt.clone()),
            None => CaptionSource::Column,
        })
        .with_kohya(caption_rules(config));
    Subset {
        source: dataset_source(config),
        selection: match config.max_train_samples {
            Some(n) => Selection::First(n as usize),
            None => Selection::All,
        },
        captions,
        repeats: 1,
        is_reg: false,
    }
}

/// The subsets of a kohya dataset file, in file order (all its `[[datasets]]`).
pub(super) fn kohya_subsets(file: &KohyaDatasetConfig) -> Vec<Subset> {
    let subset = |s: &KohyaSubset| Subset {
        source: Source::CaptionFolder(CaptionFolder {
            read_captions: true,
            caption_extension: s.caption_extension.clone(),
            layout: FolderLayout::KohyaSubset {
                class_tokens: s.class_tokens.clone(),
            },
            ..CaptionFolder::new(&s.image_dir)
        }),
        selection: Selection::All,
        captions: Captions::default()
            .with_source(CaptionSource::Column)
            .with_kohya(Some(s.captions.clone())),
        repeats: s.num_repeats,
        is_reg: s.is_reg,
    };
    file.datasets
        .iter()
        .flat_map(|d| d.subsets.iter().map(subset))
        .collect()
}

/// `--class_data_dir`'s first `--num_class_images` images with `--class_prompt`, as diffusers'
/// DreamBooth dataset takes them (its own loader pairs them with the instance images, so they are
/// not kohya's balanced regularization images).
pub(super) fn class_subset(config: &TrainConfig) -> Option<Subset> {
    if !config.with_prior_preservation {
        return None;
    }
    let (folder, prompt) = (
        config.class_data_dir.as_ref()?,
        config.class_prompt.as_ref()?,
    );
    Some(Subset {
        source: Source::CaptionFolder(CaptionFolder {
            read_captions: false,
            ..CaptionFolder::new(folder)
        }),
        selection: Selection::First(config.num_class_images as usize),
        captions: Captions::default().with_source(CaptionSource::Instance(prompt.clone())),
        repeats: 1,
        is_reg: false,
    })
}

/// kohya's caption rules from the caption flags; `None` when they change nothing.
pub(super) fn caption_rules(config: &TrainConfig) -> Option<CaptionRules> {
    let rules = CaptionRules::default()
        .with_caption_prefix(config.caption_prefix.clone())
        .with_caption_suffix(config.caption_suffix.clone())
        .with_caption_dropout_rate(config.caption_dropout_rate)
        .with_shuffle_caption(config.shuffle_caption)
        .with_keep_tokens(config.keep_tokens as usize)
        .with_keep_tokens_separator(config.keep_tokens_separator.clone())
        .with_caption_separator(config.caption_separator.clone())
        .with_caption_tag_dropout_rate(config.caption_tag_dropout_rate);
    (rules != CaptionRules::default()).then_some(rules)
}

/// `--dataset_name`: a local folder (parquet files, an imagefolder, or images with `.txt` captions)
/// or a hub dataset id.
fn dataset_source(config: &TrainConfig) -> Source {
    let columns = Columns::default()
        .with_image(config.image_column.clone())
        .with_caption(Some(config.caption_column.clone()));
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
