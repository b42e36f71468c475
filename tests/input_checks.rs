//! Inputs that are checked where they enter (issue 24, deliverables 2–4), run through the example
//! binaries as a user runs them: absurd sizes for `generate` and the trainer (exit 1 or 2 with one
//! line naming the flag, never a panic's 101), settings that used to fail late, local paths that do
//! not exist, non-finite LoRA files and model weights, a run whose every step was skipped, and
//! truncated images.
//!
//! Runs the example binaries `cargo test` builds (`tests/common::example_path`); alone, run
//! `cargo build --examples` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{example_path, fixture};
use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};

/// A folder of its own for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("input-checks-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(example: &str, args: &[&str]) -> Output {
    Command::new(example_path(example))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the example starts")
}

/// The example failed with status 1 or 2 and an `error: ` line holding every one of `needles`,
/// and no panic.
fn assert_refused(output: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let code = output.status.code();
    assert!(matches!(code, Some(1 | 2)), "exit {code:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    for needle in needles {
        assert!(line.contains(needle), "`{needle}` not in: {line}");
    }
    line.to_owned()
}

fn tiny_model() -> String {
    fixture("tiny-sdxl").display().to_string()
}

#[test]
fn generate_refuses_absurd_sizes_and_numbers_naming_the_flag() {
    let model = tiny_model();
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            model.as_str(),
            "--prompt",
            "a fox",
            "--steps",
            "1",
        ];
        args.extend_from_slice(extra);
        run("generate", &args)
    };
    for (width, height) in [
        ("10000000", "10000000"),
        ("100000", "100000"),
        ("8", "9223372036854775800"),
        ("9223372036854775800", "9223372036854775800"),
    ] {
        let output = generate(&["--width", width, "--height", height]);
        let line = assert_refused(&output, &["--width", "--height", "GiB"]);
        assert_eq!(output.status.code(), Some(1), "{line}");
    }
    for (flag, value) in [
        ("--width", "0"),
        ("--width", "-64"),
        ("--height", "100"),
        ("--steps", "0"),
        ("--guidance", "inf"),
        ("--guidance", "NaN"),
        ("--lora_scale", "nan"),
    ] {
        let output = generate(&[flag, value]);
        assert_refused(&output, &[flag]);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}");
    }
}

/// A LoRA file whose up matrix holds one NaN.
fn nan_lora(dir: &Path) -> PathBuf {
    let q = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q";
    let down = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
    let up = Tensor::zeros([8, 2], (Kind::Float, Device::Cpu));
    let _ = up.get(0).get(0).fill_(f64::NAN);
    let path = dir.join("nan_lora.safetensors");
    Tensor::write_safetensors(
        &[
            (format!("{q}.lora.down.weight"), down),
            (format!("{q}.lora.up.weight"), up),
        ],
        &path,
    )
    .unwrap();
    path
}

#[test]
fn non_finite_lora_files_are_refused_by_generate_and_lora_convert() {
    let scratch = Scratch::new("nan-lora");
    let lora = nan_lora(&scratch.0);
    let lora = lora.to_str().unwrap();
    let tensor = "attn2.to_q.lora.up.weight";
    let model = tiny_model();
    let out = scratch.0.join("out.png");
    let output = run(
        "generate",
        &[
            "--model",
            model.as_str(),
            "--prompt",
            "a fox",
            "--steps",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--lora",
            lora,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_refused(&output, &["nan_lora.safetensors", tensor, "non-finite"]);
    assert!(!out.exists());
    let converted = scratch.0.join("converted.safetensors");
    for args in [
        vec!["summary", lora],
        vec!["convert", lora, converted.to_str().unwrap(), "--to", "peft"],
    ] {
        let output = run("lora_convert", &args);
        assert_refused(&output, &["nan_lora.safetensors", tensor, "non-finite"]);
    }
    assert!(!converted.exists());
}

/// A copy of the tiny SDXL model whose UNet weight `key` holds `value` everywhere (NaN, or a
/// finite value whose activations overflow).
fn model_with_unet_weight(dir: &Path, key: &str, value: f64) -> PathBuf {
    let source = fixture("tiny-sdxl");
    let root = dir.join("model");
    for component in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let (from, to) = (source.join(component), root.join(component));
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }
    let weights = root.join("unet/diffusion_pytorch_model.safetensors");
    let tensors = TensorFile::open(&weights)
        .unwrap()
        .load_all(Device::Cpu, None)
        .unwrap();
    assert!(tensors.contains_key(key), "no {key}");
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if k == key { t.full_like(value) } else { t };
            (k, t)
        })
        .collect();
    Tensor::write_safetensors(&tensors, &weights).unwrap();
    root
}

/// `train_naruto --preset tiny` for a couple of steps with `extra` flags, writing into `out`.
fn train(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--preset",
        "tiny",
        "--max_train_steps",
        "2",
        "--logging_steps",
        "1",
        "--validation_prompt",
        "none",
        "--output_dir",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run("train_naruto", &args)
}

#[test]
fn train_naruto_refuses_settings_and_paths_before_loading_a_model() {
    let scratch = Scratch::new("train-settings");
    let out = scratch.0.join("out");
    let cases: &[(&[&str], &str, i32)] = &[
        (&["--resolution", "10000000"], "--resolution", 2),
        (&["--resolution", "4294967288"], "--resolution", 2),
        (
            &["--enable_bucket", "--max_bucket_reso", "1000000"],
            "--max_bucket_reso",
            2,
        ),
        (
            &["--num_validation_images", "0"],
            "--num_validation_images",
            2,
        ),
        (
            &["--validation_inference_steps", "0"],
            "--validation_inference_steps",
            2,
        ),
        (
            &["--validation_guidance_scale", "inf"],
            "--validation_guidance_scale",
            2,
        ),
        (
            &["--dataset_name", "./no/such/dataset"],
            "--dataset_name",
            1,
        ),
        (
            &["--pretrained_model_name_or_path", "/no/such/model"],
            "--pretrained_model_name_or_path",
            1,
        ),
    ];
    for &(args, flag, code) in cases {
        let output = train(&out, args);
        let line = assert_refused(&output, &[flag]);
        assert_eq!(output.status.code(), Some(code), "{line}");
        assert!(!out.exists(), "{args:?} created the output folder");
    }
    let output = train(&out, &["--dataset_name", "./no/such/dataset"]);
    assert_refused(&output, &["no such folder or file: ./no/such/dataset"]);
    // An output folder that is a file; an empty dataset folder.
    let file = scratch.0.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let output = train(&file, &[]);
    assert_refused(&output, &["--output_dir", "is a file, not a folder"]);
    let empty = scratch.0.join("empty-dataset");
    std::fs::create_dir_all(&empty).unwrap();
    let output = train(&out, &["--dataset_name", empty.to_str().unwrap()]);
    assert_refused(&output, &[empty.to_str().unwrap(), "no images"]);
}

#[test]
fn train_naruto_refuses_nan_weights_and_a_run_whose_every_step_was_skipped() {
    let scratch = Scratch::new("train-weights");
    let key = "conv_in.weight";
    let nan = model_with_unet_weight(&scratch.0.join("nan"), key, f64::NAN);
    let out = scratch.0.join("out");
    let output = train(
        &out,
        &["--pretrained_model_name_or_path", nan.to_str().unwrap()],
    );
    assert_refused(
        &output,
        &["diffusion_pytorch_model.safetensors", key, "non-finite"],
    );
    // Finite weights whose activations overflow: the loss is NaN at every step, each step is
    // skipped (below --max_nonfinite_steps), and the run fails without writing a LoRA.
    let overflow = model_with_unet_weight(&scratch.0.join("overflow"), key, 3e38);
    let output = train(
        &out,
        &[
            "--pretrained_model_name_or_path",
            overflow.to_str().unwrap(),
        ],
    );
    assert_refused(&output, &["all 2 optimizer steps of this run were skipped"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(!out.join("pytorch_lora_weights.safetensors").exists());
}

/// A folder dataset of four JPEG images with captions; `cut` truncates the third.
fn jpeg_dataset(dir: &Path, cut: bool) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..4u8 {
        let image = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, i.wrapping_mul(60)])
        });
        let path = dir.join(format!("img{i}.jpg"));
        image.save(&path).unwrap();
        std::fs::write(dir.join(format!("img{i}.txt")), "a picture").unwrap();
        if cut && i == 2 {
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
        }
    }
    dir.to_owned()
}

#[test]
fn a_truncated_jpeg_is_refused_unless_skip_bad_images() {
    let scratch = Scratch::new("truncated");
    let data = jpeg_dataset(&scratch.0.join("data"), true);
    let out = scratch.0.join("out");
    let dataset = [
        "--dataset_name",
        data.to_str().unwrap(),
        "--max_train_steps",
        "1",
    ];
    let output = train(&out, &dataset);
    assert_refused(&output, &["img2.jpg", "truncated"]);
    let output = train(&out, &[&dataset[..], &["--skip_bad_images"]].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("img2.jpg"),
        "the skipped row is not listed: {stdout}{stderr}"
    );
}
