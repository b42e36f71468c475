//! Loader throughput: images per second through decode, antialiased resize to 512 px, random crop
//! and flip, on the loader's worker threads.
//!
//! The images stand in for `lambdalabs/naruto-blip-captions` (JPEGs of about 1024 px): 24 seeded
//! 1024×1024 JPEGs (quality 90) written to a scratch folder with `.txt` captions.
//!
//! ```sh
//! scripts/with-torch.sh cargo bench -p data --bench loader_throughput
//! ```

// Bench code: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use data::Rng;
use data::{CropMode, Dataset, DatasetConfig, Loader, LoaderConfig, SampleKey, Source, transform};

const IMAGES: usize = 24;
const SIDE: u32 = 1024;

fn write_images() -> PathBuf {
    let folder = std::env::temp_dir().join(format!("data-bench-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    let mut rng = Rng::keyed(0, &[]);
    for i in 0..IMAGES {
        let (r, g) = (rng.next_f64() * 255.0, rng.next_f64() * 255.0);
        let image = image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
            let noise = (rng.next_u64() % 24) as f64;
            let wave = ((x as f64 / 37.0).sin() * (y as f64 / 53.0).cos() + 1.0) * 60.0;
            image::Rgb([
                (r * 0.5 + wave + noise) as u8,
                (g * 0.5 + x as f64 / 8.0 + noise) as u8,
                (wave + y as f64 / 8.0) as u8,
            ])
        });
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode_image(&image)
            .unwrap();
        std::fs::write(folder.join(format!("{i:03}.jpg")), bytes).unwrap();
        std::fs::write(folder.join(format!("{i:03}.txt")), format!("image {i}")).unwrap();
    }
    folder
}

fn loader_throughput(c: &mut Criterion) {
    let folder = write_images();
    let mut config = DatasetConfig::new(512).unwrap();
    config.transform.crop = CropMode::Random;
    config.transform.random_flip = true;
    let source = Source::CaptionFiles {
        root: folder.clone(),
        read_captions: true,
    };
    let dataset = Arc::new(Dataset::open(&source, config).unwrap());
    let mut group = c.benchmark_group("loader");
    group.sample_size(10);
    let steps = IMAGES as u64 / 4;
    group.throughput(Throughput::Elements(steps * 4));
    for workers in [1, 2] {
        let mut loader_config = LoaderConfig::new(4, 1);
        loader_config.workers = workers;
        let loader = Loader::new(dataset.clone(), loader_config).unwrap();
        let mut start = 0;
        group.bench_function(
            format!("{IMAGES} jpeg {SIDE}px -> 512px, {workers} workers"),
            |b| {
                b.iter(|| {
                    let images: usize = loader
                        .iter(start, start + steps)
                        .map(|batch| batch.unwrap().samples.len())
                        .sum();
                    start += steps;
                    images
                })
            },
        );
    }
    group.finish();

    // The two stages of one sample, on the calling thread.
    let item = &dataset.items()[0];
    let image = transform::decode(&item.bytes, &item.origin, data::MAX_PIXELS).unwrap();
    let placement = dataset
        .placement(&SampleKey {
            seed: 0,
            step: 0,
            slot: 0,
            item: 0,
        })
        .unwrap();
    let mut stages = c.benchmark_group("stage");
    stages.sample_size(20);
    stages.bench_function("decode jpeg 1024px", |b| {
        b.iter(|| transform::decode(&item.bytes, &item.origin, data::MAX_PIXELS).unwrap())
    });
    stages.bench_function("resize 1024->512, crop, flip, scale", |b| {
        b.iter(|| transform::apply(&image, &placement).unwrap())
    });
    stages.finish();
    std::fs::remove_dir_all(folder).unwrap();
}

criterion_group!(benches, loader_throughput);
criterion_main!(benches);
