//! Every `--optimizer` end to end on the tiny preset (CPU, fp32): each run moves the LoRA (its B
//! matrices start at zero) to a LoRA of its own, names its optimizer in the kohya file's
//! `ss_optimizer`, and a run stopped at a checkpoint and resumed ends on the bit-identical LoRA
//! of an uninterrupted one (the optimizer's whole state is in `checkpoint-N/`). Resuming with
//! another `--optimizer` is refused, naming the flag and the checkpoint.
//!
//! Runs happen in child processes (this binary re-run on `training::training_child`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::Path;

use tch::Tensor;
use trainer::TrainConfig;
use trainer::config::OptimizerKind;
use trainer::run::{KOHYA_FILE, LORA_FILE};

#[path = "common/training.rs"]
mod training;

use training::{assert_bit_identical, losses, run_output, run_to_end, scratch, tensors, tiny};

/// Each optimizer with the learning rate its users pick (Prodigy ≈ 1, Lion a tenth of AdamW's);
/// Adafactor with transformers' relative step, so its step size is the computed one.
fn runs() -> [(OptimizerKind, f64); 6] {
    [
        (OptimizerKind::AdamW, 1e-3),
        (OptimizerKind::AdamW8bit, 1e-3),
        (OptimizerKind::Prodigy, 1.0),
        (OptimizerKind::Adafactor, 1e-3),
        (OptimizerKind::Lion, 1e-4),
        (OptimizerKind::Lion8bit, 1e-4),
    ]
}

fn config(dir: &Path, name: &str, kind: OptimizerKind, lr: f64, steps: u64) -> TrainConfig {
    // Every tensor of the tiny LoRA is below bitsandbytes' min_8bit_size (4096 elements): the
    // 8-bit optimizers get kohya's `--optimizer_args min_8bit_size=0`, so their 8-bit states are
    // what trains, is checkpointed and resumes.
    let eight_bit = matches!(kind, OptimizerKind::AdamW8bit | OptimizerKind::Lion8bit);
    tiny(&dir.join(name))
        .with_optimizer(Some(kind))
        .with_optimizer_args(eight_bit.then(|| "min_8bit_size=0".to_owned()))
        .with_learning_rate(lr)
        .with_max_train_steps(steps)
        .with_checkpointing_steps(2)
        .with_logging_steps(1)
        .with_validation_prompt(None)
        .with_resume_from_checkpoint(Some("latest".into()))
}

/// The LoRA's B matrices (zero before training), flattened into one vector.
fn ups(path: &Path) -> Tensor {
    let ups: Vec<Tensor> = tensors(path)
        .into_iter()
        .filter(|(n, _)| n.contains("lora_B") || n.contains("lora.up"))
        .map(|(_, t)| t.to_kind(tch::Kind::Float).reshape([-1]))
        .collect();
    assert!(!ups.is_empty());
    Tensor::cat(&ups, 0)
}

fn ss_optimizer(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    header.metadata().clone().unwrap()["ss_optimizer"].clone()
}

#[test]
fn every_optimizer_trains_and_resumes_to_a_bit_identical_lora() {
    let dir = scratch("optimizers");
    let mut moved: Vec<(OptimizerKind, Tensor)> = Vec::new();
    for (kind, lr) in runs() {
        let whole = config(&dir, &format!("{kind}-whole"), kind, lr, 4);
        run_to_end(&whole);
        let steps = losses(&whole);
        assert_eq!(steps.len(), 4, "{kind}");
        assert!(
            steps.iter().all(|l| l.is_finite() && *l > 0.0),
            "{kind}: {steps:?}"
        );
        let up = ups(&whole.output_dir.join(LORA_FILE));
        let norm = up.norm().double_value(&[]);
        assert!(
            norm.is_finite() && norm > 0.0,
            "{kind} did not move the LoRA"
        );
        let class = ss_optimizer(&whole.output_dir.join(KOHYA_FILE));
        assert!(
            class.starts_with(&format!("{}(", kind.python_class())),
            "{kind}: ss_optimizer {class}"
        );
        // Stopped after the checkpoint of step 2, then resumed to step 4.
        let split = |steps| config(&dir, &format!("{kind}-split"), kind, lr, steps);
        run_to_end(&split(2));
        run_to_end(&split(4));
        assert_bit_identical(
            &whole.output_dir.join(LORA_FILE),
            &split(4).output_dir.join(LORA_FILE),
        );
        moved.push((kind, up));
    }
    // Different optimizers: different LoRAs from the same data, noise and start (the 8-bit
    // states round the moments, so each 8-bit optimizer differs from its fp32 one too).
    for (i, (a, up_a)) in moved.iter().enumerate() {
        for (b, up_b) in &moved[i + 1..] {
            assert!(!up_a.equal(up_b), "{a} and {b} trained the same LoRA");
        }
    }
    // Prodigy over the text encoders' groups too: one rate for all (diffusers' override of
    // --text_encoder_lr; prodigyopt refuses groups at different rates).
    let with_text = config(&dir, "Prodigy-text", OptimizerKind::Prodigy, 1.0, 2)
        .with_train_text_encoder(true)
        .with_max_train_steps(2);
    run_to_end(&with_text);
    assert!(losses(&with_text).iter().all(|l| l.is_finite()));
    // A checkpoint of one optimizer does not resume under another.
    let lion = config(&dir, "Lion-split", OptimizerKind::Lion, 1e-4, 4);
    let prodigy = lion
        .with_optimizer(Some(OptimizerKind::Prodigy))
        .with_learning_rate(1.0)
        .with_max_train_steps(6);
    let (ok, stderr) = run_output(&prodigy);
    assert!(!ok, "resumed Lion's state as Prodigy's");
    assert!(
        stderr.contains("--optimizer Lion")
            && stderr.contains("--optimizer Prodigy")
            && stderr.contains("checkpoint-4"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
