//! `sdxl-lora`: train, use, convert and inspect SDXL LoRAs from one command line.
//!
//! ```sh
//! cargo install --path .                       # from a clone, after scripts/bootstrap-libtorch.sh
//! sdxl-lora train --preset tiny                # the offline CPU demo
//! sdxl-lora train --help                       # every training flag, grouped by topic
//! sdxl-lora generate --model DIR --prompt "…" [--lora FILE]
//! sdxl-lora convert IN OUT --to kohya
//! sdxl-lora inspect FILE
//! sdxl-lora estimate --preset tiny --vram_gib 24
//! sdxl-lora completions bash > ~/.local/share/bash-completion/completions/sdxl-lora
//! ```
//!
//! `train` and `estimate` take diffusers' training flags, parsed by the trainer's own parser; the
//! other subcommands' flags are clap's. See docs/CLI.md.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use sdxl_lora::cli::{self, LogFormat, Verbosity, convert, estimate, generate, inspect, train};

/// Fine-tune Stable Diffusion XL with LoRA on libtorch: train, generate, convert, inspect, estimate.
#[derive(Parser)]
#[command(
    name = "sdxl-lora",
    version,
    disable_help_subcommand = true,
    subcommand_required = true
)]
struct Cli {
    /// Print warnings and errors only.
    #[arg(long, short = 'q', global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Print debug messages too.
    #[arg(long, short = 'v', global = true)]
    verbose: bool,
    /// How messages are written on stderr: text (the message alone) or json (one object a line).
    #[arg(long = "log_format", value_enum, value_name = "FORMAT", global = true, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA with diffusers' train_dreambooth_lora_sdxl.py flags (`sdxl-lora train --help`).
    #[command(disable_help_flag = true)]
    Train(TrainArgs),
    /// Text to image with an SDXL diffusers folder, optionally with a LoRA.
    Generate(generate::GenerateArgs),
    /// Write a LoRA file in another layout (diffusers, peft, kohya).
    Convert(convert::ConvertArgs),
    /// Print a LoRA file's layout, base model, targets, ranks, alphas and metadata.
    Inspect(inspect::InspectArgs),
    /// Print the memory and time a training configuration needs, without loading weights.
    #[command(disable_help_flag = true)]
    Estimate(TrainArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        /// The shell.
        #[arg(value_enum, value_name = "SHELL")]
        shell: Shell,
    },
}

/// The training flags, handed to the trainer's parser as they are.
#[derive(clap::Args)]
struct TrainArgs {
    /// Training flags: --preset tiny, --config FILE.toml, --FLAG VALUE … (see --help).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..,
        value_name = "FLAGS"
    )]
    flags: Vec<String>,
}

fn main() -> ExitCode {
    cli::run(|args: Cli| {
        let verbosity = match (args.quiet, args.verbose) {
            (true, _) => Verbosity::Quiet,
            (_, true) => Verbosity::Verbose,
            _ => Verbosity::Normal,
        };
        cli::init_logging(verbosity, args.log_format);
        match args.command {
            Command::Train(TrainArgs { flags }) if train::wants_help(&flags) => {
                println!("{}", train::help("sdxl-lora train"));
                Ok(())
            }
            Command::Train(TrainArgs { flags }) => train::train(flags, &["train"]),
            Command::Estimate(TrainArgs { flags }) if train::wants_help(&flags) => {
                println!("{}", estimate::help("sdxl-lora estimate"));
                Ok(())
            }
            Command::Estimate(TrainArgs { flags }) => estimate::estimate(flags),
            Command::Generate(args) => generate::generate(args),
            Command::Convert(args) => convert::convert(args),
            Command::Inspect(args) => inspect::inspect(args),
            Command::Completions { shell } => {
                let mut command = Cli::command();
                clap_complete::generate(shell, &mut command, "sdxl-lora", &mut std::io::stdout());
                Ok(())
            }
        }
    })
}
