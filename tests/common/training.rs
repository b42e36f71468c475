//! Training runs in child processes for the end-to-end tests: every run re-runs the test binary on
//! its ignored test `training::training_child`, so each run has a process of its own (its logging,
//! its thread count) and can be killed. (Runs draw from generators of their own, so in-process runs
//! are independent too: `tests/train_concurrent.rs`.)

#![allow(dead_code)] // each test binary uses some of the helpers

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tch::Tensor;
use trainer::TrainConfig;
use trainer::logs::jsonl::MetricsLog;

const CHILD_CONFIG: &str = "TRAIN_TINY_CHILD_CONFIG";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path under `tests/fixtures`, which must exist: a missing fixture fails the test naming it.
pub fn fixture(name: &str) -> PathBuf {
    let path = repo().join("tests/fixtures").join(name);
    assert!(
        path.exists(),
        "missing fixture {}: regenerate it with `tools/fixtures/regenerate.sh --only tiny_sdxl`",
        path.display()
    );
    path
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdxl-train-tiny-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn tiny(output_dir: &Path) -> TrainConfig {
    TrainConfig::tiny_demo(
        &fixture("tiny-sdxl"),
        &repo().join("examples/data/tiny-naruto"),
        output_dir,
    )
}

/// Runs one training process to the end of its config (resuming from the latest checkpoint).
#[test]
#[ignore = "the child process of the tests below; it trains only when they start it"]
fn training_child() {
    let path = std::env::var(CHILD_CONFIG).expect("started by a test of this file with a config");
    // One thread: identical arithmetic in every process of a comparison, and no oversubscription.
    tch::set_num_threads(1);
    // The trainer's story on stderr, as `sdxl-lora train` prints it.
    sdxl_lora::cli::init_logging(
        sdxl_lora::cli::Verbosity::Normal,
        sdxl_lora::cli::LogFormat::Text,
    );
    let config = TrainConfig::from_toml_file(Path::new(&path)).unwrap();
    // The error as a user sees it (Display), for the tests that expect a run to stop.
    if let Err(error) = trainer::Trainer::new(config).and_then(|mut trainer| trainer.run()) {
        eprintln!("error: {error}");
        std::process::exit(3);
    }
}

pub fn spawn(config: &TrainConfig, slow_checkpoints: bool) -> Child {
    let file = config.output_dir.with_extension("toml");
    std::fs::write(&file, config.to_toml().unwrap()).unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--ignored",
            "--exact",
            "training::training_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_CONFIG, &file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if slow_checkpoints {
        command.env("TRAINER_TEST_SLOW_CHECKPOINT_MS", "150");
    }
    command.spawn().unwrap()
}

/// The logged loss of every step of a finished run.
pub fn losses(config: &TrainConfig) -> Vec<f64> {
    let metrics = MetricsLog::read(&config.output_dir.join("logs/metrics.jsonl")).unwrap();
    metrics.iter().filter_map(|r| r["loss"].as_f64()).collect()
}

/// Runs one training process; returns whether it succeeded and its stderr.
pub fn run_output(config: &TrainConfig) -> (bool, String) {
    let output = spawn(config, false).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr)
}

pub fn run_to_end(config: &TrainConfig) {
    let output = spawn(config, false).wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "training failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut named = Tensor::read_safetensors(path).unwrap();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

pub fn assert_bit_identical(a: &Path, b: &Path) {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.len(), b.len());
    for ((name_a, ta), (name_b, tb)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b);
        assert!(ta.equal(tb), "{name_a} differs");
    }
}
