//! `--use_ema` end to end on the tiny preset (CPU): the LoRA files hold diffusers' `EMAModel`
//! average of the trained weights — recomputed here from the raw weights every checkpoint keeps —
//! not the raw weights; a run stopped at a checkpoint and resumed writes the bit-identical average;
//! validation images (rendered with the average swapped in) leave training untouched.
//!
//! The average's own arithmetic is checked against diffusers in `crates/optim8bit/tests/ema.rs`;
//! this file checks what the trainer averages (every weight the optimizer updates: LoRA A and B,
//! DoRA magnitudes, the text encoders' LoRA) and what it writes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor};
use trainer::TrainConfig;
use trainer::run::{KOHYA_FILE, LORA_FILE};

#[path = "common/training.rs"]
mod training;

use training::{assert_bit_identical, run_to_end, scratch, tensors, tiny};

const STEPS: u64 = 6;

fn config(dir: &Path, name: &str, steps: u64, validation: bool) -> TrainConfig {
    tiny(&dir.join(name))
        .with_max_train_steps(steps)
        .with_checkpointing_steps(1)
        .with_logging_steps(1)
        .with_use_dora(true)
        .with_train_text_encoder(true)
        .with_use_ema(true)
        .with_ema_update_after_step(1)
        .with_validation_prompt(validation.then(|| "Naruto style anime character".into()))
        .with_validation_steps(2)
        .with_validation_inference_steps(2)
        .with_num_validation_images(1)
        .with_resume_from_checkpoint(Some("latest".into()))
}

/// The raw weights of `checkpoint-{step}`, by the trainer's parameter names.
fn raw(out: &Path, step: u64) -> HashMap<String, Tensor> {
    tensors(
        &out.join(format!("checkpoint-{step}"))
            .join("lora_parameters.safetensors"),
    )
    .into_iter()
    .collect()
}

/// diffusers' `EMAModel.get_decay` for `update_after_step = 1` and the other defaults.
fn decay(optimization_step: u64) -> f64 {
    let step = optimization_step.saturating_sub(2) as f64;
    if step <= 0.0 {
        0.0
    } else {
        ((1.0 + step) / (10.0 + step)).min(0.9999)
    }
}

/// The average after `STEPS` steps, recomputed in float64 from the raw weights of every checkpoint:
/// `s ← s − (1 − decay)·(s − p)`. Steps 1 and 2 have decay 0, so the start value drops out.
fn expected_average(out: &Path) -> HashMap<String, Tensor> {
    let mut average: HashMap<String, Tensor> = HashMap::new();
    for step in 1..=STEPS {
        let weights = 1.0 - decay(step);
        for (name, p) in raw(out, step) {
            let p = p.to_kind(Kind::Double);
            let s = match average.remove(&name) {
                Some(s) => &s - (&s - &p) * weights,
                None => p,
            };
            average.insert(name, s);
        }
    }
    average
}

/// The trainer's name of each tensor of a LoRA state: `<component prefix><module>.default.<part>`.
fn by_trainer_name(state: &lora::LoraState) -> HashMap<String, Tensor> {
    let mut named = HashMap::new();
    for ((component, module), adapter) in &state.modules {
        let prefix = match component {
            lora::Component::Unet => String::new(),
            other => format!("{}.", other.diffusers_prefix()),
        };
        let key = |part: &str| format!("{prefix}{module}.default.{part}");
        named.insert(key("lora_A"), adapter.down.shallow_clone());
        named.insert(key("lora_B"), adapter.up.shallow_clone());
        if let Some(m) = &adapter.magnitude {
            named.insert(key("lora_magnitude_vector"), m.shallow_clone());
        }
    }
    named
}

/// `max |a − b| / max |b|` in float64.
fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let scale = b.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
    (&a.reshape_as(&b) - &b).abs().max().double_value(&[]) / scale
}

#[test]
fn ema_runs_write_the_average_and_resume_to_the_bit_identical_average() {
    let dir = scratch("ema");
    let whole = config(&dir, "whole", STEPS, false);
    run_to_end(&whole);
    let out = &whole.output_dir;

    // The diffusers file holds the average of every trained tensor, not the raw weights.
    let written = lora::format::read(out.join(LORA_FILE), Default::default()).unwrap();
    let written = by_trainer_name(&written.state);
    let expected = expected_average(out);
    let last = raw(out, STEPS);
    assert_eq!(
        written.len(),
        last.len(),
        "the file holds every trained tensor"
    );
    assert!(written.keys().any(|k| k.contains("magnitude")));
    assert!(written.keys().any(|k| k.starts_with("text_encoder")));
    // Error model: the trainer rounds three times per step in float32 (s − p, the product, the
    // subtraction) and once for 1 − decay, an earlier error carried with a factor ≤ 1: depth 4 per
    // step (see crates/test-support).
    let bound = test_support::f32_bound(4.0 * STEPS as f64);
    let (mut worst, mut moved) = (0.0f64, 0.0f64);
    for (name, tensor) in &written {
        let error = rel_error(tensor, &expected[name]);
        assert!(error <= bound, "{name}: error {error:e} > bound {bound:e}");
        worst = worst.max(error);
        moved = moved.max(rel_error(tensor, &last[name]));
    }
    test_support::check("train_ema average vs recomputed", worst, bound);
    assert!(
        moved > 1e3 * bound,
        "the file holds the raw weights (largest difference {moved:e})"
    );
    // The kohya file holds the same tensors (under kohya's names): each of its weights is one of
    // the diffusers file's, bit for bit.
    let diffusers: Vec<Tensor> = tensors(&out.join(LORA_FILE))
        .into_iter()
        .map(|(_, t)| t.reshape([-1]))
        .collect();
    for (name, tensor) in tensors(&out.join(KOHYA_FILE)) {
        if name.ends_with(".alpha") {
            continue;
        }
        let flat = tensor.reshape([-1]);
        assert!(
            diffusers
                .iter()
                .any(|d| d.size() == flat.size() && d.equal(&flat)),
            "{name}: the kohya file holds a tensor the diffusers file lacks"
        );
    }

    // Stopped after the checkpoint of step 3 and resumed to step 6, with validation images on the
    // way (the average swapped in and out around them): the same files.
    run_to_end(&config(&dir, "split", 3, true));
    let split = config(&dir, "split", STEPS, true);
    run_to_end(&split);
    for file in [LORA_FILE, KOHYA_FILE] {
        assert_bit_identical(&out.join(file), &split.output_dir.join(file));
    }
    for file in ["ema.safetensors", "lora_parameters.safetensors"] {
        let checkpoint = |out: &Path| out.join(format!("checkpoint-{STEPS}")).join(file);
        assert_bit_identical(&checkpoint(out), &checkpoint(&split.output_dir));
    }
    assert!(split.output_dir.join("validation").is_dir());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resuming_with_use_ema_needs_a_checkpoint_with_an_average() {
    let dir = scratch("ema-missing");
    let plain = config(&dir, "run", 2, false)
        .with_use_ema(false)
        .with_ema_update_after_step(0);
    run_to_end(&plain);
    let (ok, stderr) = training::run_output(&config(&dir, "run", 3, false));
    assert!(
        !ok,
        "a resume with --use_ema from a checkpoint without one ran"
    );
    assert!(
        stderr.contains("ema.safetensors") && stderr.contains("--use_ema"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_step_skipped_for_a_non_finite_loss_still_advances_the_average() {
    // 1e10: the first steps blow the weights up (finite), later losses overflow and those steps are
    // skipped on the device until --max_nonfinite_steps stops the run (as in tests/train_tiny.rs).
    let dir = scratch("ema-skips");
    let config = tiny(&dir.join("run"))
        .with_learning_rate(1e10)
        .with_max_train_steps(40)
        .with_checkpointing_steps(1)
        .with_logging_steps(1)
        .with_max_nonfinite_steps(3)
        .with_validation_prompt(None)
        .with_use_ema(true);
    let (ok, stderr) = training::run_output(&config);
    assert!(!ok, "the run should have stopped");
    let mut skipped_seen = 0.0f64;
    let store = trainer::checkpoint::CheckpointStore::new(&config.output_dir);
    for (step, path) in store.list().unwrap() {
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path.join("trainer_state.json")).unwrap(),
        )
        .unwrap();
        skipped_seen = skipped_seen.max(state["skipped_steps"].as_f64().unwrap());
        let ema: HashMap<String, Tensor> =
            tensors(&path.join("ema.safetensors")).into_iter().collect();
        assert_eq!(
            ema["optimization_step"].double_value(&[]),
            step as f64,
            "checkpoint-{step}: the average did not count every optimizer step"
        );
    }
    assert!(
        skipped_seen >= 1.0,
        "no checkpoint recorded a skipped step:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
