//! Saving and loading the optimizer state: a run saved after 15 steps and resumed in a fresh
//! optimizer continues bit-identically to an uninterrupted run; bad files are refused with the key
//! that is wrong, and a refused load changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use optim8bit::{AdamW, AdamWConfig, Error, ParamGroup};
use support::{set_grad, temp_path};
use tch::{Device, Kind, Tensor};

const SHAPES: [&[i64]; 3] = [&[5000], &[64, 80], &[300]]; // ragged 8-bit, whole-block 8-bit, fp32
const STEPS: i64 = 30;
const SAVE_AT: i64 = 15;

/// Initial parameters and per-step gradients (fixed by the seed), shared by both runs.
fn problem() -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
    tch::manual_seed(7);
    let opts = (Kind::Float, Device::Cpu);
    let initial: Vec<Tensor> = SHAPES.iter().map(|s| Tensor::randn(*s, opts)).collect();
    let grads = (0..STEPS)
        .map(|_| {
            SHAPES
                .iter()
                .map(|s| Tensor::randn(*s, opts) * 0.1)
                .collect()
        })
        .collect();
    (initial, grads)
}

fn optimizer(params: &[Tensor], config: AdamWConfig) -> AdamW {
    let groups = vec![
        ParamGroup::new(
            vec![params[0].shallow_clone(), params[2].shallow_clone()],
            1e-2,
            1e-2,
        ),
        ParamGroup::new(vec![params[1].shallow_clone()], 3e-3, 0.0),
    ];
    AdamW::new(groups, config).unwrap()
}

fn fresh(values: &[Tensor]) -> Vec<Tensor> {
    fresh_on(values, Device::Cpu)
}

fn fresh_on(values: &[Tensor], device: Device) -> Vec<Tensor> {
    values
        .iter()
        .map(|v| v.to_device(device).copy().set_requires_grad(true))
        .collect()
}

/// The CPU, and CUDA when there is one.
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    devices
}

fn run_steps(
    optimizer: &mut AdamW,
    params: &[Tensor],
    grads: &[Vec<Tensor>],
    steps: std::ops::Range<i64>,
) {
    for step in steps {
        // A schedule the file must carry across the restart.
        optimizer
            .set_learning_rate(0, 1e-2 / (1.0 + step as f64))
            .unwrap();
        for (param, grad) in params.iter().zip(&grads[step as usize]) {
            set_grad(param, grad);
        }
        optimizer.step().unwrap();
    }
}

fn check_exact_resume(config: AdamWConfig, name: &str, device: Device) {
    let (initial, grads) = problem();
    let fresh = |values: &[Tensor]| fresh_on(values, device);

    let straight = fresh(&initial);
    let mut uninterrupted = optimizer(&straight, config);
    run_steps(&mut uninterrupted, &straight, &grads, 0..STEPS);

    let first = fresh(&initial);
    let mut before = optimizer(&first, config);
    run_steps(&mut before, &first, &grads, 0..SAVE_AT);
    let state = temp_path(&format!("{name}-state.safetensors"));
    before.save(&state).unwrap();
    // A new process would rebuild the model from its checkpoint and the optimizer from zero.
    let resumed_params = fresh(&first.iter().map(Tensor::detach).collect::<Vec<_>>());
    drop(before);
    let mut resumed = optimizer(&resumed_params, config);
    resumed.load(&state).unwrap();
    assert_eq!(resumed.learning_rate(0).unwrap(), 1e-2 / SAVE_AT as f64);
    run_steps(&mut resumed, &resumed_params, &grads, SAVE_AT..STEPS);

    for (a, b) in straight.iter().zip(&resumed_params) {
        assert!(a.equal(b), "{name}: parameters differ after resuming");
    }
    let (end_a, end_b) = (
        temp_path(&format!("{name}-a.safetensors")),
        temp_path(&format!("{name}-b.safetensors")),
    );
    uninterrupted.save(&end_a).unwrap();
    resumed.save(&end_b).unwrap();
    let a: Vec<(String, Tensor)> = Tensor::read_safetensors(&end_a).unwrap();
    let b: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&end_b)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(a.len(), b.len());
    for (key, tensor) in &a {
        assert!(
            tensor.equal(&b[key]),
            "{name}: state `{key}` differs after resuming"
        );
    }
    println!(
        "{name} on {device:?}: {} tensors and all parameters bit-identical after {STEPS} steps with a restart at {SAVE_AT}",
        a.len()
    );
}

#[test]
fn eight_bit_resume_is_bit_identical() {
    for device in devices() {
        check_exact_resume(AdamWConfig::eight_bit(), "8bit", device);
    }
}

#[test]
fn fp32_resume_is_bit_identical() {
    for device in devices() {
        check_exact_resume(AdamWConfig::fp32(), "fp32", device);
    }
}

#[test]
fn bad_state_files_are_refused_by_key() {
    let (initial, grads) = problem();
    let params = fresh(&initial);
    let mut source = optimizer(&params, AdamWConfig::eight_bit());
    run_steps(&mut source, &params, &grads, 0..2);
    let good = temp_path("good.safetensors");
    source.save(&good).unwrap();

    // Another optimizer over differently shaped parameters.
    let other: Vec<Tensor> = fresh(&[
        Tensor::zeros([5000], (Kind::Float, Device::Cpu)),
        Tensor::zeros([80, 64], (Kind::Float, Device::Cpu)),
        Tensor::zeros([300], (Kind::Float, Device::Cpu)),
    ]);
    let mut target = optimizer(&other, AdamWConfig::eight_bit());
    let message = target.load(&good).unwrap_err().to_string();
    assert!(
        message.contains("state.1.0.state1") && message.contains("shape"),
        "{message}"
    );
    // Nothing was taken over from the refused file.
    assert_eq!(target.step_count().double_value(&[]), 0.0);
    assert_eq!(target.learning_rate(0).unwrap(), 1e-2);

    let mut fp32 = optimizer(&fresh(&initial), AdamWConfig::fp32());
    let message = fp32.load(&good).unwrap_err().to_string();
    assert!(message.contains("precision"), "{message}");

    // A missing tensor and a foreign one.
    let mut tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&good).unwrap();
    tensors.retain(|(key, _)| key != "state.0.0.absmax2");
    let partial = temp_path("partial.safetensors");
    Tensor::write_safetensors(&tensors, &partial).unwrap();
    let message = optimizer(&fresh(&initial), AdamWConfig::eight_bit())
        .load(&partial)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("state.0.0.absmax2") && message.contains("missing"),
        "{message}"
    );
    tensors.push(("state.0.0.absmax2".into(), source_absmax(&good)));
    tensors.push((
        "state.9.9.state1".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&tensors, &partial).unwrap();
    let message = optimizer(&fresh(&initial), AdamWConfig::eight_bit())
        .load(&partial)
        .unwrap_err()
        .to_string();
    assert!(message.contains("state.9.9.state1"), "{message}");

    let missing = temp_path("does-not-exist.safetensors");
    match optimizer(&fresh(&initial), AdamWConfig::eight_bit()).load(&missing) {
        Err(Error::UnreadableStateFile { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected UnreadableStateFile, got {other:?}"),
    }
}

fn source_absmax(path: &std::path::Path) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "state.0.0.absmax2")
        .unwrap()
        .1
}
