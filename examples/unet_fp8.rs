//! fp8 base weights on the UNet: how far the output moves when the frozen weights are stored as
//! `float8_e4m3fn` with one scale per tensor — first every linear layer's
//! ([`lora::quantize_base_fp8`]), then every convolution's too
//! (`UNet2DConditionModel::quantize_convs_fp8`) — and how many bytes the weights take.
//!
//! ```sh
//! cargo run --release --example unet_fp8                    # the tiny SDXL fixture UNet, golden input
//! cargo run --release --example unet_fp8 -- --full [--bf16] [--latent 32] [--device cpu|cuda]
//! cargo run --release --example unet_fp8 -- --train plain|checkpointed [--no-fp8] [--latent 32] [--batch 1]
//!     [--device cpu|cuda] [--kind fp32|bf16]
//! ```
//!
//! * Default: the fixture UNet of `tests/fixtures/tiny-sdxl` on its golden input
//!   (`tiny-sdxl-unet-io.safetensors`). Compares fp8 storage computed in fp32 against the fp32 model,
//!   fp8 storage computed in bf16 (quantized from the bf16 weights, as the trainer does) against the
//!   bf16 model, and, for scale, the bf16 model against fp32.
//! * `--full`: SDXL-base's UNet architecture (`UNetConfig::sdxl_base()`, 2.6 B parameters) with
//!   seeded random weights, in fp32, on a `1×4×L×L` latent (L = `--latent`, default 32) with random
//!   text conditioning; fp8 computed in fp32 against fp32. Needs ≈ 11 GB of memory on the CPU. With
//!   `--bf16` the fp32 weights are rounded to bf16 after the fp32 reference, and fp8 computed in bf16
//!   is compared with that bf16 model (and with fp32).
//!
//! Errors are printed two ways: `‖a − b‖ / ‖b‖` over the whole output, and `max |a − b| / max |b|`
//! (the measure the parity tests use). Bytes count every variable of the UNet's store; the bf16
//! column is what the trainer holds with `--mixed_precision bf16`: two bytes per parameter, one per
//! fp8 weight, plus four per fp8 scale.
//!
//! * `--train MODE`: the memory of one training step (forward, MSE loss, backward into rank-4 LoRA
//!   adapters on the attention projections, as the seed recipe) of the full-size UNet with random
//!   weights, fp8 linear and convolution weights unless `--no-fp8`; `checkpointed` uses gradient checkpointing. On the
//!   CPU it prints the process's resident memory before the step and its peak during the step
//!   (`VmHWM`, reset through `/proc/self/clear_refs` after building the model); on CUDA the caching
//!   allocator's peak. Run each mode in its own process. Autograd keeps the widened (bf16 / fp32)
//!   copy of every fp8 weight it needs for the input gradient until the backward reaches it, so
//!   without checkpointing the widened weights of the whole UNet are alive at the peak.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use lora::HasLinears;
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};
use sdxl_model::weights::{TensorFile, load_into};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

mod cli;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// fp8 base weights on the UNet: the output error and the bytes of fp8 storage, or a training step's memory.
#[derive(Parser)]
#[command(name = "unet_fp8")]
struct Args {
    /// SDXL-base's UNet architecture with seeded random weights instead of the tiny fixture UNet (≈ 11 GB on the CPU).
    #[arg(long)]
    full: bool,
    /// With --full: also round the weights to bf16 and compare fp8 computed in bf16.
    #[arg(long)]
    bf16: bool,
    /// The latent's side L (1×4×L×L) of --full and --train.
    #[arg(long, value_name = "L", default_value_t = 32)]
    latent: i64,
    /// Where the model runs.
    #[arg(long, value_enum, value_name = "DEVICE", default_value_t = Where::Cpu)]
    device: Where,
    /// Measure one training step's memory instead (full-size UNet, random weights, rank-4 LoRA).
    #[arg(long, value_enum, value_name = "MODE")]
    train: Option<TrainMode>,
    /// With --train: keep the frozen weights in their precision instead of fp8.
    #[arg(long = "no-fp8")]
    no_fp8: bool,
    /// With --train: the batch size.
    #[arg(long, value_name = "N", default_value_t = 1)]
    batch: i64,
    /// With --train: the model's precision (default: bf16 on CUDA, fp32 on the CPU).
    #[arg(long, value_enum, value_name = "KIND")]
    kind: Option<Precision>,
}

/// `--device`.
#[derive(Clone, Copy, ValueEnum)]
enum Where {
    Cpu,
    Cuda,
}

/// `--train`: the step without or with gradient checkpointing.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TrainMode {
    Plain,
    Checkpointed,
}

/// `--kind`.
#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    Fp32,
    Bf16,
}

fn main() -> ExitCode {
    cli::run(|args: Args| {
        let device = match args.device {
            Where::Cpu => Device::Cpu,
            Where::Cuda => Device::Cuda(0),
        };
        let kind = match args.kind {
            Some(Precision::Fp32) => Kind::Float,
            Some(Precision::Bf16) => Kind::BFloat16,
            None if device.is_cuda() => Kind::BFloat16,
            None => Kind::Float,
        };
        match args.train {
            None if args.full => full_size(args.latent, device, args.bf16),
            None => tiny(device),
            Some(mode) => train_step_memory(&TrainSetup {
                checkpointed: mode == TrainMode::Checkpointed,
                fp8: !args.no_fp8,
                latent: args.latent,
                batch: args.batch,
                kind,
                device,
            }),
        }
    })
}

/// The conditioning of one UNet call, owned.
struct Inputs {
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
    text: Tensor,
    time_ids: Tensor,
}

impl Inputs {
    fn to_kind(&self, kind: Kind) -> Self {
        Self {
            sample: self.sample.to_kind(kind),
            timesteps: self.timesteps.shallow_clone(),
            context: self.context.to_kind(kind),
            text: self.text.to_kind(kind),
            time_ids: self.time_ids.to_kind(kind),
        }
    }

    fn run(&self, unet: &UNet2DConditionModel) -> anyhow::Result<Tensor> {
        let inputs = UNetInputs {
            sample: &self.sample,
            timesteps: &self.timesteps,
            encoder_hidden_states: &self.context,
            text_embeds: Some(&self.text),
            time_ids: Some(&self.time_ids),
        };
        Ok(tch::no_grad(|| unet.forward(&inputs))?
            .to_kind(Kind::Double)
            .to_device(Device::Cpu))
    }
}

/// `(‖a − b‖ / ‖b‖, max |a − b| / max |b|)`.
fn errors(actual: &Tensor, expected: &Tensor) -> (f64, f64) {
    let diff = actual - expected;
    let norm = diff.norm().double_value(&[]) / expected.norm().double_value(&[]);
    let max = diff.abs().max().double_value(&[]) / expected.abs().max().double_value(&[]);
    (norm, max)
}

fn print_error(what: &str, actual: &Tensor, expected: &Tensor) {
    let (norm, max) = errors(actual, expected);
    println!("{what}: relative error {norm:.3e} (norm), {max:.3e} (max)");
}

/// Quantizes every convolution but the first and the last (`conv_in`, `conv_out`), to see how much
/// of the error those two carry. Returns how many were quantized.
fn quantize_inner_convs(unet: &mut UNet2DConditionModel) -> anyhow::Result<usize> {
    let mut result = Ok(0);
    unet.for_each_conv(&mut |path, conv| {
        if path != "conv_in"
            && path != "conv_out"
            && let Ok(count) = &mut result
        {
            match conv.quantize_fp8(path, None) {
                Ok(()) => *count += 1,
                Err(error) => result = Err(error),
            }
        }
    });
    Ok(result?)
}

/// Bytes of every variable as stored, and as the trainer would hold them in bf16.
fn store_bytes(vs: &VarStore) -> (i64, i64) {
    let variables = vs.variables();
    let stored = variables
        .values()
        .map(|v| v.numel() as i64 * v.kind().elt_size_in_bytes() as i64)
        .sum();
    let bf16 = variables
        .values()
        .map(|v| v.numel() as i64 * if v.kind() == Kind::Float8e4m3fn { 1 } else { 2 })
        .sum();
    (stored, bf16)
}

fn report_bytes(label: &str, vs: &VarStore, fp8_scales: i64) {
    let (stored, bf16) = store_bytes(vs);
    let params: i64 = vs.variables().values().map(|v| v.numel() as i64).sum();
    println!(
        "UNet weights {label}: {params} parameters, {:.3} GiB ({:.2} MiB) as stored, {:.3} GiB ({:.2} MiB) in bf16 terms",
        (stored + fp8_scales) as f64 / GIB,
        (stored + fp8_scales) as f64 / MIB,
        (bf16 + fp8_scales) as f64 / GIB,
        (bf16 + fp8_scales) as f64 / MIB
    );
}

fn tiny(device: Device) -> anyhow::Result<()> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let folder = fixtures.join("tiny-sdxl/unet");
    let config = UNetConfig::from_file(folder.join("config.json"))?;
    let load = |kind: Kind| -> anyhow::Result<(VarStore, UNet2DConditionModel)> {
        let mut vs = VarStore::new(device);
        let unet = UNet2DConditionModel::new(&vs.root(), &config);
        let report = load_into(
            &vs,
            &[TensorFile::open(
                folder.join("diffusion_pytorch_model.safetensors"),
            )?],
            str::to_owned,
        )?;
        anyhow::ensure!(report.is_complete(), "fixture UNet incomplete: {report:?}");
        vs.set_kind(kind);
        vs.freeze();
        Ok((vs, unet))
    };
    let io = TensorFile::open(fixtures.join("tiny-sdxl-unet-io.safetensors"))?;
    let get = |key: &str| io.tensor(key, device, Some(Kind::Float));
    let inputs = Inputs {
        sample: get("sample")?,
        timesteps: io.tensor("timesteps", device, None)?,
        context: get("encoder_hidden_states")?,
        text: get("text_embeds")?,
        time_ids: get("time_ids")?,
    };
    let golden = get("out")?.to_kind(Kind::Double).to_device(Device::Cpu);

    let (vs, mut unet) = load(Kind::Float)?;
    let fp32 = inputs.run(&unet)?;
    print_error(
        "tiny-sdxl fp32 vs diffusers' fp32 output (sanity)",
        &fp32,
        &golden,
    );
    report_bytes("fp32", &vs, 0);
    let report = lora::quantize_base_fp8(&mut unet)?;
    println!("linear layers: {report}");
    report_bytes(
        "fp8 linears, fp32 compute",
        &vs,
        report.quantized as i64 * 4,
    );
    print_error(
        "tiny-sdxl fp8 linears (fp32 compute) vs fp32",
        &inputs.run(&unet)?,
        &fp32,
    );
    let inner = quantize_inner_convs(&mut unet)?;
    println!("convolutions but conv_in and conv_out: {inner} quantized");
    print_error(
        "tiny-sdxl fp8 linears and convolutions but conv_in/conv_out (fp32 compute) vs fp32",
        &inputs.run(&unet)?,
        &fp32,
    );
    let convs = unet.quantize_convs_fp8()?;
    println!("convolutions: {convs}");
    report_bytes(
        "fp8 linears and convolutions, fp32 compute",
        &vs,
        (report.quantized + convs.quantized + inner) as i64 * 4,
    );
    print_error(
        "tiny-sdxl fp8 linears and convolutions (fp32 compute) vs fp32",
        &inputs.run(&unet)?,
        &fp32,
    );

    let bf16_inputs = inputs.to_kind(Kind::BFloat16);
    let (vs, mut unet) = load(Kind::BFloat16)?;
    let bf16 = bf16_inputs.run(&unet)?;
    print_error("tiny-sdxl bf16 vs fp32 (for scale)", &bf16, &fp32);
    report_bytes("bf16", &vs, 0);
    let report = lora::quantize_base_fp8(&mut unet)?;
    let convs = unet.quantize_convs_fp8()?;
    report_bytes(
        "fp8 linears and convolutions, bf16 compute",
        &vs,
        (report.quantized + convs.quantized) as i64 * 4,
    );
    let fp8_bf16 = bf16_inputs.run(&unet)?;
    print_error(
        "tiny-sdxl fp8 linears and convolutions (bf16 compute) vs bf16",
        &fp8_bf16,
        &bf16,
    );
    print_error(
        "tiny-sdxl fp8 linears and convolutions (bf16 compute) vs fp32",
        &fp8_bf16,
        &fp32,
    );
    Ok(())
}

fn full_size(latent: i64, device: Device, bf16: bool) -> anyhow::Result<()> {
    let config = UNetConfig::sdxl_base();
    tch::manual_seed(20261201);
    let start = Instant::now();
    let mut vs = VarStore::new(device);
    let mut unet = tch::no_grad(|| UNet2DConditionModel::new(&vs.root(), &config));
    vs.freeze();
    println!(
        "built SDXL-base's UNet with random weights in fp32 in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    report_bytes("fp32", &vs, 0);
    let float = (Kind::Float, device);
    let inputs = Inputs {
        sample: Tensor::randn([1, 4, latent, latent], float),
        timesteps: Tensor::from_slice(&[500.0f32]).to_device(device),
        context: Tensor::randn([1, 77, 2048], float),
        text: Tensor::randn([1, 1280], float),
        time_ids: Tensor::from_slice(&[1024.0f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0])
            .view([1, 6])
            .to_device(device),
    };
    let start = Instant::now();
    let fp32 = inputs.run(&unet)?;
    println!(
        "fp32 forward at {latent}×{latent} latents: {:.1} s",
        start.elapsed().as_secs_f64()
    );
    if bf16 {
        return full_size_bf16(&mut vs, &mut unet, &inputs, &fp32, latent);
    }
    let report = lora::quantize_base_fp8(&mut unet)?;
    println!("linear layers: {report}");
    report_bytes("fp8 linears", &vs, report.quantized as i64 * 4);
    let start = Instant::now();
    let fp8 = inputs.run(&unet)?;
    println!("fp8 forward: {:.1} s", start.elapsed().as_secs_f64());
    print_error(
        &format!(
            "SDXL-base UNet (random weights, {latent}×{latent}) fp8 linears (fp32 compute) vs fp32"
        ),
        &fp8,
        &fp32,
    );
    let inner = quantize_inner_convs(&mut unet)?;
    println!("convolutions but conv_in and conv_out: {inner} quantized");
    let fp8 = inputs.run(&unet)?;
    print_error(
        &format!(
            "SDXL-base UNet (random weights, {latent}×{latent}) fp8 linears and convolutions but conv_in/conv_out (fp32 compute) vs fp32"
        ),
        &fp8,
        &fp32,
    );
    let convs = unet.quantize_convs_fp8()?;
    println!("convolutions: {convs}");
    report_bytes(
        "fp8 linears and convolutions",
        &vs,
        (report.quantized + convs.quantized + inner) as i64 * 4,
    );
    let fp8 = inputs.run(&unet)?;
    print_error(
        &format!(
            "SDXL-base UNet (random weights, {latent}×{latent}) fp8 linears and convolutions (fp32 compute) vs fp32"
        ),
        &fp8,
        &fp32,
    );
    Ok(())
}

/// `--full --bf16`: the same weights rounded to bf16, then fp8 computed in bf16.
fn full_size_bf16(
    vs: &mut VarStore,
    unet: &mut UNet2DConditionModel,
    inputs: &Inputs,
    fp32: &Tensor,
    latent: i64,
) -> anyhow::Result<()> {
    vs.set_kind(Kind::BFloat16);
    let inputs = inputs.to_kind(Kind::BFloat16);
    let start = Instant::now();
    let bf16 = inputs.run(unet)?;
    println!("bf16 forward: {:.1} s", start.elapsed().as_secs_f64());
    let what = format!("SDXL-base UNet (random weights, {latent}×{latent})");
    print_error(&format!("{what} bf16 vs fp32"), &bf16, fp32);
    let report = lora::quantize_base_fp8(unet)?;
    let fp8 = inputs.run(unet)?;
    print_error(
        &format!("{what} fp8 linears (bf16 compute) vs bf16"),
        &fp8,
        &bf16,
    );
    print_error(
        &format!("{what} fp8 linears (bf16 compute) vs fp32"),
        &fp8,
        fp32,
    );
    let convs = unet.quantize_convs_fp8()?;
    report_bytes(
        "fp8 linears and convolutions, bf16",
        vs,
        (report.quantized + convs.quantized) as i64 * 4,
    );
    let fp8 = inputs.run(unet)?;
    print_error(
        &format!("{what} fp8 linears and convolutions (bf16 compute) vs bf16"),
        &fp8,
        &bf16,
    );
    print_error(
        &format!("{what} fp8 linears and convolutions (bf16 compute) vs fp32"),
        &fp8,
        fp32,
    );
    Ok(())
}

/// What `--train` measures.
struct TrainSetup {
    checkpointed: bool,
    fp8: bool,
    latent: i64,
    batch: i64,
    kind: Kind,
    device: Device,
}

/// `VmRSS` or `VmHWM` of this process in GiB, from `/proc/self/status`.
fn proc_status_gib(field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kib: f64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024.0 / GIB)
}

/// The memory in use now and a reset of the peak counter.
fn reset_peak(device: Device) -> anyhow::Result<f64> {
    match device {
        Device::Cuda(index) => {
            tch::Cuda::synchronize(index as i64);
            torch_cuda::reset_peak_memory_stats(index);
            Ok(torch_cuda::memory_stats(index)
                .context("no CUDA memory statistics")?
                .allocated as f64
                / GIB)
        }
        _ => {
            // "5" resets the peak resident set size (proc(5), /proc/pid/clear_refs).
            std::fs::write("/proc/self/clear_refs", "5")?;
            proc_status_gib("VmRSS")
        }
    }
}

fn peak(device: Device) -> anyhow::Result<f64> {
    match device {
        Device::Cuda(index) => {
            tch::Cuda::synchronize(index as i64);
            Ok(torch_cuda::memory_stats(index)
                .context("no CUDA memory statistics")?
                .peak_allocated_gib())
        }
        _ => proc_status_gib("VmHWM"),
    }
}

fn train_step_memory(setup: &TrainSetup) -> anyhow::Result<()> {
    let (kind, device) = (setup.kind, setup.device);
    tch::manual_seed(20261201);
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    let mut unet = tch::no_grad(|| UNet2DConditionModel::new(&vs.root(), &UNetConfig::sdxl_base()));
    vs.freeze();
    if setup.fp8 {
        println!("linear layers: {}", lora::quantize_base_fp8(&mut unet)?);
        println!("convolutions: {}", unet.quantize_convs_fp8()?);
    }
    let adapters = VarStore::new(device);
    lora::inject(
        &mut unet,
        &adapters.root(),
        "default",
        &lora::LoraConfig::unet_attention(4),
    )?;
    let params = lora::trainable_variables(&mut unet);
    let (batch, latent) = (setup.batch, setup.latent);
    let sample = Tensor::randn([batch, 4, latent, latent], (kind, device));
    let target = Tensor::randn([batch, 4, latent, latent], (Kind::Float, device));
    let timesteps = Tensor::full([batch], 500.0, (Kind::Float, device));
    let context = Tensor::randn([batch, 77, 2048], (kind, device));
    let text = Tensor::randn([batch, 1280], (kind, device));
    let ids = Tensor::from_slice(&[1024.0f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0])
        .to_device(device)
        .repeat([batch, 1])
        .to_kind(kind);
    let inputs = UNetInputs {
        sample: &sample,
        timesteps: &timesteps,
        encoder_hidden_states: &context,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    let resident = reset_peak(device)?;
    let start = Instant::now();
    if setup.checkpointed {
        let forward = unet.forward_checkpointed(&inputs)?;
        // d mean((out − target)²) / d out.
        let grad =
            (forward.output().to_kind(Kind::Float) - &target) * (2.0 / target.numel() as f64);
        forward.backward(&grad)?;
    } else {
        (unet.forward(&inputs)?.to_kind(Kind::Float) - &target)
            .square()
            .mean(Kind::Float)
            .backward();
    }
    let peak = peak(device)?;
    anyhow::ensure!(
        params.values().all(|p| p.grad().defined()),
        "a LoRA parameter received no gradient"
    );
    println!(
        "training step, SDXL-base UNet {kind:?}{}, {batch}x4x{latent}x{latent}, LoRA rank 4 on the attention projections, {}: \
         {resident:.2} GiB before the step, peak {peak:.2} GiB ({:.1} s, {device:?})",
        if setup.fp8 {
            " with fp8 linear and convolution weights"
        } else {
            ""
        },
        if setup.checkpointed {
            "checkpointed"
        } else {
            "plain"
        },
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
