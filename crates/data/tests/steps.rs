//! Selection, prompts, crops, flips and the per-step randomness of the loader.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::fixture;
use data::transform::{self, Placement};
use data::{
    BucketConfig, Buckets, CaptionSource, Columns, CropMode, Dataset, DatasetConfig, Loader,
    LoaderConfig, Origin, SampleKey, Selection, Source,
};

fn eighty_rows() -> Source {
    Source::Parquet {
        files: vec![fixture("eighty-rows.parquet")],
        columns: Columns::default(),
    }
}

fn eight_images() -> Source {
    Source::ImageFolder {
        root: fixture("imagefolder"),
        caption_column: Some("text".into()),
    }
}

fn random_config(resolution: u32) -> DatasetConfig {
    let mut config = DatasetConfig::new(resolution).unwrap();
    config.transform.crop = CropMode::Random;
    config.transform.random_flip = true;
    config
}

#[test]
fn first_75_rows_with_one_instance_prompt() {
    let mut config = DatasetConfig::new(8).unwrap();
    config.selection = Selection::First(75);
    config.captions.source = CaptionSource::Instance("a drawing in naruto style".into());
    let dataset = Dataset::open(&eighty_rows(), config).unwrap();
    assert_eq!(dataset.len(), 75);
    let rows: Vec<usize> = dataset
        .items()
        .iter()
        .map(|item| match &item.origin {
            Origin::ParquetRow { row, .. } => *row,
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(rows, (0..75).collect::<Vec<_>>());
    // Captions were not even read; every prompt is the instance prompt.
    assert!(dataset.items().iter().all(|item| item.caption.is_none()));
    let loader = Loader::new(Arc::new(dataset), LoaderConfig::new(5, 3)).unwrap();
    assert_eq!(loader.steps_per_epoch(), 15);
    let mut seen = HashSet::new();
    for step in 0..15 {
        for sample in loader.batch(step).unwrap().samples {
            assert_eq!(sample.prompt, "a drawing in naruto style");
            seen.insert(sample.item);
        }
    }
    assert_eq!(seen.len(), 75, "one epoch visits every selected row once");
}

#[test]
fn captions_templates_and_dropout() {
    let mut config = DatasetConfig::new(8).unwrap();
    config.selection = Selection::First(3);
    config.captions.template = Some("naruto style, {}".into());
    let dataset = Dataset::open(&eighty_rows(), config.clone()).unwrap();
    let key = |step, item| SampleKey {
        seed: 1,
        step,
        slot: 0,
        item,
    };
    assert_eq!(dataset.prompt(&key(0, 2)).unwrap(), "naruto style, row 2");

    config.captions.dropout = 0.3;
    let dataset = Dataset::open(&eighty_rows(), config).unwrap();
    let dropped = (0..2000)
        .filter(|&step| dataset.prompt(&key(step, 1)).unwrap().is_empty())
        .count();
    assert!(
        (500..700).contains(&dropped),
        "{dropped} of 2000 dropped at p = 0.3"
    );
    assert_eq!(
        dataset.prompt(&key(17, 1)).unwrap(),
        dataset.prompt(&key(17, 1)).unwrap()
    );
}

#[test]
fn seeded_subset_and_repeats() {
    let subset = |seed| {
        let mut config = DatasetConfig::new(8).unwrap();
        config.selection = Selection::Shuffled {
            count: Some(10),
            seed,
        };
        let dataset = Dataset::open(&eighty_rows(), config).unwrap();
        dataset
            .items()
            .iter()
            .map(|i| i.caption.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(subset(4), subset(4));
    assert_ne!(subset(4), subset(5));
    assert_eq!(subset(4).len(), 10);

    let mut config = DatasetConfig::new(8).unwrap();
    config.selection = Selection::First(6);
    config.repeats = 3;
    let loader = Loader::new(
        Arc::new(Dataset::open(&eighty_rows(), config).unwrap()),
        LoaderConfig::new(4, 0),
    )
    .unwrap();
    let plan = loader.epoch_plan(0);
    assert_eq!(
        plan.iter().map(Vec::len).collect::<Vec<_>>(),
        [4, 4, 4, 4, 2]
    );
    let mut counts = [0; 6];
    plan.iter().flatten().for_each(|&i| counts[i] += 1);
    assert_eq!(counts, [3; 6]);
}

#[test]
fn centre_crop_coordinates_and_pixels() {
    let dataset = Dataset::open(&eight_images(), DatasetConfig::new(32).unwrap()).unwrap();
    let key = |item| SampleKey {
        seed: 0,
        step: 0,
        slot: 0,
        item,
    };
    // Item 0 is 64x48 (w x h): resized to 42x32 (int(32*64/48) = 42), centre crop left = round(10/2) = 5.
    let sample = dataset.sample(&key(0)).unwrap();
    assert_eq!(
        (sample.original_size, sample.resized_size),
        ((48, 64), (32, 42))
    );
    assert_eq!(
        (sample.crop_top_left, sample.target_size, sample.flipped),
        ((0, 5), (32, 32), false)
    );
    // Item 4 is 100x56: resized 57x32, 25 spare columns: round(12.5) = 12 (ties to even, as Python).
    let sample = dataset.sample(&key(4)).unwrap();
    assert_eq!(
        (sample.resized_size, sample.crop_top_left),
        ((32, 57), (0, 12))
    );
    // Item 5 is 56x96: resized 32x54, top = round(11) = 11.
    let sample = dataset.sample(&key(5)).unwrap();
    assert_eq!(
        (sample.resized_size, sample.crop_top_left),
        ((54, 32), (11, 0))
    );
    // The pixels are that window of the whole resized image.
    let item = &dataset.items()[5];
    let image = transform::decode(&item.bytes, &item.origin, data::MAX_PIXELS).unwrap();
    let whole = Placement {
        resized: (32, 54),
        flipped: false,
        crop_top_left: (0, 0),
        target: (32, 54),
        reported_crop_top_left: (0, 0),
    };
    let whole = transform::apply(&image, &whole)
        .unwrap()
        .to_tensor()
        .unwrap();
    assert!(
        whole
            .narrow(1, 11, 32)
            .equal(&sample.pixels.to_tensor().unwrap())
    );
    let (min, max) = (
        sample.pixels.to_tensor().unwrap().min().double_value(&[]),
        sample.pixels.to_tensor().unwrap().max().double_value(&[]),
    );
    assert!(min >= -1.0 && max <= 1.0 && max - min > 0.5, "{min}..{max}");
}

#[test]
fn random_crops_and_flips_vary_per_step_and_stay_inside() {
    let dataset = Dataset::open(&eight_images(), random_config(32)).unwrap();
    let mut corners = HashSet::new();
    let mut flips = 0;
    for step in 0..400 {
        let key = SampleKey {
            seed: 9,
            step,
            slot: 0,
            item: 4,
        };
        let placement = dataset.placement(&key).unwrap();
        let (top, left) = placement.crop_top_left;
        assert_eq!(top, 0);
        assert!(left <= 57 - 32);
        corners.insert(left);
        flips += usize::from(placement.flipped);
    }
    assert_eq!(corners.len(), 26, "every left offset 0..=25 occurs");
    assert!((160..240).contains(&flips), "{flips} of 400 flipped");
}

#[test]
fn a_flipped_sample_is_the_mirror_of_the_unflipped_resize() {
    let dataset = Dataset::open(&eight_images(), random_config(32)).unwrap();
    let key = (0..)
        .map(|step| SampleKey {
            seed: 2,
            step,
            slot: 0,
            item: 0,
        })
        .find(|k| {
            let p = dataset.placement(k).unwrap();
            p.flipped && p.crop_top_left.1 > 0 && p.crop_top_left.1 < 10
        });
    let key = key.unwrap();
    let sample = dataset.sample(&key).unwrap();
    let item = &dataset.items()[0];
    let image = transform::decode(&item.bytes, &item.origin, data::MAX_PIXELS).unwrap();
    // diffusers crops the flipped image: in unflipped coordinates the window starts at 42 - 32 - left.
    let left = sample.crop_top_left.1 as u32;
    let unflipped = Placement {
        resized: (42, 32),
        flipped: false,
        crop_top_left: (0, 42 - 32 - left),
        target: (32, 32),
        reported_crop_top_left: (0, 0),
    };
    let unflipped = transform::apply(&image, &unflipped)
        .unwrap()
        .to_tensor()
        .unwrap();
    assert!(
        unflipped
            .flip([2])
            .equal(&sample.pixels.to_tensor().unwrap())
    );
}

/// Items, crop corners, flips and the pixel sum of a batch.
type Fingerprint = (Vec<usize>, Vec<(i32, i32)>, Vec<bool>, f64);

fn fingerprint(batch: &data::Batch) -> Fingerprint {
    (
        batch.samples.iter().map(|s| s.item).collect(),
        batch.samples.iter().map(|s| s.crop_top_left).collect(),
        batch.samples.iter().map(|s| s.flipped).collect(),
        batch.pixels.sum(tch::Kind::Double).double_value(&[]),
    )
}

#[test]
fn epochs_differ_and_a_restart_sees_the_same_batches() {
    let open = || Arc::new(Dataset::open(&eight_images(), random_config(32)).unwrap());
    let mut config = LoaderConfig::new(2, 1234);
    config.workers = 3;
    let loader = Loader::new(open(), config).unwrap();
    assert_eq!(loader.steps_per_epoch(), 4);
    let full: Vec<_> = loader
        .iter(0, 12)
        .map(|b| fingerprint(&b.unwrap()))
        .collect();
    // A new process: a freshly opened dataset, one worker, resuming at step 6.
    let mut resumed_config = config;
    resumed_config.workers = 1;
    let resumed = Loader::new(open(), resumed_config).unwrap();
    let tail: Vec<_> = resumed
        .iter(6, 12)
        .map(|b| fingerprint(&b.unwrap()))
        .collect();
    assert_eq!(tail, full[6..]);
    assert_eq!(fingerprint(&resumed.batch(7).unwrap()), full[7]);
    // Each epoch has another order, and each item another crop or flip.
    let epoch = |e: usize| full[e * 4..(e + 1) * 4].to_vec();
    assert_ne!(epoch(0), epoch(1));
    assert_ne!(epoch(1), epoch(2));
    let placements = |e: usize| {
        let mut p: Vec<_> = epoch(e)
            .into_iter()
            .flat_map(|(items, crops, flips, _)| {
                items.into_iter().zip(crops).zip(flips).collect::<Vec<_>>()
            })
            .collect();
        p.sort();
        p
    };
    assert_ne!(placements(0), placements(1));
    // Another seed, other batches.
    let other = Loader::new(open(), config.with_seed(1235)).unwrap();
    assert_ne!(fingerprint(&other.batch(0).unwrap()), full[0]);
}

#[test]
fn bucketed_batches_hold_one_size() {
    let mut config = random_config(40);
    config.buckets = Buckets::kohya(
        &BucketConfig::default()
            .with_resolution((40, 40))
            .with_enable_bucket(true)
            .with_min_bucket_reso(24)
            .with_max_bucket_reso(64)
            .with_bucket_reso_steps(8)
            .with_bucket_no_upscale(false),
    )
    .unwrap();
    let dataset = Arc::new(Dataset::open(&eight_images(), config).unwrap());
    let buckets: HashSet<usize> = dataset.items().iter().map(|i| i.bucket).collect();
    assert!(
        buckets.len() >= 3,
        "the fixture's aspect ratios span several buckets"
    );
    let loader = Loader::new(dataset.clone(), LoaderConfig::new(2, 5)).unwrap();
    for batch in loader.iter(0, 2 * loader.steps_per_epoch()) {
        let batch = batch.unwrap();
        let size = batch.samples[0].target_size;
        assert!(batch.samples.iter().all(|s| s.target_size == size));
        assert_eq!(
            batch.pixels.size(),
            [batch.samples.len() as i64, 3, size.0 as i64, size.1 as i64]
        );
        let first = &dataset.items()[batch.samples[0].item];
        assert_eq!(
            dataset.config().buckets.sizes()[first.bucket],
            (size.1, size.0)
        );
    }
    let mut dropping = LoaderConfig::new(2, 5);
    dropping.drop_last = true;
    let loader = Loader::new(dataset, dropping).unwrap();
    assert!(loader.epoch_plan(0).iter().all(|b| b.len() == 2));
}

#[test]
fn loader_reports_throughput() {
    let loader = Loader::new(
        Arc::new(Dataset::open(&eight_images(), random_config(32)).unwrap()),
        LoaderConfig::new(4, 0),
    )
    .unwrap();
    let mut batches = loader.iter(0, 4);
    let total: usize = batches.by_ref().map(|b| b.unwrap().samples.len()).sum();
    assert_eq!((total, batches.images()), (16, 16));
    assert!(batches.images_per_second() > 0.0);
}
