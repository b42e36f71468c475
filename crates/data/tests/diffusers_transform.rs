//! The per-step transform against diffusers' SDXL preprocessing run by the fixture generator
//! (PIL bilinear resize of the short side, flip, centre crop, ToTensor, Normalize) at 32 px.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;

use common::fixture;
use data::transform::{self, Placement};
use data::{Dataset, DatasetConfig, SampleKey, Source};
use tch::Tensor;

#[test]
fn samples_match_diffusers_preprocessing() {
    let golden: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture("diffusers-transform-32.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let source = Source::ImageFolder {
        root: fixture("imagefolder"),
        caption_column: Some("text".into()),
    };
    let dataset = Dataset::open(&source, DatasetConfig::new(32).unwrap()).unwrap();
    let one_level = 2.0 / 255.0 + 1e-6;
    for (i, item) in dataset.items().iter().enumerate() {
        let pair = |name: &str| -> (u32, u32) {
            let values = Vec::<i64>::try_from(&golden[&format!("{i}.{name}")]).unwrap();
            (values[0] as u32, values[1] as u32)
        };
        let sample = dataset
            .sample(&SampleKey {
                seed: 0,
                step: 0,
                slot: 0,
                item: i,
            })
            .unwrap();
        assert_eq!(sample.original_size, pair("original_size"), "item {i}");
        let (top, left) = pair("plain.crop_top_left");
        assert_eq!(sample.crop_top_left, (top as i32, left as i32), "item {i}");
        let image = transform::decode(&item.bytes, &item.origin, data::MAX_PIXELS).unwrap();
        for (variant, flipped) in [("plain", false), ("flipped", true)] {
            let crop_top_left = pair(&format!("{variant}.crop_top_left"));
            let placement = Placement {
                resized: (sample.resized_size.1, sample.resized_size.0),
                flipped,
                crop_top_left,
                target: (32, 32),
                reported_crop_top_left: (crop_top_left.0 as i32, crop_top_left.1 as i32),
            };
            let ours = transform::apply(&image, &placement)
                .unwrap()
                .to_tensor()
                .unwrap();
            let theirs = &golden[&format!("{i}.{variant}.pixels")];
            let difference = (&ours - theirs).abs();
            let max = difference.max().double_value(&[]);
            let mean = difference.mean(tch::Kind::Double).double_value(&[]);
            // PIL and fast_image_resize round a few pixels differently: at most one 8-bit level. JPEG
            // decoders differ too (libjpeg-turbo's IDCT and chroma upsampling against zune-jpeg's).
            let is_jpeg = item.bytes.starts_with(&[0xff, 0xd8]);
            let (max_levels, mean_levels) = if is_jpeg { (2.0, 0.5) } else { (1.0, 0.25) };
            assert!(
                max <= max_levels * one_level,
                "item {i} {variant}: max difference {max}"
            );
            assert!(
                mean < mean_levels * one_level,
                "item {i} {variant}: mean difference {mean}"
            );
            println!(
                "item {i} {variant}: max {:.2} levels, mean {:.3} levels",
                max * 127.5,
                mean * 127.5
            );
        }
    }
}
