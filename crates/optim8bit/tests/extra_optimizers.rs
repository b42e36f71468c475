//! Lion, Prodigy and Adafactor against their reference implementations over 20 steps (their state
//! files, `step_if` and skipped parameters: `tests/extra_optimizers_state.rs`).
//!
//! The fixture `extra-optimizers.safetensors` comes from `gen_extra_optimizers` in
//! `tools/fixtures/generate.py`: lion-pytorch's `Lion`, prodigyopt's `Prodigy` (three settings) and
//! transformers' `Adafactor` (two settings), each 20 float32 steps on the CPU over the same four
//! LoRA-like parameters (`[4, 32]`, `[24, 4]`, `[4, 6, 3, 3]`, `[24]`) and seeded gradients; it
//! holds the parameters after every step and Prodigy's `d`. The settings are read from the
//! fixture's metadata, so the two sides cannot drift apart.
//!
//! With a CUDA device (the GPU harness sets `SDXL_REQUIRE_CUDA=1`, making one mandatory) each
//! comparison runs again on CUDA with steps 3–20 replayed from one captured CUDA graph.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use support::extra::{Any, build, initial_params, reference, set_grads};
use tch::{Device, Tensor};
use test_support::cuda;
use test_support::{check, f32_bound, max_rel_error};

/// Runs `run` over the fixture's steps and checks every step's parameters (and Prodigy's `d`)
/// against the reference within `depth(step)` of the error model in `test_support`.
fn check_run(run: &str, depth: impl Fn(f64) -> f64) {
    check_run_on(run, Device::Cpu, &depth);
    if cuda() {
        check_run_on(run, Device::Cuda(0), &depth);
    }
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

/// No first moment (β₁ = 0), weight decay added to the gradient, bias correction, growth 1.2.
#[test]
fn prodigy_coupled_matches_prodigyopt() {
    check_run("prodigy_coupled", |steps| {
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
