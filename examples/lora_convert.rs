//! Prints a LoRA file's summary, or converts it between the diffusers, peft and kohya layouts.
//!
//! ```sh
//! cargo run --example lora_convert -- summary FILE.safetensors
//! cargo run --example lora_convert -- convert IN.safetensors OUT.safetensors --to diffusers|peft|kohya \
//!     [--sgm RENAMES.json] [--unet MODEL.safetensors] [--text-encoder MODEL.safetensors] \
//!     [--text-encoder-2 MODEL.safetensors]
//! ```
//!
//! Reading a kohya file needs the model's module paths: pass the model file of each component
//! the LoRA adapts (`--unet tiny-sdxl/unet/diffusion_pytorch_model.safetensors`, …). `--sgm` names
//! a JSON list of `[diffusers prefix, SGM prefix]` pairs; with it, kohya files may use SGM UNet
//! block names, and `--to kohya` writes them.

use std::path::PathBuf;

use anyhow::{Context, bail};
use lora::Component;
use lora::format::{self, BlockRenames, Format, ModuleNames, ReadOptions, WriteOptions};

const USAGE: &str = "usage: lora_convert summary FILE | lora_convert convert IN OUT --to diffusers|peft|kohya \
                     [--sgm RENAMES.json] [--unet F] [--text-encoder F] [--text-encoder-2 F]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("summary") => {
            let file = args.get(1).context(USAGE)?;
            print!("{}", format::summary(file)?);
            Ok(())
        }
        Some("convert") => convert(&args[1..]),
        _ => bail!(USAGE),
    }
}

fn convert(args: &[String]) -> anyhow::Result<()> {
    let (input, output) = match args {
        [input, output, ..] => (PathBuf::from(input), PathBuf::from(output)),
        _ => bail!(USAGE),
    };
    let (mut target, mut renames, mut names) = (None, None, ModuleNames::new());
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--to" => target = Some(value.parse::<Format>().map_err(anyhow::Error::msg)?),
            "--sgm" => renames = Some(BlockRenames::from_json_file(value.as_ref())?),
            "--unet" => _ = names.add_model_file(Component::Unet, value.as_ref())?,
            "--text-encoder" => _ = names.add_model_file(Component::TextEncoder, value.as_ref())?,
            "--text-encoder-2" => {
                _ = names.add_model_file(Component::TextEncoder2, value.as_ref())?
            }
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    let target = target.context("--to is required")?;
    let options = ReadOptions {
        module_names: (!names.is_empty()).then_some(&names),
        block_renames: renames.as_ref(),
    };
    let file = format::read(&input, options)?;
    let write_options = WriteOptions {
        block_renames: renames.as_ref(),
        ..WriteOptions::default()
    };
    format::write(&output, &file.state, target, &write_options)?;
    println!(
        "{} ({}, {} modules) → {} ({target})",
        input.display(),
        file.format,
        file.state.modules.len(),
        output.display()
    );
    Ok(())
}
