//! `Lion` with an 8-bit momentum ([`LionConfig::eight_bit`]) against bitsandbytes' `Lion8bit` over
//! 20 steps (its `step_if`, state files and state sizes: `tests/lion8bit_state.rs`).
//!
//! The fixtures come from `tools/fixtures/generate.py`, with the parameters, groups and gradients of
//! the AdamW8bit ones (`tests/bnb_reference.rs`): a 4400-element parameter (8-bit momentum, ragged
//! last block of 48) with weight decay, a 4096-element one (exactly `min_8bit_size`: 8-bit) in a
//! group without, and a 2560-element one (below `min_8bit_size`: fp32 momentum) with weight decay.
//! - `bnb-lion8bit-cpu.safetensors` (`gen_bnb_lion8bit`): bitsandbytes' CPU path with its
//!   quantizer routed to bitsandbytes' nearest-code kernel (the CUDA kernel's rounding). That path
//!   computes `1 − β` in float64 and rounds it to float32, where the kernels (and we) compute
//!   `1.0f − β` in float32, and it does not keep signs next to zero.
//! - `bnb-lion8bit-cuda.safetensors` (`gen_bnb_lion8bit_cuda`): the CUDA kernels themselves,
//!   generated on the GPU machine (`tools/gpu/lion8bit.sh`, an H100 on 2026-12-06) and committed.
//!
//! Each compares, after steps 1, 2, 10 and 20, the parameters (error model below), the codes
//! (within one code; one-code differences come from values on a midpoint between two codes and
//! are counted), the block scales and the fp32 momentum. With a CUDA device (the GPU harness sets
//! `SDXL_REQUIRE_CUDA=1`, making one mandatory) the comparison runs again on CUDA with steps 3–20
//! replayed from one captured CUDA graph.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use std::collections::HashMap;

use optim8bit::quantize::QuantMap;
use optim8bit::{Lion, LionConfig};
use support::bnb::{CodeTally, Reference, read_reference};
use support::{max_rel_error, temp_path};
use tch::{Device, Kind, Tensor};
use test_support::cuda;
use test_support::f32_bound;

const HOW: &str = "regenerate it with `tools/fixtures/regenerate.sh --only bnb_lion8bit` (the CPU \
                   path) or, on the GPU machine, `--only bnb_lion8bit_cuda` (the CUDA kernels, \
                   docs/GPU.md)";

/// The fixture's `Lion8bit` settings (bitsandbytes' defaults, recorded in its metadata).
fn config(reference: &Reference) -> LionConfig {
    let betas = &reference.info["betas"];
    LionConfig::eight_bit()
        .with_beta1(betas[0].as_f64().unwrap())
        .with_beta2(betas[1].as_f64().unwrap())
}

/// The error model of the parameters after `step` steps (docs/NUMERICS.md). Each step rounds the
/// parameter twice: the decay `p·(1 − lr·wd)` and the subtraction of `lr·sign(…)`, a product that
/// is exact (`±lr` or 0). The factor `1 − lr·wd` itself is rounded once by the kernel's float32
/// arithmetic and once, differently, by the CPU path's float64 → float32: one more rounding. Errors
/// of earlier steps carry over with the factor `1 − lr·wd ≤ 1`, so depths add: 3 per step. The
/// direction is exact unless the sign's argument `β₁m + (1 − β₁)g` lies within the momentum's error
/// of zero; such a flip moves the element by 2·lr, far above this bound, and is reported as such.
fn param_bound(step: i64) -> f64 {
    f32_bound(3.0 * step as f64)
}

/// Runs the fixture on `device` and compares the recorded steps. `systematic` is the relative
/// difference of the momentum that the reference's own arithmetic causes (see the callers).
fn compare(file: &str, device: Device, systematic: f64) {
    // A momentum after 20 steps carries 20 updates of three roundings each (m ← β₂·m + (1 − β₂)·g,
    // dequantization by an exact code times the absmax); a block's absmax is the largest of them.
    let moment_tolerance = systematic + f32_bound(20.0 * 3.0);
    let reference = read_reference(file, HOW);
    let t = &reference.tensors;
    println!(
        "reference: bitsandbytes {} on {}, our optimizer on {device:?}",
        reference.info["optimizer"], reference.device
    );
    assert!(
        QuantMap::signed(Device::Cpu)
            .unwrap()
            .code()
            .equal(&t["qmap1"]),
        "the signed dynamic map differs from bitsandbytes'"
    );
    let params = reference.initial_params(device);
    let mut optimizer = Lion::new(reference.param_groups(&params), config(&reference)).unwrap();
    let slots = reference.slots();
    let last = *reference.recorded_steps.iter().max().unwrap();
    let mut graph = None;
    let mut tally = CodeTally::default();
    for step in 1..=last {
        match &graph {
            // Replays write the new gradients into the captured gradients' storage.
            Some(g) => {
                for ((name, _), p) in reference.params.iter().zip(&params) {
                    p.grad().copy_(&reference.grad(name, step));
                }
                torch_cuda::CudaGraph::replay(g).unwrap();
            }
            None if device.is_cuda() && step == 3 => {
                reference.set_grads(&params, step);
                tch::Cuda::synchronize(0);
                let (g, stepped) = torch_cuda::CudaGraph::capture(
                    0,
                    None,
                    torch_cuda::CaptureMode::Global,
                    || optimizer.step(),
                )
                .unwrap();
                stepped.unwrap();
                g.replay().unwrap();
                graph = Some(g);
            }
            None => {
                reference.set_grads(&params, step);
                optimizer.step().unwrap();
            }
        }
        if !reference.recorded_steps.contains(&step) {
            continue;
        }
        let saved = temp_path(&format!("{file}-{device:?}-step{step}.safetensors"));
        optimizer.save(&saved).unwrap();
        let file: HashMap<String, Tensor> = Tensor::read_safetensors(&saved)
            .unwrap()
            .into_iter()
            .collect();
        std::fs::remove_file(&saved).unwrap();
        for (((name, g), param), (_, i)) in reference.params.iter().zip(&params).zip(&slots) {
            let theirs = |key: &str| &t[&format!("step{step}.{name}.{key}")];
            let ours = |key: &str| &file[&format!("state.{g}.{i}.{key}")];
            let lr = reference.groups[*g].0;
            let flips = (param.to_device(Device::Cpu) - theirs("param"))
                .abs()
                .gt(lr)
                .sum(Kind::Int64)
                .int64_value(&[]);
            assert_eq!(
                flips, 0,
                "{name} at step {step}: {flips} update signs differ"
            );
            let param_error = max_rel_error(param, theirs("param"));
            print!("step {step:2} {name:7} param rel. error {param_error:.2e}");
            assert!(
                param_error <= param_bound(step),
                "{name} at step {step}: parameters differ by {param_error:e} > {:e}",
                param_bound(step)
            );
            if t.contains_key(&format!("step{step}.{name}.absmax1")) {
                let absmax_error = max_rel_error(ours("absmax1"), theirs("absmax1"));
                let what = format!("{name} at step {step}");
                let count = tally.add(ours("state1"), theirs("state1"), &what);
                println!(", absmax rel. error {absmax_error:.2e}, codes differing {count}");
                assert!(
                    absmax_error <= moment_tolerance,
                    "{what}: absmax differs by {absmax_error:e}"
                );
            } else {
                // Below min_8bit_size: an fp32 momentum, on both sides.
                assert!(!file.contains_key(&format!("state.{g}.{i}.state1")));
                let error = max_rel_error(ours("exp_avg"), theirs("state1"));
                println!(", fp32 momentum rel. error {error:.2e}");
                assert!(
                    error <= moment_tolerance,
                    "{name} at step {step}: momentum differs by {error:e}"
                );
            }
        }
    }
    tally.finish();
}

#[test]
fn matches_bitsandbytes_cpu_path_over_20_steps() {
    // The CPU path's 1 − β₂ is float32(1 − 0.99) = 0.0099999998, the kernel's (and ours)
    // 1.0f − 0.99f = 0.0099999905: the gradient's share of the momentum is 9.31e-7 smaller
    // relative, and so at most is the momentum. The direction's 1 − β₁ differs by 2.2e-7 relative,
    // which only matters next to a sign change (checked by the flip count).
    compare("bnb-lion8bit-cpu.safetensors", Device::Cpu, 9.32e-7);
    if cuda() {
        compare("bnb-lion8bit-cpu.safetensors", Device::Cuda(0), 9.32e-7);
    }
}

#[test]
fn matches_bitsandbytes_cuda_kernel_over_20_steps() {
    compare("bnb-lion8bit-cuda.safetensors", Device::Cpu, 0.0);
    if cuda() {
        compare("bnb-lion8bit-cuda.safetensors", Device::Cuda(0), 0.0);
    }
}
