//! When does sliced attention pay? Time of the three attention backends and several slice sizes on
//! SDXL's attention shapes, with the memory each needs for its score matrices.
//!
//! Shapes are those of the UNet's self-attention at its two attention levels (channels 640 / 1280,
//! 10 / 20 heads of 64) and of its cross-attention to the 77 text tokens. On CUDA they are taken at
//! 1024 px with classifier-free guidance (batch 2, bf16), the inference setting; on the CPU at 512 px,
//! batch 1, fp32, so that the bench finishes on a small machine.
//!
//! The memory in each benchmark's name is computed: the plain backend materialises one
//! `[batch·heads, Lq, Lk]` score matrix (plus its softmax), a sliced one only `[rows, Lq, Lk]`, and the
//! fused kernels none (flash / memory-efficient attention keeps scores in on-chip tiles on CUDA). On
//! CUDA the bench also measures it: the caching allocator's peak above the inputs during one call
//! (`torch-cuda`), printed before each group.
//! Run: `scripts/with-torch.sh cargo bench --bench attention_slicing`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sdxl_model::attention::{AttentionBackend, SliceSize, attention};
use tch::{Cuda, Device, Kind, Tensor};

struct Shape {
    name: &'static str,
    batch: i64,
    query_len: i64,
    key_len: i64,
    heads: i64,
}

fn shapes(device: Device) -> Vec<Shape> {
    // Latent side: 128 at 1024 px, 64 at 512 px; attention runs at 1/2 and 1/4 of it.
    let (batch, side) = if device.is_cuda() { (2, 128) } else { (1, 64) };
    let level1 = (side / 2) * (side / 2);
    let level2 = (side / 4) * (side / 4);
    vec![
        Shape {
            name: "self-attn level 1 (640 ch, 10 heads)",
            batch,
            query_len: level1,
            key_len: level1,
            heads: 10,
        },
        Shape {
            name: "self-attn level 2 (1280 ch, 20 heads)",
            batch,
            query_len: level2,
            key_len: level2,
            heads: 20,
        },
        Shape {
            name: "cross-attn level 1 (77 tokens)",
            batch,
            query_len: level1,
            key_len: 77,
            heads: 10,
        },
    ]
}

/// Bytes of the score matrices alive at once (scores and their softmax, fp32 softmax).
fn score_bytes(shape: &Shape, backend: AttentionBackend, element: i64) -> i64 {
    let rows = match backend {
        AttentionBackend::Fused | AttentionBackend::Flash | AttentionBackend::Cudnn => 0,
        AttentionBackend::Plain => shape.batch * shape.heads,
        AttentionBackend::Sliced(size) => size.rows(shape.heads).min(shape.batch * shape.heads),
    };
    rows * shape.query_len * shape.key_len * (element + 4)
}

fn attention_slicing(c: &mut Criterion) {
    let _guard = tch::no_grad_guard();
    let mut devices = vec![Device::Cpu];
    if Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    let backends = [
        AttentionBackend::Fused,
        AttentionBackend::Flash,
        AttentionBackend::Cudnn,
        AttentionBackend::Plain,
        AttentionBackend::Sliced(SliceSize::Auto),
        AttentionBackend::Sliced(SliceSize::Rows(4)),
        AttentionBackend::Sliced(SliceSize::Max),
    ];
    for device in devices {
        let (kind, element) = if device.is_cuda() {
            (Kind::BFloat16, 2)
        } else {
            (Kind::Float, 4)
        };
        for shape in shapes(device) {
            let width = shape.heads * 64;
            let q = Tensor::randn([shape.batch, shape.query_len, width], (kind, device));
            let k = Tensor::randn([shape.batch, shape.key_len, width], (kind, device));
            let v = Tensor::randn([shape.batch, shape.key_len, width], (kind, device));
            let mut group = c.benchmark_group(format!(
                "{} {device:?} {kind:?} batch {} L {}",
                shape.name, shape.batch, shape.query_len
            ));
            group.sample_size(10);
            for backend in backends {
                // The backend order exists on CUDA only (on the CPU both are `Fused`).
                if matches!(backend, AttentionBackend::Flash | AttentionBackend::Cudnn)
                    && !device.is_cuda()
                {
                    continue;
                }
                if let (Device::Cuda(i), Some(base)) = (device, torch_cuda::memory_stats(0)) {
                    torch_cuda::reset_peak_memory_stats(0);
                    let out = attention(&q, &k, &v, shape.heads, backend);
                    Cuda::synchronize(i as i64);
                    drop(out);
                    if let Some(stats) = torch_cuda::memory_stats(0) {
                        let extra = stats.peak_allocated.saturating_sub(base.allocated) as f64
                            / (1024.0 * 1024.0);
                        println!(
                            "{} {backend:?}: measured peak {extra:.0} MiB above the inputs",
                            shape.name
                        );
                    }
                }
                let mib = score_bytes(&shape, backend, element) as f64 / (1024.0 * 1024.0);
                let id = BenchmarkId::new(format!("{backend:?}"), format!("scores {mib:.0} MiB"));
                group.bench_function(id, |b| {
                    b.iter(|| {
                        let out = attention(&q, &k, &v, shape.heads, backend);
                        if let Device::Cuda(i) = device {
                            Cuda::synchronize(i as i64);
                        }
                        out
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, attention_slicing);
criterion_main!(benches);
