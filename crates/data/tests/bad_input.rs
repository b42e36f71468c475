//! Every kind of bad input gives an error naming the row or file; `skip_bad_rows` counts them.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Scratch, copy_folder, fixture};
use data::{Columns, Dataset, DatasetConfig, Selection, Source};

fn bad_rows() -> Source {
    Source::Parquet {
        files: vec![fixture("bad-rows.parquet")],
        columns: Columns::default(),
    }
}

fn error(source: &Source, config: DatasetConfig) -> String {
    Dataset::open(source, config).unwrap_err().to_string()
}

fn resolution(side: u32) -> DatasetConfig {
    DatasetConfig::new(side).unwrap()
}

#[test]
fn an_undecodable_image_names_its_row() {
    let mut config = resolution(32);
    config.selection = Selection::First(2);
    let message = error(&bad_rows(), config);
    assert!(
        message.contains("bad-rows.parquet row 1: cannot decode the image"),
        "{message}"
    );
}

#[test]
fn a_missing_column_names_the_file_and_the_columns_it_has() {
    let source = Source::Parquet {
        files: vec![fixture("parquet/data/train-00000-of-00001.parquet")],
        columns: Columns::default()
            .with_image("image".into())
            .with_caption(Some("caption".into())),
    };
    let message = error(&source, resolution(32));
    assert!(
        message.contains(
            "train-00000-of-00001.parquet: no column `caption` (the file has: image, text)"
        ),
        "{message}"
    );
    let source = Source::Parquet {
        files: vec![fixture("renamed-columns.parquet")],
        columns: Columns::default(),
    };
    let message = error(&source, resolution(32));
    assert!(
        message.contains(
            "renamed-columns.parquet: no column `image` (the file has: picture, caption)"
        ),
        "{message}"
    );
}

#[test]
fn an_empty_selection_is_refused() {
    let mut config = resolution(32);
    config.selection = Selection::First(0);
    assert_eq!(
        error(&bad_rows(), config),
        "empty selection: First(0) of a source with 6 rows selects nothing"
    );
    let empty = Scratch::new("empty");
    let source = Source::CaptionFiles {
        root: empty.path().to_path_buf(),
        read_captions: true,
    };
    let message = error(&source, resolution(32));
    assert_eq!(
        message,
        format!(
            "empty selection: {}: no images (.png, .jpg, .jpeg, .webp) in the folder or its subfolders",
            empty.path().display()
        )
    );
    let source = Source::Parquet {
        files: vec![],
        columns: Columns::default(),
    };
    assert_eq!(
        error(&source, resolution(32)),
        "empty selection: no parquet files given"
    );
}

#[test]
fn an_image_smaller_than_the_crop_names_its_row() {
    let source = Source::ImageFolder {
        root: fixture("imagefolder"),
        caption_column: Some("text".into()),
    };
    let message = error(&source, resolution(50));
    assert!(
        message.contains(
            "metadata.jsonl line 1: image 64x48 is smaller than the 50x50 crop (upscaling is off"
        ),
        "{message}"
    );
    // With upscaling allowed the same images are accepted.
    let mut config = resolution(50);
    config.transform.allow_upscale = true;
    assert_eq!(Dataset::open(&source, config).unwrap().len(), 8);
}

#[test]
fn a_path_escaping_the_dataset_folder_is_refused() {
    let scratch = Scratch::new("escape");
    let root = scratch.path().join("set");
    copy_folder(&fixture("imagefolder"), &root);
    std::fs::write(root.join("metadata.jsonl"), "{\"file_name\": \"000.png\", \"text\": \"a\"}\n{\"file_name\": \"../../etc/passwd\", \"text\": \"b\"}\n").unwrap();
    let source = Source::ImageFolder {
        root: root.clone(),
        caption_column: Some("text".into()),
    };
    let message = error(&source, resolution(32));
    assert!(
        message.contains(
            "metadata.jsonl line 2: image path `../../etc/passwd` escapes the dataset folder"
        ),
        "{message}"
    );
    // In parquet: row 5 of bad-rows.parquet names `../outside.png`.
    let mut config = resolution(16);
    config.selection = Selection::Shuffled {
        count: None,
        seed: 0,
    };
    config.skip_bad_rows = true;
    let dataset = Dataset::open(&bad_rows(), config).unwrap();
    let escaped = dataset
        .skipped()
        .iter()
        .find(|s| s.error.to_string().contains("row 5"))
        .unwrap();
    assert!(
        escaped
            .error
            .to_string()
            .contains("image path `../outside.png` escapes the dataset folder")
    );
}

#[test]
fn skipping_bad_rows_counts_them() {
    let mut config = resolution(32);
    config.skip_bad_rows = true;
    let dataset = Dataset::open(&bad_rows(), config).unwrap();
    assert_eq!(dataset.len(), 3);
    let captions: Vec<_> = dataset
        .items()
        .iter()
        .map(|i| i.caption.clone().unwrap())
        .collect();
    assert_eq!(captions, ["good 0", "good 2", "good 4"]);
    let reasons: Vec<String> = dataset
        .skipped()
        .iter()
        .map(|s| s.error.to_string())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains("row 1: cannot decode the image"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("row 3: image 20x16 is smaller than the 32x32 crop"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("row 5: image path `../outside.png` escapes"),
        "{reasons:?}"
    );
    // Without the option the first bad row stops the run.
    let message = error(&bad_rows(), resolution(32));
    assert!(message.contains("row 1: cannot decode"), "{message}");
    // Every row bad: nothing left is an error too.
    let scratch = Scratch::new("all-bad");
    std::fs::write(scratch.path().join("a.png"), b"garbage").unwrap();
    std::fs::write(scratch.path().join("b.jpg"), b"garbage").unwrap();
    let mut config = resolution(32);
    config.skip_bad_rows = true;
    let source = Source::CaptionFiles {
        root: scratch.path().to_path_buf(),
        read_captions: false,
    };
    config.captions.source = data::CaptionSource::Instance("x".into());
    assert_eq!(
        error(&source, config),
        "empty selection: all 2 selected rows were skipped as bad"
    );
}

#[test]
fn folder_problems_name_the_file() {
    let scratch = Scratch::new("folders");
    // A .txt folder with an image lacking its caption, and a garbage image.
    let txt = scratch.path().join("txt");
    copy_folder(&fixture("txtfolder"), &txt);
    std::fs::remove_file(txt.join("003.txt")).unwrap();
    let source = Source::CaptionFiles {
        root: txt.clone(),
        read_captions: true,
    };
    let message = error(&source, resolution(32));
    assert!(
        message.contains("003.png: no caption file") && message.contains("003.txt next to it"),
        "{message}"
    );
    // Not needed with an instance prompt.
    let mut config = resolution(32);
    config.captions.source = data::CaptionSource::Instance("x".into());
    assert_eq!(Dataset::open(&source, config).unwrap().len(), 8);
    std::fs::write(txt.join("003.txt"), "fine").unwrap();
    std::fs::write(txt.join("004.png"), b"garbage").unwrap();
    let message = error(&source, resolution(32));
    assert!(
        message.contains("txt/004.png: cannot decode the image"),
        "{message}"
    );

    // metadata.jsonl: bad JSON, a missing image file, a missing caption key.
    let folder = scratch.path().join("imagefolder");
    copy_folder(&fixture("imagefolder"), &folder);
    let source = Source::ImageFolder {
        root: folder.clone(),
        caption_column: Some("text".into()),
    };
    std::fs::write(
        folder.join("metadata.jsonl"),
        "{\"file_name\": \"000.png\", \"text\": \"a\"}\n{oops\n",
    )
    .unwrap();
    let message = error(&source, resolution(32));
    assert!(message.contains("metadata.jsonl:2: not JSON"), "{message}");
    std::fs::write(
        folder.join("metadata.jsonl"),
        "{\"file_name\": \"missing.png\", \"text\": \"a\"}\n",
    )
    .unwrap();
    let message = error(&source, resolution(32));
    assert!(message.contains("missing.png: No such file"), "{message}");
    std::fs::write(
        folder.join("metadata.jsonl"),
        "{\"file_name\": \"000.png\", \"caption\": \"a\"}\n",
    )
    .unwrap();
    let message = error(&source, resolution(32));
    assert!(
        message.contains("metadata.jsonl:1: no string caption `text`"),
        "{message}"
    );
}

#[test]
fn nonsense_options_are_refused() {
    let mut config = resolution(32);
    config.repeats = 0;
    assert_eq!(
        error(&bad_rows(), config),
        "invalid option `repeats`: must be at least 1"
    );
    let mut config = resolution(32);
    config.captions.dropout = 1.5;
    assert_eq!(
        error(&bad_rows(), config),
        "invalid option `caption_dropout`: 1.5 is not a probability"
    );
    let dataset = std::sync::Arc::new(Dataset::open(&fixtures_txt(), resolution(32)).unwrap());
    let err = data::Loader::new(dataset.clone(), data::LoaderConfig::new(0, 0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid option `batch_size`: must be positive"
    );
    let mut drop_all = data::LoaderConfig::new(9, 0);
    drop_all.drop_last = true;
    let err = data::Loader::new(dataset, drop_all).unwrap_err();
    assert!(
        err.to_string()
            .contains("no bucket holds a full batch of 9"),
        "{err}"
    );
}

fn fixtures_txt() -> Source {
    Source::CaptionFiles {
        root: fixture("txtfolder"),
        read_captions: true,
    }
}

/// Parquet footers that claim impossible counts (found by the `parquet` fuzz target,
/// docs/RELIABILITY.md; the inputs are in `fuzz/corpus/parquet/`): a schema element with 536
/// million children, on which the `parquet` crate reserved 4 GB (an allocation that fails aborts the
/// process), and row groups of 2⁶⁰ rows, whose index list could not be allocated (a panic). Both are
/// refused as malformed files, named, before either happens.
#[test]
fn footers_claiming_impossible_counts_are_refused_naming_the_file() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/parquet");
    let scratch = Scratch::new("footer-counts");
    for (input, expected) in [
        ("crash-huge-num-children", "children in a schema of"),
        ("crash-huge-row-count", "rows"),
        // A field of another type than the parquet crate reads it as, after which the crate read
        // on from the wrong place and skipped billions of booleans that take no bytes (seconds).
        ("slow-footer-field-types-1", "where a"),
        // Lists of booleans, which the crate skips without reading a byte where the protocol gives
        // each one: it then read the rest as lists of billions of elements (seconds to minutes).
        ("slow-bool-skip-1", "is a bool"),
        ("slow-bool-skip-2", "is a bool"),
        ("slow-bool-skip-3", "is a bool"),
    ] {
        let file = scratch.path().join(format!("{input}.parquet"));
        std::fs::copy(corpus.join(input), &file).unwrap();
        let source = Source::Parquet {
            files: vec![file],
            columns: Columns::default(),
        };
        let message = error(&source, resolution(32));
        println!("{input}: {message}");
        assert!(
            message.contains(&format!("{input}.parquet"))
                && message.contains("the file is malformed")
                && message.contains(expected),
            "{input}: {message}"
        );
    }
}

/// Pages whose headers claim more than their bytes can hold: dictionaries of billions of values and
/// pages decompressing to gigabytes, which the `parquet` crate reserved memory for before reading
/// (an allocation that fails aborts the process; found by the `parquet` fuzz target,
/// docs/RELIABILITY.md), and a page header that cannot be read within its chunk. Each is refused,
/// naming the file, the row group and the column.
#[test]
fn pages_claiming_impossible_sizes_are_refused_naming_the_file_and_column() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/parquet");
    let scratch = Scratch::new("page-sizes");
    let inputs = (3..=7).map(|i| format!("crash-page-alloc-{i}"));
    // A page header the parquet crate read on from the wrong place into a skip of seconds.
    for input in inputs.chain(["slow-page-header-1".to_owned()]) {
        let file = scratch.path().join(format!("{input}.parquet"));
        std::fs::copy(corpus.join(&input), &file).unwrap();
        let source = Source::Parquet {
            files: vec![file],
            columns: Columns::default(),
        };
        let message = error(&source, resolution(32));
        println!("{input}: {message}");
        assert!(
            message.contains(&format!("{input}.parquet"))
                && message.contains("the file is malformed"),
            "{input}: {message}"
        );
    }
}

/// An image of an extreme aspect ratio whose resize to cover its crop would make more pixels than
/// an image may have (a 60000×2 strip covering a 1024 px square: 30.7 million × 1024 pixels, 94 GB)
/// is refused when the dataset is opened, naming the file and the sizes — not an allocation that
/// fails and aborts the process; with `skip_bad_rows` it is skipped and the rest trains.
#[test]
fn an_image_whose_resize_would_be_too_large_is_refused_naming_the_file() {
    let scratch = Scratch::new("extreme-aspect");
    let strip = image::RgbImage::from_pixel(60_000, 2, image::Rgb([200, 10, 10]));
    strip.save(scratch.path().join("strip.png")).unwrap();
    std::fs::write(scratch.path().join("strip.txt"), "a strip").unwrap();
    let square = image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]));
    square.save(scratch.path().join("square.png")).unwrap();
    std::fs::write(scratch.path().join("square.txt"), "a square").unwrap();
    let source = Source::CaptionFiles {
        root: scratch.path().to_path_buf(),
        read_captions: true,
    };
    let mut config = resolution(1024);
    config.transform.allow_upscale = true;
    let message = error(&source, config.clone());
    assert!(
        message.contains("strip.png: image 60000x2 would be resized to 30720000x1024 to cover its 1024x1024 bucket, more than the 178956970 pixels"),
        "{message}"
    );
    config.skip_bad_rows = true;
    let dataset = Dataset::open(&source, config).unwrap();
    assert_eq!((dataset.len(), dataset.skipped().len()), (1, 1));
}

/// An image of more pixels than `max_pixels` (PIL's 178,956,970 by default) is refused from its
/// header, before it is decoded, naming the file and its size.
#[test]
fn an_image_of_too_many_pixels_is_refused_before_decoding() {
    let scratch = Scratch::new("too-many-pixels");
    image::RgbImage::from_pixel(400, 300, image::Rgb([9, 9, 9]))
        .save(scratch.path().join("big.png"))
        .unwrap();
    let source = Source::CaptionFiles {
        root: scratch.path().to_path_buf(),
        read_captions: false,
    };
    let mut config = resolution(32);
    config.captions.source = data::CaptionSource::Instance("x".into());
    assert_eq!(config.transform.max_pixels, data::MAX_PIXELS);
    Dataset::open(&source, config.clone()).unwrap();
    config.transform = config.transform.with_max_pixels(119_999);
    let message = error(&source, config);
    assert!(
        message
            .contains("big.png: image 400x300 has more than the 119999 pixels an image may have"),
        "{message}"
    );
}
