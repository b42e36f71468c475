//! Every LoRA file the trainer writes reads back into our own tools (issue 24, deliverable 6): one
//! tiny run with every adapter kind the trainer writes (kohya's UNet targets with LoCon convolutions,
//! DoRA magnitudes, both text encoders), then
//!
//! 1. the library loader reads the kohya file (SGM block names, `lora_te1_`/`lora_te2_`) with nothing
//!    but the pipeline's module names, as the same adapters as the diffusers file, tensor for tensor,
//!    and both applied to the tiny pipeline give the same latents (bit for bit: the same tensors,
//!    the same arithmetic);
//! 2. `generate --lora` writes the same image from either file (and from a checkpoint's);
//! 3. `lora_convert convert` turns the kohya file, read with the model files of `--unet`
//!    (SGM names from the `config.json` beside it) and the encoders, back into the diffusers file's
//!    adapters.
//!
//! The training run happens in a child process (this test binary re-run on the ignored test
//! `training_child`); the examples are those `cargo test` builds beside the test binaries.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::path::Path;
use std::process::Command;

use lora::format::{self, ReadOptions};
use sdxl_model::pipeline::{GenerateOptions, Pipeline};
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::vae::Upcast;
use trainer::run::{KOHYA_FILE, LORA_FILE};

#[path = "common/training.rs"]
mod training;

use training::{fixture, run_to_end, scratch, tiny};

fn pipeline() -> Pipeline {
    let options = LoadOptions::default().vae_upcast(Upcast::Never);
    Pipeline::from_pretrained(fixture("tiny-sdxl"), &options)
        .unwrap()
        .model
}

fn options() -> GenerateOptions {
    GenerateOptions::default()
        .with_prompts(vec!["Naruto style anime character".into()])
        .with_steps(2)
        .with_width(64)
        .with_height(64)
        .with_seed(3)
}

/// The adapters of `file` read with the pipeline's names only (no explicit block renames).
fn read(pipe: &mut Pipeline, file: &Path) -> format::LoraFile {
    let names = pipe.lora_module_names();
    let options = ReadOptions::default()
        .with_module_names(Some(&names))
        .with_block_renames(None);
    format::read(file, options).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn assert_same_adapters(a: &format::LoraFile, b: &format::LoraFile) {
    assert_eq!(
        a.state.modules.keys().collect::<Vec<_>>(),
        b.state.modules.keys().collect::<Vec<_>>()
    );
    for (key, ma) in &a.state.modules {
        let mb = &b.state.modules[key];
        assert!(ma.down.equal(&mb.down), "{key:?} down");
        assert!(ma.up.equal(&mb.up), "{key:?} up");
        // alpha: exact in both files here (rank 4 → 4, conv alpha 1; float32 holds both).
        assert_eq!(
            (ma.alpha, ma.scaling),
            (mb.alpha, mb.scaling),
            "{key:?} alpha"
        );
        match (&ma.magnitude, &mb.magnitude) {
            (Some(x), Some(y)) => assert!(x.equal(y), "{key:?} magnitude"),
            (None, None) => {}
            _ => panic!("{key:?}: DoRA magnitude in one file only"),
        }
    }
}

fn run_example(name: &str, args: &[&str]) -> std::process::Output {
    let output = Command::new(common::example_path(name))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{name} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn every_lora_file_of_a_run_reads_back_into_generate_and_lora_convert() {
    let dir = scratch("read-back");
    let config = tiny(&dir.join("out"))
        .with_target_modules("kohya".into())
        .with_conv_rank(Some(2))
        .with_conv_alpha(Some(1.0))
        .with_use_dora(true)
        .with_train_text_encoder(true)
        .with_max_train_steps(2)
        .with_checkpointing_steps(2)
        .with_logging_steps(1)
        .with_validation_prompt(None);
    run_to_end(&config);
    let out = &config.output_dir;

    // 1. The library: the same adapters, the same latents.
    let mut pipe = pipeline();
    let base = pipe.latents(&options()).unwrap();
    let diffusers = read(&mut pipe, &out.join(LORA_FILE));
    let kohya = read(&mut pipe, &out.join(KOHYA_FILE));
    assert_eq!(kohya.format, format::Format::Kohya);
    for component in lora::Component::ALL {
        assert!(
            kohya.state.component(component).next().is_some(),
            "no {component} adapters"
        );
    }
    assert!(kohya.state.modules.values().any(|m| m.is_conv()));
    assert!(kohya.state.modules.values().any(|m| m.magnitude.is_some()));
    assert_same_adapters(&diffusers, &kohya);
    let checkpoint = read(&mut pipe, &out.join("checkpoint-2").join(KOHYA_FILE));
    assert_same_adapters(&diffusers, &checkpoint);
    let latents = |file: &format::LoraFile| {
        let mut pipe = pipeline();
        let layers = pipe.load_lora(&file.state, "lora").unwrap();
        assert_eq!(layers, file.state.modules.len());
        pipe.latents(&options()).unwrap()
    };
    let (with_diffusers, with_kohya) = (latents(&diffusers), latents(&kohya));
    assert!(
        with_diffusers.equal(&with_kohya),
        "the kohya file's deltas differ"
    );
    assert!(!with_diffusers.equal(&base), "the LoRA changed nothing");

    // 2. generate --lora: the same image from each file (pixel for pixel).
    let model = fixture("tiny-sdxl").display().to_string();
    let image = |lora: &Path, name: &str| {
        let png = dir.join(name);
        let (lora, png_text) = (lora.display().to_string(), png.display().to_string());
        let args = [
            "--model", &model, "--prompt", "a fox", "--steps", "2", "--width", "64", "--height",
            "64", "--lora", &lora, "--out", &png_text,
        ];
        let stdout = String::from_utf8(run_example("generate", &args).stdout).unwrap();
        let layers = format!("LoRA on {} layers", diffusers.state.modules.len());
        assert!(stdout.contains(&layers), "{stdout}");
        // The pixels: each PNG's `parameters` chunk names its own LoRA file and hash.
        image::open(png).unwrap().to_rgb8().into_raw()
    };
    let from_diffusers = image(&out.join(LORA_FILE), "diffusers.png");
    assert_eq!(from_diffusers, image(&out.join(KOHYA_FILE), "kohya.png"));
    let from_checkpoint = image(&out.join("checkpoint-2").join(KOHYA_FILE), "ckpt.png");
    assert_eq!(from_diffusers, from_checkpoint);

    // 3. lora_convert: kohya (SGM names) → diffusers, with the model files; the same adapters.
    let converted = dir.join("converted.safetensors");
    let file = |c: &str, f: &str| fixture(&format!("tiny-sdxl/{c}/{f}")).display().to_string();
    let (kohya_text, converted_text) = (
        out.join(KOHYA_FILE).display().to_string(),
        converted.display().to_string(),
    );
    let unet = file("unet", "diffusion_pytorch_model.safetensors");
    let (te1, te2) = (
        file("text_encoder", "model.safetensors"),
        file("text_encoder_2", "model.safetensors"),
    );
    let args = [
        "convert",
        &kohya_text,
        &converted_text,
        "--to",
        "diffusers",
        "--unet",
        &unet,
        "--text-encoder",
        &te1,
        "--text-encoder-2",
        &te2,
    ];
    run_example("lora_convert", &args);
    assert_same_adapters(&diffusers, &read(&mut pipe, &converted));
    let _ = std::fs::remove_dir_all(&dir);
}
