//! Content-keyed caches: an edited image, another resolution or another VAE id is encoded afresh;
//! everything else is reused, in memory and on disk across reopening.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;

use common::{Scratch, copy_folder, fixture};
use data::{
    CacheKey, CropMode, Dataset, DatasetConfig, Error, Loader, LoaderConfig, Source, TensorCache,
};
use tch::Tensor;

/// Encodes every sample of one epoch through `cache` with a stand-in VAE (8x average pooling);
/// returns how many times the encoder ran.
fn encode_epoch(
    folder: &Path,
    resolution: u32,
    vae_id: &str,
    cache: &TensorCache,
    flip: bool,
) -> usize {
    let mut config = DatasetConfig::new(resolution).unwrap();
    config.transform.crop = CropMode::Center;
    config.transform.random_flip = flip;
    let source = Source::CaptionFiles {
        root: folder.to_path_buf(),
        read_captions: true,
    };
    let loader = Loader::new(
        Arc::new(Dataset::open(&source, config).unwrap()),
        LoaderConfig::new(1, 0),
    )
    .unwrap();
    let runs = Cell::new(0);
    for batch in loader.iter(0, loader.steps_per_epoch()) {
        for sample in batch.unwrap().samples {
            let key = CacheKey::latents(vae_id, &sample);
            let entry = cache
                .get_or_insert_with(&key, || {
                    runs.set(runs.get() + 1);
                    Ok::<_, Error>(vec![(
                        "latents".to_owned(),
                        sample
                            .pixels
                            .to_tensor()
                            .unwrap()
                            .unsqueeze(0)
                            .avg_pool2d_default(8),
                    )])
                })
                .unwrap();
            let expected = sample
                .pixels
                .to_tensor()
                .unwrap()
                .unsqueeze(0)
                .avg_pool2d_default(8);
            assert!(
                entry[0].1.allclose(&expected, 0.0, 0.0, false),
                "a cached entry differs from a fresh encode"
            );
        }
    }
    runs.get()
}

fn edit_one_pixel(path: &Path) {
    let mut image = image::open(path).unwrap().into_rgb8();
    let pixel = image.get_pixel_mut(10, 10);
    pixel.0[0] = pixel.0[0].wrapping_add(40);
    image.save(path).unwrap();
}

#[test]
fn invalidation_by_content_resolution_and_vae() {
    let scratch = Scratch::new("cache");
    let folder = scratch.path().join("images");
    copy_folder(&fixture("txtfolder"), &folder);
    for cache in [
        TensorCache::in_memory(),
        TensorCache::on_disk(scratch.path().join("latents")).unwrap(),
    ] {
        assert_eq!(
            encode_epoch(&folder, 32, "vae-a", &cache, false),
            8,
            "first epoch encodes everything"
        );
        assert_eq!(
            encode_epoch(&folder, 32, "vae-a", &cache, false),
            0,
            "second epoch reuses everything"
        );
        assert_eq!((cache.hits(), cache.misses()), (8, 8));
        assert_eq!(
            encode_epoch(&folder, 24, "vae-a", &cache, false),
            8,
            "another resolution"
        );
        assert_eq!(
            encode_epoch(&folder, 32, "vae-b", &cache, false),
            8,
            "another VAE"
        );
        assert_eq!(
            encode_epoch(&folder, 32, "vae-a", &cache, false),
            0,
            "the first setting is still cached"
        );
    }
    // Edit one image: only it is encoded again (the on-disk cache also survives reopening).
    edit_one_pixel(&folder.join("003.png"));
    let reopened = TensorCache::on_disk(scratch.path().join("latents")).unwrap();
    assert_eq!(encode_epoch(&folder, 32, "vae-a", &reopened, false), 1);
    assert_eq!(encode_epoch(&folder, 32, "vae-a", &reopened, false), 0);
}

#[test]
fn flipped_and_unflipped_crops_are_separate_entries() {
    let cache = TensorCache::in_memory();
    let folder = fixture("txtfolder");
    // With random flips, each image has at most two entries; over many epochs both appear.
    let mut config = DatasetConfig::new(32).unwrap();
    config.transform.random_flip = true;
    let source = Source::CaptionFiles {
        root: folder.clone(),
        read_captions: true,
    };
    let loader = Loader::new(
        Arc::new(Dataset::open(&source, config).unwrap()),
        LoaderConfig::new(4, 1),
    )
    .unwrap();
    let mut encodes = 0;
    for batch in loader.iter(0, 20 * loader.steps_per_epoch()) {
        for sample in batch.unwrap().samples {
            let key = CacheKey::latents("vae", &sample);
            cache
                .get_or_insert_with(&key, || {
                    encodes += 1;
                    Ok::<_, Error>(vec![(
                        "latents".to_owned(),
                        sample.pixels.to_tensor().unwrap(),
                    )])
                })
                .unwrap();
        }
    }
    assert_eq!(
        encodes, 16,
        "two entries (flipped or not) for each of the 8 images"
    );
}

#[test]
fn text_keys_follow_prompt_and_encoder() {
    let a = CacheKey::text("clip-l+bigg", "a drawing");
    assert_eq!(a, CacheKey::text("clip-l+bigg", "a drawing"));
    assert_ne!(a, CacheKey::text("clip-l+bigg", "a drawing "));
    assert_ne!(a, CacheKey::text("other", "a drawing"));
    assert_eq!(a.as_str().len(), 64);
    // Parts are length-prefixed: moving a boundary changes the key.
    let left = data::CacheKeyBuilder::new("x").part("a", b"bc").finish();
    let right = data::CacheKeyBuilder::new("x").part("ab", b"c").finish();
    assert_ne!(left, right);
    // A failing encoder stores nothing.
    let cache = TensorCache::in_memory();
    let failed = cache.get_or_insert_with(&a, || {
        Err::<data::Entry, _>(Error::Worker("encoder failed".into()))
    });
    assert!(failed.is_err());
    assert!(cache.get(&a).unwrap().is_none());
    let stored = cache.get_or_insert_with(&a, || {
        Ok::<_, Error>(vec![(
            "pooled".into(),
            Tensor::ones([2], tch::kind::FLOAT_CPU),
        )])
    });
    assert_eq!(stored.unwrap()[0].0, "pooled");
    assert!(cache.get(&a).unwrap().is_some());
}
