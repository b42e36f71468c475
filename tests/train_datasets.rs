//! The trainer on real-world datasets (issue 16), end to end on the tiny SDXL-shaped model on the
//! CPU: images of any size, rows that cannot be used.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::Path;

use trainer::TrainConfig;
use trainer::run::LORA_FILE;

#[path = "common/training.rs"]
mod training;

use training::{fixture, run_output, scratch, tiny};

/// A short run of the tiny model on `dataset` at 64 px.
fn short(dataset: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        dataset_name: dataset.display().to_string(),
        max_train_steps: 2,
        gradient_accumulation_steps: 1,
        checkpointing_steps: 100,
        validation_prompt: None,
        ..tiny(out)
    }
}

#[test]
fn images_smaller_than_the_resolution_are_resized_up_unless_no_upscale() {
    // 40 to 100 px images at 64 px: several are smaller than the crop.
    let dir = scratch("upscale");
    let dataset = fixture("captioned-images/imagefolder");
    let config = short(&dataset, &dir.join("run"));
    let (ok, stderr) = run_output(&config);
    assert!(ok, "training failed:\n{stderr}");
    assert!(dir.join("run").join(LORA_FILE).is_file());

    let refused = TrainConfig {
        no_upscale: true,
        output_dir: dir.join("refused"),
        ..config
    };
    let (ok, stderr) = run_output(&refused);
    assert!(!ok, "--no_upscale trained on images below 64 px");
    assert!(
        stderr.contains("is smaller than the 64x64 crop (upscaling is off"),
        "{stderr}"
    );
    assert!(
        stderr.contains("metadata.jsonl line"),
        "names no row: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn skip_bad_images_trains_past_unusable_rows_and_lists_them_at_the_end() {
    let dir = scratch("bad-rows");
    let dataset = dir.join("data");
    std::fs::create_dir_all(&dataset).unwrap();
    std::fs::copy(
        fixture("captioned-images/bad-rows.parquet"),
        dataset.join("bad-rows.parquet"),
    )
    .unwrap();
    let config = short(&dataset, &dir.join("stops"));
    let (ok, stderr) = run_output(&config);
    assert!(!ok, "a dataset with an undecodable row trained");
    assert!(stderr.contains("row 1"), "names no row: {stderr}");

    let skipping = TrainConfig {
        skip_bad_images: true,
        output_dir: dir.join("skips"),
        ..config
    };
    let (ok, stderr) = run_output(&skipping);
    assert!(ok, "training failed:\n{stderr}");
    let end = stderr
        .rfind("2 row(s) were left out (--skip_bad_images):")
        .unwrap_or_else(|| panic!("no list of two rows at the end:\n{stderr}"));
    let listed = &stderr[end..];
    assert!(
        listed.contains("row 1") && listed.contains("row 5"),
        "{listed}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
