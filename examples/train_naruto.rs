//! Trains the seed recipe's LoRA: SDXL base on the first 75 Naruto images, 512 px, batch 2 ×
//! accumulation 2, bf16, 8-bit AdamW, rank 4 on the UNet's attention projections, 1200 steps, every
//! caption replaced by "Naruto style anime character" — diffusers' DreamBooth-LoRA SDXL script.
//!
//! ```sh
//! cargo run --release --example train_naruto                      # the real run (hub model and data)
//! cargo run --release --example train_naruto -- --preset tiny     # offline CPU demo, a few minutes
//! cargo run --release --example train_naruto -- --help            # every flag, with its default
//! ```
//!
//! Flags are those of diffusers' script (`--pretrained_model_name_or_path PATH|ID`,
//! `--dataset_name PATH|ID`, `--max_train_steps N`, `--resume_from_checkpoint latest`, …), also
//! readable from a TOML file with `--config FILE`. `--preset tiny` starts from the demo settings
//! (`trainer::TrainConfig::tiny_demo`: the repository's tiny SDXL-shaped model and small dataset);
//! a `--config` file's keys override the preset, and later flags override both.

use std::path::Path;
use std::process::ExitCode;

use cli::UsageError;
use trainer::distributed::{World, launch};
use trainer::{Error, TrainConfig, Trainer};

mod cli;

const USAGE: &str = "Trains the seed recipe's SDXL LoRA with diffusers' train_dreambooth_lora_sdxl.py flags.

Usage: train_naruto [--preset tiny] [--config FILE.toml] [--FLAG VALUE ...]

  --preset <tiny>
      Start from the offline demo settings (the repository's tiny model and dataset, CPU); later flags override them (default: none, the seed recipe)
  --config <path>
      A TOML file whose keys are the flag names: its keys override the defaults or the preset, flags override it (default: none)
  -h, --help
      Print this help

Flags (`--FLAG VALUE` or `--FLAG=VALUE`; a boolean flag alone means true):";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}\n{}", TrainConfig::flags_help());
        return ExitCode::SUCCESS;
    }
    cli::finish("train_naruto", train(args))
}

/// `--preset NAME` or `--preset=NAME`, anywhere on the line, taken out of `args`.
fn take_preset(args: &mut Vec<String>) -> anyhow::Result<Option<String>> {
    let Some(i) = args
        .iter()
        .position(|a| a == "--preset" || a.starts_with("--preset="))
    else {
        return Ok(None);
    };
    let flag = args.remove(i);
    match flag.strip_prefix("--preset=") {
        Some(name) => Ok(Some(name.to_owned())),
        None if i < args.len() => Ok(Some(args.remove(i))),
        None => anyhow::bail!(UsageError("--preset needs a name (tiny)".into())),
    }
}

fn train(mut args: Vec<String>) -> anyhow::Result<()> {
    let all_args = args.clone();
    let preset = take_preset(&mut args)?;
    let parsed = match preset.as_deref() {
        None => TrainConfig::from_args(args),
        Some("tiny") => {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
            let preset = TrainConfig::tiny_demo(
                &repo.join("tests/fixtures/tiny-sdxl"),
                &repo.join("examples/data/tiny-naruto"),
                Path::new("naruto-lora-tiny"),
            );
            // Flags after the preset override it, through the same parser.
            TrainConfig::from_args_over(preset, args)
        }
        Some(other) => anyhow::bail!(UsageError(format!(
            "--preset: `{other}` is not a preset (the only one is `tiny`)"
        ))),
    };
    let config = match parsed {
        Ok(config) => config,
        // A flag or value of the command line; a --config file's problems are errors of the run.
        Err(error @ Error::InvalidOption { .. }) => anyhow::bail!(UsageError(error.to_string())),
        Err(error) => return Err(error.into()),
    };
    let world = World::from_env()?;
    if config.nproc_per_node > 1 && world == World::SINGLE && std::env::var_os("RANK").is_none() {
        return launch_ranks(&all_args, config.nproc_per_node as usize);
    }
    let output_dir = config.output_dir.clone();
    let mut trainer = Trainer::new(config)?;
    let summary = trainer.run()?;
    if !summary.main_process {
        return Ok(());
    }
    println!(
        "done: {} steps, final loss {}, {:.3} s/step{}; LoRA: {} (kohya: {}); loss plot: {}",
        summary.steps_run,
        summary
            .loss_history
            .last()
            .map_or_else(|| "n/a".into(), |(_, l)| format!("{l:.4}")),
        summary.seconds_per_step,
        summary
            .peak_memory_gib
            .map_or_else(String::new, |g| format!(", peak {g:.2} GiB")),
        summary.lora_file.display(),
        summary.kohya_file.display(),
        output_dir.join("loss.png").display(),
    );
    Ok(())
}

/// `--nproc_per_node N`: this executable N times, as torchrun would start it, output by rank.
fn launch_ranks(args: &[String], nproc: usize) -> anyhow::Result<()> {
    let program = std::env::current_exe()?;
    let forward = |rank: usize, stream: launch::Stream, line: &str| match stream {
        launch::Stream::Stdout => println!("[rank {rank}] {line}"),
        launch::Stream::Stderr => eprintln!("[rank {rank}] {line}"),
    };
    launch::launch(&program, &launch::child_args(args), nproc, &forward)?;
    Ok(())
}
