//! Time of one optimizer step and bytes of optimizer state per parameter, for 8-bit and fp32
//! AdamW, on the CPU and (when present) CUDA:
//! - `seed-lora`: the seed's LoRA, 1,120 tensors of rank-4 SDXL attention adapters (5.81 M params);
//! - `100M`: 100 tensors of 1000 × 1000 (100 M params).
//!
//! `cargo bench -p optim8bit --bench step` (filter with e.g. `-- seed-lora`). On CUDA the queue is
//! drained after every step, so the figure is the device time of a step plus its launch cost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code: failing loudly is the point

#[path = "../tests/support/mod.rs"]
mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use optim8bit::{AdamW, AdamWConfig, ParamGroup};
use tch::{Cuda, Device, Kind, Tensor};

fn bench_steps(c: &mut Criterion) {
    // Criterion's name filter (the first free argument), applied before building 100 M parameters.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    // Thousands of small tensors: on a small shared machine libtorch's intra-op threads cost more in
    // synchronisation than they gain (measured: 8-bit seed-lora step 8.7 s with 2 threads under load).
    if let Some(threads) = std::env::var("OPTIM8BIT_BENCH_THREADS").ok().and_then(|v| v.parse().ok()) {
        tch::set_num_threads(threads);
    }
    let mut devices = vec![Device::Cpu];
    if Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    let sizes: [(&str, Vec<Vec<i64>>); 2] =
        [("seed-lora", support::seed_lora_shapes()), ("100M", vec![vec![1000, 1000]; 100])];
    for device in devices {
        for (size_name, shapes) in &sizes {
            for (config_name, config) in [("8bit", AdamWConfig::eight_bit()), ("fp32", AdamWConfig::fp32())] {
                let name = format!("adamw-{config_name} {size_name} ({device:?})");
                if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                    continue;
                }
                let params: Vec<Tensor> = shapes
                    .iter()
                    .map(|s| Tensor::randn(s.as_slice(), (Kind::Float, device)).set_requires_grad(true))
                    .collect();
                for p in &params {
                    // A gradient for every parameter: backward of a product gives grad = g exactly.
                    (p * Tensor::randn(p.size(), (Kind::Float, device)) * 1e-3).sum(Kind::Float).backward();
                }
                let mut optimizer = AdamW::new(vec![ParamGroup::new(params, 1e-4, 1e-2)], config).unwrap();
                let bytes = optimizer.state_bytes();
                let count = optimizer.param_count();
                println!(
                    "{name}: {count} params in {} tensors, state {bytes} bytes = {:.3} bytes/param",
                    shapes.len(),
                    bytes as f64 / count as f64
                );
                c.bench_function(&name, |b| {
                    b.iter(|| {
                        optimizer.step().unwrap();
                        if let Device::Cuda(i) = device {
                            Cuda::synchronize(i as i64);
                        }
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
