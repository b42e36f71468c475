//! `--mixed_precision fp16` end to end on the tiny preset, on the CPU: fp16 frozen weights and
//! activations, fp32 LoRA masters, dynamic loss scaling. The losses stay near the fp32 run's, the
//! scaler's state is logged, checkpointed and restored, and a run stopped at a checkpoint and resumed ends
//! on the bit-identical LoRA of an uninterrupted run.
//!
//! Every run happens in a child process (`training::training_child`), as in `tests/train_tiny.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use tch::Tensor;
use trainer::TrainConfig;
use trainer::config::MixedPrecision;
use trainer::logs::jsonl::MetricsLog;
use trainer::run::LORA_FILE;

#[path = "common/training.rs"]
mod training;

use training::{assert_bit_identical, losses, run_to_end, scratch, tiny};

#[test]
fn fp16_runs_train_near_fp32_and_resume_to_a_bit_identical_lora() {
    let dir = scratch("fp16");
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
    let whole = config("whole", MixedPrecision::Fp16, 6);
    run_to_end(&fp32);
    run_to_end(&whole);
    let (a, b) = (losses(&fp32), losses(&whole));
    println!("fp32 losses {a:?}\nfp16 losses {b:?}");
    assert_eq!((a.len(), b.len()), (6, 6));
    // Error model. fp16's own rounding (2⁻¹¹ relative per operation) moves the loss far less than
    // the noise does: the fp16 run draws ε like the latents, in fp16 (diffusers'
    // `torch.randn_like(model_input)`), and libtorch's CPU generator fills a half tensor of 16 or
    // more elements from another stream than a float one, so the two runs see different noise
    // samples. A step's loss is a mean of squares over N = 2 × 4 × 16 × 16 = 2048 elements (batch 2
    // of 16×16 latents): relative sampling spread about √(2/N) ≈ 0.031, so ≈ 0.044 between two
    // independent draws. Bounds: each step within 0.2 (4.5σ), the mean relative difference of the
    // six steps within 0.1 (σ/√6 ≈ 0.018: 5.5σ).
    let mut total = 0.0;
    for (step, (a, b)) in a.iter().zip(&b).enumerate() {
        let relative = (a - b).abs() / a.abs();
        assert!(
            b.is_finite() && relative <= 0.2,
            "step {}: fp32 {a} vs fp16 {b}",
            step + 1
        );
        total += relative;
    }
    assert!(
        total / 6.0 <= 0.1,
        "mean relative difference {}",
        total / 6.0
    );
    // The scaler's scale and overflow count are logged at every logging step.
    let metrics = MetricsLog::read(&whole.output_dir.join("logs/metrics.jsonl")).unwrap();
    for record in &metrics {
        let scale = record["loss_scale"].as_f64().unwrap();
        assert!(scale > 0.0 && scale <= 65536.0, "{record}");
        assert_eq!(record["overflow_steps"].as_u64(), Some(0), "{record}");
    }
    // Its state is in every checkpoint.
    let scaler = whole
        .output_dir
        .join("checkpoint-3/grad_scaler.safetensors");
    let named: Vec<(String, Tensor)> = Tensor::read_safetensors(&scaler).unwrap();
    let scale = named.iter().find(|(n, _)| n == "scale").unwrap();
    assert_eq!(scale.1.double_value(&[]), 65536.0);
    // B starts at zero, so it is what training moved: the fp16 run moved it as the fp32 run did.
    let ups = |config: &TrainConfig| -> Tensor {
        let named = training::tensors(&config.output_dir.join(LORA_FILE));
        let ups: Vec<Tensor> = named
            .iter()
            .filter(|(n, _)| n.contains("lora_B") || n.contains("lora.up"))
            .map(|(_, t)| t.to_kind(tch::Kind::Float).reshape([-1]))
            .collect();
        assert!(!ups.is_empty());
        Tensor::cat(&ups, 0)
    };
    let (up32, up16) = (ups(&fp32), ups(&whole));
    let cosine = (&up16 * &up32).sum(tch::Kind::Float).double_value(&[])
        / (up16.norm().double_value(&[]) * up32.norm().double_value(&[]));
    println!("fp16 vs fp32 LoRA B after 6 steps: cosine {cosine:.4}");
    assert!(cosine > 0.5, "cosine {cosine}");
    // Stopped after the checkpoint of step 3, then resumed to step 6.
    run_to_end(&config("split", MixedPrecision::Fp16, 3));
    // The scaler's state is restored from the checkpoint: a copy of it whose scale was changed
    // to 1024 resumes with that scale.
    copy_dir(&dir.join("split"), &dir.join("rescaled"));
    let file = dir.join("rescaled/checkpoint-3/grad_scaler.safetensors");
    let named: Vec<(String, Tensor)> = Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(n, t)| match n.as_str() {
            "scale" => (n, t.full_like(1024.0)),
            _ => (n, t),
        })
        .collect();
    Tensor::write_safetensors(&named, &file).unwrap();
    let rescaled = config("rescaled", MixedPrecision::Fp16, 6);
    run_to_end(&rescaled);
    let metrics = MetricsLog::read(&rescaled.output_dir.join("logs/metrics.jsonl")).unwrap();
    let resumed: Vec<f64> = metrics
        .iter()
        .filter(|r| r["step"].as_u64().unwrap() > 3)
        .map(|r| r["loss_scale"].as_f64().unwrap())
        .collect();
    assert_eq!(resumed, [1024.0; 3]);
    run_to_end(&config("split", MixedPrecision::Fp16, 6));
    assert_bit_identical(
        &whole.output_dir.join(LORA_FILE),
        &dir.join("split").join(LORA_FILE),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
