//! Sweeps end to end on the tiny model (CPU), through `sdxl-lora train --sweep`: each variant of
//! a 3-variant sweep (another learning rate, rank, seed) ends with the LoRA its own run ends with,
//! bit for bit; a sweep killed after its checkpoint and resumed ends as the uninterrupted one; a
//! variant whose loss goes non-finite stops while the other finishes; bad sweep files fail before
//! any model loads, naming the file, the table and the key.
//!
//! Every run is a child process with one libtorch thread (`OMP_NUM_THREADS=1`), so that runs
//! compared bit for bit do the same arithmetic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trainer::config::SweepFile;
use trainer::run::LORA_FILE;
use trainer::sweep::{SWEEP_LOSS_FILE, SWEEP_SUMMARY_FILE, SWEEP_VALIDATION_FILE};

#[path = "common/training.rs"]
mod training;

#[path = "common/sweep.rs"]
mod sweep;

use sweep::{assert_success, base, command, config_file, run};
use training::{assert_bit_identical, scratch, tiny};

/// Three variants that differ from the base in the learning rate, the rank (and the dataset
/// subset: their own cached latents) and the seed (and the instance prompt: their own prompt
/// embeddings, from the text encoders the sweep loads once).
const SWEEP: &str = r#"
[[variant]]
name = "lr-3e-3"
learning_rate = 3e-3

[[variant]]
name = "rank-8"
rank = 8
lora_alpha = 8
max_train_samples = 12

[[variant]]
name = "seed-7"
seed = 7
instance_prompt = "a drawing in naruto style"
"#;

#[test]
fn each_variant_ends_as_its_own_run_and_a_killed_sweep_resumes_bit_identically() {
    let dir = scratch("sweep");
    let sweep_file = dir.join("sweep.toml");
    std::fs::write(&sweep_file, SWEEP).unwrap();
    let sweep = sweep_file.to_str().unwrap();

    // The uninterrupted sweep.
    let whole = base(&dir.join("whole"));
    let whole_config = config_file(&whole);
    let output = run(&["--config", whole_config.to_str().unwrap(), "--sweep", sweep]);
    assert_success(&output);
    // The text encoders and the VAE served every variant, then were freed once.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr
            .matches("text encoders kept for the sweep's other variants")
            .count(),
        3,
        "{stderr}"
    );
    assert_eq!(
        stderr
            .matches("every variant prepared; text encoders and VAE freed")
            .count(),
        1
    );

    // Each variant's own run, with the settings the sweep gives it.
    let file = SweepFile::read(&sweep_file).unwrap();
    let variants = file.variant_configs(&whole).unwrap();
    assert_eq!(variants.len(), 3);
    for (name, config) in &variants {
        let own = config.clone().with_output_dir(dir.join("own").join(name));
        let own_file = dir.join(format!("own-{name}.toml"));
        std::fs::write(&own_file, own.to_toml().unwrap()).unwrap();
        assert_success(&run(&["--config", own_file.to_str().unwrap()]));
        // The variant's folder holds what its own run writes, and the same LoRA, bit for bit.
        let in_sweep = whole.output_dir.join(name);
        assert_bit_identical(&in_sweep.join(LORA_FILE), &own.output_dir.join(LORA_FILE));
        for file in [
            "logs/metrics.jsonl",
            "loss.png",
            "checkpoint-10",
            "checkpoint-20",
        ] {
            assert!(in_sweep.join(file).exists(), "{name}: no {file}");
        }
        let losses = |dir: &Path| {
            let metrics = trainer::logs::MetricsLog::read(&dir.join("logs/metrics.jsonl")).unwrap();
            metrics
                .iter()
                .filter_map(|r| r["loss"].as_f64())
                .collect::<Vec<_>>()
        };
        assert_eq!(losses(&in_sweep), losses(&own.output_dir), "{name}");
    }
    // The variants differ from each other (each setting matters).
    let lora = |name: &str| training::tensors(&whole.output_dir.join(name).join(LORA_FILE));
    let (a, c) = (lora("lr-3e-3"), lora("seed-7"));
    assert!(a.iter().zip(&c).any(|((_, x), (_, y))| !x.equal(y)));
    assert_ne!(lora("rank-8")[0].1.size(), a[0].1.size());
    // The sweep's own outputs.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(whole.output_dir.join(SWEEP_SUMMARY_FILE)).unwrap())
            .unwrap();
    let statuses: Vec<&str> = summary["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["finished"; 3]);
    assert!(whole.output_dir.join(SWEEP_LOSS_FILE).is_file());
    assert!(whole.output_dir.join("checkpoint-20/sweep.json").is_file());

    // A sweep killed after its checkpoint at step 10, then resumed.
    let killed = base(&dir.join("killed"));
    let killed_config = config_file(&killed);
    let killed_args = [
        "--config",
        killed_config.to_str().unwrap(),
        "--sweep",
        sweep,
    ];
    let mut child = command(&killed_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let record = killed.output_dir.join("checkpoint-10/sweep.json");
    let started = Instant::now();
    while !record.is_file() {
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended early");
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.output_dir.join("checkpoint-20").exists(),
        "the sweep was not interrupted before its end"
    );
    let mut resumed = killed_args.to_vec();
    resumed.extend(["--resume_from_checkpoint", "latest"]);
    let output = run(&resumed);
    assert_success(&output);
    assert!(String::from_utf8_lossy(&output.stderr).contains("resuming the sweep from step 10"));
    for (name, _) in &variants {
        assert_bit_identical(
            &killed.output_dir.join(name).join(LORA_FILE),
            &whole.output_dir.join(name).join(LORA_FILE),
        );
    }
}

#[test]
fn a_diverging_variant_stops_and_the_others_finish() {
    let dir = scratch("sweep-diverge");
    let sweep_file = dir.join("sweep.toml");
    // A learning rate of 1e30 sends the LoRA past any finite loss after its first step.
    std::fs::write(
        &sweep_file,
        "[[variant]]\nname = \"fine\"\n\n[[variant]]\nname = \"boom\"\nlearning_rate = 1e30\n",
    )
    .unwrap();
    let config = tiny(&dir.join("out"))
        .with_max_train_steps(6)
        .with_gradient_accumulation_steps(1)
        .with_checkpointing_steps(6)
        .with_logging_steps(1)
        .with_max_nonfinite_steps(1)
        .with_validation_inference_steps(2)
        .with_num_validation_images(1);
    let config_path = config_file(&config);
    let output = run(&[
        "--config",
        config_path.to_str().unwrap(),
        "--sweep",
        sweep_file.to_str().unwrap(),
    ]);
    assert_success(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("variant boom diverged after step"),
        "{stderr}"
    );
    let out = &config.output_dir;
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(SWEEP_SUMMARY_FILE)).unwrap()).unwrap();
    let variants = summary["variants"].as_array().unwrap();
    assert_eq!(variants[0]["status"], "finished");
    assert_eq!(variants[1]["status"], "diverged");
    assert!(
        variants[1]["error"]
            .as_str()
            .unwrap()
            .contains("non-finite"),
        "{summary}"
    );
    // Its run really went non-finite: its metrics log skipped steps.
    let metrics = trainer::logs::MetricsLog::read(&out.join("boom/logs/metrics.jsonl")).unwrap();
    assert!(
        metrics
            .iter()
            .any(|r| r["skipped_steps"].as_u64().unwrap_or(0) > 0),
        "{metrics:?}"
    );
    assert!(out.join("fine").join(LORA_FILE).is_file());
    assert!(!out.join("boom").join(LORA_FILE).exists());
    // The grid: the base model's row, then the one variant that finished.
    let grid = image::open(out.join(SWEEP_VALIDATION_FILE)).unwrap();
    // The variant's own comparison has the same two rows (base, LoRA) on the same seed.
    let own = image::open(out.join("fine/base_vs_lora.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (own.width(), own.height()));
    assert_eq!(grid.to_rgb8(), own.to_rgb8());

    // A sweep whose every variant fails exits with an error.
    std::fs::write(
        &sweep_file,
        "[[variant]]\nname = \"boom\"\nlearning_rate = 1e30\n",
    )
    .unwrap();
    let failed = tiny(&dir.join("failed"))
        .with_max_train_steps(4)
        .with_gradient_accumulation_steps(1)
        .with_logging_steps(1)
        .with_max_nonfinite_steps(1)
        .with_validation_prompt(None);
    let failed_path = config_file(&failed);
    let output = run(&[
        "--config",
        failed_path.to_str().unwrap(),
        "--sweep",
        sweep_file.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("every variant of the sweep failed"),
        "{stderr}"
    );
    assert!(failed.output_dir.join(SWEEP_SUMMARY_FILE).is_file());
}

#[test]
fn bad_sweep_files_fail_before_any_model_loads() {
    let dir = scratch("sweep-bad");
    for (text, expected) in [
        (
            "[[variant]]\nname = \"a\"\nresolution = 128\n",
            "[[variant]] 1 (`a`): `resolution` is the same for every variant",
        ),
        (
            "[[variant]]\nname = \"a\"\nlearning_rat = 1e-4\n",
            "[[variant]] 1 (`a`): `learning_rat` is not a flag",
        ),
        ("[[variant]]\nname = \"a/b\"\n", "name `a/b` may hold only"),
        (
            "[[variant]]\nname = \"a\"\n[[variant]]\nname = \"a\"\n",
            "[[variant]] 2: name `a` is taken",
        ),
    ] {
        let file = dir.join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let output = run(&[
            "--preset",
            "tiny",
            "--output_dir",
            dir.join("out").to_str().unwrap(),
            "--sweep",
            file.to_str().unwrap(),
        ]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("{}: ", file.display())) && stderr.contains(expected),
            "{text:?}: {stderr}"
        );
        assert!(!dir.join("out").exists(), "{text:?}: it started");
    }
}

#[test]
fn the_example_sweep_estimates_each_variant_and_the_whole() {
    let example = training::repo().join("examples/sweeps/tiny.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_sdxl-lora"))
        .args(["estimate", "--preset", "tiny", "--sweep"])
        .arg(&example)
        .output()
        .unwrap();
    assert_success(&output);
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].ends_with("a sweep of 3 variants"), "{text}");
    for (line, name) in lines[1..4].iter().zip(["base", "lr-3e-3", "rank-8-seed-1"]) {
        assert!(line.starts_with(&format!("  {name}: ")), "{text}");
    }
    assert!(
        lines[4].starts_with("the sweep in one process: estimated peak"),
        "{text}"
    );
}
