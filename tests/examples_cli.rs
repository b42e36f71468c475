//! Every example answers `--help` and `-h` with its usage (stdout, exit 0), a usage error with one line
//! `error: …` naming the flag and one line pointing at `--help` (stderr, exit 2), and an error while
//! running with one line (exit 1); never a backtrace, though `RUST_BACKTRACE=1` is set
//! (`examples/cli/mod.rs`).
//!
//! It runs the example binaries that `cargo test` builds beside the test binaries
//! (`target/<profile>/examples/<name>`); run `cargo build --examples` first when running this test
//! alone. A target folder shared by several checkouts (`CARGO_TARGET_DIR`) holds the examples of
//! whichever checkout built last.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;
use common::example_path;

use std::process::{Command, Output};

/// An example, the flags its help must list (every flag that README.md, docs/ and tools/gpu/ pass it,
/// at least) and command lines that are usage errors, each with the flag or argument its error names.
struct Example {
    name: &'static str,
    flags: &'static [&'static str],
    usage_errors: &'static [(&'static [&'static str], &'static str)],
}

const EXAMPLES: &[Example] = &[
    Example {
        name: "generate",
        flags: &[
            "--model",
            "--prompt",
            "--negative",
            "--negative_prompt",
            "--steps",
            "--guidance",
            "--guidance_scale",
            "--num_images_per_prompt",
            "--num_images",
            "--batch_size",
            "--width",
            "--height",
            "--seed",
            "--scheduler",
            "--kind",
            "--vae_fp32",
            "--tile",
            "--lora",
            "--lora_scale",
            "--compare",
            "--lora_weights",
            "--warmup",
            "--fp8",
            "--fp8_compute",
            "--channels_last",
            "--attention",
            "--out",
        ],
        usage_errors: &[
            (&["--prompt", "a fox"], "--model"),
            (&["--model", "m", "--prompt", "p", "--fp8_compute"], "--fp8"),
            (
                &["--model", "m", "--prompt", "p", "--attention", "flashy"],
                "--attention",
            ),
            (&["--model", "m"], "--prompt"),
            (
                &["--model", "m", "--prompt", "p", "--steps", "x"],
                "--steps",
            ),
            (
                &["--model", "m", "--prompt", "p", "--steps", "-1"],
                "--steps",
            ),
            (&["--model", "m", "--prompt", "p", "--kind", "f8"], "--kind"),
            (
                &["--model", "m", "--prompt", "p", "--scheduler", "x"],
                "--scheduler",
            ),
            (&["--model", "m", "--prompt", "p", "--compare"], "--compare"),
            (
                &[
                    "--model",
                    "m",
                    "--prompt",
                    "p",
                    "--lora",
                    "x.safetensors:inf",
                ],
                "--lora",
            ),
            (
                &[
                    "--model",
                    "m",
                    "--prompt",
                    "p",
                    "--negative",
                    "a",
                    "--negative",
                    "b",
                ],
                "--negative",
            ),
            (&["--model", "m", "--prompt"], "--prompt"),
        ],
    },
    Example {
        name: "inspect_weights",
        flags: &["<FILE>"],
        usage_errors: &[(&[], "<FILE>"), (&["a", "b"], "'b'")],
    },
    Example {
        name: "lora_convert",
        flags: &[
            "summary",
            "convert",
            "--to",
            "--sgm",
            "--unet",
            "--text-encoder",
            "--text-encoder-2",
            "--sdxl",
            "--resolution",
        ],
        usage_errors: &[
            (&[], "subcommand"),
            (&["frob"], "'frob'"),
            (&["convert", "in.safetensors", "out.safetensors"], "--to"),
            (&["convert", "a", "b", "--to", "onnx"], "--to"),
        ],
    },
    Example {
        name: "train_naruto",
        flags: &[
            "--preset",
            "--config",
            "--pretrained_model_name_or_path",
            "--dataset_name",
            "--resolution",
            "--train_batch_size",
            "--gradient_accumulation_steps",
            "--max_train_steps",
            "--checkpointing_steps",
            "--logging_steps",
            "--validation_prompt",
            "--output_dir",
            "--profile_step",
            "--cuda_graph",
            "--gradient_checkpointing",
            "--nproc_per_node",
        ],
        usage_errors: &[
            (&["--rank", "four"], "--rank"),
            (&["--nproc_per_node", "0"], "--nproc_per_node"),
            (&["--max_train_steps"], "--max_train_steps"),
            (&["--resolution", "500"], "--resolution"),
            (&["--preset"], "--preset"),
            (&["--preset", "huge"], "--preset"),
            (&["rank"], "rank"),
        ],
    },
    Example {
        name: "unet_fp8",
        flags: &[
            "--full", "--bf16", "--latent", "--device", "--train", "--no-fp8", "--batch", "--kind",
        ],
        usage_errors: &[
            (&["--train", "eager"], "--train"),
            (&["--latent"], "--latent"),
            (&["--device", "tpu"], "--device"),
        ],
    },
    Example {
        name: "unet_sdxl",
        flags: &["--ref", "--steps", "--attention", "--train-memory"],
        usage_errors: &[
            (&["--attention", "flashy"], "--attention"),
            (&["--train-memory", "x"], "--train-memory"),
            (&["--steps", "-1"], "--steps"),
        ],
    },
    Example {
        name: "vae_decode",
        flags: &[
            "--size",
            "--kind",
            "--untiled",
            "--runs",
            "--cudnn-benchmark",
            "--attention",
            "--profile",
        ],
        usage_errors: &[
            (&["--size", "12"], "--size"),
            (&["--kind", "q"], "--kind"),
            (&["--runs", "many"], "--runs"),
        ],
    },
    Example {
        name: "vae_text_sdxl",
        flags: &["--ref"],
        usage_errors: &[(&["--ref"], "--ref")],
    },
];

/// `target/<profile>/examples/<name>`: this test binary is `target/<profile>/deps/<name>-<hash>`.
fn run(name: &str, args: &[&str]) -> Output {
    Command::new(example_path(name))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the example starts")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_every_flag_on_stdout() {
    for example in EXAMPLES {
        for help in ["--help", "-h"] {
            let output = run(example.name, &[help]);
            let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
            assert_eq!(
                output.status.code(),
                Some(0),
                "{} {help}: {stderr}",
                example.name
            );
            assert!(
                stderr.is_empty(),
                "{} {help}: stderr {stderr}",
                example.name
            );
            assert!(
                stdout.contains(&format!("Usage: {}", example.name)),
                "{} {help}: {stdout}",
                example.name
            );
            for flag in example.flags {
                // A flag is listed as `--name <VALUE>` or `--name` then spaces or the line's end, an
                // alias as `[aliases: --name]`.
                let listed = stdout.lines().any(|line| {
                    line.split_whitespace()
                        .any(|word| word.trim_end_matches([']', ',']) == *flag)
                });
                assert!(
                    listed,
                    "{} {help} does not list {flag}:\n{stdout}",
                    example.name
                );
            }
        }
    }
}

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    for example in EXAMPLES {
        let unknown: (&[&str], &str) = (&["--no-such-flag"], "--no-such-flag");
        for (args, named) in example.usage_errors.iter().chain([&unknown]) {
            let output = run(example.name, args);
            let stderr = text(&output.stderr);
            let what = format!("{} {}", example.name, args.join(" "));
            assert_eq!(output.status.code(), Some(2), "{what}: {stderr}");
            assert!(
                output.stdout.is_empty(),
                "{what}: stdout {}",
                text(&output.stdout)
            );
            let lines: Vec<&str> = stderr.lines().collect();
            let hint = format!(" (run '{} --help' for usage)", example.name);
            assert_eq!(lines.len(), 1, "{what}: {stderr}");
            assert!(lines[0].starts_with("error: "), "{what}: {stderr}");
            assert!(
                lines[0].contains(named),
                "{what}: does not name {named}: {stderr}"
            );
            assert!(lines[0].ends_with(&hint), "{what}: {stderr}");
        }
    }
}

#[test]
fn runtime_errors_are_one_line_and_exit_1() {
    let missing = "/nonexistent/weights.safetensors";
    for (name, args) in [
        ("inspect_weights", &[missing][..]),
        ("lora_convert", &["summary", missing][..]),
    ] {
        let output = run(name, args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{name}: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(missing),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn lora_convert_writes_kohyas_sdxl_metadata() {
    let input = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lora/tiny-sdxl-diffusers.safetensors");
    let output = std::env::temp_dir().join(format!("convert-{}.safetensors", std::process::id()));
    let (input_text, output_text) = (input.display().to_string(), output.display().to_string());
    let args = ["convert", &input_text, &output_text, "--to", "kohya"];
    let result = run("lora_convert", &args);
    assert_eq!(result.status.code(), Some(0), "{}", text(&result.stderr));
    let bytes = std::fs::read(&output).unwrap();
    std::fs::remove_file(&output).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap();
    // The file adapts both text encoders: an SDXL LoRA.
    for (key, value) in [
        ("ss_base_model_version", "sdxl_base_v1-0"),
        ("ss_network_module", "networks.lora"),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
        ("modelspec.resolution", "1024x1024"),
        (
            "modelspec.title",
            output.file_stem().unwrap().to_str().unwrap(),
        ),
        ("sshs_legacy_hash", "e3b0c442"),
    ] {
        assert_eq!(metadata.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert_eq!(metadata["sshs_model_hash"].len(), 64);
}

/// `--nproc_per_node 2` starts two ranks of train_naruto with torchrun's variables; when a rank
/// fails (here both: the dataset does not exist), the launcher forwards its error prefixed by its
/// rank, stops the others and exits 1 naming it.
#[test]
fn train_naruto_launches_its_ranks_and_names_a_failing_one() {
    let output = run(
        "train_naruto",
        &[
            "--preset",
            "tiny",
            "--nproc_per_node",
            "2",
            "--dataset_name",
            "/nonexistent/dataset",
        ],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    let rank = ["0", "1"]
        .into_iter()
        .find(|r| {
            last == format!(
                "error: --nproc_per_node: rank {r} exited with status 1; stopped the other ranks"
            )
        })
        .unwrap_or_else(|| panic!("the last line names no failing rank: {stderr}"));
    let failed = format!("[rank {rank}] error: ");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&failed) && l.contains("/nonexistent/dataset")),
        "{stderr}"
    );
}

/// Under torchrun's variables, a missing one is named, and a rank whose rendezvous never
/// happens (no rank 0 hosts the store) stops within --ddp_timeout naming rank 0 (c10d's own log
/// lines of the attempts come before the error line).
#[test]
fn train_naruto_reads_torchruns_variables() {
    let torchrun = |vars: &[(&str, &str)], extra: &[&str]| {
        let mut command = Command::new(example_path("train_naruto"));
        command.args(["--preset", "tiny"]).args(extra);
        for (k, v) in vars {
            command.env(k, v);
        }
        command.output().expect("the example starts")
    };
    let output = torchrun(&[("RANK", "0"), ("WORLD_SIZE", "2")], &[]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: LOCAL_RANK: is not set"),
        "{stderr}"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port().to_string())
        .expect("a free port");
    let output = torchrun(
        &[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port),
        ],
        // 3 seconds.
        &["--ddp_timeout", "0.05"],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    // c10d logs its connection attempts above; the error is the last line.
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: process group (this is rank 1): ")
            && last.contains("rank 0's store did not answer"),
        "{stderr}"
    );
}
