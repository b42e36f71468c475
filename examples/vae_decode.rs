//! Times the SDXL VAE decode of one image, tiled or not, on the full-size architecture with random
//! weights: the benchmark behind the "2048×2048 tiled bf16 decode" figure in docs/BENCHMARKS.md.
//!
//! ```sh
//! cargo run --release --example vae_decode -- [--size 2048] [--kind bf16|f16|f32] [--untiled] [--runs 5] [--cudnn-benchmark]
//!     [--attention fused|plain|sliced] [--profile trace.json]
//! ```
//!
//! Runs on CUDA when available (else the CPU, slowly), in `--kind` with no fp32 upcast. On CUDA it
//! also prints the caching allocator's peak during the timed decodes (the figure PyTorch reports as
//! `torch.cuda.max_memory_allocated()`), through `torch-cuda`. `--cudnn-benchmark` lets cuDNN time its
//! convolution algorithms on first use of each shape and keep the fastest (PyTorch's
//! `torch.backends.cudnn.benchmark = True`); the warm-up decode pays for that. `--attention` picks the
//! mid block's attention kernels. `--profile` records one more decode with libtorch's profiler and
//! writes its Chrome trace (read it with `tools/gpu/profile_summary.py`).

use std::time::Instant;

use anyhow::{Context, bail};
use sdxl_model::attention::AttentionBackend;
use sdxl_model::vae::{AutoencoderKL, AutoencoderKLConfig, VaeTiling};
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let (mut size, mut kind, mut tiled, mut runs, mut benchmark) =
        (2048i64, Kind::BFloat16, true, 5usize, false);
    let (mut attention, mut profile) = (AttentionBackend::Fused, None::<std::path::PathBuf>);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--size" => {
                size = args
                    .next()
                    .context("--size needs a value")?
                    .parse()
                    .context("--size")?
            }
            "--runs" => {
                runs = args
                    .next()
                    .context("--runs needs a value")?
                    .parse()
                    .context("--runs")?
            }
            "--untiled" => tiled = false,
            "--cudnn-benchmark" => benchmark = true,
            "--attention" => {
                attention = args
                    .next()
                    .context("--attention needs a value")?
                    .parse()
                    .context("--attention")?
            }
            "--profile" => profile = Some(args.next().context("--profile needs a path")?.into()),
            "--kind" => {
                kind = match args.next().context("--kind needs a value")?.as_str() {
                    "bf16" => Kind::BFloat16,
                    "f16" => Kind::Half,
                    "f32" => Kind::Float,
                    other => bail!("--kind: `{other}` is not bf16, f16 or f32"),
                }
            }
            other => bail!("unknown argument `{other}`"),
        }
    }
    if size % 8 != 0 || size <= 0 {
        bail!("--size must be a positive multiple of 8, got {size}");
    }
    let device = Device::cuda_if_available();
    tch::Cuda::cudnn_set_benchmark(benchmark);
    tch::manual_seed(0);
    let mut vs = tch::nn::VarStore::new(device);
    let mut vae = AutoencoderKL::new(&vs.root(), &AutoencoderKLConfig::sdxl())?;
    vs.set_kind(kind);
    vae.set_attention_backend(attention);
    if tiled {
        vae.set_tiling(Some(VaeTiling::default()))?;
    }
    let latents = Tensor::randn([1, 4, size / 8, size / 8], (kind, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut times = Vec::with_capacity(runs);
    tch::no_grad(|| -> anyhow::Result<()> {
        let warm = vae.decode(&latents)?; // first call: kernel selection and allocator warm-up
        sync();
        println!("output {:?} {:?} on {device:?}", warm.size(), warm.kind());
        drop(warm);
        torch_cuda::reset_peak_memory_stats(0);
        for _ in 0..runs {
            let start = Instant::now();
            let _image = vae.decode(&latents)?;
            sync();
            times.push(start.elapsed().as_secs_f64());
        }
        if let Some(path) = &profile {
            let profiler = torch_cuda::Profiler::start(torch_cuda::ProfilerOptions {
                cuda: device.is_cuda(),
                shapes: true,
                memory: false,
            })?;
            let _image = vae.decode(&latents)?;
            sync();
            profiler.finish(path)?;
            println!("profile of one decode written to {}", path.display());
        }
        Ok(())
    })?;
    if let Some(stats) = torch_cuda::memory_stats(0) {
        println!(
            "peak GPU memory during the timed decodes: {:.2} GiB allocated, {:.2} GiB reserved",
            stats.peak_allocated_gib(),
            stats.peak_reserved_gib()
        );
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "VAE decode {size}x{size} {kind:?} {attention:?} attention, {}{}: median {median:.3} s over {runs} runs (min {:.3} s)",
        if benchmark {
            "cuDNN benchmark mode, "
        } else {
            ""
        },
        if tiled {
            "tiling on (1024 px tiles, overlap 0.25; only larger images are split)"
        } else {
            "untiled"
        },
        times.first().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}
