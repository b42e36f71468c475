//! Training from a single-file SDXL checkpoint, end to end on the tiny model (CPU): the tiny-sdxl
//! folder written as one SGM file by diffusers' own `convert_diffusers_to_original_sdxl.py` (fixture
//! `tiny_sdxl_single_file`) trains the same LoRA, bit for bit, as the folder (also with the text
//! encoders trained); a file carrying the
//! `v_pred` / `ztsnr` markers of community v-prediction checkpoints trains with v-prediction and zero
//! terminal SNR (validation images sampled with ZTSNR and guidance rescale); ZTSNR without
//! v-prediction is refused naming the flag.
//!
//! Every run happens in a child process (see `common/training.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::Path;

use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};
use trainer::TrainConfig;
use trainer::run::{KOHYA_FILE, LORA_FILE};

#[path = "common/training.rs"]
mod training;

use training::{assert_bit_identical, fixture, losses, run_output, run_to_end, scratch, tiny};

/// A short run of the tiny preset on `model`, configs from the tiny-sdxl folder.
fn short_run(out: &Path, model: &Path) -> TrainConfig {
    tiny(out)
        .with_pretrained_model_name_or_path(model.display().to_string())
        .with_max_train_steps(4)
        .with_checkpointing_steps(4)
        .with_validation_prompt(None)
}

#[test]
fn a_single_file_trains_the_same_lora_as_its_diffusers_folder() {
    let dir = scratch("single-same");
    let from_folder = short_run(&dir.join("folder"), &fixture("tiny-sdxl"));
    let from_file = short_run(
        &dir.join("file"),
        &fixture("tiny-sdxl-single-file.safetensors"),
    )
    .with_single_file_config(Some(fixture("tiny-sdxl").display().to_string()));
    run_to_end(&from_folder);
    let (ok, log) = run_output(&from_file);
    assert!(ok, "training from the single file failed:\n{log}");
    assert!(
        log.contains("single file") && log.contains("0 key(s) of no component"),
        "{log}"
    );
    assert_eq!(losses(&from_folder), losses(&from_file));
    for name in [LORA_FILE, KOHYA_FILE] {
        assert_bit_identical(
            &from_folder.output_dir.join(name),
            &from_file.output_dir.join(name),
        );
    }
    // Without --single_file_config the file is read as SDXL base, whose shapes it does not have: the
    // error names the file and a key.
    let as_sdxl = from_file
        .clone()
        .with_output_dir(dir.join("as-sdxl"))
        .with_single_file_config(None);
    let (ok, log) = run_output(&as_sdxl);
    assert!(!ok);
    assert!(
        log.contains("tiny-sdxl-single-file.safetensors") && log.contains("mis-shaped"),
        "{log}"
    );
    // With the text encoders trained too, both read from the file.
    let with_text = |config: &TrainConfig, name: &str| {
        config
            .clone()
            .with_output_dir(dir.join(name))
            .with_train_text_encoder(true)
    };
    let (folder_text, file_text) = (
        with_text(&from_folder, "folder-text"),
        with_text(&from_file, "file-text"),
    );
    run_to_end(&folder_text);
    run_to_end(&file_text);
    assert_eq!(losses(&folder_text), losses(&file_text));
    assert_bit_identical(
        &folder_text.output_dir.join(LORA_FILE),
        &file_text.output_dir.join(LORA_FILE),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_marked_v_prediction_file_trains_with_zero_terminal_snr() {
    let dir = scratch("single-vpred");
    // The fixture with the markers community v-prediction checkpoints carry.
    let file = TensorFile::open(fixture("tiny-sdxl-single-file.safetensors")).unwrap();
    let mut tensors: Vec<(String, Tensor)> = file
        .load_all(Device::Cpu, None)
        .unwrap()
        .into_iter()
        .collect();
    for key in ["v_pred", "ztsnr"] {
        tensors.push((key.into(), Tensor::zeros([0], (Kind::Float, Device::Cpu))));
    }
    let marked = dir.join("vpred-ztsnr.safetensors");
    Tensor::write_safetensors(&tensors, &marked).unwrap();
    let config = short_run(&dir.join("run"), &marked)
        .with_single_file_config(Some(fixture("tiny-sdxl").display().to_string()))
        .with_validation_prompt(Some("Naruto style anime character".into()))
        .with_validation_steps(2)
        .with_validation_inference_steps(3)
        .with_num_validation_images(1);
    let (ok, log) = run_output(&config);
    assert!(ok, "{log}");
    assert!(
        log.contains("`v_pred` key: training with --prediction_type v_prediction")
            && log.contains("`ztsnr` key: training with --zero_terminal_snr")
            && log.contains("2 key(s) of no component"),
        "{log}"
    );
    let losses = losses(&config);
    assert!(
        !losses.is_empty() && losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(config.output_dir.join("model_card.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(card["config"]["prediction_type"], "v_prediction");
    assert_eq!(card["config"]["zero_terminal_snr"], true);
    assert!(config.output_dir.join(LORA_FILE).is_file());
    // Validation sampled from σ = 4096 (trailing timesteps on the rescaled schedule): an image, not
    // the flat one that non-finite latents would decode to.
    for image in ["validation/step-000002.png", "base_vs_lora.png"] {
        let pixels = image::open(config.output_dir.join(image))
            .unwrap()
            .to_rgb8();
        let first = *pixels.get_pixel(0, 0);
        assert!(pixels.pixels().any(|p| *p != first), "{image} is flat");
    }

    // ε-prediction with zero terminal SNR is refused before anything loads.
    let refused = config
        .clone()
        .with_output_dir(dir.join("refused"))
        .with_prediction_type(Some("epsilon".into()))
        .with_zero_terminal_snr(true);
    let (ok, log) = run_output(&refused);
    assert!(
        !ok && log.contains("--zero_terminal_snr") && log.contains("v_prediction"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
