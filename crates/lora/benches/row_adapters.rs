//! Row adapters (`lora::attach_rows`, what a batched sweep runs): one forward and backward pass of
//! a linear layer 320 → 320 over 256 tokens with K rank-4 adapter sets, each on its own 2 rows of a
//! batch of 2K, for K = 1, 2, 4, 8, beside the same layer with one ordinary adapter over the same
//! 2K rows (`plain`). A batched sweep's step is K variants' micro-steps in one pass, so the cost of
//! the row adapters beyond the base product should grow with the rows, as the base's does: the
//! time per row at K = 8 near K = 1's.
//!
//! `cargo bench -p lora --bench row_adapters` (on the CPU; and on CUDA when present).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code: failing loudly is the point

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lora::{Adapter, Conv2d, HasLinears, Linear, attach_rows, detach};
use tch::{Cuda, Device, Kind, Tensor};

const FEATURES: i64 = 320;
const TOKENS: i64 = 256;
const RANK: i64 = 4;
const ROWS_PER_SET: i64 = 2;

struct Net {
    lin: Linear,
}

impl HasLinears for Net {
    fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        f("lin", &mut self.lin);
    }
    fn for_each_conv(&mut self, _f: &mut dyn FnMut(&str, &mut Conv2d)) {}
}

fn adapter(device: Device) -> Adapter {
    let opts = (Kind::Float, device);
    Adapter::new(
        "default",
        (Tensor::randn([RANK, FEATURES], opts) * 0.05).set_requires_grad(true),
        (Tensor::randn([FEATURES, RANK], opts) * 0.05).set_requires_grad(true),
        RANK as f64,
    )
}

/// The layer with `sets` row adapter sets on consecutive rows, or one ordinary adapter (`sets` 0).
fn net(device: Device, sets: i64) -> Net {
    let opts = (Kind::Float, device);
    let mut net = Net {
        lin: Linear::from_tensors(
            Tensor::randn([FEATURES, FEATURES], opts) * 0.05,
            Some(Tensor::zeros([FEATURES], opts)),
        ),
    };
    if sets == 0 {
        net.lin.add_adapter("lin", adapter(device)).unwrap();
    }
    for set in 0..sets {
        net.lin.add_adapter("lin", adapter(device)).unwrap();
        let mut detached = detach(&mut net, "default").unwrap();
        let rows = set * ROWS_PER_SET..(set + 1) * ROWS_PER_SET;
        attach_rows(&mut net, rows, &mut detached).unwrap();
    }
    net
}

fn bench(c: &mut Criterion) {
    tch::manual_seed(0);
    let mut devices = vec![Device::Cpu];
    if Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        let sync = || {
            if let Device::Cuda(i) = device {
                Cuda::synchronize(i as i64);
            }
        };
        let mut group = c.benchmark_group(format!("row_adapters/{device:?}"));
        for k in [1_i64, 2, 4, 8] {
            let rows = k * ROWS_PER_SET;
            let xs = Tensor::randn([rows, TOKENS, FEATURES], (Kind::Float, device))
                .set_requires_grad(true);
            group.throughput(Throughput::Elements(rows as u64));
            for (name, sets) in [("rows", k), ("plain", 0)] {
                let net = net(device, sets);
                group.bench_function(BenchmarkId::new(name, k), |b| {
                    b.iter(|| {
                        let out = tch::nn::Module::forward(&net.lin, &xs);
                        out.sum(Kind::Float).backward();
                        sync();
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
