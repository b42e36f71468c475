//! The full-size SDXL VAE and both text encoders on the GPU: parity with diffusers / transformers.
//!
//! ```sh
//! python3 tools/gpu/reference_sdxl.py --parts vae text          # writes /tmp/sdxl-ref
//! cargo run --release --example vae_text_sdxl -- [--ref /tmp/sdxl-ref]
//! ```
//!
//! Loads the random-weight models that `tools/gpu/reference_sdxl.py` saved (`vae/`, `text_encoder/`,
//! `text_encoder_2/`) in fp32 and prints the relative error (`max |ours − ref| / max |ref|`) of the VAE
//! decode and encode mean (`vae-io.safetensors`) and of both encoders' penultimate hidden states and
//! pooled outputs (`text-io.safetensors`). The 2048×2048 bf16 decode timing is `examples/vae_decode.rs`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Parser;
use sdxl_model::clip::ClipTextModel;
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::vae::{AutoencoderKL, Upcast};
use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};

mod cli;

/// The full-size SDXL VAE and both text encoders: parity with diffusers / transformers.
#[derive(Parser)]
#[command(name = "vae_text_sdxl")]
struct Args {
    /// The output folder of tools/gpu/reference_sdxl.py --parts vae text (vae/, text_encoder/, text_encoder_2/, *-io.safetensors).
    #[arg(long = "ref", value_name = "DIR", default_value = "/tmp/sdxl-ref")]
    reference: PathBuf,
}

/// `max |a − b| / max |b|` in f64.
fn rel(actual: &Tensor, expected: &Tensor) -> anyhow::Result<f64> {
    if actual.size() != expected.size() {
        bail!(
            "shape {:?} vs reference {:?}",
            actual.size(),
            expected.size()
        );
    }
    let a = actual.to_kind(Kind::Double).to_device(Device::Cpu);
    let e = expected.to_kind(Kind::Double).to_device(Device::Cpu);
    Ok((&a - &e).abs().max().double_value(&[])
        / e.abs().max().double_value(&[]).max(f64::MIN_POSITIVE))
}

fn main() -> ExitCode {
    cli::run(compare)
}

fn compare(args: Args) -> anyhow::Result<()> {
    let reference = args.reference;
    let device = Device::cuda_if_available();
    println!("device {device:?}, reference {}", reference.display());
    tch::no_grad(|| -> anyhow::Result<()> {
        let io = TensorFile::open(reference.join("vae-io.safetensors"))?;
        let options = LoadOptions::default()
            .device(device)
            .vae_upcast(Upcast::Never);
        let vae = AutoencoderKL::from_pretrained(reference.join("vae"), &options)?.model;
        let decoded = vae.decode(&io.tensor("latents", device, None)?)?;
        let mean = vae.encode(&io.tensor("image", device, None)?)?.mean;
        println!(
            "VAE fp32 rel. error vs diffusers: decode {:.3e}, encode mean {:.3e}",
            rel(&decoded, &io.tensor("decoded_fp32", Device::Cpu, None)?)?,
            rel(&mean, &io.tensor("mean_fp32", Device::Cpu, None)?)?
        );
        drop(vae);

        let io = TensorFile::open(reference.join("text-io.safetensors"))?;
        let ids = io.tensor("input_ids", device, None)?;
        for name in ["text_encoder", "text_encoder_2"] {
            let model = ClipTextModel::from_pretrained(reference.join(name), &options)?.model;
            let out = model.forward(&ids)?;
            let penultimate = &out.hidden_states[out.hidden_states.len() - 2];
            let pooled = out.text_embeds.as_ref().unwrap_or(&out.pooled);
            println!(
                "{name} fp32 rel. error vs transformers: penultimate {:.3e}, pooled {:.3e}",
                rel(
                    penultimate,
                    &io.tensor(&format!("{name}.penultimate"), Device::Cpu, None)?
                )?,
                rel(
                    pooled,
                    &io.tensor(&format!("{name}.pooled"), Device::Cpu, None)?
                )?
            );
        }
        Ok(())
    })
}
