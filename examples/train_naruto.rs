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
//! a `--config` file's keys override the preset, and later flags override both. The same command as
//! `sdxl-lora train` (`src/cli/train.rs`).

use std::process::ExitCode;

use sdxl_lora::cli::train;

mod cli;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if train::wants_help(&args) {
        println!("{}", train::help("train_naruto"));
        return ExitCode::SUCCESS;
    }
    sdxl_lora::cli::init_logging(
        sdxl_lora::cli::Verbosity::Normal,
        sdxl_lora::cli::LogFormat::Text,
    );
    cli::finish("train_naruto", train::train(args, &[]))
}
