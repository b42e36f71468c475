//! The same images and captions as a `datasets` parquet file, an imagefolder, a `.txt` folder, a
//! parquet file with renamed columns and one that stores paths: all yield identical samples.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::fixture;
use data::{Columns, CropMode, Dataset, DatasetConfig, Loader, LoaderConfig, Source};

fn all_layouts() -> Vec<(&'static str, Source)> {
    vec![
        (
            "datasets parquet",
            Source::Parquet {
                files: vec![fixture("parquet/data/train-00000-of-00001.parquet")],
                columns: Columns::default(),
            },
        ),
        (
            "imagefolder",
            Source::ImageFolder {
                root: fixture("imagefolder"),
                caption_column: Some("text".into()),
            },
        ),
        (
            "txt folder",
            Source::CaptionFiles {
                root: fixture("txtfolder"),
                read_captions: true,
            },
        ),
        (
            "renamed columns",
            Source::Parquet {
                files: vec![fixture("renamed-columns.parquet")],
                columns: Columns::default()
                    .with_image("picture".into())
                    .with_caption(Some("caption".into())),
            },
        ),
        (
            "images by path",
            Source::Parquet {
                files: vec![fixture("by-path.parquet")],
                columns: Columns::default(),
            },
        ),
    ]
}

fn config() -> DatasetConfig {
    let mut config = DatasetConfig::new(32).unwrap();
    config.transform.crop = CropMode::Random;
    config.transform.random_flip = true;
    config
}

#[test]
fn every_layout_yields_identical_samples() {
    let mut reference: Option<Vec<data::Batch>> = None;
    for (name, source) in all_layouts() {
        let dataset =
            Arc::new(Dataset::open(&source, config()).unwrap_or_else(|e| panic!("{name}: {e}")));
        assert_eq!(dataset.len(), 8, "{name}");
        assert_eq!(
            dataset.items()[2].caption.as_deref(),
            Some("a drawing of a lighthouse, number 2"),
            "{name}"
        );
        let loader = Loader::new(dataset, LoaderConfig::new(3, 11)).unwrap();
        let batches: Vec<_> = loader.iter(0, 6).collect::<Result<_, _>>().unwrap();
        match &reference {
            None => reference = Some(batches),
            Some(expected) => {
                for (got, want) in batches.iter().zip(expected) {
                    assert!(
                        got.pixels.equal(&want.pixels),
                        "{name}: step {} pixels differ",
                        got.step
                    );
                    for (g, w) in got.samples.iter().zip(&want.samples) {
                        assert_eq!(
                            (
                                &g.prompt,
                                g.original_size,
                                g.crop_top_left,
                                g.flipped,
                                g.content_hash,
                                g.item
                            ),
                            (
                                &w.prompt,
                                w.original_size,
                                w.crop_top_left,
                                w.flipped,
                                w.content_hash,
                                w.item
                            ),
                            "{name}: step {}",
                            got.step
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn original_sizes_come_from_the_images() {
    let (_, source) = all_layouts().remove(0);
    let dataset = Dataset::open(&source, config()).unwrap();
    let sizes: Vec<_> = dataset.items().iter().map(|item| item.size).collect();
    // (width, height) as the generator drew them.
    assert_eq!(
        sizes,
        [
            (64, 48),
            (48, 64),
            (80, 60),
            (72, 72),
            (100, 56),
            (56, 96),
            (90, 70),
            (64, 64)
        ]
    );
}
