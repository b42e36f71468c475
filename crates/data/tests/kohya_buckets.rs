//! kohya's aspect-ratio buckets against kohya's own code (`tests/fixtures/kohya-buckets.json`, written
//! by `tools/fixtures/generate.py --only kohya_buckets` from sd-scripts v0.10.1): the candidate
//! buckets, every image size's bucket, resized size, crop and SDXL crop corner under each flag set,
//! the buckets in use, the flag sets kohya refuses; then datasets and batches built on them.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::fixture;
use data::Rng;
use data::transform::{self, Placement};
use data::{
    Assignment, BucketConfig, Buckets, CaptionSource, CropMode, Dataset, DatasetConfig, Error,
    Loader, LoaderConfig, SampleKey, Source, kohya_crop_top_left,
};
use serde_json::Value;

fn golden() -> Value {
    let path = test_support::fixture("kohya-buckets.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn number(value: &Value) -> u32 {
    u32::try_from(value.as_u64().unwrap()).unwrap()
}

fn pair(value: &Value) -> (u32, u32) {
    (number(&value[0]), number(&value[1]))
}

fn pairs(value: &Value) -> Vec<(u32, u32)> {
    value.as_array().unwrap().iter().map(pair).collect()
}

fn bucket_config(config: &Value) -> BucketConfig {
    BucketConfig::default()
        .with_resolution(pair(&config["resolution"]))
        .with_enable_bucket(config["enable_bucket"].as_bool().unwrap())
        .with_min_bucket_reso(number(&config["min_bucket_reso"]))
        .with_max_bucket_reso(number(&config["max_bucket_reso"]))
        .with_bucket_reso_steps(number(&config["bucket_reso_steps"]))
        .with_bucket_no_upscale(config["bucket_no_upscale"].as_bool().unwrap())
}

#[test]
fn every_size_goes_where_kohya_puts_it() {
    let golden = golden();
    let columns: Vec<&str> = golden["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "bucket_w",
            "bucket_h",
            "resized_w",
            "resized_h",
            "crop_left",
            "crop_top",
            "crop_top_left_top",
            "crop_top_left_left",
            "flipped_crop_top_left_left"
        ]
    );
    let sizes = pairs(&golden["sizes"]);
    let configs = golden["configs"].as_array().unwrap();
    assert!(sizes.len() >= 200, "{} sizes", sizes.len());
    assert_eq!(configs.len(), 12);
    let (mut compared, mut refused, mut negative) = (0, 0, 0);
    for config in configs {
        let name = config["name"].as_str().unwrap();
        let mut buckets = Buckets::kohya(&bucket_config(config)).unwrap();
        assert!(buckets.is_kohya());
        assert_eq!(
            buckets.candidates(),
            pairs(&config["predefined"]),
            "{name}: kohya's predefined buckets"
        );
        let rows = config["rows"].as_array().unwrap();
        assert_eq!(rows.len(), sizes.len());
        for (&(width, height), row) in sizes.iter().zip(rows) {
            let ours = buckets.select(width, height);
            let context = format!("{name}, {width}x{height}");
            let Some(row) = row.as_array() else {
                // kohya raised (or made a bucket side of 0): we refuse the image.
                assert_eq!(ours, None, "{context}: kohya says {row}");
                refused += 1;
                continue;
            };
            let (row, corner): (Vec<u32>, Vec<i32>) = (
                row[..6].iter().map(number).collect(),
                row[6..]
                    .iter()
                    .map(|v| i32::try_from(v.as_i64().unwrap()).unwrap())
                    .collect(),
            );
            let ours = ours.unwrap_or_else(|| panic!("{context}: no bucket, kohya has {row:?}"));
            assert_eq!(
                (ours.bucket, ours.resized),
                ((row[0], row[1]), (row[2], row[3])),
                "{context}: bucket and resized size"
            );
            let mut rng = Rng::keyed(0, &[]);
            let plain = transform::kohya_placement(
                (width, height),
                ours,
                false,
                CropMode::Center,
                &mut rng,
            );
            assert_eq!(plain.crop_top_left, (row[5], row[4]), "{context}: crop");
            assert_eq!(plain.target, ours.bucket);
            assert_eq!(
                plain.reported_crop_top_left,
                (corner[0], corner[1]),
                "{context}: SDXL crop corner"
            );
            let flipped =
                transform::kohya_placement((width, height), ours, true, CropMode::Center, &mut rng);
            assert_eq!(
                flipped.reported_crop_top_left,
                (corner[0], corner[2]),
                "{context}: SDXL crop corner, flipped"
            );
            // Cropping then flipping: the window starts at the mirrored offset of the flipped image.
            assert_eq!(
                flipped.crop_top_left,
                (row[5], row[2] - row[0] - row[4]),
                "{context}: flipped crop"
            );
            assert_eq!(
                kohya_crop_top_left(ours.bucket, (width, height), false),
                (corner[0], corner[1])
            );
            negative += usize::from(corner.iter().any(|&c| c < 0));
            buckets.add(ours.bucket);
            compared += 1;
        }
        assert_eq!(
            buckets.sizes(),
            pairs(&config["buckets"]),
            "{name}: the buckets in use, in kohya's order"
        );
    }
    assert_eq!(compared + refused, sizes.len() * configs.len());
    assert!(
        compared >= 2900 && refused > 0 && negative > 0,
        "{compared} compared, {refused} refused, {negative} with a corner of -1"
    );
}

#[test]
fn flag_sets_kohya_refuses_are_refused_naming_the_flag() {
    let golden = golden();
    let refused = golden["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 5);
    for config in refused {
        let name = config["name"].as_str().unwrap();
        let expected = match name {
            "min-above-resolution" | "zero-min" | "min-below-steps" => "--min_bucket_reso",
            "max-below-resolution" => "--max_bucket_reso",
            "zero-steps" => "--bucket_reso_steps",
            other => panic!("unknown case {other}"),
        };
        match Buckets::kohya(&bucket_config(config)) {
            Err(Error::InvalidOption { option, problem }) => {
                assert_eq!(option, expected, "{name}: {problem}")
            }
            other => panic!("{name}: kohya says {}, we {other:?}", config["kohya_error"]),
        }
    }
}

#[test]
fn random_crops_stay_inside_and_report_kohyas_corner() {
    let buckets =
        Buckets::kohya(&BucketConfig::new((1024, 1024)).with_enable_bucket(true)).unwrap();
    let assignment = buckets.select(1100, 400).unwrap();
    let spare = assignment.resized.0 - assignment.bucket.0;
    assert_eq!(
        (assignment.bucket, assignment.resized),
        ((1024, 384), (1056, 384))
    );
    let centre = kohya_crop_top_left(assignment.bucket, (1100, 400), false);
    let mut rng = Rng::keyed(3, &[]);
    let mut lefts = HashSet::new();
    for _ in 0..2000 {
        let placement =
            transform::kohya_placement((1100, 400), assignment, false, CropMode::Random, &mut rng);
        assert_eq!(placement.crop_top_left.0, 0);
        assert!(placement.crop_top_left.1 <= spare);
        assert_eq!(placement.reported_crop_top_left, centre);
        lefts.insert(placement.crop_top_left.1);
    }
    assert_eq!(
        lefts.len() as u32,
        spare + 1,
        "every offset 0..=spare occurs"
    );
}

fn eight_images() -> Source {
    Source::ImageFolder {
        root: fixture("imagefolder"),
        caption_column: Some("text".into()),
    }
}

fn small_buckets(no_upscale: bool) -> BucketConfig {
    // The fixture's 40-100 px images at a 64 px resolution: buckets of 32..128 px in steps of 8.
    BucketConfig::default()
        .with_resolution((64, 64))
        .with_enable_bucket(true)
        .with_min_bucket_reso(32)
        .with_max_bucket_reso(128)
        .with_bucket_reso_steps(8)
        .with_bucket_no_upscale(no_upscale)
}

#[test]
fn mixed_sizes_get_several_buckets_and_batches_never_mix_them() {
    for no_upscale in [false, true] {
        let mut config = DatasetConfig::kohya(&small_buckets(no_upscale)).unwrap();
        config.captions.source = CaptionSource::Instance("x".into());
        config.transform.crop = CropMode::Random;
        config.transform.random_flip = true;
        let dataset = Arc::new(Dataset::open(&eight_images(), config).unwrap());
        let buckets = &dataset.config().buckets;
        let used: HashSet<usize> = dataset.items().iter().map(|i| i.bucket).collect();
        assert!(used.len() >= 3, "{:?}", buckets.sizes());
        assert_eq!(used.len(), buckets.sizes().len(), "only the buckets in use");
        // Every item's bucket and resized size are kohya's for its size.
        for item in dataset.items() {
            let Assignment { bucket, resized } = buckets.select(item.size.0, item.size.1).unwrap();
            assert_eq!(
                (buckets.sizes()[item.bucket], item.resized),
                (bucket, resized)
            );
        }
        let loader = Loader::new(dataset.clone(), LoaderConfig::new(2, 5)).unwrap();
        for batch in loader.iter(0, 3 * loader.steps_per_epoch()) {
            let batch = batch.unwrap();
            let first = &dataset.items()[batch.samples[0].item];
            let (width, height) = buckets.sizes()[first.bucket];
            assert_eq!(
                batch.pixels.size(),
                [
                    batch.samples.len() as i64,
                    3,
                    i64::from(height),
                    i64::from(width)
                ]
            );
            for sample in &batch.samples {
                let item = &dataset.items()[sample.item];
                assert_eq!(item.bucket, first.bucket, "one bucket per batch");
                assert_eq!(sample.target_size, (height, width));
                assert_eq!(sample.original_size, (item.size.1, item.size.0));
                assert_eq!(sample.resized_size, (item.resized.1, item.resized.0));
                assert_eq!(
                    sample.crop_top_left,
                    kohya_crop_top_left((width, height), item.size, sample.flipped)
                );
            }
        }
    }
}

#[test]
fn a_kohya_sample_is_its_crop_of_the_whole_resized_image() {
    let mut config = DatasetConfig::kohya(&small_buckets(false)).unwrap();
    config.captions.source = CaptionSource::Instance("x".into());
    config.transform.crop = CropMode::Random;
    config.transform.random_flip = true;
    let dataset = Dataset::open(&eight_images(), config).unwrap();
    // Item 4 is 100x56 (ar 1.79): bucket 80x48 (ar 1.67, the nearest), resized to 86x48, so the
    // random crop has 6 spare columns.
    let mut seen = HashSet::new();
    for step in 0..64 {
        let key = SampleKey {
            seed: 1,
            step,
            slot: 0,
            item: 4,
        };
        let placement = dataset.placement(&key).unwrap();
        let sample = dataset.sample(&key).unwrap();
        seen.insert((placement.flipped, placement.crop_top_left));
        let item = &dataset.items()[4];
        let image = transform::decode(&item.bytes, &item.origin, data::MAX_PIXELS).unwrap();
        let whole = Placement {
            resized: placement.resized,
            flipped: placement.flipped,
            crop_top_left: (0, 0),
            target: placement.resized,
            reported_crop_top_left: (0, 0),
        };
        let whole = transform::apply(&image, &whole)
            .unwrap()
            .to_tensor()
            .unwrap();
        let (top, left) = placement.crop_top_left;
        let (width, height) = placement.target;
        let window = whole.narrow(1, i64::from(top), i64::from(height)).narrow(
            2,
            i64::from(left),
            i64::from(width),
        );
        assert!(
            window.equal(&sample.pixels.to_tensor().unwrap()),
            "{placement:?}"
        );
    }
    assert!(seen.len() > 4, "{seen:?}");
}

#[test]
fn without_enable_bucket_every_image_covers_the_one_resolution() {
    let mut config = DatasetConfig::kohya(&BucketConfig::new((48, 38))).unwrap();
    config.captions.source = CaptionSource::Instance("x".into());
    let dataset = Dataset::open(&eight_images(), config).unwrap();
    assert_eq!(dataset.config().buckets.sizes(), [(48, 38)]);
    for (index, item) in dataset.items().iter().enumerate() {
        let sample = dataset
            .sample(&SampleKey {
                seed: 0,
                step: 0,
                slot: 0,
                item: index,
            })
            .unwrap();
        assert_eq!(sample.target_size, (38, 48));
        assert!(item.resized.0 >= 48 && item.resized.1 >= 38, "{item:?}");
        // kohya's resize rounds (int(x + 0.5)) where torchvision's truncates: 100x56 -> 67.86x38.
        if item.size == (100, 56) {
            assert_eq!(item.resized, (68, 38));
        }
    }
}

#[test]
fn no_upscale_refuses_images_narrower_than_a_step() {
    let mut config = DatasetConfig::kohya(
        &small_buckets(true)
            .with_bucket_reso_steps(64)
            .with_min_bucket_reso(64),
    )
    .unwrap();
    config.captions.source = CaptionSource::Instance("x".into());
    // One 64 px step and a 64x64 area: only 64x64 and 72x72 (scaled down to 64x64) get a bucket;
    // every other image has a side under 64 px, before or after scaling down, where kohya fails.
    let err = Dataset::open(&eight_images(), config.clone()).unwrap_err();
    assert!(
        matches!(err, Error::ImageTooSmall { crop_width: 64, .. }),
        "{err}"
    );
    config.skip_bad_rows = true;
    let dataset = Dataset::open(&eight_images(), config).unwrap();
    assert_eq!((dataset.len(), dataset.skipped().len()), (2, 6));
    assert_eq!(dataset.config().buckets.sizes(), [(64, 64)]);
}
