//! Lion, Prodigy and Adafactor against their reference implementations over 20 steps, and their
//! state files.
//!
//! The fixture `extra-optimizers.safetensors` comes from `gen_extra_optimizers` in
//! `tools/fixtures/generate.py`: lion-pytorch's `Lion`, prodigyopt's `Prodigy` (two settings) and
//! transformers' `Adafactor` (two settings), each 20 float32 steps on the CPU over the same four
//! LoRA-like parameters (`[4, 32]`, `[24, 4]`, `[4, 6, 3, 3]`, `[24]`) and seeded gradients; it
//! holds the parameters after every step and Prodigy's `d`. The settings are read from the
//! fixture's metadata, so the two sides cannot drift apart.
//!
//! With a CUDA device (the GPU harness sets `SDXL_REQUIRE_CUDA=1`, making one mandatory) each
//! comparison runs again on CUDA with steps 3–20 replayed from one captured CUDA graph.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use std::collections::HashMap;

use optim8bit::{Adafactor, AdafactorConfig, Lion, LionConfig, ParamGroup, Prodigy, ProdigyConfig};
use serde_json::Value;
use support::{fixture, set_grad, temp_path};
use tch::{Device, Tensor};
use test_support::{check, f32_bound, max_rel_error};

const FILE: &str = "extra-optimizers.safetensors";

struct Reference {
    tensors: HashMap<String, Tensor>,
    params: Vec<String>,
    runs: HashMap<String, Value>,
    steps: i64,
}

fn reference() -> Reference {
    let path = fixture(
        FILE,
        "regenerate it with `tools/fixtures/regenerate.sh --only extra_optimizers`",
    );
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info: Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["reference"]).unwrap();
    let params = info["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap().to_string())
        .collect();
    let runs = info["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].clone()))
        .collect();
    Reference {
        tensors: Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect(),
        params,
        runs,
        steps: info["steps"].as_i64().unwrap(),
    }
}

/// One of the optimizers under test.
enum Any {
    Lion(Lion),
    Prodigy(Prodigy),
    Adafactor(Adafactor),
}

impl Any {
    fn step(&mut self) {
        match self {
            Any::Lion(o) => o.step(),
            Any::Prodigy(o) => o.step(),
            Any::Adafactor(o) => o.step(),
        }
        .unwrap()
    }

    fn save(&self, path: &std::path::Path) {
        match self {
            Any::Lion(o) => o.save(path),
            Any::Prodigy(o) => o.save(path),
            Any::Adafactor(o) => o.save(path),
        }
        .unwrap()
    }

    fn load(&mut self, path: &std::path::Path) {
        match self {
            Any::Lion(o) => o.load(path),
            Any::Prodigy(o) => o.load(path),
            Any::Adafactor(o) => o.load(path),
        }
        .unwrap()
    }
}

fn f(v: &Value) -> f64 {
    match v.as_str() {
        Some("inf") => f64::INFINITY,
        _ => v.as_f64().unwrap(),
    }
}

/// The optimizer of fixture run `run` over `params`, with the run's settings.
fn build(r: &Reference, run: &str, params: &[Tensor]) -> Any {
    let s = &r.runs[run];
    let params = params.iter().map(Tensor::shallow_clone).collect();
    let wd = f(&s["weight_decay"]);
    if run.starts_with("lion") {
        let config = LionConfig {
            beta1: f(&s["betas"][0]),
            beta2: f(&s["betas"][1]),
        };
        let group = ParamGroup::new(params, f(&s["lr"]), wd);
        Any::Lion(Lion::new(vec![group], config).unwrap())
    } else if run.starts_with("prodigy") {
        let config = ProdigyConfig {
            beta1: f(&s["betas"][0]),
            beta2: f(&s["betas"][1]),
            beta3: s["beta3"].as_f64(),
            eps: f(&s["eps"]),
            decouple: s["decouple"].as_bool().unwrap(),
            use_bias_correction: s["use_bias_correction"].as_bool().unwrap(),
            safeguard_warmup: s["safeguard_warmup"].as_bool().unwrap(),
            d0: f(&s["d0"]),
            d_coef: f(&s["d_coef"]),
            growth_rate: f(&s["growth_rate"]),
        };
        let group = ParamGroup::new(params, f(&s["lr"]), wd);
        Any::Prodigy(Prodigy::new(vec![group], config).unwrap())
    } else {
        let config = AdafactorConfig {
            eps: (f(&s["eps"][0]), f(&s["eps"][1])),
            clip_threshold: f(&s["clip_threshold"]),
            decay_rate: f(&s["decay_rate"]),
            beta1: s["beta1"].as_f64(),
            scale_parameter: s["scale_parameter"].as_bool().unwrap(),
            relative_step: s["relative_step"].as_bool().unwrap(),
            warmup_init: s["warmup_init"].as_bool().unwrap(),
        };
        let lr = s["lr"].as_f64().unwrap_or(0.0);
        let group = ParamGroup::new(params, lr, wd);
        Any::Adafactor(Adafactor::new(vec![group], config).unwrap())
    }
}

fn initial_params(r: &Reference) -> Vec<Tensor> {
    r.params
        .iter()
        .map(|n| {
            r.tensors[&format!("{n}.initial")]
                .copy()
                .set_requires_grad(true)
        })
        .collect()
}

fn set_grads(r: &Reference, params: &[Tensor], step: i64) {
    for (p, n) in params.iter().zip(&r.params) {
        set_grad(p, &r.tensors[&format!("{n}.grads")].get(step));
    }
}

/// Runs `run` over the fixture's steps and checks every step's parameters (and Prodigy's `d`)
/// against the reference within `depth(step)` of the error model in `test_support`.
fn check_run(run: &str, depth: impl Fn(f64) -> f64) {
    check_run_on(run, Device::Cpu, &depth);
    if cuda() {
        check_run_on(run, Device::Cuda(0), &depth);
    }
}

/// Whether a CUDA device is there; without one the CUDA half of a test is skipped, unless
/// `SDXL_REQUIRE_CUDA=1` (the GPU machine's harness) makes that a failure.
fn cuda() -> bool {
    let required = std::env::var("SDXL_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let present = tch::Cuda::is_available();
    assert!(
        present || !required,
        "SDXL_REQUIRE_CUDA=1 but tch sees no CUDA device"
    );
    present
}

/// [`check_run`] on `device`. On CUDA, steps 3 to 20 replay one CUDA graph captured after two
/// eager steps (new gradients are copied into the captured gradients' storage), so the step is
/// checked to be capturable and to compute the reference's values when replayed.
fn check_run_on(run: &str, device: Device, depth: &dyn Fn(f64) -> f64) {
    let r = reference();
    let params: Vec<Tensor> = initial_params(&r)
        .iter()
        .map(|p| p.detach().to_device(device).set_requires_grad(true))
        .collect();
    let mut opt = build(&r, run, &params);
    let mut worst = (0.0f64, 0.0f64);
    let mut graph = None;
    for step in 0..r.steps {
        if graph.is_none() || step < 2 {
            set_grads(&r, &params, step);
        } else {
            for (p, n) in params.iter().zip(&r.params) {
                let grad = r.tensors[&format!("{n}.grads")].get(step);
                p.grad().copy_(&grad);
            }
        }
        match &graph {
            Some(g) => torch_cuda::CudaGraph::replay(g).unwrap(),
            None if device.is_cuda() && step == 2 => {
                tch::Cuda::synchronize(0);
                let (g, ()) = torch_cuda::CudaGraph::capture(
                    0,
                    None,
                    torch_cuda::CaptureMode::Global,
                    || opt.step(),
                )
                .unwrap();
                g.replay().unwrap();
                graph = Some(g);
            }
            None => opt.step(),
        }
        let bound = f32_bound(depth((step + 1) as f64));
        for (p, n) in params.iter().zip(&r.params) {
            let error = max_rel_error(p, &r.tensors[&format!("{run}.{n}")].get(step));
            assert!(
                error <= bound,
                "{run} step {} {n}: error {error:e} > bound {bound:e}",
                step + 1
            );
            worst.0 = worst.0.max(error / bound);
        }
        if let Any::Prodigy(o) = &opt {
            let error = max_rel_error(o.d(), &r.tensors[&format!("{run}.d")].get(step));
            assert!(
                error <= bound,
                "{run} step {} d: error {error:e} > bound {bound:e}",
                step + 1
            );
            worst.1 = worst.1.max(error / bound);
        }
    }
    // The last step's error against its bound, for the record.
    let last = params
        .iter()
        .zip(&r.params)
        .map(|(p, n)| max_rel_error(p, &r.tensors[&format!("{run}.{n}")].get(r.steps - 1)))
        .fold(0.0, f64::max);
    let upstream = match run.split('_').next().unwrap() {
        "lion" => "lion-pytorch",
        "prodigy" => "prodigyopt",
        _ => "transformers",
    };
    let name = format!(
        "optimizer {run} parameters after {} steps vs {upstream}",
        r.steps
    );
    check(&name, last, f32_bound(depth(r.steps as f64)));
    println!(
        "{run}: largest error/bound over all steps: params {:.2e}, d {:.2e}",
        worst.0, worst.1
    );
}

/// Elements of the fixture's parameters (the longest reduction of a step runs over all of them:
/// Prodigy's dot products and `Σ|s|` are summed over every parameter).
const ELEMENTS: f64 = (4 * 32 + 24 * 4 + 4 * 6 * 3 * 3 + 24) as f64;
/// The largest single parameter (Adafactor's norms and means run over one parameter).
const LARGEST: f64 = (4 * 6 * 3 * 3) as f64;

// The depths. Each optimizer step rounds the parameter a few times (decay, update) and the update
// carries the error of its own computation, which is at most as large relative to the parameter
// as relative to itself (every update here is smaller than the parameter it changes). Errors of
// earlier steps carry over with factor ≤ 1 (a decay factor or a momentum β < 1), so depths add up
// over steps.

/// Lion: per step the decay multiply and the subtraction of ±lr (exact product): 2 roundings. The
/// sign is exact unless its argument lies within rounding of 0, where it could flip; the fixture
/// has no such element (a flip would show as an error of 2·lr, far above the bound).
#[test]
fn lion_matches_lion_pytorch() {
    check_run("lion", |steps| 2.0 * steps);
}

/// Prodigy: `d̂` is a ratio of two sums over all elements (dot products `⟨g, p₀ − p⟩` and `Σ|s|`,
/// each a sum of `ELEMENTS` terms) plus about 30 scalar and elementwise operations; an error in
/// `d` returns in the next step's numerator (∝ d²) and denominator (∝ d²), so its amplification
/// per step is at most 2, whose square multiplies the depth (NUMERICS.md): `4·(2·ELEMENTS + 30)`
/// per step.
#[test]
fn prodigy_matches_prodigyopt() {
    check_run("prodigy", |steps| steps * 4.0 * (2.0 * ELEMENTS + 30.0));
}

/// The same with beta3 given, no bias correction, no safeguard, unbounded growth (`d` grows
/// 7000-fold over the 20 steps).
#[test]
fn prodigy_plain_matches_prodigyopt() {
    check_run("prodigy_plain", |steps| {
        steps * 4.0 * (2.0 * ELEMENTS + 30.0)
    });
}

/// Adafactor: per step the update passes through the row and column means and the RMS norms
/// (sums of up to `LARGEST` terms; two norms, two means) and about 15 elementwise operations,
/// then 2 roundings into the parameter.
#[test]
fn adafactor_relative_step_matches_transformers() {
    check_run("adafactor_relative", |steps| steps * (4.0 * LARGEST + 17.0));
}

/// Fixed lr, first moment, weight decay, clip threshold 0.5, no parameter scaling.
#[test]
fn adafactor_fixed_lr_matches_transformers() {
    check_run("adafactor_fixed", |steps| steps * (4.0 * LARGEST + 17.0));
}

/// Every state tensor of a saved file, by key.
fn saved(opt: &Any, name: &str) -> HashMap<String, Tensor> {
    let path = temp_path(name);
    opt.save(&path);
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect()
}

/// Saving after 10 steps, loading into a fresh optimizer over copies of the parameters and taking
/// the other 10 steps gives bit-identical parameters and states to 20 uninterrupted steps.
#[test]
fn resume_equals_an_uninterrupted_run() {
    let r = reference();
    for run in [
        "lion",
        "prodigy",
        "prodigy_plain",
        "adafactor_relative",
        "adafactor_fixed",
    ] {
        let straight = initial_params(&r);
        let mut opt = build(&r, run, &straight);
        let first = initial_params(&r);
        let mut interrupted = build(&r, run, &first);
        for step in 0..10 {
            set_grads(&r, &straight, step);
            opt.step();
            set_grads(&r, &first, step);
            interrupted.step();
        }
        let path = temp_path(&format!("{run}-resume.safetensors"));
        interrupted.save(&path);
        // A fresh process: new parameters holding the values at step 10, a new optimizer.
        let resumed: Vec<Tensor> = first
            .iter()
            .map(|p| p.detach().copy().set_requires_grad(true))
            .collect();
        let mut opt2 = build(&r, run, &resumed);
        opt2.load(&path);
        for step in 10..r.steps {
            set_grads(&r, &straight, step);
            opt.step();
            set_grads(&r, &resumed, step);
            opt2.step();
        }
        for (a, b) in straight.iter().zip(&resumed) {
            assert!(a.equal(b), "{run}: resumed parameters differ");
        }
        let (a, b) = (
            saved(&opt, &format!("{run}-a")),
            saved(&opt2, &format!("{run}-b")),
        );
        assert_eq!(a.len(), b.len());
        for (key, t) in &a {
            assert!(t.equal(&b[key]), "{run}: state {key} differs after resume");
        }
    }
}

/// `step_if(false)` leaves parameters and every state bit-identical; `step_if(true)` is `step`.
#[test]
fn step_if_false_changes_nothing() {
    let r = reference();
    for run in ["lion", "prodigy", "adafactor_fixed"] {
        let params = initial_params(&r);
        let mut opt = build(&r, run, &params);
        let twin = initial_params(&r);
        let mut stepped = build(&r, run, &twin);
        for step in 0..3 {
            set_grads(&r, &params, step);
            opt.step();
            set_grads(&r, &twin, step);
            stepped.step();
        }
        let before = saved(&opt, &format!("{run}-before"));
        let kept: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
        set_grads(&r, &params, 3);
        let no = Tensor::from(false);
        match &mut opt {
            Any::Lion(o) => o.step_if(&no),
            Any::Prodigy(o) => o.step_if(&no),
            Any::Adafactor(o) => o.step_if(&no),
        }
        .unwrap();
        let after = saved(&opt, &format!("{run}-after"));
        for (key, t) in &before {
            assert!(
                t.equal(&after[key]),
                "{run}: {key} changed by a skipped step"
            );
        }
        for (p, k) in params.iter().zip(&kept) {
            assert!(p.equal(k), "{run}: a skipped step moved a parameter");
        }
        let yes = Tensor::from(1.0f32);
        match &mut opt {
            Any::Lion(o) => o.step_if(&yes),
            Any::Prodigy(o) => o.step_if(&yes),
            Any::Adafactor(o) => o.step_if(&yes),
        }
        .unwrap();
        set_grads(&r, &twin, 3);
        stepped.step();
        for (p, q) in params.iter().zip(&twin) {
            assert!(p.equal(q), "{run}: step_if(true) differs from step");
        }
    }
}

/// A state file of another optimizer or other settings is refused, naming the key, and changes
/// nothing.
#[test]
fn load_refuses_a_foreign_state() {
    let r = reference();
    let params = initial_params(&r);
    let lion = build(&r, "lion", &params);
    let path = temp_path("lion-state.safetensors");
    lion.save(&path);
    let Any::Prodigy(mut prodigy) = build(&r, "prodigy", &params) else {
        unreachable!()
    };
    let message = prodigy.load(&path).unwrap_err().to_string();
    assert!(
        message.contains("lion-state.safetensors") && message.contains("missing"),
        "{message}"
    );
    let Any::Adafactor(mut a) = build(&r, "adafactor_fixed", &params) else {
        unreachable!()
    };
    let path = temp_path("adafactor-relative.safetensors");
    build(&r, "adafactor_relative", &params).save(&path);
    let message = a.load(&path).unwrap_err().to_string();
    assert!(
        message.contains("adafactor-relative.safetensors"),
        "{message}"
    );
    assert_eq!(a.step_count().double_value(&[]), 0.0);
    let message = Adafactor::new(
        vec![ParamGroup::new(vec![params[0].shallow_clone()], 1e-3, 0.0)],
        AdafactorConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("param_groups[0].lr"), "{message}");
    let message = Prodigy::new(
        vec![
            ParamGroup::new(vec![params[0].shallow_clone()], 1.0, 0.0),
            ParamGroup::new(vec![params[1].shallow_clone()], 0.5, 0.0),
        ],
        ProdigyConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("param_groups[1].lr"), "{message}");
}

/// A parameter without a gradient is skipped (as in the references): it keeps its value while
/// the others, in another group, move.
#[test]
fn parameters_without_gradients_are_left_alone() {
    let r = reference();
    for run in ["lion", "prodigy", "adafactor_relative", "adafactor_fixed"] {
        let params = initial_params(&r);
        let any = build(&r, run, &params);
        let (lr, wd) = match &any {
            Any::Lion(o) => (o.learning_rate(0).unwrap(), o.weight_decay(0).unwrap()),
            Any::Prodigy(o) => (o.learning_rate(0).unwrap(), o.weight_decay(0).unwrap()),
            Any::Adafactor(o) => (o.learning_rate(0).unwrap(), o.weight_decay(0).unwrap()),
        };
        let groups = vec![
            ParamGroup::new(vec![params[0].shallow_clone()], lr, wd),
            ParamGroup::new(vec![params[1].shallow_clone()], lr, wd),
        ];
        let mut opt = match any {
            Any::Lion(o) => Any::Lion(Lion::new(groups, *o.config()).unwrap()),
            Any::Prodigy(o) => Any::Prodigy(Prodigy::new(groups, *o.config()).unwrap()),
            Any::Adafactor(o) => Any::Adafactor(Adafactor::new(groups, *o.config()).unwrap()),
        };
        let untouched = params[1].detach().copy();
        let before = params[0].detach().copy();
        for step in 0..3 {
            set_grad(
                &params[0],
                &r.tensors[&format!("{}.grads", r.params[0])].get(step),
            );
            opt.step();
        }
        assert!(!params[1].grad().defined(), "{run}");
        assert!(
            params[1].equal(&untouched),
            "{run}: moved without a gradient"
        );
        assert!(
            !params[0].equal(&before),
            "{run}: the other parameter did not move"
        );
    }
}
