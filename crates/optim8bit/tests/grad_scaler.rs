//! The GradScaler against `torch.amp.GradScaler` over 50 steps with injected overflows.
//!
//! The fixture `grad-scaler.safetensors` comes from `gen_grad_scaler` in
//! `tools/fixtures/generate.py` (`tools/fixtures/grad_scaler.py`): four sequences (growth
//! interval 3; torch's defaults from a growth tracker 2 short of 2000; a scale of 2¹²⁶ whose growth
//! to infinity torch refuses; an initial scale of 1000 with factors 3 and 0.3, so that the scale
//! and its reciprocal round), each 50 steps of `scale(loss).backward()`, `unscale_`, a
//! lion-pytorch `Lion` step gated by the scaler, `update`, on seeded gradients with inf, NaN and
//! finite-but-overflowing values at chosen steps. Scales, growth trackers, `found_inf` and the
//! unscaled gradients are compared bit for bit (they are the same ATen kernels on the same
//! inputs); the parameters too: Lion's update is `lr·sign(·)` with no weight decay, so one
//! rounding of `p − lr·s` on both sides.
//!
//! A run saved after step 25 and resumed into a fresh scaler and optimizer ends bit-identical.
//!
//! With a CUDA device (the GPU harness sets `SDXL_REQUIRE_CUDA=1`, making one mandatory) the
//! sequences run again on CUDA against the same fixture, eagerly and with the scaler's unscale, the
//! gated step and the update replayed from one CUDA graph.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use std::collections::HashMap;

use optim8bit::{GradScaler, GradScalerConfig, Lion, LionConfig, ParamGroup};
use serde_json::Value;
use support::{fixture, temp_path};
use tch::{Device, Kind, Tensor};

struct Reference {
    tensors: HashMap<String, Tensor>,
    info: Value,
}

fn reference() -> Reference {
    let path = fixture(
        "grad-scaler.safetensors",
        "regenerate it with `tools/fixtures/regenerate.sh --only grad_scaler`",
    );
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info = serde_json::from_str(&header.metadata().as_ref().unwrap()["reference"]).unwrap();
    Reference {
        tensors: Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect(),
        info,
    }
}

impl Reference {
    fn t(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no {key}"))
    }

    fn names(&self) -> Vec<String> {
        self.info["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_str().unwrap().to_string())
            .collect()
    }

    /// The sequence's scaler settings (torch's defaults where the generator passed none) and the
    /// growth tracker it loaded before step 0.
    fn sequence(&self, name: &str) -> (GradScalerConfig, Option<i64>) {
        let entry = self.info["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s[0] == name)
            .unwrap();
        let d = GradScalerConfig::default();
        let get = |k: &str, default: f64| entry[1][k].as_f64().unwrap_or(default);
        let config = GradScalerConfig::default()
            .with_init_scale(get("init_scale", d.init_scale))
            .with_growth_factor(get("growth_factor", d.growth_factor))
            .with_backoff_factor(get("backoff_factor", d.backoff_factor))
            .with_growth_interval(get("growth_interval", d.growth_interval as f64) as i64);
        (config, entry[2].as_i64())
    }
}

struct Run {
    params: Vec<Tensor>,
    optimizer: Lion,
    scaler: GradScaler,
}

/// The CPU, and the CUDA device when there is one; without one the CUDA half is skipped, unless
/// `SDXL_REQUIRE_CUDA=1` (the GPU machine's harness) makes that a failure.
fn devices() -> Vec<Device> {
    let present = test_support::cuda();
    let mut devices = vec![Device::Cpu];
    if present {
        devices.push(Device::Cuda(0));
    }
    devices
}

fn start(r: &Reference, sequence: &str, device: Device) -> Run {
    let lion = &r.info["lion"];
    let params: Vec<Tensor> = r
        .names()
        .iter()
        .map(|n| {
            r.t(&format!("{n}.initial"))
                .to_device(device)
                .copy() // on the CPU `to_device` is the fixture's own tensor
                .set_requires_grad(true)
        })
        .collect();
    let group = ParamGroup::new(
        params.iter().map(Tensor::shallow_clone).collect(),
        lion["lr"].as_f64().unwrap(),
        lion["weight_decay"].as_f64().unwrap(),
    );
    let config = LionConfig::fp32()
        .with_beta1(lion["betas"][0].as_f64().unwrap())
        .with_beta2(lion["betas"][1].as_f64().unwrap());
    let (scaler_config, tracker) = r.sequence(sequence);
    let scaler = GradScaler::new(scaler_config, device).unwrap();
    if let Some(tracker) = tracker {
        let _ = scaler.growth_tracker().shallow_clone().fill_(tracker);
    }
    Run {
        params,
        optimizer: Lion::new(vec![group], config).unwrap(),
        scaler,
    }
}

fn bits_equal(name: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.kind(), expected.kind(), "{name}: element type");
    let actual = actual.to_device(Device::Cpu);
    // Bit patterns, except that a NaN equals any NaN: its sign and payload are not specified
    // (the fixture's come from torch's CPU kernels; CUDA's multiply gives the canonical NaN).
    let nan = actual.isnan();
    let as_bits = |t: &Tensor| {
        let bits = t.contiguous().view_dtype(Kind::Int);
        bits.where_self(&nan.logical_not(), &bits.zeros_like())
    };
    assert!(
        nan.equal(&expected.isnan()) && as_bits(&actual).equal(&as_bits(expected)),
        "{name}: {actual:?} vs {expected:?}"
    );
}

/// The scaler's device work of an optimizer step: unscale, the gated step, the update.
fn gated_update(run: &mut Run) {
    run.scaler.unscale(&run.params).unwrap();
    run.optimizer
        .step_if(&run.scaler.finite().unwrap())
        .unwrap();
    run.scaler.update().unwrap();
}

/// Step `step` of `sequence`, checked against the fixture. With `graph` (CUDA), the gated update
/// is captured at step 2 and replayed from then on, the scaled gradients written into the
/// captured gradients' storage (`g · scale`, the product the backward pass computes).
fn step(
    r: &Reference,
    run: &mut Run,
    sequence: &str,
    step: i64,
    graph: Option<&mut Option<torch_cuda::CudaGraph>>,
) {
    let names = r.names();
    let replay = graph.as_ref().is_some_and(|g| g.is_some());
    if replay {
        for (p, n) in run.params.iter().zip(&names) {
            let grad = r.t(&format!("{n}.grads")).get(step).to_device(p.device());
            p.grad().copy_(&(grad * run.scaler.scale_tensor()));
        }
    } else {
        run.optimizer.zero_grad().unwrap();
        let loss = run
            .params
            .iter()
            .zip(&names)
            .map(|(p, n)| {
                let grad = r.t(&format!("{n}.grads")).get(step).to_device(p.device());
                (p * grad).sum(Kind::Float)
            })
            .reduce(|a, b| a + b)
            .unwrap();
        run.scaler.scale(&loss).unwrap().backward();
    }
    let at = |key: &str| r.t(&format!("{sequence}.{key}")).get(step);
    let context = format!("{sequence} step {step} on {:?}", run.params[0].device());
    bits_equal(
        &format!("{context} scale used"),
        run.scaler.scale_tensor(),
        &at("scale_used"),
    );
    match graph {
        Some(Some(graph)) => graph.replay().unwrap(),
        Some(slot) if step == 2 => {
            tch::Cuda::synchronize(0);
            let (graph, ()) =
                torch_cuda::CudaGraph::capture(0, None, torch_cuda::CaptureMode::Global, || {
                    gated_update(run)
                })
                .unwrap();
            graph.replay().unwrap();
            *slot = Some(graph);
        }
        _ => gated_update(run),
    }
    // Neither the gated step nor the update changes the gradients or found_inf.
    bits_equal(
        &format!("{context} found_inf"),
        run.scaler.found_inf(),
        &at("found_inf"),
    );
    for (p, n) in run.params.iter().zip(&names) {
        bits_equal(
            &format!("{context} {n} unscaled"),
            &p.grad(),
            &at(&format!("{n}.unscaled")),
        );
    }
    bits_equal(
        &format!("{context} scale"),
        run.scaler.scale_tensor(),
        &at("scale"),
    );
    bits_equal(
        &format!("{context} growth tracker"),
        run.scaler.growth_tracker(),
        &at("growth_tracker"),
    );
    for (p, n) in run.params.iter().zip(&names) {
        bits_equal(
            &format!("{context} {n}"),
            &p.detach(),
            &at(&format!("{n}.params")),
        );
    }
}

#[test]
fn scales_skips_and_parameters_equal_torch_grad_scaler() {
    let r = reference();
    let steps = r.info["steps"].as_i64().unwrap();
    for device in devices() {
        for sequence in ["interval3", "default", "near_max", "uneven"] {
            let found = r.t(&format!("{sequence}.found_inf"));
            let skipped = found.sum(Kind::Float).double_value(&[]);
            assert!(
                skipped >= 5.0,
                "{sequence}: the fixture must inject overflows"
            );
            let mut run = start(&r, sequence, device);
            for s in 0..steps {
                step(&r, &mut run, sequence, s, None);
            }
            if device.is_cuda() {
                // Again with the gated update replayed from a CUDA graph: it is capturable.
                let mut run = start(&r, sequence, device);
                let mut graph = None;
                for s in 0..steps {
                    step(&r, &mut run, sequence, s, Some(&mut graph));
                }
            }
        }
    }
    // The sequences cover growth, backoff and a refused growth to infinity.
    let scales = r.t("interval3.scale_used");
    assert!(
        scales.get(6).double_value(&[]) > scales.get(5).double_value(&[]),
        "growth"
    );
    let near_max = r.t("near_max.scale_used");
    assert_eq!(near_max.get(6).double_value(&[]), 2f64.powi(127));
    assert_eq!(near_max.get(7).double_value(&[]), 2f64.powi(127));
}

#[test]
fn a_run_resumed_from_saved_state_is_bit_identical() {
    let r = reference();
    let steps = r.info["steps"].as_i64().unwrap();
    let mut first = start(&r, "interval3", Device::Cpu);
    for s in 0..25 {
        step(&r, &mut first, "interval3", s, None);
    }
    let (scaler_file, lion_file) = (
        temp_path("scaler.safetensors"),
        temp_path("lion.safetensors"),
    );
    first.scaler.save(&scaler_file).unwrap();
    first.optimizer.save(&lion_file).unwrap();
    let mut resumed = start(&r, "interval3", Device::Cpu);
    for (p, q) in resumed.params.iter().zip(&first.params) {
        tch::no_grad(|| p.shallow_clone().copy_(q));
    }
    resumed.scaler.load(&scaler_file).unwrap();
    resumed.optimizer.load(&lion_file).unwrap();
    for s in 25..steps {
        step(&r, &mut resumed, "interval3", s, None);
    }

    // A state file of other settings is refused, naming the setting, and changes nothing.
    let other = r.sequence("interval3").0.with_growth_interval(2000);
    let mut mismatched = GradScaler::new(other, Device::Cpu).unwrap();
    let err = mismatched.load(&scaler_file).unwrap_err().to_string();
    assert!(err.contains("growth_interval"), "{err}");
    assert_eq!(mismatched.scale_tensor().double_value(&[]), 65536.0);
}

#[test]
fn bad_settings_and_fp16_gradients_are_refused() {
    let d = GradScalerConfig::default();
    for (bad, name) in [
        (d.with_init_scale(1e39), "init_scale"),
        (d.with_growth_factor(1.0), "growth_factor"),
        (d.with_backoff_factor(1.0), "backoff_factor"),
        (d.with_growth_interval(0), "growth_interval"),
    ] {
        let err = GradScaler::new(bad, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
    let half = Tensor::ones([3], (Kind::Half, Device::Cpu)).set_requires_grad(true);
    half.sum(Kind::Half).backward();
    let mut scaler = GradScaler::new(d, Device::Cpu).unwrap();
    let err = scaler.unscale(&[half]).unwrap_err().to_string();
    assert!(err.contains("fp16"), "{err}");
}
