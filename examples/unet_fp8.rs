//! fp8 base weights on the UNet: how far the output moves when every linear layer's frozen weight is
//! stored as `float8_e4m3fn` with one scale per tensor ([`lora::quantize_base_fp8`]), and how many
//! bytes the weights take before and after.
//!
//! ```sh
//! cargo run --release --example unet_fp8                    # the tiny SDXL fixture UNet, golden input
//! cargo run --release --example unet_fp8 -- --full [--latent 32] [--device cpu|cuda]
//! ```
//!
//! * Default: the fixture UNet of `tests/fixtures/tiny-sdxl` on its golden input
//!   (`tiny-sdxl-unet-io.safetensors`). Compares fp8 storage computed in fp32 against the fp32 model,
//!   fp8 storage computed in bf16 (quantized from the bf16 weights, as the trainer does) against the
//!   bf16 model, and, for scale, the bf16 model against fp32.
//! * `--full`: SDXL-base's UNet architecture (`UNetConfig::sdxl_base()`, 2.6 B parameters) with
//!   seeded random weights, in fp32, on a `1×4×L×L` latent (L = `--latent`, default 32) with random
//!   text conditioning; fp8 computed in fp32 against fp32. Needs ≈ 11 GB of memory on the CPU.
//!
//! Errors are printed two ways: `‖a − b‖ / ‖b‖` over the whole output, and `max |a − b| / max |b|`
//! (the measure the parity tests use). Bytes count every variable of the UNet's store; the bf16
//! column is what the trainer holds with `--mixed_precision bf16`: two bytes per parameter, one per
//! fp8 weight, plus four per fp8 scale.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};
use sdxl_model::weights::{TensorFile, load_into};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

fn main() -> anyhow::Result<()> {
    let (mut full, mut latent, mut device) = (false, 32i64, Device::Cpu);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--full" => full = true,
            "--latent" => latent = args.next().context("--latent needs a size")?.parse().context("--latent")?,
            "--device" => {
                device = match args.next().context("--device needs cpu or cuda")?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    other => bail!("--device: `{other}` is not cpu or cuda"),
                }
            }
            other => bail!("unknown argument `{other}`"),
        }
    }
    if full { full_size(latent, device) } else { tiny(device) }
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
        Ok(tch::no_grad(|| unet.forward(&inputs))?.to_kind(Kind::Double).to_device(Device::Cpu))
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

/// Bytes of every variable as stored, and as the trainer would hold them in bf16.
fn store_bytes(vs: &VarStore) -> (i64, i64) {
    let variables = vs.variables();
    let stored = variables.values().map(|v| v.numel() as i64 * v.kind().elt_size_in_bytes() as i64).sum();
    let bf16 = variables.values().map(|v| v.numel() as i64 * if v.kind() == Kind::Float8e4m3fn { 1 } else { 2 }).sum();
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
        let report = load_into(&vs, &[TensorFile::open(folder.join("diffusion_pytorch_model.safetensors"))?], str::to_owned)?;
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
    print_error("tiny-sdxl fp32 vs diffusers' fp32 output (sanity)", &fp32, &golden);
    report_bytes("fp32", &vs, 0);
    let report = lora::quantize_base_fp8(&mut unet)?;
    println!("{report}");
    report_bytes("fp8 linears, fp32 compute", &vs, report.quantized as i64 * 4);
    print_error("tiny-sdxl fp8 (fp32 compute) vs fp32", &inputs.run(&unet)?, &fp32);

    let bf16_inputs = inputs.to_kind(Kind::BFloat16);
    let (vs, mut unet) = load(Kind::BFloat16)?;
    let bf16 = bf16_inputs.run(&unet)?;
    print_error("tiny-sdxl bf16 vs fp32 (for scale)", &bf16, &fp32);
    report_bytes("bf16", &vs, 0);
    let report = lora::quantize_base_fp8(&mut unet)?;
    report_bytes("fp8 linears, bf16 compute", &vs, report.quantized as i64 * 4);
    let fp8_bf16 = bf16_inputs.run(&unet)?;
    print_error("tiny-sdxl fp8 (bf16 compute) vs bf16", &fp8_bf16, &bf16);
    print_error("tiny-sdxl fp8 (bf16 compute) vs fp32", &fp8_bf16, &fp32);
    Ok(())
}

fn full_size(latent: i64, device: Device) -> anyhow::Result<()> {
    let config = UNetConfig::sdxl_base();
    tch::manual_seed(20261201);
    let start = Instant::now();
    let mut vs = VarStore::new(device);
    let mut unet = tch::no_grad(|| UNet2DConditionModel::new(&vs.root(), &config));
    vs.freeze();
    println!("built SDXL-base's UNet with random weights in fp32 in {:.1} s", start.elapsed().as_secs_f64());
    report_bytes("fp32", &vs, 0);
    let float = (Kind::Float, device);
    let inputs = Inputs {
        sample: Tensor::randn([1, 4, latent, latent], float),
        timesteps: Tensor::from_slice(&[500.0f32]).to_device(device),
        context: Tensor::randn([1, 77, 2048], float),
        text: Tensor::randn([1, 1280], float),
        time_ids: Tensor::from_slice(&[1024.0f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0]).view([1, 6]).to_device(device),
    };
    let start = Instant::now();
    let fp32 = inputs.run(&unet)?;
    println!("fp32 forward at {latent}×{latent} latents: {:.1} s", start.elapsed().as_secs_f64());
    let report = lora::quantize_base_fp8(&mut unet)?;
    println!("{report}");
    report_bytes("fp8 linears", &vs, report.quantized as i64 * 4);
    let start = Instant::now();
    let fp8 = inputs.run(&unet)?;
    println!("fp8 forward: {:.1} s", start.elapsed().as_secs_f64());
    print_error(&format!("SDXL-base UNet (random weights, {latent}×{latent}) fp8 (fp32 compute) vs fp32"), &fp8, &fp32);
    Ok(())
}
