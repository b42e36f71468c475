//! Batched sweeps (`--sweep_execution batched`) end to end on the tiny model (CPU), through
//! `sdxl-lora train --sweep`: each variant of a 4-variant sweep (another learning rate; another
//! rank and data subset; another seed and prompt; other target modules) ends within the float32
//! bound of docs/SWEEPS.md of the LoRA its own run ends with (the sequential sweep's, which
//! `tests/train_sweep.rs` holds bit-identical to its own run), and much closer to it than to another
//! variant's; a batched sweep killed after its checkpoint and resumed ends bit-identical to the
//! uninterrupted batched sweep; a variant whose loss goes non-finite stops while the others end as
//! in a batched sweep without it (within the bound, with gradient checkpointing); a DoRA variant
//! runs its micro-steps on its own (said once) and ends bit-identical to its sequential sweep's; bad
//! values of the flag and `--cuda_graph` without a CUDA device fail before any model loads, naming the
//! flag; `--profile_step` times and records the batched sweep's whole step. On CUDA (skipped without one unless
//! `SDXL_REQUIRE_CUDA=1`): a batched sweep with `--cuda_graph` captures its micro-steps and each
//! variant's optimizer step and ends within the bound of the same sweep run eagerly, in fp32 and fp16.
//!
//! Every run is a child process with one libtorch thread (`OMP_NUM_THREADS=1`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use trainer::TrainConfig;
use trainer::run::LORA_FILE;
use trainer::sweep::SWEEP_SUMMARY_FILE;

#[path = "common/training.rs"]
mod training;

#[path = "common/sweep.rs"]
mod sweep;

use sweep::{assert_success, base, command, config_file, run};
use training::{assert_bit_identical, scratch, tiny};

/// The bound of docs/SWEEPS.md ("Batched execution"): a batched variant's LoRA differs from its
/// own run's by at most this fraction of the size of its own run's update (the norm of its `B`
/// matrices, which start at zero).
const RELATIVE_BOUND: f64 = 1e-3;

/// The bound of a batched variant against its sequential sweep's under bf16 or fp16 frozen weights, in
/// units of the format's unit roundoff `u` (see `half_precision_batched_variants_stay_near_their_sequential_runs`).
const HALF_BOUND_ULPS: f64 = 100.0;

/// Four variants: another learning rate; another rank and data subset (its own latents); another
/// seed and prompt (its own embeddings); other target modules (rows with no adapter of it on the
/// feed-forward layers, and none of the others' on its own).
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

[[variant]]
name = "ff"
target_modules = "to_q,ff.net.2"
"#;

/// A LoRA file's tensors, flattened in one vector, and its `B` (up) matrices alone.
fn lora(path: &Path) -> (Tensor, Tensor) {
    let tensors = training::tensors(path);
    let flat = |keep: &dyn Fn(&str) -> bool| {
        let parts: Vec<Tensor> = tensors
            .iter()
            .filter(|(name, _)| keep(name))
            .map(|(_, t)| t.to_kind(Kind::Double).flatten(0, -1))
            .collect();
        Tensor::cat(&parts, 0)
    };
    let is_up = |name: &str| name.contains("lora_B") || name.contains("lora.up");
    (flat(&|_| true), flat(&is_up))
}

fn norm(t: &Tensor) -> f64 {
    t.norm().double_value(&[])
}

#[test]
fn batched_variants_end_within_the_bound_of_their_own_runs_and_resume_bit_identically() {
    let dir = scratch("sweep-batched");
    let sweep_file = dir.join("sweep.toml");
    std::fs::write(&sweep_file, SWEEP).unwrap();
    let sweep = sweep_file.to_str().unwrap();

    // Each variant's own run: the sequential sweep (bit-identical to it, tests/train_sweep.rs).
    let own = base(&dir.join("own"));
    let own_config = config_file(&own);
    assert_success(&run(&[
        "--config",
        own_config.to_str().unwrap(),
        "--sweep",
        sweep,
    ]));

    let whole = base(&dir.join("whole"));
    let whole_config = config_file(&whole);
    let whole_args = [
        "--config",
        whole_config.to_str().unwrap(),
        "--sweep",
        sweep,
        "--sweep_execution",
        "batched",
    ];
    let output = run(&whole_args);
    assert_success(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--sweep_execution batched"), "{stderr}");
    // Every variant shared the call: none took a micro-step on its own.
    assert!(!stderr.contains("on its own when"), "{stderr}");

    let names = ["lr-3e-3", "rank-8", "seed-7", "ff"];
    for name in names {
        let (batched, _) = lora(&whole.output_dir.join(name).join(LORA_FILE));
        let (single, single_up) = lora(&own.output_dir.join(name).join(LORA_FILE));
        let distance = norm(&(&batched - &single));
        let update = norm(&single_up);
        assert!(update > 0.0, "{name}: its run learned nothing");
        eprintln!(
            "{name}: |batched - own| = {distance:.3e}, |own update (B)| = {update:.3e}, ratio {:.3e}",
            distance / update
        );
        assert!(
            distance <= RELATIVE_BOUND * update,
            "{name}: batched differs from its own run by {distance:.3e}, more than {RELATIVE_BOUND} × {update:.3e}"
        );
    }
    // The bound can fail: another variant of the same shapes (another learning rate, another
    // seed) is far outside it.
    let (a, _) = lora(&whole.output_dir.join("lr-3e-3").join(LORA_FILE));
    let (c, _) = lora(&own.output_dir.join("seed-7").join(LORA_FILE));
    let (_, a_up) = lora(&own.output_dir.join("lr-3e-3").join(LORA_FILE));
    assert!(norm(&(&a - &c)) > 100.0 * RELATIVE_BOUND * norm(&a_up));

    // A batched sweep killed after its checkpoint at step 10, then resumed: bit-identical to the
    // uninterrupted batched sweep.
    let killed = base(&dir.join("killed"));
    let killed_config = config_file(&killed);
    let killed_args = [
        "--config",
        killed_config.to_str().unwrap(),
        "--sweep",
        sweep,
        "--sweep_execution",
        "batched",
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
    assert!(!killed.output_dir.join("checkpoint-20").exists());
    let mut resumed = killed_args.to_vec();
    resumed.extend(["--resume_from_checkpoint", "latest"]);
    let output = run(&resumed);
    assert_success(&output);
    assert!(String::from_utf8_lossy(&output.stderr).contains("resuming the sweep from step 10"));
    for name in names {
        assert_bit_identical(
            &killed.output_dir.join(name).join(LORA_FILE),
            &whole.output_dir.join(name).join(LORA_FILE),
        );
    }
}

#[test]
fn a_diverging_variant_stops_and_leaves_the_others_as_without_it() {
    let dir = scratch("sweep-batched-diverge");
    let config = |out: &str| {
        tiny(&dir.join(out))
            .with_max_train_steps(6)
            .with_gradient_accumulation_steps(2)
            .with_checkpointing_steps(6)
            .with_logging_steps(1)
            .with_max_nonfinite_steps(1)
            .with_gradient_checkpointing(true)
            .with_validation_prompt(None)
    };
    let sweep = |name: &str, text: &str, out: &TrainConfig| {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let path = config_file(out);
        run(&[
            "--config",
            path.to_str().unwrap(),
            "--sweep",
            file.to_str().unwrap(),
            "--sweep_execution",
            "batched",
        ])
    };
    let two = "[[variant]]\nname = \"fine\"\n\n[[variant]]\nname = \"rank-2\"\nrank = 2\nlora_alpha = 2\n";
    let with_boom = format!("{two}\n[[variant]]\nname = \"boom\"\nlearning_rate = 1e30\n");
    let without = config("without");
    assert_success(&sweep("two.toml", two, &without));
    let with = config("with");
    let output = sweep("three.toml", &with_boom, &with);
    assert_success(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("variant boom diverged after step"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(with.output_dir.join(SWEEP_SUMMARY_FILE)).unwrap())
            .unwrap();
    let statuses: Vec<&str> = summary["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["finished", "finished", "diverged"]);
    // It really went non-finite while it shared the others' calls.
    let metrics =
        trainer::logs::MetricsLog::read(&with.output_dir.join("boom/logs/metrics.jsonl")).unwrap();
    assert!(
        metrics
            .iter()
            .any(|r| r["skipped_steps"].as_u64().unwrap_or(0) > 0),
        "{metrics:?}"
    );
    for name in ["fine", "rank-2"] {
        let (mine, _) = lora(&with.output_dir.join(name).join(LORA_FILE));
        let (alone, alone_up) = lora(&without.output_dir.join(name).join(LORA_FILE));
        let distance = norm(&(&mine - &alone));
        assert!(mine.isfinite().all().int64_value(&[]) == 1, "{name}");
        assert!(
            distance <= RELATIVE_BOUND * norm(&alone_up),
            "{name}: {distance:.3e} from the sweep without the diverging variant"
        );
    }
}

#[test]
fn a_variant_that_cannot_share_the_call_runs_on_its_own_as_in_a_sequential_sweep() {
    let dir = scratch("sweep-batched-fallback");
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        "[[variant]]\nname = \"a\"\n\n[[variant]]\nname = \"b\"\nseed = 3\n\n\
         [[variant]]\nname = \"dora\"\nuse_dora = true\n",
    )
    .unwrap();
    let config = |out: &str| {
        tiny(&dir.join(out))
            .with_max_train_steps(4)
            .with_gradient_accumulation_steps(1)
            .with_checkpointing_steps(4)
            .with_validation_prompt(None)
    };
    let sweep = |out: &TrainConfig, execution: &str| {
        let path = config_file(out);
        let output = run(&[
            "--config",
            path.to_str().unwrap(),
            "--sweep",
            file.to_str().unwrap(),
            "--sweep_execution",
            execution,
        ]);
        assert_success(&output);
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let sequential = config("sequential");
    sweep(&sequential, "sequential");
    let batched = config("batched");
    let stderr = sweep(&batched, "batched");
    // Said once, for the DoRA variant only; the other two shared their calls.
    assert_eq!(
        stderr
            .matches("variant dora takes its micro-steps on its own when --use_dora")
            .count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches("on its own when").count(), 1, "{stderr}");
    // On its own it computes what its run computes: bit for bit.
    assert_bit_identical(
        &batched.output_dir.join("dora").join(LORA_FILE),
        &sequential.output_dir.join("dora").join(LORA_FILE),
    );
}

/// `--mixed_precision bf16` and `fp16`: the batched step runs the frozen UNet in half precision over
/// the variants' rows, each variant with its own fp32 LoRA masters (and, in fp16, its own loss
/// scaler, logged), and each variant ends near its sequential sweep's LoRA.
///
/// Error model: the half-precision kernels of a larger batch block their work differently, and every
/// activation they round to bf16 or fp16 may land on the neighbouring value (the unit roundoff u is
/// 2⁻⁸ in bf16, 2⁻¹¹ in fp16), so the gradients of the two executions differ by a few u relative, and
/// Adam's normalized update carries that into the LoRA: ‖LoRA_batched − LoRA_sequential‖ is some
/// multiple of u times the update ‖B‖. Measured on the CPU after 6 steps, under libtorch's AVX-512,
/// AVX2 and plain kernels: 13–16 u in bf16 (ratios 5.0·10⁻² to 6.4·10⁻²), 10–39 u in fp16 (4.8·10⁻³ to
/// 1.9·10⁻², the plain kernels the largest) — of one order in both formats, as rounding predicts.
/// Bound: [`HALF_BOUND_ULPS`] u, a margin of 2.5 over the largest. A variant whose rows got another
/// variant's adapters would differ by the order of its whole update (a ratio of 1, i.e. 256 u in bf16).
#[test]
fn half_precision_batched_variants_stay_near_their_sequential_runs() {
    let dir = scratch("sweep-batched-half");
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        "[[variant]]\nname = \"lr-3e-3\"\nlearning_rate = 3e-3\n\n\
         [[variant]]\nname = \"seed-7\"\nseed = 7\n",
    )
    .unwrap();
    for (precision, unit_roundoff) in [("bf16", 2f64.powi(-8)), ("fp16", 2f64.powi(-11))] {
        let bound = HALF_BOUND_ULPS * unit_roundoff;
        let config = |out: &str| {
            tiny(&dir.join(format!("{precision}-{out}")))
                .with_max_train_steps(6)
                .with_gradient_accumulation_steps(1)
                .with_checkpointing_steps(6)
                .with_logging_steps(1)
                .with_validation_prompt(None)
        };
        let sweep = |out: &TrainConfig, execution: &str| {
            let path = config_file(out);
            assert_success(&run(&[
                "--config",
                path.to_str().unwrap(),
                "--mixed_precision",
                precision,
                "--sweep",
                file.to_str().unwrap(),
                "--sweep_execution",
                execution,
            ]));
        };
        let sequential = config("sequential");
        sweep(&sequential, "sequential");
        let batched = config("batched");
        sweep(&batched, "batched");
        for name in ["lr-3e-3", "seed-7"] {
            let (a, _) = lora(&batched.output_dir.join(name).join(LORA_FILE));
            let (b, b_up) = lora(&sequential.output_dir.join(name).join(LORA_FILE));
            let (distance, update) = (norm(&(&a - &b)), norm(&b_up));
            eprintln!(
                "{precision} {name}: |batched - sequential| = {distance:.3e}, update {update:.3e}, ratio {:.3e}",
                distance / update
            );
            assert!(update > 0.0, "{precision} {name}: nothing learned");
            assert!(
                distance <= bound * update,
                "{precision} {name}: {distance:.3e} > {bound:.3e} × {update:.3e}"
            );
            if precision == "fp16" {
                let metrics = trainer::logs::jsonl::MetricsLog::read(
                    &batched.output_dir.join(name).join("logs/metrics.jsonl"),
                )
                .unwrap();
                assert_eq!(metrics.len(), 6, "{precision} {name}");
                for record in &metrics {
                    assert!(
                        record["loss_scale"].as_f64().is_some_and(|s| s > 0.0),
                        "{record}"
                    );
                }
            }
        }
        // The two variants' LoRAs lie far apart on that scale.
        let (a, a_up) = lora(&batched.output_dir.join("lr-3e-3").join(LORA_FILE));
        let (c, _) = lora(&batched.output_dir.join("seed-7").join(LORA_FILE));
        assert!(norm(&(&a - &c)) > 10.0 * bound * norm(&a_up));
    }
}

#[test]
fn bad_values_and_cuda_graphs_on_the_cpu_fail_before_any_model_loads_naming_the_flag() {
    let dir = scratch("sweep-batched-bad");
    let file = dir.join("sweep.toml");
    std::fs::write(&file, "[[variant]]\nname = \"a\"\n").unwrap();
    let out = dir.join("out");
    let common = [
        "--preset",
        "tiny",
        "--output_dir",
        out.to_str().unwrap(),
        "--sweep",
        file.to_str().unwrap(),
    ];
    let mut bad = common.to_vec();
    bad.extend(["--sweep_execution", "parallel"]);
    let output = run(&bad);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--sweep_execution") && stderr.contains("parallel"),
        "{stderr}"
    );
    // `--cuda_graph` is captured under batched execution, but only on a CUDA device: on the CPU the
    // sweep stops before anything is written, as a run of its own would (after loading) say.
    let graphs_out = dir.join("graphs");
    let graphs_config = config_file(
        &tiny(&graphs_out)
            .with_cuda_graph(true)
            .with_device("cpu".into()),
    );
    let graphs = [
        "--config",
        graphs_config.to_str().unwrap(),
        "--sweep",
        file.to_str().unwrap(),
    ];
    for execution in ["batched", "sequential"] {
        let mut args = graphs.to_vec();
        args.extend(["--sweep_execution", execution]);
        let output = run(&args);
        assert!(!output.status.success(), "{execution}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("--cuda_graph") && stderr.contains("needs a CUDA device"),
            "{execution}: {stderr}"
        );
        assert!(!stderr.contains("the UNet loaded once"), "{stderr}");
    }
    // The file's key is checked as the flag is, naming the key.
    std::fs::write(
        &file,
        "sweep_execution = \"parallel\"\n[[variant]]\nname = \"a\"\n",
    )
    .unwrap();
    let output = run(&common);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sweep_execution") && stderr.contains("parallel"),
        "{stderr}"
    );
    let output = run(&["--preset", "tiny", "--sweep_execution", "batched"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("only with --sweep"));
    for folder in [&out, &graphs_out] {
        assert!(!folder.exists(), "it started: {}", folder.display());
    }
}

/// `--profile_step N` under batched execution probes the sweep's whole step: step N timed (its
/// line names the sweep and sums both variants' model FLOPs), step N+1 recorded by libtorch's
/// profiler into the sweep's `profile/` folder; the variants still end as without it.
#[test]
fn a_profiled_batched_sweep_times_and_records_the_whole_step() {
    let dir = scratch("sweep-batched-profile");
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        "[[variant]]\nname = \"a\"\n\n[[variant]]\nname = \"b\"\nlearning_rate = 3e-3\n",
    )
    .unwrap();
    let config = base(&dir.join("out"))
        .with_max_train_steps(4)
        .with_checkpointing_steps(100)
        .with_profile_step(Some(2));
    let config_path = config_file(&config);
    let output = run(&[
        "--config",
        config_path.to_str().unwrap(),
        "--sweep",
        file.to_str().unwrap(),
        "--sweep_execution",
        "batched",
    ]);
    assert_success(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let timed = stderr
        .lines()
        .find(|l| l.contains("the sweep's step 2 (eager): the host enqueued its work"))
        .unwrap_or_else(|| panic!("no timed sweep step:\n{stderr}"));
    // The line ends with the step's model FLOPs (both variants'; the tiny model's round to 0.00).
    assert!(
        timed.contains("TFLOP per step (UNet model FLOPs)"),
        "{timed}"
    );
    let recorded = stderr
        .lines()
        .find(|l| l.contains("the sweep's step 3 (eager) recorded by the profiler"))
        .unwrap_or_else(|| panic!("no recorded sweep step:\n{stderr}"));
    let trace = dir.join("out/profile/step-3.json");
    assert!(recorded.contains(trace.to_str().unwrap()), "{recorded}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["name"].as_str().is_some_and(|n| n.contains("mm"))),
        "no matrix product in the trace of {} events",
        events.len()
    );
    // Each variant's own run would not probe in batched execution: one line per probed step.
    assert_eq!(
        stderr.matches("step 2 (eager): the host enqueued").count(),
        1,
        "{stderr}"
    );
    for name in ["a", "b"] {
        assert!(
            dir.join("out").join(name).join(LORA_FILE).exists(),
            "{name}"
        );
    }
}

/// `--cuda_graph` under batched execution on CUDA: two variants that share each micro-step's call
/// (another learning rate; another seed) and one with adapter dropout, which takes its
/// micro-steps on its own. After the warm-up steps the batched call, the dropout variant's own
/// micro-steps (two per optimizer step: accumulation 2) and each variant's optimizer step are
/// captured and replayed; each variant's LoRA ends within the file's bound of the same sweep run
/// eagerly — in fp32, and in fp16 (with gradient checkpointing) with each variant's own loss scaler
/// (logged every step), there within the half-precision bound. The captured graphs replay the eager step's kernels on the same
/// inputs (each variant's generator re-seeded before each replay), so the two executions differ at
/// most by the kernels' own run-to-run rounding.
#[test]
fn captured_batched_sweeps_end_within_the_bound_of_eager_ones_on_cuda() {
    if !test_support::cuda() {
        return;
    }
    let dir = scratch("sweep-batched-graphs");
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        "[[variant]]\nname = \"lr-3e-3\"\nlearning_rate = 3e-3\n\n\
         [[variant]]\nname = \"seed-7\"\nseed = 7\n\n\
         [[variant]]\nname = \"dropout\"\nlora_dropout = 0.1\n",
    )
    .unwrap();
    let names = ["lr-3e-3", "seed-7", "dropout"];
    // fp16 with gradient checkpointing: the batched call's checkpointed forward and recomputation
    // in the graph too.
    for (precision, bound, checkpointing) in [
        ("no", RELATIVE_BOUND, false),
        ("fp16", HALF_BOUND_ULPS * 2f64.powi(-11), true),
    ] {
        let config = |out: &str, graphs: bool| {
            tiny(&dir.join(format!("{precision}-{out}")))
                .with_device("cuda".into())
                .with_cuda_graph(graphs)
                .with_gradient_checkpointing(checkpointing)
                .with_max_train_steps(8)
                .with_gradient_accumulation_steps(2)
                .with_checkpointing_steps(8)
                .with_logging_steps(1)
                .with_validation_prompt(None)
        };
        let sweep = |out: &TrainConfig| {
            let path = config_file(out);
            let output = run(&[
                "--config",
                path.to_str().unwrap(),
                "--mixed_precision",
                precision,
                "--sweep",
                file.to_str().unwrap(),
                "--sweep_execution",
                "batched",
            ]);
            assert_success(&output);
            String::from_utf8_lossy(&output.stderr).into_owned()
        };
        let eager = config("eager", false);
        let stderr = sweep(&eager);
        assert!(!stderr.contains("as a CUDA graph"), "{stderr}");
        let captured = config("captured", true);
        let stderr = sweep(&captured);
        // The shared call and the dropout variant's own micro-steps, each micro-step index of the
        // accumulation once; every variant's optimizer step once; nothing left eager.
        for micro in 0..2 {
            assert_eq!(
                stderr
                    .matches(&format!(
                        "captured the batched micro-step of lr-3e-3, seed-7 (buckets 0, 0; micro-step {micro})"
                    ))
                    .count(),
                1,
                "{stderr}"
            );
            assert_eq!(
                stderr
                    .matches(&format!(
                        "captured variant dropout's micro-step on its own (bucket 0; micro-step {micro})"
                    ))
                    .count(),
                1,
                "{stderr}"
            );
        }
        assert_eq!(
            stderr
                .matches("captured its optimizer step as a CUDA graph")
                .count(),
            3,
            "{stderr}"
        );
        assert!(!stderr.contains("run eagerly (said once)"), "{stderr}");
        for name in names {
            let (a, _) = lora(&captured.output_dir.join(name).join(LORA_FILE));
            let (b, b_up) = lora(&eager.output_dir.join(name).join(LORA_FILE));
            let (distance, update) = (norm(&(&a - &b)), norm(&b_up));
            eprintln!(
                "{precision} {name}: |captured - eager| = {distance:.3e}, update {update:.3e}, ratio {:.3e}",
                distance / update
            );
            assert!(update > 0.0, "{precision} {name}: nothing learned");
            assert!(
                distance <= bound * update,
                "{precision} {name}: {distance:.3e} > {bound:.3e} × {update:.3e}"
            );
            let metrics = trainer::logs::jsonl::MetricsLog::read(
                &captured.output_dir.join(name).join("logs/metrics.jsonl"),
            )
            .unwrap();
            assert_eq!(metrics.len(), 8, "{precision} {name}");
            if precision == "fp16" {
                for record in &metrics {
                    assert!(
                        record["loss_scale"].as_f64().is_some_and(|s| s > 0.0),
                        "{record}"
                    );
                }
            }
        }
        // The variants' LoRAs lie far apart on that scale: the bound can fail.
        let (a, a_up) = lora(&captured.output_dir.join("lr-3e-3").join(LORA_FILE));
        let (c, _) = lora(&captured.output_dir.join("seed-7").join(LORA_FILE));
        assert!(norm(&(&a - &c)) > 10.0 * bound * norm(&a_up));
    }
}
