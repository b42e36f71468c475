//! Time of one optimizer step and bytes of optimizer state per parameter, for 8-bit and fp32
//! AdamW, on the CPU and (when present) CUDA:
//! - `seed-lora`: the seed's LoRA, 1,120 tensors of rank-4 SDXL attention adapters (5.81 M params);
//! - `100M`: 100 tensors of 1000 × 1000 (100 M params).
//!
//! `step_if` names time [`AdamW::step_if`] with a true condition on the device (the gated step the
//! trainer takes; compare with the plain step of the same size); `clip_grad_norm` names time
//! [`optim8bit::clip_grad_norm`] over the same gradients (with a limit that leaves them unscaled).
//!
//! `cargo bench -p optim8bit --bench step` (filter with e.g. `-- seed-lora`). On CUDA the queue is
//! drained after every step, so the figure is the device time of a step plus its launch cost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code: failing loudly is the point

#[path = "../tests/support/mod.rs"]
mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use optim8bit::{AdamW, AdamWConfig, ParamGroup, clip_grad_norm};
use tch::{Cuda, Device, Kind, Tensor};

fn bench_steps(c: &mut Criterion) {
    // Criterion's name filter (the first free argument), applied before building 100 M parameters.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    // Thousands of small tensors: on a small shared machine libtorch's intra-op threads cost more in
    // synchronisation than they gain (docs/BENCHMARKS.md, Results: the optim8bit seed-LoRA row).
    if let Some(threads) = std::env::var("OPTIM8BIT_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tch::set_num_threads(threads);
    }
    let mut devices = vec![Device::Cpu];
    if Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    let sizes: [(&str, Vec<Vec<i64>>); 2] = [
        ("seed-lora", support::seed_lora_shapes()),
        ("100M", vec![vec![1000, 1000]; 100]),
    ];
    for device in devices {
        let sync = || {
            if let Device::Cuda(i) = device {
                Cuda::synchronize(i as i64);
            }
        };
        for (size_name, shapes) in &sizes {
            let skipped = |name: &str| filter.as_ref().is_some_and(|f| !name.contains(f.as_str()));
            let params_with_grads = || -> Vec<Tensor> {
                let params: Vec<Tensor> = shapes
                    .iter()
                    .map(|s| {
                        Tensor::randn(s.as_slice(), (Kind::Float, device)).set_requires_grad(true)
                    })
                    .collect();
                for p in &params {
                    // A gradient for every parameter: backward of a product gives grad = g exactly.
                    (p * Tensor::randn(p.size(), (Kind::Float, device)) * 1e-3)
                        .sum(Kind::Float)
                        .backward();
                }
                params
            };
            let name = format!("clip_grad_norm {size_name} ({device:?})");
            if !skipped(&name) {
                let params = params_with_grads();
                // A limit far above the norm: the factor is 1 and the gradients stay as they are.
                c.bench_function(&name, |b| {
                    b.iter(|| {
                        let norm = clip_grad_norm(&params, 1e30).unwrap();
                        sync();
                        norm
                    })
                });
            }
            let variants = [
                ("8bit", AdamWConfig::eight_bit(), false),
                ("fp32", AdamWConfig::fp32(), false),
                ("8bit step_if", AdamWConfig::eight_bit(), true),
                ("fp32 step_if", AdamWConfig::fp32(), true),
            ];
            for (config_name, config, gated) in variants {
                let name = format!("adamw-{config_name} {size_name} ({device:?})");
                if skipped(&name) {
                    continue;
                }
                let params = params_with_grads();
                let mut optimizer =
                    AdamW::new(vec![ParamGroup::new(params, 1e-4, 1e-2)], config).unwrap();
                let bytes = optimizer.state_bytes();
                let count = optimizer.param_count();
                println!(
                    "{name}: {count} params in {} tensors, state {bytes} bytes = {:.3} bytes/param",
                    shapes.len(),
                    bytes as f64 / count as f64
                );
                let apply = Tensor::from(true).to_device(device);
                c.bench_function(&name, |b| {
                    b.iter(|| {
                        if gated {
                            optimizer.step_if(&apply).unwrap();
                        } else {
                            optimizer.step().unwrap();
                        }
                        sync();
                    })
                });
            }
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_steps
}
criterion_main!(benches);
