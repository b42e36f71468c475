//! Helpers of the sweep tests (`tests/train_sweep.rs`, `tests/train_sweep_batched.rs`): the
//! `sdxl-lora train` child process with one libtorch thread, its config file and the tiny base.
//! Included beside `common/training.rs` (`#[path]` modules of the test crate), whose `tiny` it uses.

#![allow(dead_code)] // each test binary uses some of the helpers

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use trainer::TrainConfig;

/// `sdxl-lora train ARGS` with one libtorch thread (`OMP_NUM_THREADS=1`), so that runs compared
/// bit for bit do the same arithmetic; output captured.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sdxl-lora"));
    command
        .arg("train")
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

pub fn run(args: &[&str]) -> Output {
    command(args).output().unwrap()
}

pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes `config` as a `--config` file beside its output folder.
pub fn config_file(config: &TrainConfig) -> PathBuf {
    let file = config.output_dir.with_extension("toml");
    std::fs::write(&file, config.to_toml().unwrap()).unwrap();
    file
}

/// The tiny base of the sweeps: 20 steps of one micro-step each, a checkpoint every 10.
pub fn base(out: &Path) -> TrainConfig {
    super::training::tiny(out)
        .with_max_train_steps(20)
        .with_gradient_accumulation_steps(1)
        .with_checkpointing_steps(10)
        .with_validation_prompt(None)
}
