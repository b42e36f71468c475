//! Class images for prior preservation (`trainer::class_images`) on the tiny SDXL model: the
//! missing images are generated with diffusers' naming, a second call generates none, deleted
//! images come back identical, and bad settings are errors that name the flag and the folder.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::path::{Path, PathBuf};

use common::fixture;
use tch::{Device, Kind};
use trainer::TrainConfig;
use trainer::class_images::ensure_class_images;
use trainer::model_files::{ModelFolder, SingleFileModel};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("class-images-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(folder: &Path) -> TrainConfig {
    TrainConfig::default()
        .with_with_prior_preservation(true)
        .with_class_data_dir(Some(folder.to_owned()))
        .with_class_prompt(Some("a photo of a dog".into()))
        .with_num_class_images(3)
        .with_sample_batch_size(2)
        .with_seed(7)
        .with_class_inference_steps(4)
}

fn tiny_model() -> ModelFolder {
    ModelFolder {
        root: fixture("tiny-sdxl"),
        variant: None,
        single_file: None,
    }
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn missing_class_images_are_generated_once_and_reproducibly() {
    // One thread: no oversubscription of a shared machine (the tiny model gains nothing from more).
    tch::set_num_threads(1);
    let dir = scratch("generate");
    let folder = dir.join("class");
    // One image of the user's, and entries that are not images.
    std::fs::create_dir_all(folder.join("subfolder")).unwrap();
    std::fs::write(folder.join("notes.txt"), "not an image").unwrap();
    let own = folder.join("own.png");
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]))
        .save(&own)
        .unwrap();
    let config = config(&folder);

    let first = ensure_class_images(&config, &tiny_model(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!((first.generated, first.paths.len()), (2, 3));
    let names = names(&first.paths);
    assert!(names.contains(&"own.png".to_owned()), "{names:?}");
    let generated: Vec<&String> = names.iter().filter(|n| n.ends_with(".jpg")).collect();
    for (name, index) in generated.iter().zip(["1-", "2-"]) {
        // `{index}-{sha1 of the pixels}.jpg`, numbered after the image already there.
        let hash = name
            .strip_prefix(index)
            .and_then(|n| n.strip_suffix(".jpg"))
            .unwrap_or_else(|| panic!("{name}"));
        assert!(
            hash.len() == 40 && hash.chars().all(|c| c.is_ascii_hexdigit()),
            "{name}"
        );
        let decoded = image::open(folder.join(name)).unwrap().to_rgb8();
        // The pipeline's default size for this model: sample_size 16 × the VAE's factor 4.
        assert_eq!(decoded.dimensions(), (64, 64));
    }
    assert_ne!(
        generated[0][2..],
        generated[1][2..],
        "two seeds, two images"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Enough images now: nothing is generated.
    let second = ensure_class_images(&config, &tiny_model(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!((second.generated, &second.paths), (0, &first.paths));

    // Deleted images come back with the same pixels (their names are their hashes).
    for name in &generated {
        std::fs::remove_file(folder.join(name)).unwrap();
    }
    let third = ensure_class_images(&config, &tiny_model(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!((third.generated, &third.paths), (2, &first.paths));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The single-file checkpoint of the tiny model (`tiny_sdxl_single_file`) makes the folder's class
/// images, pixel for pixel (their names hold the SHA-1 of their pixels); with v-prediction and zero
/// terminal SNR they are sampled otherwise (trailing timesteps, rescaled guidance).
#[test]
fn a_single_file_makes_the_folders_class_images() {
    tch::set_num_threads(1);
    let dir = scratch("single-file");
    let single = ModelFolder {
        root: fixture("tiny-sdxl-single-file.safetensors")
            .parent()
            .unwrap()
            .to_owned(),
        variant: None,
        single_file: Some(SingleFileModel {
            path: fixture("tiny-sdxl-single-file.safetensors"),
            config_folder: Some(fixture("tiny-sdxl")),
        }),
    };
    let generate = |config: &TrainConfig, model: &ModelFolder| {
        names(
            &ensure_class_images(config, model, Device::Cpu, Kind::Float)
                .unwrap()
                .paths,
        )
    };
    let from_folder = generate(&config(&dir.join("folder")), &tiny_model());
    let from_file = generate(&config(&dir.join("file")), &single);
    assert_eq!(from_folder.len(), 3);
    assert_eq!(from_folder, from_file);
    let ztsnr = config(&dir.join("ztsnr"))
        .with_prediction_type(Some("v_prediction".into()))
        .with_zero_terminal_snr(true);
    let from_ztsnr = generate(&ztsnr, &single);
    assert_eq!(from_ztsnr.len(), 3);
    assert!(
        from_ztsnr.iter().all(|n| !from_file.contains(n)),
        "{from_ztsnr:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_class_settings_name_the_flag_and_folder() {
    let dir = scratch("errors");
    let file = dir.join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let message = |config: &TrainConfig| {
        ensure_class_images(config, &tiny_model(), Device::Cpu, Kind::Float)
            .unwrap_err()
            .to_string()
    };
    let not_a_folder = message(&config(&file));
    assert!(
        not_a_folder.starts_with("--class_data_dir") && not_a_folder.contains("a-file"),
        "{not_a_folder}"
    );
    let no_prompt = message(&config(&dir.join("class")).with_class_prompt(None));
    assert!(no_prompt.starts_with("--class_prompt"), "{no_prompt}");
    let no_folder = message(&config(&dir).with_class_data_dir(None));
    assert!(no_folder.starts_with("--class_data_dir"), "{no_folder}");
    std::fs::remove_dir_all(&dir).unwrap();
}
