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
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lora::Component;
use lora::format::{self, BlockRenames, Format, ModuleNames, ReadOptions, WriteOptions};

mod cli;

/// Prints a LoRA file's summary, or converts it between the diffusers, peft and kohya layouts.
#[derive(Parser)]
#[command(
    name = "lora_convert",
    flatten_help = true,
    disable_help_subcommand = true
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the file's layout, modules, ranks and alphas.
    Summary {
        /// The LoRA file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Writes the LoRA in another layout.
    Convert(ConvertArgs),
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// The LoRA file to read.
    #[arg(value_name = "IN")]
    input: PathBuf,
    /// The file to write.
    #[arg(value_name = "OUT")]
    output: PathBuf,
    /// The layout to write: diffusers, peft or kohya.
    #[arg(long = "to", value_name = "FORMAT")]
    target: Format,
    /// A JSON list of [diffusers prefix, SGM prefix] pairs: kohya files may use SGM UNet block names, and --to kohya writes them.
    #[arg(long, value_name = "RENAMES.json")]
    sgm: Option<PathBuf>,
    /// The UNet's model file, for the module paths a kohya file needs (repeat for shards).
    #[arg(long, value_name = "MODEL.safetensors")]
    unet: Vec<PathBuf>,
    /// The first text encoder's model file (repeat for shards).
    #[arg(long = "text-encoder", value_name = "MODEL.safetensors")]
    text_encoder: Vec<PathBuf>,
    /// The second text encoder's model file (repeat for shards).
    #[arg(long = "text-encoder-2", value_name = "MODEL.safetensors")]
    text_encoder_2: Vec<PathBuf>,
}

fn main() -> ExitCode {
    cli::run(|args: Args| match args.command {
        Command::Summary { file } => {
            print!("{}", format::summary(file)?);
            Ok(())
        }
        Command::Convert(args) => convert(args),
    })
}

fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let renames = args
        .sgm
        .as_deref()
        .map(BlockRenames::from_json_file)
        .transpose()?;
    let mut names = ModuleNames::new();
    for (component, files) in [
        (Component::Unet, &args.unet),
        (Component::TextEncoder, &args.text_encoder),
        (Component::TextEncoder2, &args.text_encoder_2),
    ] {
        for file in files {
            names.add_model_file(component, file)?;
        }
    }
    let options = ReadOptions {
        module_names: (!names.is_empty()).then_some(&names),
        block_renames: renames.as_ref(),
    };
    let file = format::read(&args.input, options)?;
    let write_options = WriteOptions {
        block_renames: renames.as_ref(),
        ..WriteOptions::default()
    };
    format::write(&args.output, &file.state, args.target, &write_options)?;
    println!(
        "{} ({}, {} modules) → {} ({})",
        args.input.display(),
        file.format,
        file.state.modules.len(),
        args.output.display(),
        args.target
    );
    Ok(())
}
