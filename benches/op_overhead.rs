//! Host cost of one libtorch operation issued from Rust through tch.
//!
//! Small-batch SDXL training is bound by this per-op launch overhead, not by arithmetic (see
//! `docs/BENCHMARKS.md`), so it is the first number to know on any machine. Each iteration issues one
//! in-place add on a tiny tensor; on CUDA the queue is drained once per sample, so the figure is the
//! host-side cost of issuing ops, not GPU time.

use criterion::{Criterion, criterion_group, criterion_main};
use tch::{Cuda, Device, Kind, Tensor};

fn op_overhead(c: &mut Criterion) {
    let _guard = tch::no_grad_guard();
    let mut devices = vec![Device::Cpu];
    if Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        let mut x = Tensor::zeros([16], (Kind::Float, device));
        let one = Tensor::ones([16], (Kind::Float, device));
        c.bench_function(&format!("add_ ({device:?}, 16 floats)"), |b| {
            b.iter(|| {
                let _ = x.g_add_(&one);
            });
            if let Device::Cuda(i) = device {
                Cuda::synchronize(i as i64);
            }
        });
    }
}

criterion_group!(benches, op_overhead);
criterion_main!(benches);
