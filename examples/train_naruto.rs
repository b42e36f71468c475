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
//! (`trainer::TrainConfig::tiny_demo`: the repository's tiny SDXL-shaped model and small dataset),
//! and later flags still override them.

use std::path::Path;

use anyhow::Context;
use trainer::{TrainConfig, Trainer};

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: train_naruto [--preset tiny] [--config FILE.toml] [--flag value ...]\n\nflags:\n{}",
            TrainConfig::flags_help()
        );
        return Ok(());
    }
    let preset = match args.iter().position(|a| a == "--preset") {
        Some(i) => {
            let name = args
                .get(i + 1)
                .cloned()
                .context("--preset needs a name (tiny)")?;
            args.drain(i..i + 2);
            Some(name)
        }
        None => None,
    };
    let config = match preset.as_deref() {
        None => TrainConfig::from_args(args)?,
        Some("tiny") => {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
            let preset = TrainConfig::tiny_demo(
                &repo.join("tests/fixtures/tiny-sdxl"),
                &repo.join("examples/data/tiny-naruto"),
                Path::new("naruto-lora-tiny"),
            );
            // Flags after the preset override it, through the same parser.
            TrainConfig::from_args_over(preset, args)?
        }
        Some(other) => anyhow::bail!("--preset {other}: the only preset is `tiny`"),
    };
    let output_dir = config.output_dir.clone();
    let mut trainer = Trainer::new(config)?;
    let summary = trainer.run()?;
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
