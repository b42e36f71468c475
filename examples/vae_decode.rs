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

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use sdxl_model::attention::AttentionBackend;
use sdxl_model::vae::{AutoencoderKL, AutoencoderKLConfig, VaeTiling};
use tch::{Device, Kind, Tensor};

mod cli;

use cli::Precision;

/// Times the SDXL VAE decode of one image (full-size architecture, random weights), tiled or not.
#[derive(Parser)]
#[command(name = "vae_decode")]
struct Args {
    /// Image side in pixels (a positive multiple of 8).
    #[arg(long, value_name = "PX", default_value_t = 2048, value_parser = multiple_of_8)]
    size: i64,
    /// Precision of the VAE (no fp32 upcast).
    #[arg(long, value_enum, value_name = "KIND", default_value_t = Precision::Bf16)]
    kind: Precision,
    /// Decode in one piece instead of 1024 px tiles with 0.25 overlap.
    #[arg(long)]
    untiled: bool,
    /// Timed decodes (after one warm-up decode).
    #[arg(long, value_name = "N", default_value_t = 5)]
    runs: usize,
    /// Let cuDNN time its convolution algorithms on first use and keep the fastest.
    #[arg(long = "cudnn-benchmark")]
    cudnn_benchmark: bool,
    /// The mid block's attention kernels: fused, plain, sliced or sliced:<auto|max|rows>.
    #[arg(long, value_name = "BACKEND", default_value = "fused")]
    attention: AttentionBackend,
    /// Record one more decode with libtorch's profiler and write its Chrome trace here; none by default.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
}

fn multiple_of_8(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(size) if size > 0 && size % 8 == 0 => Ok(size),
        Ok(_) => Err("not a positive multiple of 8".into()),
        Err(error) => Err(error.to_string()),
    }
}

fn main() -> ExitCode {
    cli::run(decode)
}

fn decode(args: Args) -> anyhow::Result<()> {
    let Args {
        size,
        kind,
        untiled,
        runs,
        cudnn_benchmark: benchmark,
        attention,
        profile,
    } = args;
    let (kind, tiled) = (Kind::from(kind), !untiled);
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
            let profiler = torch_cuda::Profiler::start(
                torch_cuda::ProfilerOptions::default()
                    .with_cuda(device.is_cuda())
                    .with_shapes(true)
                    .with_memory(false),
            )?;
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
