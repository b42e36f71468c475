//! Prints a LoRA file's summary, or converts it between the diffusers, peft and kohya layouts.
//!
//! ```sh
//! cargo run --example lora_convert -- summary FILE.safetensors
//! cargo run --example lora_convert -- convert IN.safetensors OUT.safetensors --to diffusers|peft|kohya \
//!     [--sgm RENAMES.json] [--unet MODEL.safetensors] [--text-encoder MODEL.safetensors] \
//!     [--text-encoder-2 MODEL.safetensors] [--sdxl] [--resolution PIXELS]
//! ```
//!
//! The conversion is `sdxl-lora convert` (`src/cli/convert.rs`), whose help tells the flags.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lora::format;
use sdxl_lora::cli::convert::{ConvertArgs, convert};

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

fn main() -> ExitCode {
    cli::run(|args: Args| match args.command {
        Command::Summary { file } => {
            print!("{}", format::summary(file)?);
            Ok(())
        }
        Command::Convert(args) => convert(args),
    })
}
