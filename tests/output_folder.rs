//! One run per output folder (issue 24), with `train_naruto --preset tiny` as users run it: a
//! second run on a folder in use is refused naming the holder's pid while the first finishes; a
//! `kill -9` of the holder leaves its lock to the next run, which takes it over; a folder holding a
//! finished run is refused (unchanged: the same files, byte for byte) unless the run is resumed or
//! moved aside with `--overwrite_output_dir`; a resume that changes what a step means is refused
//! naming every changed flag; the temporary files of runs that died are removed at the start; a
//! run resumed after kills keeps one TensorBoard event file.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: failing loudly is the point

mod common;
use common::example_path;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const LOCK_FILE: &str = ".trainer.lock";

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("output-folder-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `train_naruto --preset tiny` (no validation images) writing into `out`, with `extra` flags.
fn command(out: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(example_path("train_naruto"));
    command
        .args(["--preset", "tiny", "--validation_prompt", "none"])
        .args(["--logging_steps", "1", "--checkpointing_steps", "2"])
        .arg("--output_dir")
        .arg(out)
        .args(extra)
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn run(out: &Path, extra: &[&str]) -> (bool, String) {
    let output = command(out, extra).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr)
}

fn succeeded(output: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{what}: {stderr}");
    stderr
}

/// Every file under `dir` (hidden ones included) with the SHA-256 of its bytes, and every folder.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(dir).unwrap().to_owned();
            if path.is_dir() {
                files.insert(relative, "folder".into());
                pending.push(path);
            } else {
                let hash = Sha256::digest(std::fs::read(&path).unwrap());
                files.insert(relative, format!("{hash:x}"));
            }
        }
    }
    files
}

/// Polls until `done` holds; panics naming `what` after two minutes or when `child` exits first.
fn wait_for(child: &mut Child, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run exited ({status}) before {what}");
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn event_files(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect()
}

#[test]
fn a_second_run_is_refused_naming_the_holder_and_a_kill_leaves_the_folder_to_a_resume() {
    let out = fresh_dir("concurrent").join("run");
    let steps = ["--max_train_steps", "30"];
    let mut first = command(&out, &steps).spawn().unwrap();
    wait_for(&mut first, "the lock", || out.join(LOCK_FILE).exists());
    // With or without resume, the folder in use is refused before anything is read or written.
    for extra in [&[][..], &["--resume_from_checkpoint", "latest"]] {
        let (ok, stderr) = run(&out, &[&steps[..], extra].concat());
        assert!(!ok, "a second run was accepted: {stderr}");
        assert!(
            stderr.contains("another training run is using it (pid ")
                && stderr.contains(&format!("pid {} on ", first.id())),
            "{stderr}"
        );
    }
    succeeded(first.wait_with_output().unwrap(), "the first run");
    assert!(!out.join(LOCK_FILE).exists(), "released at the end");
    assert!(out.join("checkpoint-30").is_dir());

    // A run killed with SIGKILL keeps its lock file but not its lock: a resume takes it over.
    let killed_dir = out.with_file_name("killed");
    let long = ["--max_train_steps", "400"];
    let mut killed = command(&killed_dir, &long).spawn().unwrap();
    wait_for(&mut killed, "checkpoint-4", || {
        killed_dir.join("checkpoint-4").is_dir()
    });
    killed.kill().unwrap();
    let pid = killed.id();
    killed.wait().unwrap();
    assert!(killed_dir.join(LOCK_FILE).exists());
    // Leftovers of failed writes, as a run that died mid-write leaves them.
    let leftovers = [
        "pytorch_lora_weights.safetensors.tmp999999",
        ".model_card.json.tmp-999999",
        "logs/.metrics.jsonl.tmp-999999",
        "loss.png.tmp",
    ];
    for name in leftovers {
        std::fs::write(killed_dir.join(name), b"half").unwrap();
    }
    std::fs::create_dir(killed_dir.join(".checkpoint-6.tmp-999999")).unwrap();
    let mut resumed = command(&killed_dir, &["--max_train_steps", "6"]);
    resumed.args(["--resume_from_checkpoint", "latest"]);
    let stderr = succeeded(resumed.output().unwrap(), "the resume");
    assert!(
        stderr.contains(&format!("the run that held it (pid {pid} on ")),
        "{stderr}"
    );
    for name in leftovers.iter().chain(&[".checkpoint-6.tmp-999999"]) {
        assert!(!killed_dir.join(name).exists(), "{name} is still there");
        assert!(
            stderr.contains(&format!(
                "removed {} left by an interrupted run",
                killed_dir.join(name).display()
            )),
            "{name}: {stderr}"
        );
    }
    assert!(!killed_dir.join(LOCK_FILE).exists());
    assert_eq!(event_files(&killed_dir).len(), 1, "one TensorBoard file");
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

#[test]
fn a_finished_folder_is_refused_unchanged_unless_resumed_or_moved_aside() {
    let root = fresh_dir("finished");
    let out = root.join("run");
    let steps = ["--max_train_steps", "4"];
    succeeded(command(&out, &steps).output().unwrap(), "the first run");
    let before = snapshot(&out);
    assert!(before.contains_key(Path::new("checkpoint-4/trainer_state.json")));

    // Again without resume, and with an empty resume: refused, the folder as it was.
    let (ok, stderr) = run(&out, &steps);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "--output_dir {}: holds another run (checkpoint-2, checkpoint-4, \
             pytorch_lora_weights.safetensors, pytorch_lora_weights_kohya.safetensors, \
             model_card.json, logs/): continue it with --resume_from_checkpoint latest, move it \
             aside with --overwrite_output_dir",
            out.display()
        )),
        "{stderr}"
    );
    assert_eq!(snapshot(&out), before);
    let (ok, stderr) = run(&out, &[&steps[..], &["--resume_from_checkpoint="]].concat());
    assert!(!ok);
    assert!(
        stderr.contains("--resume_from_checkpoint: is empty"),
        "{stderr}"
    );
    assert_eq!(snapshot(&out), before);

    // A resume that changes what a step means: every changed flag named with both values.
    let other_data = root.join("other-data");
    std::fs::create_dir(&other_data).unwrap();
    let other_data = other_data.display().to_string();
    let changed = [
        "--resume_from_checkpoint",
        "latest",
        "--max_train_steps",
        "3",
        "--gradient_accumulation_steps",
        "1",
        "--rank",
        "8",
        "--lora_alpha",
        "2",
        "--target_modules",
        "to_q,to_v",
        "--dataset_name",
        &other_data,
    ];
    let (ok, stderr) = run(&out, &changed);
    assert!(!ok);
    for part in [
        "this run changes what a step of it means".to_owned(),
        "--gradient_accumulation_steps 2 (the checkpoint's) vs 1 (this run's)".to_owned(),
        "--rank 4 (the checkpoint's) vs 8 (this run's)".to_owned(),
        "--lora_alpha unset (the checkpoint's) vs 2.0 (this run's)".to_owned(),
        "--target_modules `attn` (the checkpoint's) vs `to_q,to_v` (this run's)".to_owned(),
        format!("(the checkpoint's) vs `{other_data}` (this run's)"),
        "--max_train_steps 3 is below the checkpoint's step 4".to_owned(),
    ] {
        assert!(stderr.contains(&part), "{part} not in: {stderr}");
    }
    assert_eq!(snapshot(&out), before);

    // --overwrite_output_dir: the earlier run moves whole into previous-run-<time>/.
    let stderr = succeeded(
        command(&out, &[&steps[..], &["--overwrite_output_dir"]].concat())
            .output()
            .unwrap(),
        "the overwriting run",
    );
    let aside: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("previous-run-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(
        stderr.contains(
            "--overwrite_output_dir: moved the earlier run (checkpoint-2, checkpoint-4, "
        ) && stderr.contains(&format!("to {}", aside[0].display())),
        "{stderr}"
    );
    assert_eq!(snapshot(&aside[0]), before, "moved whole and unchanged");
    let after = snapshot(&out);
    assert!(after.contains_key(Path::new("checkpoint-4/trainer_state.json")));
    assert!(!after.contains_key(Path::new(LOCK_FILE)));
    let _ = std::fs::remove_dir_all(&root);
}
