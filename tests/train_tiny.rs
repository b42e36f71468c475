//! The trainer end to end on the tiny preset (the repository's tiny SDXL-shaped model and demo
//! dataset, on the CPU): the loss falls, every output file loads, and a run killed with SIGKILL at
//! random moments — including in the middle of writing a checkpoint — and resumed each time ends with
//! a LoRA bit-identical to an uninterrupted run's, never leaving a corrupt checkpoint behind.
//!
//! Every training run happens in a child process (this test binary re-run on the ignored test
//! `training_child`): each run has a process of its own and can be killed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use image::GenericImageView;
use tch::Tensor;
use trainer::TrainConfig;
use trainer::checkpoint::CheckpointStore;
use trainer::logs::{jsonl::MetricsLog, read_images, tensorboard::read_scalars};
use trainer::run::{KOHYA_FILE, LORA_FILE};

#[path = "common/training.rs"]
mod training;

use training::{
    assert_bit_identical, fixture, losses, run_output, run_to_end, scratch, spawn, tensors, tiny,
};

#[test]
fn random_crops_flips_v_prediction_min_snr_and_offset_noise_train() {
    let out = scratch("fresh").join("run");
    let config = tiny(&out)
        .with_cache_latents(false)
        .with_center_crop(false)
        .with_random_flip(true)
        // The other loss options on the same short run: v-prediction targets, min-SNR-5 weights,
        // offset noise.
        .with_prediction_type(Some("v_prediction".into()))
        .with_snr_gamma(Some(5.0))
        .with_noise_offset(0.05)
        .with_max_train_steps(10)
        .with_checkpointing_steps(10)
        .with_validation_prompt(None);
    run_to_end(&config);
    let metrics = MetricsLog::read(&out.join("logs/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics.iter().filter_map(|r| r["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 2);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    assert!(out.join(LORA_FILE).is_file() && out.join("checkpoint-10").is_dir());
    // The checkpoint's kohya file carries kohya's and ModelSpec's metadata of this run.
    let kohya = out.join("checkpoint-10").join(KOHYA_FILE);
    let header = kohya_header(&kohya);
    for (key, value) in [
        ("ss_base_model_version", "sdxl_base_v1-0"),
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "4.0"),
        ("ss_steps", "10"),
        ("ss_max_train_steps", "10"),
        ("ss_resolution", "(64, 64)"),
        ("ss_output_name", "run"),
        ("ss_seed", "0"),
        ("ss_learning_rate", "0.001"),
        ("modelspec.sai_model_spec", "1.0.1"),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
        (
            "modelspec.implementation",
            "https://github.com/Stability-AI/generative-models",
        ),
        ("modelspec.title", "run"),
        ("modelspec.resolution", "64x64"),
        ("modelspec.prediction_type", "v"),
        // Under 1 MiB: kohya's legacy hash reads nothing, the SHA-256 of no bytes.
        ("sshs_legacy_hash", "e3b0c442"),
    ] {
        assert_eq!(header.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert_eq!(header["sshs_model_hash"], data_sha256(&kohya));
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

/// The header entries of a safetensors file.
fn kohya_header(path: &Path) -> std::collections::BTreeMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    header.metadata().clone().unwrap().into_iter().collect()
}

/// SHA-256 (hex) of everything after a safetensors file's header: kohya's `sshs_model_hash`.
fn data_sha256(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    sha2::Sha256::digest(&bytes[8 + length..])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn fp8_base_weights_train_close_to_the_full_precision_run() {
    let dir = scratch("fp8");
    let short = |name: &str, fp8_base_weights: bool| {
        tiny(&dir.join(name))
            .with_fp8_base_weights(fp8_base_weights)
            .with_max_train_steps(10)
            .with_checkpointing_steps(10)
            .with_logging_steps(1)
            .with_validation_prompt(None)
    };
    let (plain, fp8) = (short("plain", false), short("fp8", true));
    run_to_end(&plain);
    let output = spawn(&fp8, false).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "training failed:\n{stderr}");
    // Every linear layer and convolution of the tiny UNet went to fp8.
    assert!(
        stderr.contains("linear layers: fp8 base weights: 213 layers quantized (0 already fp8)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("convolutions: fp8 base weights: 50 layers quantized (0 already fp8)"),
        "{stderr}"
    );
    let (plain_losses, fp8_losses) = (losses(&plain), losses(&fp8));
    assert_eq!((plain_losses.len(), fp8_losses.len()), (10, 10));
    // Same seed, same batches and noise: the losses differ only by the weights' fp8 rounding, and
    // they do differ (the flag is not ignored).
    for (step, (a, b)) in plain_losses.iter().zip(&fp8_losses).enumerate() {
        assert!(
            b.is_finite() && (a - b).abs() <= 0.05 * a.abs(),
            "step {}: {a} vs {b}",
            step + 1
        );
    }
    assert_ne!(plain_losses, fp8_losses);
    let worst = plain_losses
        .iter()
        .zip(&fp8_losses)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0.0, f64::max);
    println!("fp8 vs full-precision loss over 10 steps: largest relative difference {worst:.2e}");
    assert!(fp8.output_dir.join(LORA_FILE).is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--fp8_compute` (bf16): the fp8-stored layers multiply in fp8 with their inputs quantized per
/// call, through torch-cuda's differentiable product. The losses
/// stay near the widened fp8 run's (the inputs' rounding, ≤ 2⁻⁴ of each value, is the difference)
/// and differ from them (the flag is not ignored); with gradient checkpointing, whose first pass
/// runs without gradients, the forward pass is the same; `--fp8_gradients` (the input gradients in
/// fp8 as well) keeps the losses as near.
#[test]
fn fp8_products_train_close_to_the_widened_fp8_run_with_and_without_checkpointing() {
    use trainer::config::MixedPrecision;
    let dir = scratch("fp8-compute");
    let short = |name: &str, fp8_compute: bool, checkpointing: bool| {
        tiny(&dir.join(name))
            .with_mixed_precision(MixedPrecision::Bf16)
            .with_fp8_base_weights(true)
            .with_fp8_compute(fp8_compute)
            .with_fp8_gradients(name == "gradients")
            .with_gradient_checkpointing(checkpointing)
            .with_max_train_steps(10)
            .with_checkpointing_steps(10)
            .with_logging_steps(1)
            .with_validation_prompt(None)
    };
    let (widened, products, checkpointed, gradients) = (
        short("widened", false, false),
        short("products", true, false),
        short("checkpointed", true, true),
        short("gradients", true, false),
    );
    run_to_end(&widened);
    let output = spawn(&products, false).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "training failed:\n{stderr}");
    assert!(
        stderr.contains("fp8 products: 213 linear layers multiply in fp8"),
        "{stderr}"
    );
    run_to_end(&checkpointed);
    let output = spawn(&gradients, false).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "training failed:\n{stderr}");
    assert!(
        stderr.contains("input gradients in fp8, output gradients quantized to e5m2"),
        "{stderr}"
    );
    let (a, b) = (losses(&widened), losses(&products));
    assert_eq!((a.len(), b.len()), (10, 10));
    for (step, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(
            b.is_finite() && (a - b).abs() <= 0.05 * a.abs(),
            "step {}: widened {a} vs fp8 products {b}",
            step + 1
        );
    }
    assert_ne!(a, b, "the fp8 products did not run");
    let worst = a
        .iter()
        .zip(&b)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0.0, f64::max);
    println!(
        "fp8 products vs widened fp8 loss over 10 steps: largest relative difference {worst:.2e}"
    );
    // Checkpointed: the first loss (the forward pass before any update) is the same number, though
    // the checkpointed forward ran without gradients; later steps move as checkpointing moves the
    // widened run too (its backward sums in another order).
    let c = losses(&checkpointed);
    assert_eq!(c[0], b[0], "the checkpointed forward pass differs");
    for (step, (b, c)) in b.iter().zip(&c).enumerate() {
        assert!(
            c.is_finite() && (b - c).abs() <= 0.05 * b.abs(),
            "step {}: fp8 products {b} vs checkpointed {c}",
            step + 1
        );
    }
    // --fp8_gradients: the same first forward pass; then the e5m2 gradients move the LoRA, and the
    // losses stay as near the widened run's.
    let g = losses(&gradients);
    assert_eq!(g[0], b[0], "--fp8_gradients changed the forward pass");
    assert_ne!(g, b, "the fp8 backward did not run");
    for (step, (a, g)) in a.iter().zip(&g).enumerate() {
        assert!(
            g.is_finite() && (a - g).abs() <= 0.05 * a.abs(),
            "step {}: widened {a} vs fp8 gradients {g}",
            step + 1
        );
    }
    let worst = a
        .iter()
        .zip(&g)
        .map(|(a, g)| (a - g).abs() / a.abs())
        .fold(0.0, f64::max);
    println!(
        "fp8 gradients vs widened fp8 loss over 10 steps: largest relative difference {worst:.2e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// bf16 mixed precision trains through the LoRA's compute copies (`lora::ComputeCopies`): the
/// run's losses stay near the fp32 run's, and a run stopped at a checkpoint and resumed (the copies
/// refreshed from the loaded masters) ends on the bit-identical LoRA of an uninterrupted one.
#[test]
fn bf16_runs_train_near_fp32_and_resume_to_a_bit_identical_lora() {
    use trainer::config::MixedPrecision;
    let dir = scratch("bf16");
    let config = |name: &str, mixed_precision: MixedPrecision, steps: u64| {
        tiny(&dir.join(name))
            .with_mixed_precision(mixed_precision)
            .with_max_train_steps(steps)
            .with_checkpointing_steps(3)
            .with_logging_steps(1)
            .with_validation_prompt(None)
            .with_resume_from_checkpoint(Some("latest".into()))
    };
    let fp32 = config("fp32", MixedPrecision::No, 6);
    let whole = config("whole", MixedPrecision::Bf16, 6);
    run_to_end(&fp32);
    run_to_end(&whole);
    let (a, b) = (losses(&fp32), losses(&whole));
    assert_eq!((a.len(), b.len()), (6, 6));
    for (step, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(
            b.is_finite() && (a - b).abs() <= 0.1 * a.abs(),
            "step {}: fp32 {a} vs bf16 {b}",
            step + 1
        );
    }
    // B starts at zero, so it is what training moved: the bf16 run moved it as the fp32 run did.
    let ups = |config: &TrainConfig| -> Tensor {
        let named = tensors(&config.output_dir.join(LORA_FILE));
        let ups: Vec<Tensor> = named
            .iter()
            .filter(|(n, _)| n.contains("lora_B") || n.contains("lora.up"))
            .map(|(_, t)| t.to_kind(tch::Kind::Float).reshape([-1]))
            .collect();
        assert!(!ups.is_empty());
        Tensor::cat(&ups, 0)
    };
    let (up32, up16) = (ups(&fp32), ups(&whole));
    // Adam's first steps move each entry by about ±lr whatever the gradient's size, so the signs of
    // small gradients decide much of B and bf16 rounding flips some: compare directions.
    let cosine = (&up16 * &up32).sum(tch::Kind::Float).double_value(&[])
        / (up16.norm().double_value(&[]) * up32.norm().double_value(&[]));
    println!("bf16 vs fp32 LoRA B after 6 steps: cosine {cosine:.3}");
    assert!(
        cosine > 0.5,
        "the bf16 run moved B elsewhere than the fp32 run (cosine {cosine})"
    );
    // Stopped after the checkpoint of step 3, then resumed to step 6.
    run_to_end(&config("split", MixedPrecision::Bf16, 3));
    run_to_end(&config("split", MixedPrecision::Bf16, 6));
    assert_bit_identical(
        &whole.output_dir.join(LORA_FILE),
        &dir.join("split").join(LORA_FILE),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint records its global batch (`--train_batch_size` × processes); a resume with another
/// one stops before training, naming the flags (docs/TRAINING.md, "Multi-GPU (data parallel)").
#[test]
fn a_resume_with_another_global_batch_is_refused() {
    let dir = scratch("global-batch");
    let config = |train_batch_size: u32, steps: u64| {
        tiny(&dir.join("run"))
            .with_train_batch_size(train_batch_size)
            .with_max_train_steps(steps)
            .with_checkpointing_steps(1)
            .with_validation_prompt(None)
            .with_resume_from_checkpoint(Some("latest".into()))
    };
    run_to_end(&config(2, 1));
    let (ok, stderr) = run_output(&config(1, 2));
    assert!(!ok, "the resume should have been refused");
    assert!(
        stderr.contains(
            "the checkpoint was trained with a global batch of 2 (--train_batch_size 2 × 1 process), \
             and this run's is 1 (--train_batch_size 1 × 1 process)"
        ),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cuda_graphs_need_a_cuda_device_and_cached_latents() {
    let out = scratch("graph").join("run");
    let device = if tch::Cuda::is_available() {
        "cuda"
    } else {
        "cpu"
    };
    let config = tiny(&out)
        .with_cuda_graph(true)
        .with_cache_latents(!tch::Cuda::is_available())
        .with_device(device.into());
    let error = trainer::Trainer::new(config).unwrap_err().to_string();
    assert!(
        error.contains("--cuda_graph") && error.contains("CUDA device and --cache_latents"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

/// Trains with an absurd learning rate; returns the child's stderr and checks that nothing
/// non-finite was written and no final LoRA exists.
fn diverge(name: &str, learning_rate: f64) -> String {
    let out = scratch(name).join("run");
    let config = tiny(&out)
        .with_learning_rate(learning_rate)
        .with_max_train_steps(40)
        .with_checkpointing_steps(1)
        .with_logging_steps(5)
        .with_max_nonfinite_steps(3)
        .with_validation_prompt(None);
    let output = spawn(&config, false).wait_with_output().unwrap();
    assert!(!output.status.success(), "the run should have stopped");
    assert!(!out.join(LORA_FILE).exists());
    for (_, path) in CheckpointStore::new(&out).list().unwrap() {
        for (name, tensor) in tensors(&path.join("lora_parameters.safetensors")) {
            assert!(
                bool::try_from(tensor.isfinite().all()).unwrap(),
                "{name} in {}",
                path.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_diverging_run_skips_its_non_finite_steps_then_stops_without_writing_a_lora() {
    // 1e10: the first steps blow the weights up (finite), later losses overflow and those steps are
    // skipped on the device until the limit stops the run.
    let stderr = diverge("diverge", 1e10);
    assert!(
        stderr.contains("optimizer steps were skipped")
            && stderr.contains("--max_nonfinite_steps 3"),
        "{stderr}"
    );
    // 1e30: weight decay itself overflows a parameter to infinity; the checkpoint writer refuses it.
    let stderr = diverge("overflow", 1e30);
    assert!(
        stderr.contains("refusing to write checkpoint-") && stderr.contains("is not finite"),
        "{stderr}"
    );
}

#[test]
fn tiny_preset_trains_and_every_output_loads() {
    let out = scratch("outputs").join("run");
    run_to_end(&tiny(&out));

    // The loss falls: the last logged windows average clearly below the first.
    let metrics = MetricsLog::read(&out.join("logs/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics.iter().filter_map(|r| r["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 20, "a loss every 5 of 100 steps");
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..3]), mean(&losses[17..]));
    println!("mean loss of the first three windows {first:.4}, of the last three {last:.4}");
    assert!(
        last < first - 0.03,
        "loss did not fall: {first:.4} -> {last:.4}"
    );

    // TensorBoard has the same losses at the same steps.
    let events: Vec<PathBuf> = std::fs::read_dir(out.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(events.len(), 1);
    // TensorBoard's images: the validation row of step 50 and the final grid, the files' own bytes
    // (TensorBoard's EventAccumulator reads them: tools/fixtures/check_tensorboard.py --images).
    let images = read_images(&events[0]).unwrap();
    let shown: Vec<(&str, i64)> = images.iter().map(|i| (i.tag.as_str(), i.step)).collect();
    assert_eq!(
        shown,
        [("validation", 50), ("validation/base_vs_lora", 100)]
    );
    assert_eq!(
        images[0].encoded,
        std::fs::read(out.join("validation/step-000050.png")).unwrap()
    );
    assert_eq!(
        images[1].encoded,
        std::fs::read(out.join("base_vs_lora.png")).unwrap()
    );
    let scalars = read_scalars(&events[0]).unwrap();
    let logged: Vec<(i64, f32)> = scalars
        .iter()
        .filter(|s| s.tag == "train/loss")
        .map(|s| (s.step, s.value))
        .collect();
    let expected: Vec<(i64, f64)> = metrics
        .iter()
        .filter_map(|r| Some((r["step"].as_i64()?, r["loss"].as_f64()?)))
        .collect();
    assert_eq!(logged.len(), expected.len());
    for ((step, value), (expected_step, expected_value)) in logged.iter().zip(&expected) {
        assert_eq!(step, expected_step);
        assert!(
            (f64::from(*value) - expected_value).abs() < 1e-6,
            "step {step}: {value} vs {expected_value}"
        );
    }

    // Both LoRA files read back as the same adapters, on all 136 attention projections.
    let diffusers = lora::format::read(out.join(LORA_FILE), Default::default()).unwrap();
    assert_eq!(diffusers.format, lora::format::Format::Diffusers);
    assert_eq!(diffusers.state.modules.len(), 136);
    assert!(
        diffusers
            .metadata
            .contains_key(lora::format::TRAINING_CONFIG_KEY)
    );
    let unet_file = fixture("tiny-sdxl/unet/diffusion_pytorch_model.safetensors");
    let unet_config =
        sdxl_model::unet::UNetConfig::from_file(fixture("tiny-sdxl/unet/config.json")).unwrap();
    let renames = lora::format::BlockRenames::new(sdxl_model::unet::sgm_unet_table(&unet_config));
    let mut names = lora::format::ModuleNames::new();
    names
        .add_model_file(lora::Component::Unet, &unet_file)
        .unwrap();
    let options = lora::format::ReadOptions::default()
        .with_module_names(Some(&names))
        .with_block_renames(Some(&renames));
    let kohya = lora::format::read(out.join(KOHYA_FILE), options).unwrap();
    assert_eq!(kohya.format, lora::format::Format::Kohya);
    assert_eq!(kohya.state.modules.len(), diffusers.state.modules.len());
    for (key, module) in &diffusers.state.modules {
        let other = &kohya.state.modules[key];
        assert!(
            module.down.equal(&other.down) && module.up.equal(&other.up),
            "{key:?}"
        );
    }

    // Images: the loss plot, a validation grid at step 50, the base-vs-LoRA comparison.
    let size = |p: &str| image::image_dimensions(out.join(p)).unwrap();
    assert_eq!(size("loss.png"), (800, 450));
    assert_eq!(size("validation/step-000050.png"), (128, 64));
    assert_eq!(size("base_vs_lora.png"), (128, 128));
    let grid = image::open(out.join("base_vs_lora.png")).unwrap().to_rgb8();
    let (top, bottom) = (
        grid.view(0, 0, 128, 64).to_image(),
        grid.view(0, 64, 128, 64).to_image(),
    );
    assert_ne!(top, bottom, "the LoRA changed nothing");

    // The model card and the checkpoints.
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model_card.json")).unwrap())
            .unwrap();
    assert_eq!(card["steps"], 100);
    // The hub's card: front matter with the widget of the validation images
    // (huggingface_hub's ModelCard reads it: tools/fixtures/check_model_card.py).
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    let front = readme
        .strip_prefix("---\n")
        .unwrap()
        .split("\n---\n")
        .next()
        .unwrap();
    for line in [
        "license: openrail++",
        "- lora",
        "instance_prompt: \"Naruto style anime character\"",
        "widget:",
        "- text: \"Naruto style anime character\"",
        "    url: \"validation/step-000050.png\"",
        "    url: \"base_vs_lora.png\"",
    ] {
        assert!(front.lines().any(|l| l == line), "{line}:\n{front}");
    }
    let steps: Vec<u64> = CheckpointStore::new(&out)
        .list()
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [25, 50, 75, 100]);
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

/// A checkpoint the store lists must be complete: every file present and the state at its step.
fn assert_checkpoints_complete(out: &Path) -> Vec<u64> {
    let mut steps = Vec::new();
    for (step, path) in CheckpointStore::new(out).list().unwrap() {
        for file in [
            "lora_parameters.safetensors",
            "optimizer.safetensors",
            LORA_FILE,
            KOHYA_FILE,
            "trainer_state.json",
            "config.toml",
        ] {
            assert!(path.join(file).is_file(), "{} lacks {file}", path.display());
        }
        let state: trainer::TrainerState = serde_json::from_str(
            &std::fs::read_to_string(path.join("trainer_state.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(state.step, step);
        assert_eq!(state.batch_layout.map(|l| l.world_size), Some(1));
        assert_eq!(
            tensors(&path.join("lora_parameters.safetensors")).len(),
            272
        );
        steps.push(step);
    }
    steps
}

fn latest_step(out: &Path) -> u64 {
    CheckpointStore::new(out)
        .latest()
        .unwrap()
        .map_or(0, |(step, _)| step)
}

/// Polls until `done` holds or the child exits; true when `done` came first.
fn wait_until(child: &mut Child, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn checkpoint_being_written(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".tmp-"))
    })
}

#[test]
fn runs_killed_at_random_moments_resume_to_a_bit_identical_lora() {
    let root = scratch("resume");
    let config = |name: &str| {
        tiny(&root.join(name))
            .with_max_train_steps(40)
            .with_checkpointing_steps(2)
            .with_checkpoints_total_limit(Some(2))
            .with_validation_prompt(None)
            .with_logging_steps(4)
            .with_resume_from_checkpoint(Some("latest".into()))
    };
    let reference = config("uninterrupted");
    run_to_end(&reference);

    let resumed = config("killed");
    let out = &resumed.output_dir;
    // Each process first saves one new checkpoint (so every kill leaves progress behind), then is
    // killed either in the middle of its next checkpoint write or after a seeded random delay (which
    // lands anywhere: in a step, a save, a prune).
    let mut rng = 0x5eed_u64;
    let mut random_ms = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % 700
    };
    let plan = [
        None,
        Some(random_ms()),
        None,
        Some(random_ms()),
        None,
        Some(random_ms()),
        Some(random_ms()),
    ];
    let (mut mid_write, mut killed, mut seen) = (0, 0, Vec::new());
    for point in plan {
        let before = latest_step(out);
        let mut child = spawn(&resumed, true);
        let mut landed = wait_until(&mut child, || latest_step(out) > before);
        if landed {
            landed = match point {
                None => wait_until(&mut child, || checkpoint_being_written(out)),
                Some(ms) => {
                    std::thread::sleep(Duration::from_millis(ms));
                    child.try_wait().unwrap().is_none()
                }
            };
        }
        if landed {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
            mid_write += usize::from(point.is_none());
        }
        let status = child.wait().unwrap();
        assert!(landed || status.success(), "a child failed on its own");
        let steps = assert_checkpoints_complete(out);
        assert!(
            steps.len() <= 3,
            "checkpoints_total_limit 2 (+1 while a save is pruned): {steps:?}"
        );
        let latest = steps.last().copied().unwrap_or(0);
        assert!(
            seen.last().is_none_or(|&l| latest >= l),
            "the latest checkpoint went back: {seen:?} then {latest}"
        );
        seen.push(latest);
    }
    println!(
        "{killed} kills ({mid_write} while a checkpoint was being written); latest checkpoints seen: {seen:?}"
    );
    assert!(
        killed >= 5 && mid_write >= 2,
        "too few kills landed: {killed} ({mid_write} mid-write)"
    );
    run_to_end(&resumed);
    assert_bit_identical(&out.join(LORA_FILE), &reference.output_dir.join(LORA_FILE));
    assert_bit_identical(
        &out.join("checkpoint-40/lora_parameters.safetensors"),
        &reference
            .output_dir
            .join("checkpoint-40/lora_parameters.safetensors"),
    );
    assert_bit_identical(
        &out.join("checkpoint-40/optimizer.safetensors"),
        &reference
            .output_dir
            .join("checkpoint-40/optimizer.safetensors"),
    );
    // The metrics log, rewritten at each resume, ends with the uninterrupted run's losses.
    let losses = |dir: &Path| -> Vec<(u64, f64)> {
        MetricsLog::read(&dir.join("logs/metrics.jsonl"))
            .unwrap()
            .iter()
            .filter_map(|r| Some((r["step"].as_u64()?, r["loss"].as_f64()?)))
            .collect()
    };
    assert_eq!(losses(out), losses(&reference.output_dir));
    // The whole trainer state (loss history, window sums, learning rate, counters) is the
    // uninterrupted run's byte for byte: every value is an f64 that round-trips through JSON, and
    // the state holds no wall-clock time. (The checkpoints' config.toml differ in --output_dir only.)
    let state = |dir: &Path| std::fs::read(dir.join("checkpoint-40/trainer_state.json")).unwrap();
    assert!(
        state(out) == state(&reference.output_dir),
        "trainer_state.json differs:\n{}\n{}",
        String::from_utf8_lossy(&state(out)),
        String::from_utf8_lossy(&state(&reference.output_dir))
    );
    // One TensorBoard file, appended at every resume; read as TensorBoard reads it (a restart
    // event drops the steps from it on, which the resumed run logs again), its losses are the
    // uninterrupted run's.
    let tensorboard = |dir: &Path| -> Vec<(i64, f32)> {
        let files = event_files(dir);
        assert_eq!(files.len(), 1, "{files:?}");
        let mut last_write = std::collections::BTreeMap::new();
        for scalar in read_scalars(&files[0]).unwrap() {
            if scalar.tag == "train/loss" {
                last_write.insert(scalar.step, scalar.value.to_bits());
            }
        }
        last_write
            .into_iter()
            .map(|(step, bits)| (step, f32::from_bits(bits)))
            .collect()
    };
    assert_eq!(tensorboard(out), tensorboard(&reference.output_dir));
    assert!(!out.join(".trainer.lock").exists(), "the lock is released");
    let _ = std::fs::remove_dir_all(&root);
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect()
}
