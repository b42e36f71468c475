//! Caption folders: a configurable caption extension and kohya's `<repeats>_<class tokens>`
//! subfolders (per-item repeats, class tokens for images without a caption file), and the errors
//! of a broken layout.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{Scratch, fixture};
use data::{CaptionFolder, Dataset, DatasetConfig, FolderLayout, Loader, LoaderConfig, Source};

fn copy(image: &str, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(fixture("txtfolder").join(image), to).unwrap();
}

fn open(folder: CaptionFolder) -> data::Result<Dataset> {
    Dataset::open(
        &Source::CaptionFolder(folder),
        DatasetConfig::new(32).unwrap(),
    )
}

/// `10_sks dog/` with a captioned and an uncaptioned image, `2_cat_toy/` with one uncaptioned.
fn kohya_root(scratch: &Scratch, extension: &str) -> std::path::PathBuf {
    let root = scratch.path().join("train");
    copy("000.png", &root.join("10_sks dog/a.png"));
    std::fs::write(
        root.join(format!("10_sks dog/a{extension}")),
        "  sks dog, grass \nsecond line\n",
    )
    .unwrap();
    copy("002.jpg", &root.join("10_sks dog/b.jpg"));
    copy("001.png", &root.join("2_cat_toy/c.png"));
    // Deeper folders and other files are not read, hidden folders are skipped.
    copy("003.png", &root.join("2_cat_toy/nested/d.png"));
    std::fs::write(root.join("notes.md"), "not an image").unwrap();
    copy("004.png", &root.join(".cache/e.png"));
    root
}

#[test]
fn kohya_subfolders_give_repeats_and_class_tokens() {
    let scratch = Scratch::new("kohya");
    let root = kohya_root(&scratch, ".caption");
    let folder = CaptionFolder {
        caption_extension: "caption".into(),
        ..CaptionFolder::kohya(&root)
    };
    let dataset = open(folder).unwrap();
    let items: Vec<(String, u32, String)> = dataset
        .items()
        .iter()
        .map(|item| {
            (
                item.origin.to_string()[root.as_os_str().len() + 1..].to_owned(),
                item.repeats,
                item.caption.clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        items,
        [
            ("10_sks dog/a.png".into(), 10, "sks dog, grass".into()),
            ("10_sks dog/b.jpg".into(), 10, "sks dog".into()),
            ("2_cat_toy/c.png".into(), 2, "cat_toy".into()),
        ]
    );

    // The loader uses each item repeats × DatasetConfig::repeats times per epoch.
    let mut config = DatasetConfig::new(32).unwrap();
    config.repeats = 2;
    let dataset = Dataset::open(
        &Source::CaptionFolder(CaptionFolder {
            caption_extension: ".caption".into(),
            ..CaptionFolder::kohya(&root)
        }),
        config,
    )
    .unwrap();
    let loader = Loader::new(Arc::new(dataset), LoaderConfig::new(4, 1)).unwrap();
    let mut counts = [0; 3];
    for batch in loader.epoch_plan(0) {
        for item in batch {
            counts[item] += 1;
        }
    }
    assert_eq!(counts, [20, 20, 4]);
    assert_eq!(loader.steps_per_epoch(), 11);
}

#[test]
fn a_flat_folder_takes_any_caption_extension() {
    let scratch = Scratch::new("ext");
    copy("000.png", &scratch.path().join("x/a.png"));
    std::fs::write(scratch.path().join("x/a.tags"), "one\ntwo\n").unwrap();
    let folder = CaptionFolder {
        caption_extension: ".tags".into(),
        ..CaptionFolder::new(scratch.path())
    };
    let dataset = open(folder.clone()).unwrap();
    // The flat layout keeps the whole file, trimmed, as before.
    assert_eq!(dataset.items()[0].caption.as_deref(), Some("one\ntwo"));
    assert_eq!(dataset.items()[0].repeats, 1);
    // A `.txt` next to it is not read; with no `.tags` file the image fails, naming the file.
    std::fs::remove_file(scratch.path().join("x/a.tags")).unwrap();
    std::fs::write(scratch.path().join("x/a.txt"), "txt").unwrap();
    let message = open(folder).unwrap_err().to_string();
    assert!(message.contains("a.tags"), "{message}");
    let message = open(CaptionFolder {
        caption_extension: ".".into(),
        ..CaptionFolder::new(scratch.path())
    })
    .unwrap_err()
    .to_string();
    assert!(message.contains("caption_extension"), "{message}");
    assert_eq!(CaptionFolder::new("r").layout, FolderLayout::Flat);
}

#[test]
fn a_broken_kohya_layout_names_the_folder_or_file() {
    type Breakage<'a> = (&'a str, &'a dyn Fn(&Path), &'a str);
    let cases: [Breakage; 5] = [
        (
            "zero",
            &|root| copy("000.png", &root.join("0_sks dog/a.png")),
            "0_sks dog: 0 repeats; at least 1 is needed",
        ),
        (
            "no count",
            &|root| copy("000.png", &root.join("sks dog/a.png")),
            "sks dog: `sks dog` is not named `<repeats>_<class tokens>`",
        ),
        (
            "stray image",
            &|root| copy("000.png", &root.join("a.png")),
            "a.png: an image directly in a kohya-layout folder",
        ),
        (
            "empty caption",
            &|root| std::fs::write(root.join("5_x/a.txt"), "").unwrap(),
            "5_x/a.txt: the caption file is empty",
        ),
        (
            "not utf-8",
            &|root| std::fs::write(root.join("5_x/a.txt"), [0xff, 0xfe, 0x41]).unwrap(),
            "5_x/a.txt: stream did not contain valid UTF-8",
        ),
    ];
    for (name, break_it, expected) in cases {
        let scratch = Scratch::new("broken");
        let root = scratch.path().join("train");
        copy("000.png", &root.join("5_x/a.png"));
        assert!(open(CaptionFolder::kohya(&root)).is_ok());
        break_it(&root);
        let message = open(CaptionFolder::kohya(&root)).unwrap_err().to_string();
        assert!(message.contains(expected), "{name}: {message}");
    }

    let scratch = Scratch::new("empty-kohya");
    let message = open(CaptionFolder::kohya(scratch.path()))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("has no `<repeats>_<class tokens>` subfolders"),
        "{message}"
    );
}
