//! The full-size SDXL-base UNet on the GPU: parity with diffusers, time per inference step and
//! training-step memory with and without gradient checkpointing.
//!
//! ```sh
//! cargo run --release --example unet_sdxl -- [--ref /tmp/sdxl-ref] [--steps 10] [--profile trace.json]
//! cargo run --release --example unet_sdxl -- --train-memory plain|checkpointed
//! ```
//!
//! * Parity and speed (default): with `--ref` pointing at the output of `tools/gpu/reference_sdxl.py`
//!   (diffusers' random-weight SDXL UNet in `unet/` and `unet-io.safetensors` with its fp32 and bf16
//!   outputs), loads the same weights in fp32 and in bf16 and prints the relative errors against
//!   diffusers' fp32 output beside diffusers' own bf16-vs-fp32 spread. Without the folder it uses random
//!   weights and only times. The bf16 UNet runs again with channels-last feature maps
//!   (`UNet2DConditionModel::set_channels_last`), against the same references. Timing: bf16, 1024 px
//!   (128×128 latents), batch 2 as with classifier-free guidance, fused attention, after warm-up,
//!   synchronised, NCHW then channels-last.
//! * `--train-memory MODE`: training steps (forward, MSE loss, backward into rank-4 LoRA adapters on
//!   `to_q, to_k, to_v, to_out.0`, as the seed recipe) of the bf16 UNet at 512 px,
//!   batch 2, with frozen weights and the gradient taken w.r.t. the input, so the backward runs through
//!   every layer as LoRA training does. Run each mode in its own process: device memory in use after the
//!   step (`nvidia-smi`) then includes the caching allocator's reserve, i.e. the step's peak.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use sdxl_model::attention::AttentionBackend;
use sdxl_model::unet::loading::{UNetWeights, load_unet};
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};
use sdxl_model::weights::TensorFile;
use tch::nn::VarStore;
use tch::{Cuda, Device, Kind, Tensor};

mod cli;

/// The full-size SDXL-base UNet: parity with diffusers and time per step, or a training step's memory.
#[derive(Parser)]
#[command(name = "unet_sdxl")]
struct Args {
    /// The output folder of tools/gpu/reference_sdxl.py (unet/, unet-io.safetensors); without it, random weights and timing only.
    #[arg(long = "ref", value_name = "DIR", default_value = "/tmp/sdxl-ref")]
    reference: PathBuf,
    /// Timed UNet steps (after 3 warm-up steps).
    #[arg(long, value_name = "N", default_value_t = 10)]
    steps: usize,
    /// Attention kernels: fused, plain, sliced or sliced:<auto|max|rows>.
    #[arg(long, value_name = "BACKEND", default_value = "fused")]
    attention: AttentionBackend,
    /// After the timing, record one more bf16 channels-last step with libtorch's profiler and write
    /// its Chrome trace here (read it with tools/gpu/profile_summary.py); none by default.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Measure training steps' time and memory instead (bf16, 512 px, batch 2, rank-4 LoRA).
    #[arg(long = "train-memory", value_enum, value_name = "MODE")]
    train_memory: Option<TrainMode>,
}

/// `--train-memory`: the step without or with gradient checkpointing.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TrainMode {
    Plain,
    Checkpointed,
}

fn main() -> ExitCode {
    cli::run(|args: Args| {
        let device = Device::cuda_if_available();
        if !device.is_cuda() {
            eprintln!(
                "warning: no CUDA device; running the full-size UNet on the CPU will be very slow"
            );
        }
        let config = UNetConfig::sdxl_base();
        match args.train_memory {
            None => parity_and_speed(
                &config,
                &args.reference,
                args.steps,
                args.attention,
                args.profile.as_deref(),
                device,
            ),
            Some(mode) => train_step_memory(
                &config,
                mode == TrainMode::Checkpointed,
                args.attention,
                device,
            ),
        }
    })
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        Cuda::synchronize(i as i64);
    }
}

/// `max |a - b| / max |b|`.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

fn random_unet(
    config: &UNetConfig,
    kind: Kind,
    device: Device,
) -> (VarStore, UNet2DConditionModel) {
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    let unet = tch::no_grad(|| UNet2DConditionModel::new(&vs.root(), config));
    vs.freeze();
    (vs, unet)
}

fn parity_and_speed(
    config: &UNetConfig,
    reference: &std::path::Path,
    steps: usize,
    backend: AttentionBackend,
    profile: Option<&std::path::Path>,
    device: Device,
) -> anyhow::Result<()> {
    let io_path = reference.join("unet-io.safetensors");
    let weights = UNetWeights::Diffusers {
        folder: reference.join("unet"),
        variant: None,
    };
    let io = if io_path.is_file() {
        Some(TensorFile::open(&io_path)?)
    } else {
        None
    };
    let input = |key: &str, shape: &[i64]| -> anyhow::Result<Tensor> {
        Ok(match &io {
            Some(file) => file.tensor(key, device, Some(Kind::Float))?,
            None => Tensor::randn(shape, (Kind::Float, device)),
        })
    };
    let sample = input("sample", &[2, 4, 128, 128])?;
    let timesteps = match &io {
        Some(file) => file.tensor("timesteps", device, Some(Kind::Float))?,
        None => Tensor::from_slice(&[999.0f32, 17.0]).to_device(device),
    };
    let context = input("encoder_hidden_states", &[2, 77, 2048])?;
    let text = input("text_embeds", &[2, 1280])?;
    let ids = Tensor::from_slice(&[1024.0f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0])
        .to_device(device)
        .repeat([2, 1]);
    let ids = match &io {
        Some(file) => file.tensor("time_ids", device, Some(Kind::Float))?,
        None => ids,
    };
    let run = |unet: &UNet2DConditionModel, kind: Kind| -> anyhow::Result<Tensor> {
        let (s, c, t) = (
            sample.to_kind(kind),
            context.to_kind(kind),
            text.to_kind(kind),
        );
        let i = ids.to_kind(kind);
        let inputs = UNetInputs {
            sample: &s,
            timesteps: &timesteps,
            encoder_hidden_states: &c,
            text_embeds: Some(&t),
            time_ids: Some(&i),
        };
        Ok(tch::no_grad(|| unet.forward(&inputs))?)
    };

    let bf16_unet = if let Some(file) = &io {
        let expected = file.tensor("out_fp32", device, Some(Kind::Float))?;
        let diffusers_bf16 = file.tensor("out_bf16", device, Some(Kind::Float))?;
        {
            // The reference's fp32 run has TF32 off for matrix products and convolutions: so has ours.
            torch_cuda::set_allow_tf32(false, false);
            let (_vs, mut unet) = load_unet(config, &weights, device, Kind::Float)?;
            unet.set_attention_backend(backend);
            let ours = run(&unet, Kind::Float)?;
            println!(
                "fp32: rel error vs diffusers fp32 {:.3e}",
                rel(&ours, &expected)
            );
        }
        let (vs, mut unet) = load_unet(config, &weights, device, Kind::BFloat16)?;
        unet.set_attention_backend(backend);
        let ours = run(&unet, Kind::BFloat16)?;
        println!(
            "bf16: rel error vs diffusers fp32 {:.3e} (diffusers' own bf16 vs fp32: {:.3e}); vs diffusers bf16 {:.3e}",
            rel(&ours, &expected),
            rel(&diffusers_bf16, &expected),
            rel(&ours, &diffusers_bf16)
        );
        // The same weights with channels-last feature maps (NHWC convolutions, the channels-last
        // group norm kernels).
        unet.set_channels_last(true);
        let channels_last = run(&unet, Kind::BFloat16)?;
        unet.set_channels_last(false);
        println!(
            "bf16 channels-last: rel error vs diffusers fp32 {:.3e}; vs diffusers bf16 {:.3e}; vs ours NCHW {:.3e}",
            rel(&channels_last, &expected),
            rel(&channels_last, &diffusers_bf16),
            rel(&channels_last, &ours)
        );
        (vs, unet)
    } else {
        println!("no {} : random weights, timing only", io_path.display());
        let (vs, mut unet) = random_unet(config, Kind::BFloat16, device);
        unet.set_attention_backend(backend);
        (vs, unet)
    };
    let (_vs, mut unet) = bf16_unet;
    for layout in ["NCHW", "channels-last"] {
        unet.set_channels_last(layout == "channels-last");
        for _ in 0..3 {
            let _ = run(&unet, Kind::BFloat16)?;
        }
        sync(device);
        let start = Instant::now();
        for _ in 0..steps {
            let _ = run(&unet, Kind::BFloat16)?;
        }
        sync(device);
        let per_step = start.elapsed().as_secs_f64() / steps as f64;
        println!(
            "bf16 1024 px batch 2 ({backend:?} attention, {layout}): {:.1} ms per UNet step ({steps} steps)",
            per_step * 1e3
        );
    }
    // The loop above left the channels-last layout set.
    if let Some(path) = profile {
        let profiler = torch_cuda::Profiler::start(
            torch_cuda::ProfilerOptions::default()
                .with_cuda(true)
                .with_shapes(true),
        )?;
        let _ = run(&unet, Kind::BFloat16)?;
        sync(device);
        profiler.finish(path)?;
        println!(
            "profile of one channels-last step written to {}",
            path.display()
        );
    }
    Ok(())
}

fn train_step_memory(
    config: &UNetConfig,
    checkpointed: bool,
    backend: AttentionBackend,
    device: Device,
) -> anyhow::Result<()> {
    let (_vs, mut unet) = random_unet(config, Kind::BFloat16, device);
    unet.set_attention_backend(backend);
    // The seed recipe's adapters: fp32, rank 4, on the attention projections; only they train.
    let adapters = VarStore::new(device);
    let report = lora::inject(
        &mut unet,
        &adapters.root(),
        "default",
        &lora::LoraConfig::unet_attention(4),
    )?;
    let params = lora::trainable_variables(&mut unet);
    let lora_params: i64 = params.values().map(Tensor::numel).map(|n| n as i64).sum();
    println!(
        "LoRA rank 4: {} modules, {lora_params} parameters",
        report.adapted.len()
    );
    let kind = Kind::BFloat16;
    let sample = Tensor::randn([2, 4, 64, 64], (kind, device));
    let target = Tensor::randn([2, 4, 64, 64], (kind, device));
    let timesteps = Tensor::from_slice(&[500.0f32, 20.0]).to_device(device);
    let context = Tensor::randn([2, 77, 2048], (kind, device));
    let text = Tensor::randn([2, 1280], (kind, device));
    let ids = Tensor::from_slice(&[512.0f32, 512.0, 0.0, 0.0, 512.0, 512.0])
        .to_device(device)
        .repeat([2, 1])
        .to_kind(kind);
    let inputs = UNetInputs {
        sample: &sample,
        timesteps: &timesteps,
        encoder_hidden_states: &context,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    let step = || -> anyhow::Result<()> {
        if checkpointed {
            let fwd = unet.forward_checkpointed(&inputs)?;
            // d mean((out - target)²) / d out, computed on the device.
            let grad = (fwd.output().to_kind(Kind::Float) - target.to_kind(Kind::Float))
                * (2.0 / target.numel() as f64);
            fwd.backward(&grad)?;
        } else {
            let out = unet.forward(&inputs)?;
            (out.to_kind(Kind::Float) - target.to_kind(Kind::Float))
                .square()
                .mean(Kind::Float)
                .backward();
        }
        Ok(())
    };
    step()?; // warm-up: kernel selection, allocator growth
    sync(device);
    anyhow::ensure!(
        params.values().all(|p| p.grad().defined()),
        "a LoRA parameter received no gradient"
    );
    let weights_gib = torch_cuda::memory_stats(0).map(|s| s.allocated as f64 / (1u64 << 30) as f64);
    torch_cuda::reset_peak_memory_stats(0);
    let runs = 3;
    let start = Instant::now();
    for _ in 0..runs {
        for p in params.values() {
            let mut g = p.grad();
            let _ = g.zero_();
        }
        step()?;
    }
    sync(device);
    let per_step = start.elapsed().as_secs_f64() / runs as f64;
    let mode = if checkpointed {
        "checkpointed"
    } else {
        "plain"
    };
    match (torch_cuda::memory_stats(0), weights_gib) {
        (Some(stats), Some(resident)) => println!(
            "training step, bf16 512 px batch 2, LoRA rank 4, {mode}: peak {:.2} GiB allocated ({:.2} GiB reserved; {resident:.2} GiB resident between steps); {:.0} ms per step (eager, no optimizer)",
            stats.peak_allocated_gib(),
            stats.peak_reserved_gib(),
            per_step * 1e3
        ),
        _ => println!(
            "training step, {mode}: {:.0} ms per step (no CUDA memory statistics here)",
            per_step * 1e3
        ),
    }
    Ok(())
}
