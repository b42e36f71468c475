//! Data-parallel training on the CPU through c10d's Gloo backend (issue 19's acceptance), with
//! `train_naruto --preset tiny` as users run it: under the trainer's own `--nproc_per_node`
//! launcher, and as torchrun starts it (each process given `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`).
//!
//! What "the same LoRA" means here. The two runs compute the same sums in a different order: one
//! process reduces the gradient of its batch of 2 inside each weight-gradient product, two
//! processes each reduce their sample's, and the all-reduce adds the two halves (`(a + b) / 2`,
//! each addition one float32 rounding). Everything else — the plan, the draws of every row, the
//! clipping and the skip decision on the averaged gradient — is the same. A reordered float32 sum
//! of K terms differs by at most about K·u of the sum of the terms' magnitudes (u = 2⁻²⁴); the
//! tiny model's longest reductions are over a few hundred terms (batch × tokens × channels of a
//! product), so where a gradient is not itself a cancellation its relative difference is below
//! about 256·u ≈ 1.5e-5 per step, and AdamW's update (`m̂ / (√v̂ + ε)`) turns a relative gradient
//! difference into about the same relative update difference. Over N steps that is
//! `N · 1.5e-5` of the LoRA's norm: the bound on the relative L2 difference. An element whose
//! gradient cancels to within rounding of zero (the LoRA `A` matrices in the first steps, while
//! `B` is still near zero) can get an update of either sign, at most `lr` per step in AdamW's
//! first steps: the element-wise bound is `2 · lr · N`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: failing loudly is the point

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

const STEPS: u64 = 6;
const LR: f64 = 1e-3;

fn example_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lies in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: `cargo test` builds the examples; alone, run `cargo build --examples` first",
        path.display()
    );
    path
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("train-ddp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `train_naruto --preset tiny` writing into `out`, with `extra` flags.
fn command(out: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(example_path("train_naruto"));
    command
        .args([
            "--preset",
            "tiny",
            "--optimizer",
            "AdamW",
            "--validation_steps",
            "1000",
        ])
        .args(["--learning_rate", &LR.to_string()])
        .arg("--output_dir")
        .arg(out)
        .args(extra)
        .env("OMP_NUM_THREADS", "1");
    command
}

fn finished(output: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{what}: {stderr}");
    stderr
}

/// A free port from the OS (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Rank `rank` of a world of `world_size`, started as torchrun starts it.
fn spawn_rank(out: &Path, extra: &[&str], rank: usize, world_size: usize, port: u16) -> Child {
    command(out, extra)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world_size.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example starts")
}

/// The fp32 LoRA parameters of `checkpoint`, by name.
fn params(checkpoint: &Path) -> Vec<(String, Tensor)> {
    let mut named = Tensor::read_safetensors(checkpoint.join("lora_parameters.safetensors"))
        .expect("the checkpoint's parameters");
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Asserts the two LoRAs agree within the bounds of the module documentation.
fn assert_same_lora(a: &Path, b: &Path, steps: u64) {
    let (a, b) = (params(a), params(b));
    assert_eq!(a.len(), b.len());
    let flat = |named: &[(String, Tensor)]| {
        Tensor::cat(
            &named
                .iter()
                .map(|(_, t)| t.to_kind(Kind::Double).flatten(0, -1))
                .collect::<Vec<_>>(),
            0,
        )
    };
    for ((name_a, _), (name_b, _)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b);
    }
    let (fa, fb) = (flat(&a), flat(&b));
    let diff = (&fa - &fb).abs();
    let max = diff.max().double_value(&[]);
    let relative = diff.norm().double_value(&[]) / fa.norm().double_value(&[]);
    let element_bound = 2.0 * LR * steps as f64;
    let relative_bound = steps as f64 * 1.5e-5;
    assert!(
        max <= element_bound && relative <= relative_bound,
        "LoRAs differ: max |Δ| {max:e} (bound {element_bound:e}), relative L2 {relative:e} \
         (bound {relative_bound:e})"
    );
    // Not trivially equal: the runs trained.
    assert!(fa.abs().max().double_value(&[]) > 0.0);
}

fn loss_history(checkpoint: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(state["loss_history"].clone()).unwrap()
}

/// 2 processes of batch 1 (the `--nproc_per_node` launcher) end on the LoRA of 1 process of batch
/// 2, and 1 process of batch 2 resuming the 2-process run's checkpoint continues it to the same
/// LoRA: the LoRA depends on the global batch, not on the world size.
#[test]
fn two_processes_of_batch_1_train_the_one_process_batch_2_lora_and_a_resume_on_one_continues() {
    let steps = STEPS.to_string();
    let common = ["--max_train_steps", &steps, "--checkpointing_steps", "3"];
    let one = fresh_dir("one");
    let output = command(&one, &common)
        .args(["--train_batch_size", "2"])
        .output()
        .unwrap();
    finished(output, "one process of batch 2");

    let two = fresh_dir("two");
    let output = command(&two, &common)
        .args(["--train_batch_size", "1", "--nproc_per_node", "2"])
        .output()
        .unwrap();
    let stderr = finished(output, "two processes of batch 1");
    assert!(
        stderr.contains("[rank 0] [trainer] data parallel: 2 processes"),
        "{stderr}"
    );
    // Rank 0 alone tells the story and writes.
    assert!(!stderr.contains("[rank 1] [trainer]"), "{stderr}");
    let last = |dir: &Path| dir.join(format!("checkpoint-{STEPS}"));
    assert_same_lora(&last(&one), &last(&two), STEPS);
    for ((step_a, loss_a), (step_b, loss_b)) in loss_history(&last(&one))
        .iter()
        .zip(&loss_history(&last(&two)))
    {
        assert_eq!(step_a, step_b);
        assert!(
            (loss_a - loss_b).abs() <= 1e-4 * loss_a.abs(),
            "{loss_a} vs {loss_b}"
        );
    }
    let state = std::fs::read_to_string(last(&two).join("trainer_state.json")).unwrap();
    assert!(
        state.contains("\"world_size\": 2") && state.contains("\"train_batch_size\": 1"),
        "{state}"
    );

    // 2 → 1: the 2-process checkpoint-3 continued by one process of batch 2.
    let resumed = fresh_dir("resumed");
    let copied = resumed.join("checkpoint-3");
    std::fs::create_dir_all(&copied).unwrap();
    for entry in std::fs::read_dir(two.join("checkpoint-3")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copied.join(entry.file_name())).unwrap();
    }
    let output = command(&resumed, &common)
        .args([
            "--train_batch_size",
            "2",
            "--resume_from_checkpoint",
            "latest",
        ])
        .output()
        .unwrap();
    let stderr = finished(output, "the resume on one process");
    assert!(stderr.contains("resumed from"), "{stderr}");
    assert_same_lora(&last(&two), &last(&resumed), STEPS);
    assert_same_lora(&last(&one), &last(&resumed), STEPS);

    // Another global batch is refused, naming the flags.
    let output = command(&resumed, &common)
        .args([
            "--train_batch_size",
            "1",
            "--resume_from_checkpoint",
            "latest",
        ])
        .args(["--max_train_steps", "8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("global batch of 2"), "{stderr}");
    for dir in [one, two, resumed] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `kill -9` of rank 1 mid-run: rank 0 exits non-zero within 60 s naming rank 1, no checkpoint is
/// left half-written, and a resume from the last checkpoint completes.
#[test]
fn a_killed_rank_stops_the_other_naming_it_and_the_run_resumes() {
    rank_1_fails_mid_run("killed", Fault::Kill);
}

/// Rank 1 stopped (SIGSTOP: alive, answering nothing) mid-run: rank 0 exits non-zero once
/// `--ddp_timeout` (15 s here) has passed, naming rank 1; the resume completes.
#[test]
fn a_hung_rank_stops_the_other_at_the_timeout_naming_it() {
    rank_1_fails_mid_run("hung", Fault::Stop);
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    Stop,
}

fn rank_1_fails_mid_run(name: &str, fault: Fault) {
    let out = fresh_dir(name);
    let extra = ["--max_train_steps", "24", "--checkpointing_steps", "2"];
    let per_rank: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["--train_batch_size", "1", "--ddp_timeout", "0.25"])
        .collect();
    let port = free_port();
    let mut rank0 = spawn_rank(&out, &per_rank, 0, 2, port);
    let mut rank1 = spawn_rank(&out, &per_rank, 1, 2, port);
    let started = Instant::now();
    while !out.join("checkpoint-2").is_dir() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint-2 after 300 s"
        );
        if let Some(status) = rank0.try_wait().unwrap() {
            let output = rank0.wait_with_output().unwrap();
            panic!(
                "rank 0 ended early ({status}): {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match fault {
        Fault::Kill => rank1.kill().unwrap(), // SIGKILL
        Fault::Stop => {
            let stopped = Command::new("kill")
                .args(["-STOP", &rank1.id().to_string()])
                .status()
                .unwrap();
            assert!(stopped.success());
        }
    }
    let failed = Instant::now();
    loop {
        if rank0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            failed.elapsed() < Duration::from_secs(60),
            "rank 0 still runs 60 s after rank 1 failed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let waited = failed.elapsed();
    let _ = rank1.kill();
    let _ = rank1.wait();
    let output = rank0.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "rank 0 succeeded: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("rank 1"),
        "rank 0's error does not name rank 1: {stderr}"
    );
    if fault == Fault::Stop {
        // Not before the timeout: a stopped process keeps its connections open.
        assert!(waited >= Duration::from_secs(10), "{waited:?}: {stderr}");
    }
    // Only whole checkpoints: each has its trainer state; no temporary folder is left.
    let mut latest = 0;
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("checkpoint-") {
            let step: u64 = step
                .parse()
                .unwrap_or_else(|_| panic!("a stray folder {name}"));
            assert!(
                out.join(&name).join("trainer_state.json").is_file(),
                "{name}"
            );
            latest = latest.max(step);
        }
        assert!(!name.contains("tmp"), "left half-written: {name}");
    }
    assert!(latest >= 2);
    // The run resumes from the last checkpoint, on one process of batch 2, and completes.
    let mut resume = extra.to_vec();
    resume.extend([
        "--train_batch_size",
        "2",
        "--resume_from_checkpoint",
        "latest",
    ]);
    let output = command(&out, &resume).output().unwrap();
    let stderr = finished(output, "the resume");
    assert!(stderr.contains(&format!("at step {latest}")), "{stderr}");
    assert!(out.join("checkpoint-24").is_dir());
    let _ = std::fs::remove_dir_all(out);
}
