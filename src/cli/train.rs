//! `sdxl-lora train` (and the `train_naruto` example): diffusers' `train_dreambooth_lora_sdxl.py`
//! flags, parsed by the trainer's own parser (`trainer::TrainConfig::from_args`), so that one parser
//! defines the training flags, their aliases, `--config FILE.toml` and their error messages.
//!
//! `--preset tiny` starts from the demo settings (`trainer::TrainConfig::tiny_demo`: the repository's
//! tiny SDXL-shaped model and small dataset); a `--config` file's keys override the preset, and later
//! flags override both. `--nproc_per_node N` starts this executable N times, as torchrun would.

use std::path::Path;

use trainer::config::{SweepExecution, SweepFile};
use trainer::distributed::{World, launch};
use trainer::sweep::{SWEEP_LOSS_FILE, SWEEP_SUMMARY_FILE, Sweep, VariantStatus};
use trainer::{Error, TrainConfig, Trainer};

use super::UsageError;

/// The first lines of `--help`; [`TrainConfig::flags_help`] follows, grouped by topic.
fn usage(name: &str) -> String {
    format!(
        "Trains an SDXL LoRA with diffusers' train_dreambooth_lora_sdxl.py flags.

Usage: {name} [--preset tiny] [--config FILE.toml] [--sweep FILE.toml] [--FLAG VALUE ...]

  --preset <tiny>
      Start from the offline demo settings (the repository's tiny model and dataset, CPU); later flags override them (default: none, the seed recipe)
  --config <path>
      A TOML file whose keys are the flag names: its keys override the defaults or the preset, flags override it (default: none)
  --sweep <path>
      Train the variants of a sweep file in one process on one loaded base model: its [base] keys override the preset, --config and flags override them, each [[variant]] overrides those; outputs in --output_dir/<variant name>/ (docs/SWEEPS.md) (default: none)
  --sweep_execution <sequential|batched>
      How a sweep's variants take their steps: one after another (each bit-identical to its own run), or their micro-steps in one UNet call where their inputs share a shape (equal to their own runs within float tolerance; captured as CUDA graphs with --cuda_graph; not with --profile_step); overrides the sweep file's top-level `sweep_execution` (docs/SWEEPS.md) (default: sequential)
  -h, --help
      Print this help

Flags (`--FLAG VALUE` or `--FLAG=VALUE`; a boolean flag alone means true):"
    )
}

/// The help of the command `name` (`train_naruto`, `sdxl-lora train`): the usage, then every flag.
pub fn help(name: &str) -> String {
    format!("{}\n{}", usage(name), TrainConfig::flags_help())
}

/// Whether `args` ask for the help.
pub fn wants_help(args: &[String]) -> bool {
    args.iter().any(|a| a == "--help" || a == "-h")
}

/// The run's configuration from the command line `args` (after the program and subcommand): the
/// defaults or a preset, a `--config` file, then the flags. A problem of the command line is a
/// [`UsageError`]; a `--config` file's problems are errors of the run.
pub fn config(args: Vec<String>) -> anyhow::Result<TrainConfig> {
    config_over_sweep(args, None)
}

/// [`config`] with a sweep file's `[base]` keys set over the defaults or the preset (before
/// `--config` and the flags).
pub(crate) fn config_over_sweep(
    mut args: Vec<String>,
    sweep: Option<&SweepFile>,
) -> anyhow::Result<TrainConfig> {
    let preset = super::take_flag(&mut args, "--preset", "a name (tiny)")?;
    let with_base = |start: TrainConfig| match sweep {
        Some(sweep) => sweep.base_over(start),
        None => Ok(start),
    };
    let parsed = match preset.as_deref() {
        None => with_base(TrainConfig::default())
            .and_then(|start| TrainConfig::from_args_over(start, args)),
        Some("tiny") => {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
            let preset = TrainConfig::tiny_demo(
                &repo.join("tests/fixtures/tiny-sdxl"),
                &repo.join("examples/data/tiny-naruto"),
                Path::new("naruto-lora-tiny"),
            );
            // Flags after the preset override it, through the same parser.
            with_base(preset).and_then(|start| TrainConfig::from_args_over(start, args))
        }
        Some(other) => anyhow::bail!(UsageError(format!(
            "--preset: `{other}` is not a preset (the only one is `tiny`)"
        ))),
    };
    match parsed {
        Ok(config) => Ok(config),
        Err(error @ Error::InvalidOption { .. }) => Err(UsageError(error.to_string()).into()),
        Err(error) => Err(error.into()),
    }
}

/// Trains with the command line `args`. `relaunch` is what comes before them on this executable's
/// command line (`["train"]` for `sdxl-lora`, nothing for the example): `--nproc_per_node N` starts
/// the executable again with it, once per rank.
pub fn train(mut args: Vec<String>, relaunch: &[&str]) -> anyhow::Result<()> {
    let execution = take_sweep_execution(&mut args)?;
    if let Some(path) = super::take_flag(&mut args, "--sweep", "a sweep file (TOML)")? {
        return sweep(args, Path::new(&path), execution);
    }
    if execution.is_some() {
        anyhow::bail!(UsageError(
            "--sweep_execution: only with --sweep (it says how a sweep's variants take their steps)"
                .into()
        ));
    }
    let all_args = args.clone();
    let config = config(args)?;
    let world = World::from_env()?;
    if config.nproc_per_node > 1 && world == World::SINGLE && std::env::var_os("RANK").is_none() {
        let mut child: Vec<String> = relaunch.iter().map(|s| (*s).to_owned()).collect();
        child.extend(launch::child_args(&all_args));
        return launch_ranks(&child, config.nproc_per_node as usize);
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

/// `--sweep FILE`: the variants of the sweep file trained in this process; fails only when every
/// variant failed.
fn sweep(args: Vec<String>, path: &Path, execution: Option<SweepExecution>) -> anyhow::Result<()> {
    let mut file = SweepFile::read(path)?;
    if let Some(execution) = execution {
        file = file.with_execution(execution);
    }
    let base = config_over_sweep(args, Some(&file))?;
    let output_dir = base.output_dir.clone();
    let summary = Sweep::new(base, &file)?.run()?;
    for variant in &summary.variants {
        let outcome = match &variant.status {
            VariantStatus::Finished => format!(
                "finished, final loss {}",
                variant
                    .final_loss
                    .map_or_else(|| "n/a".into(), |l| format!("{l:.4}"))
            ),
            VariantStatus::Diverged { step, .. } => format!("diverged after step {step}"),
            other => format!("{other:?}"),
        };
        println!("{}: {outcome}", variant.name);
    }
    println!(
        "done: {} variants; summary: {}; loss curves: {}",
        summary.variants.len(),
        output_dir.join(SWEEP_SUMMARY_FILE).display(),
        output_dir.join(SWEEP_LOSS_FILE).display(),
    );
    Ok(())
}

/// `--sweep_execution sequential|batched`, taken off `args` (a usage error naming the flag for
/// another value).
pub(crate) fn take_sweep_execution(
    args: &mut Vec<String>,
) -> anyhow::Result<Option<SweepExecution>> {
    match super::take_flag(args, "--sweep_execution", "`sequential` or `batched`")? {
        None => Ok(None),
        Some(value) => SweepExecution::parse(&value)
            .map(Some)
            .map_err(|e| UsageError(e.to_string()).into()),
    }
}

/// This executable `nproc` times with `args`, as torchrun would start it, output by rank.
fn launch_ranks(args: &[String], nproc: usize) -> anyhow::Result<()> {
    let program = std::env::current_exe()?;
    let forward = |rank: usize, stream: launch::Stream, line: &str| match stream {
        launch::Stream::Stdout => println!("[rank {rank}] {line}"),
        launch::Stream::Stderr => eprintln!("[rank {rank}] {line}"),
    };
    launch::launch(&program, args, nproc, &forward)?;
    Ok(())
}
