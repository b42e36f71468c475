//! The `sdxl-lora` binary: every subcommand answers `--help` on stdout with exit 0, a usage error is
//! an `error: …` line naming the culprit (with a suggestion for a typo) and the `--help` hint, exit 2;
//! `generate` stacks LoRAs given as `--lora FILE[:WEIGHT]`; `inspect` reads every LoRA layout; `estimate` prints the trainer's estimate without loading
//! weights; `completions` prints a script for each shell.
//!
//! Cargo builds the binary for the integration tests (`CARGO_BIN_EXE_sdxl-lora`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdxl-lora"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("sdxl-lora starts")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `sdxl-lora --quiet generate` on the tiny pipeline ("a fox", 2 steps, 64×64 px) writing `out`, with
/// `flags` after the others; asserts exit 0 and returns stdout.
fn generate_tiny(out: &std::path::Path, flags: &[&str]) -> String {
    let out_arg = out.to_string_lossy().into_owned();
    let mut args = vec![
        "--quiet",
        "generate",
        "--model",
        "tests/fixtures/tiny-sdxl",
        "--prompt",
        "a fox",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        &out_arg,
    ];
    args.extend_from_slice(flags);
    let output = run(&args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}: {}",
        out.display(),
        text(&output.stderr)
    );
    text(&output.stdout)
}

const SUBCOMMANDS: [&str; 6] = [
    "train",
    "generate",
    "convert",
    "inspect",
    "estimate",
    "completions",
];

#[test]
fn every_subcommand_answers_help() {
    let top = run(&["--help"]);
    assert_eq!(top.status.code(), Some(0), "{}", text(&top.stderr));
    let listing = text(&top.stdout);
    for sub in SUBCOMMANDS {
        assert!(
            listing.contains(sub),
            "--help does not list {sub}:\n{listing}"
        );
        for help in ["--help", "-h"] {
            let output = run(&[sub, help]);
            let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
            assert_eq!(output.status.code(), Some(0), "{sub} {help}: {stderr}");
            assert!(stderr.is_empty(), "{sub} {help}: stderr {stderr}");
            assert!(
                stdout.contains(&format!("Usage: sdxl-lora {sub}")),
                "{sub} {help}:\n{stdout}"
            );
        }
    }
    // The training flags' help is the trainer's own, grouped under the usage.
    let train = text(&run(&["train", "--help"]).stdout);
    for flag in [
        "--preset",
        "--config",
        "--pretrained_model_name_or_path",
        "--max_train_steps",
    ] {
        assert!(train.contains(flag), "train --help lacks {flag}");
    }
}

/// Usage errors: the line, the culprit it names, the hint; exit 2, nothing on stdout.
#[test]
fn usage_errors_are_one_line_and_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "subcommand"),
        (&["genrate"], "did you mean 'generate'"),
        (&["generate", "--prompt", "p"], "--model"),
        (
            &["generate", "--model", "m", "--prompt", "p", "--steps", "x"],
            "--steps",
        ),
        (
            &["generate", "--model", "m", "--prompt", "p", "--compare"],
            "--compare",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--throughput",
                "4,0",
            ],
            "--throughput",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--lora",
                "x.safetensors:nan",
            ],
            "--lora",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--lora",
                "x.safetensors:-inf",
            ],
            "--lora",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--num_images_per_prompt",
                "0",
            ],
            "--num_images_per_prompt",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--num_images",
                "0",
            ],
            "--num_images",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--num_images",
                "2",
                "--batch_size",
                "0",
            ],
            "--batch_size",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--batch_size",
                "2",
            ],
            "--batch_size",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--num_images",
                "2",
                "--num_images_per_prompt",
                "2",
            ],
            "--num_images",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--lora_weights",
                "0,1",
            ],
            "--lora_weights",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--lora",
                "x.safetensors",
                "--lora_weights",
                "0,nan",
            ],
            "--lora_weights",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--lora",
                "x.safetensors",
                "--lora_weights",
                "",
            ],
            "--lora_weights",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--lora",
                "x.safetensors",
                "--lora_weights",
                "0,1",
                "--compare",
            ],
            "--compare",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "p",
                "--lora",
                "x.safetensors",
                "--lora_weights",
                "1",
                "--throughput",
                "2",
            ],
            "--lora_weights",
        ),
        (&["convert", "a", "b", "--to", "onnx"], "--to"),
        (&["inspect"], "FILE"),
        (&["completions", "tcsh"], "tcsh"),
        (&["--log_format", "xml", "inspect", "f"], "--log_format"),
        (
            &["train", "--max_train_step", "5"],
            "did you mean `--max_train_steps`?",
        ),
        (&["train", "--preset", "huge"], "--preset"),
        (&["estimate", "--vram_gib", "lots"], "--vram_gib"),
        (&["estimate", "--preset", "tiny", "--rank", "x"], "--rank"),
    ];
    for (args, named) in cases {
        let output = run(args);
        let stderr = text(&output.stderr);
        let what = format!("sdxl-lora {}", args.join(" "));
        assert_eq!(output.status.code(), Some(2), "{what}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "{what}: stdout {}",
            text(&output.stdout)
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: {stderr}");
        assert!(lines[0].starts_with("error: "), "{what}: {stderr}");
        assert!(
            lines[0].contains(named),
            "{what}: does not name {named}: {stderr}"
        );
        assert!(
            lines[0].ends_with(" (run 'sdxl-lora --help' for usage)"),
            "{what}: {stderr}"
        );
    }
}

#[test]
fn runtime_errors_are_one_line_and_exit_1() {
    let missing = "/nonexistent/lora.safetensors";
    let output = run(&["inspect", missing]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(missing),
        "{stderr}"
    );
}

/// `inspect` on a file of each layout: the layout, the targets, the ranks and the metadata.
#[test]
fn inspect_reads_each_layout() {
    let cases = [
        (
            "comfyui-attention-kohya",
            "kohya",
            "to_k",
            "ss_network_module",
        ),
        (
            "comfyui-attention-peft",
            "peft",
            "to_k",
            "lora_adapter_metadata",
        ),
        ("tiny-sdxl-diffusers", "diffusers", "k_proj", "format"),
    ];
    for (name, layout, target, key) in cases {
        let file = format!("tests/fixtures/lora/{name}.safetensors");
        let output = run(&["inspect", &file]);
        let stdout = text(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{name}: {}",
            text(&output.stderr)
        );
        let first = stdout.lines().next().unwrap_or_default();
        assert!(
            first.contains(&format!("{layout} LoRA")),
            "{name}:\n{stdout}"
        );
        assert!(stdout.contains("  base model: "), "{name}:\n{stdout}");
        let targets = stdout
            .lines()
            .find(|l| l.starts_with("  targets: "))
            .unwrap();
        assert!(
            targets.contains(&format!("{target} ×")),
            "{name}:\n{stdout}"
        );
        assert!(stdout.contains(", rank {"), "{name}:\n{stdout}");
        assert!(
            stdout.contains(&format!("header {key} = ")),
            "{name}:\n{stdout}"
        );
    }
}

/// `estimate` of the tiny preset: the trainer's estimate line, the optimizer table, and with
/// `--vram_gib` one verdict per setting; a larger rank needs more optimizer state.
#[test]
fn estimate_prints_the_estimate_and_what_fits() {
    let report = |args: &[&str]| -> String {
        let output = run(args);
        let stdout = text(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&output.stderr)
        );
        assert!(
            stdout.contains("estimated peak GPU memory "),
            "{args:?}:\n{stdout}"
        );
        stdout
    };
    // The chosen optimizer's state, MiB.
    let state = |stdout: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with("  * AdamW8bit"))
            .unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let stdout = report(&["estimate", "--preset", "tiny", "--vram_gib", "80"]);
    let verdicts: Vec<&str> = stdout
        .lines()
        .filter(|l| l.ends_with("— fits") || l.ends_with("— does not fit"))
        .collect();
    assert_eq!(verdicts.len(), 8, "{stdout}");
    assert!(verdicts.iter().all(|l| l.ends_with("— fits")), "{stdout}");
    let large = report(&["estimate", "--preset", "tiny", "--rank", "64"]);
    // Rank 64's LoRA has 16 times rank 4's parameters, and so 16 times the state (printed to
    // 0.01 MiB: rank 4's ~0.27 MiB carries up to 2 % of rounding).
    let ratio = state(&large) / state(&stdout);
    assert!(
        (ratio - 16.0).abs() < 16.0 * 0.03,
        "{ratio}:\n{stdout}\n{large}"
    );
    // Nothing fits in a millionth of a GiB.
    let stdout = report(&["estimate", "--preset", "tiny", "--vram_gib", "0.000001"]);
    assert!(!stdout.contains("— fits"), "{stdout}");
}

#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef sdxl-lora"),
        ("fish", "complete -c sdxl-lora"),
    ] {
        let output = run(&["completions", shell]);
        let stdout = text(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{shell}: {}",
            text(&output.stderr)
        );
        assert!(stdout.contains(marker), "{shell}:\n{stdout}");
        assert!(
            stdout.contains("inspect") && stdout.contains("estimate"),
            "{shell}"
        );
    }
}

/// `--log_format json` writes the trainer's messages as JSON objects; `--quiet` silences them.
#[test]
fn log_format_and_quiet() {
    let out = std::env::temp_dir().join(format!("sdxl-lora-cli-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let out_arg = out.to_string_lossy().into_owned();
    let train = |global: &[&str]| {
        let mut args: Vec<&str> = global.to_vec();
        args.extend([
            "train",
            "--preset",
            "tiny",
            "--max_train_steps",
            "1",
            "--output_dir",
            &out_arg,
        ]);
        let output = run(&args);
        let _ = std::fs::remove_dir_all(&out);
        output
    };
    let json = train(&["--log_format", "json"]);
    let stderr = text(&json.stderr);
    assert_eq!(json.status.code(), Some(0), "{stderr}");
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["level"] == "INFO"
            && e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("[trainer] "))),
        "{stderr}"
    );
    let quiet = train(&["--quiet"]);
    let stderr = text(&quiet.stderr);
    assert_eq!(quiet.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("[trainer]"), "{stderr}");
    assert!(
        text(&quiet.stdout).starts_with("done: 1 steps"),
        "{}",
        text(&quiet.stdout)
    );
}

/// `generate --lora FILE[:WEIGHT]` twice on the tiny pipeline: one line per LoRA with its adapter name
/// and weight; a second LoRA at weight 0 gives the first alone (at `--lora_scale`) within rounding, at
/// 0.4 another image; `--compare` writes one grid of both sides.
#[test]
fn generate_stacks_loras_at_their_weights() {
    let dir = std::env::temp_dir().join(format!("sdxl-lora-cli-stack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = "tests/fixtures/lora/stacked-a.safetensors";
    let b = "tests/fixtures/lora/stacked-b.safetensors";
    let generate = |name: &str, loras: &[&str]| -> (String, Vec<u8>) {
        let out = dir.join(format!("{name}.png"));
        let stdout = generate_tiny(&out, loras);
        (stdout, std::fs::read(&out).unwrap())
    };
    let a_07 = format!("{a}:0.7");
    let (stdout, stacked) = generate("stacked", &["--lora", &a_07, "--lora", &format!("{b}:0.4")]);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains(" LoRA on ")).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(a) && lines[0].ends_with("as adapter lora0, weight 0.7"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(b) && lines[1].ends_with("as adapter lora1, weight 0.4"),
        "{stdout}"
    );
    let (_, second_off) = generate(
        "second-off",
        &["--lora", &a_07, "--lora", &format!("{b}:0")],
    );
    let (stdout, first_alone) = generate("first-alone", &["--lora", a, "--lora_scale", "0.7"]);
    assert!(stdout.contains("as adapter lora0, weight 0.7"), "{stdout}");
    // The pixels (the `parameters` chunks differ: they list the second LoRA at weight 0). With a
    // second adapter the deltas are summed in another order, so float32's last bits may move a value
    // across a rounding boundary of the 8-bit output (seen under ATEN_CPU_CAPABILITY=default): at most
    // 1 of 255, while the second LoRA at 0.4 moves pixels far more.
    let largest_difference = |a: &[u8], b: &[u8]| -> u8 {
        let (a, b) = (
            image::load_from_memory(a).unwrap().to_rgb8().into_raw(),
            image::load_from_memory(b).unwrap().to_rgb8().into_raw(),
        );
        a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
    };
    assert!(
        largest_difference(&second_off, &first_alone) <= 1,
        "a LoRA at weight 0 must change nothing beyond rounding"
    );
    let moved = largest_difference(&stacked, &second_off);
    assert!(moved > 8, "the second LoRA's weight must matter: {moved}");
    let (stdout, grid) = generate(
        "grid",
        &["--lora", &a_07, "--lora", &format!("{b}:0.4"), "--compare"],
    );
    assert!(stdout.contains("(base left, LoRAs right)"), "{stdout}");
    let grid = image::load_from_memory(&grid).unwrap().to_rgb8();
    // Labelled as the --lora_weights grid: "base" and "LoRA" above, "seed 0" left (6 glyphs of 6 px
    // and 2 px margins); the right cell is the stacked image, the left one the base model's.
    let (left, top) = (6 * 6 + 4, 9 + 4);
    assert_eq!(grid.dimensions(), (left + 2 * 64, top + 64));
    let cell =
        |column: u32| image::imageops::crop_imm(&grid, left + 64 * column, top, 64, 64).to_image();
    let pixels = |png: &[u8]| image::load_from_memory(png).unwrap().to_rgb8();
    assert_eq!(
        cell(1),
        pixels(&stacked),
        "the LoRA side is the stacked image"
    );
    let (_, base) = generate("base", &[]);
    assert_eq!(
        cell(0),
        pixels(&base),
        "the base side is the base model's image"
    );
    let (_, parameters) = png_of(&dir.join("grid.png"));
    assert!(
        parameters.contains(", Script: X/Y/Z plot, X Type: LoRA weight, X Values: \"0, 1\", ")
            && parameters.contains("Lora hashes: "),
        "{parameters}"
    );
    // Two images of one seed: a row each, told apart by their place in the batch ("seed 0 #0",
    // "seed 0 #1": 9 glyphs).
    let (_, pair) = generate(
        "pair",
        &["--lora", a, "--compare", "--num_images_per_prompt", "2"],
    );
    let pair = pixels(&pair);
    let left = 9 * 6 + 4;
    assert_eq!(pair.dimensions(), (left + 2 * 64, top + 2 * 64));
    let label = |row: u32| image::imageops::crop_imm(&pair, 0, top + 64 * row, left, 64).to_image();
    assert_ne!(label(0), label(1), "the two rows' labels must differ");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// diffusers' spellings `--negative_prompt` and `--guidance_scale` give what `--negative` and
/// `--guidance` give; `--num_images_per_prompt 2` writes two different images.
#[test]
fn generate_takes_diffusers_flag_spellings_and_images_per_prompt() {
    let dir = std::env::temp_dir().join(format!("sdxl-lora-cli-spell-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let generate = |name: &str, flags: [&str; 2]| -> Vec<Vec<u8>> {
        let out = dir.join(format!("{name}.png"));
        let spelled = [
            flags[0],
            "blurry",
            flags[1],
            "3",
            "--num_images_per_prompt",
            "2",
        ];
        generate_tiny(&out, &spelled);
        (0..2)
            .map(|i| std::fs::read(dir.join(format!("{name}-{i}.png"))).unwrap())
            .collect()
    };
    let ours = generate("ours", ["--negative", "--guidance"]);
    let diffusers = generate("diffusers", ["--negative_prompt", "--guidance_scale"]);
    assert_eq!(ours, diffusers);
    assert_ne!(ours[0], ours[1], "each image has its own noise");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generate_throughput_mode_times_each_batch_and_writes_nothing() {
    let dir = std::env::temp_dir().join(format!("sdxl-lora-cli-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("never.png");
    let stdout = generate_tiny(&out, &["--fp8", "--throughput", "1,3"]);
    // --fp8 reports both kinds of layer, then one line per batch size.
    assert!(
        stdout.contains("UNet linear layers: fp8 base weights: 213 layers quantized"),
        "{stdout}"
    );
    assert!(
        stdout.contains("UNet convolutions: fp8 base weights: 50 layers quantized"),
        "{stdout}"
    );
    let batches: Vec<&str> = stdout.lines().filter(|l| l.starts_with("batch ")).collect();
    assert_eq!(batches.len(), 2, "{stdout}");
    assert!(
        batches[0].starts_with("batch 1: 1 image(s) 64x64 px"),
        "{stdout}"
    );
    assert!(
        batches[1].starts_with("batch 3: 3 image(s) 64x64 px"),
        "{stdout}"
    );
    assert!(
        batches.iter().all(|l| l.contains(" images/s, ")),
        "{stdout}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each PNG carries A1111's generation parameters in its `parameters` text chunk: the prompt with the
/// LoRA's tag, the negative prompt, the settings, and the LoRA's data hash.
#[test]
fn generate_writes_a1111_parameters_into_each_png() {
    use sha2::Digest;
    let dir = std::env::temp_dir().join(format!("sdxl-lora-cli-infotext-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("fox.png");
    let lora = "tests/fixtures/lora/tiny-sdxl-diffusers.safetensors";
    let lora_arg = format!("{lora}:0.5");
    generate_tiny(
        &out,
        &["--negative_prompt", "blurry, dark", "--lora", &lora_arg],
    );
    let bytes = std::fs::read(lora).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let hash: String = sha2::Sha256::digest(&bytes[8 + header..])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
    let reader = decoder.read_info().unwrap();
    let chunks: Vec<(String, String)> = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    let expected = format!(
        "a fox <lora:tiny-sdxl-diffusers:0.5>\nNegative prompt: blurry, dark\nSteps: 2, Sampler: Euler, \
         CFG scale: 5.0, Seed: 0, Size: 64x64, Model: tiny-sdxl, Lora hashes: \"tiny-sdxl-diffusers: {}\", \
         Version: sdxl-lora {}",
        &hash[..12],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(chunks, [("parameters".to_owned(), expected)]);
    // The image itself decodes as before.
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (64, 64));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--seed 1,2` generates every prompt once per seed, numbered in seed order, each PNG naming its seed,
/// each image the one a run with that seed alone gives; the load time is its own line.
#[test]
fn generate_makes_one_image_per_seed() {
    let dir = std::env::temp_dir().join(format!("sdxl-lora-cli-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let generate = |name: &str, seeds: &str| -> String {
        generate_tiny(&dir.join(format!("{name}.png")), &["--seed", seeds])
    };
    let stdout = generate("both", "1,2");
    assert!(
        stdout.starts_with("loaded tests/fixtures/tiny-sdxl in "),
        "{stdout}"
    );
    assert!(stdout.contains("generate (seed 1): 1 image(s)"), "{stdout}");
    assert!(stdout.contains("generate (seed 2): 1 image(s)"), "{stdout}");
    generate("alone", "2");
    let png = |name: &str| {
        let file = std::fs::File::open(dir.join(name)).unwrap();
        let reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let parameters = reader.info().uncompressed_latin1_text[0].text.clone();
        let pixels = image::open(dir.join(name)).unwrap().to_rgb8().into_raw();
        (parameters, pixels)
    };
    let (first, first_pixels) = png("both-0.png");
    let (second, second_pixels) = png("both-1.png");
    let (alone, alone_pixels) = png("alone.png");
    assert!(first.contains(", Seed: 1, "), "{first}");
    assert!(second.contains(", Seed: 2, "), "{second}");
    assert_eq!(second, alone);
    assert_eq!(second_pixels, alone_pixels);
    assert_ne!(first_pixels, second_pixels);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A PNG's pixels and its `parameters` chunk.
fn png_of(path: &std::path::Path) -> (image::RgbImage, String) {
    let file = std::fs::File::open(path).unwrap();
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let parameters = reader.info().uncompressed_latin1_text[0].text.clone();
    (image::open(path).unwrap().to_rgb8(), parameters)
}

/// `--lora_weights 0,0.5` with two seeds: one PNG, a header row of labels over a column per weight, a
/// label column left of a row per seed; the weight-0 cell is the base model's image, the 0.5 cell the
/// image of `--lora FILE:0.5` alone; the `parameters` chunk describes the plot.
#[test]
fn generate_lora_weights_writes_one_labelled_grid() {
    let dir = std::env::temp_dir().join(format!("sdxl-lora-cli-xy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lora = "tests/fixtures/lora/tiny-sdxl-diffusers.safetensors";
    let grid_path = dir.join("grid.png");
    let stdout = generate_tiny(
        &grid_path,
        &["--seed", "1,2", "--lora", lora, "--lora_weights", "0,0.5"],
    );
    assert!(stdout.contains("(2 row(s) x 2 LoRA weight(s))"), "{stdout}");
    assert_eq!(
        stdout.matches(" LoRA on ").count(),
        1,
        "loaded once: {stdout}"
    );
    let (grid, parameters) = png_of(&grid_path);
    // The label column fits "seed 1" (6 glyphs of 6 px, 2 px margins); the header is one 9 px line.
    let (left, top) = (6 * 6 + 4, 9 + 4);
    assert_eq!(grid.dimensions(), (left + 2 * 64, top + 2 * 64));
    let cell = |row: u32, column: u32| {
        image::imageops::crop_imm(&grid, left + 64 * column, top + 64 * row, 64, 64).to_image()
    };
    let ink = |x0: u32, y0: u32, w: u32, h: u32| {
        (x0..x0 + w)
            .flat_map(|x| (y0..y0 + h).map(move |y| (x, y)))
            .filter(|&(x, y)| grid.get_pixel(x, y).0 == [0, 0, 0])
            .count()
    };
    assert!(ink(left, 0, 64, top) > 10, "the first column's label");
    assert!(ink(left + 64, 0, 64, top) > 10, "the second column's label");
    assert!(ink(0, top, left, 64) > 10, "the first row's label");
    assert!(ink(0, top + 64, left, 64) > 10, "the second row's label");
    let (base, _) = png_of(&{
        let path = dir.join("base.png");
        generate_tiny(&path, &["--seed", "2"]);
        path
    });
    assert_eq!(cell(1, 0), base, "weight 0 is the base model");
    let (half, _) = png_of(&{
        let path = dir.join("half.png");
        generate_tiny(&path, &["--seed", "1", "--lora", &format!("{lora}:0.5")]);
        path
    });
    assert_eq!(cell(0, 1), half, "weight 0.5 is --lora FILE:0.5");
    assert_ne!(cell(0, 1), cell(0, 0));
    assert_ne!(cell(0, 0), cell(1, 0));
    assert!(
        parameters.starts_with("a fox <lora:tiny-sdxl-diffusers:1>\n"),
        "{parameters}"
    );
    assert!(
        parameters.contains(
            ", Seed: 1, Size: 64x64, Model: tiny-sdxl, Lora hashes: \"tiny-sdxl-diffusers: "
        ) && parameters.contains(
            ", Script: X/Y/Z plot, X Type: LoRA weight, X Values: \"0, 0.5\", Y Type: Seed, \
             Y Values: \"1, 2\", Version: "
        ),
        "{parameters}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--num_images 3` gives the same images whatever `--batch_size` (here with an ancestral sampler,
/// whose step noise is drawn per image too) up to float32 rounding (1/255 in under 1% of the values),
/// image j being exactly the one `--seed` + j alone gives.
#[test]
fn generate_num_images_do_not_depend_on_batch_size() {
    let dir = std::env::temp_dir().join(format!("sdxl-lora-cli-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let generate = |name: &str, flags: &[&str]| -> String {
        let mut all = vec!["--scheduler", "euler_a"];
        all.extend_from_slice(flags);
        generate_tiny(&dir.join(format!("{name}.png")), &all)
    };
    let stdout = generate(
        "one",
        &["--seed", "5", "--num_images", "3", "--batch_size", "1"],
    );
    assert_eq!(stdout.matches(" 1 image(s) ").count(), 3, "{stdout}");
    let stdout = generate(
        "three",
        &["--seed", "5", "--num_images", "3", "--batch_size", "3"],
    );
    assert!(
        stdout.contains("generate (seeds 5-7): 3 image(s)"),
        "{stdout}"
    );
    generate("alone", &["--seed", "6"]);
    let mut images = Vec::new();
    for i in 0..3 {
        let (one, one_parameters) = png_of(&dir.join(format!("one-{i}.png")));
        let (three, three_parameters) = png_of(&dir.join(format!("three-{i}.png")));
        let differences: Vec<u8> = one
            .as_raw()
            .iter()
            .zip(three.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let largest = differences.iter().max().copied().unwrap_or(0);
        let count = differences.iter().filter(|&&d| d > 0).count();
        // The same noise; float32 kernels block a batch of 3 differently from a batch of 1, so the
        // last bits may move a value across an 8-bit rounding boundary: at most 1 of 255, rarely.
        assert!(
            largest <= 1 && count * 100 <= differences.len(),
            "image {i}: {count} values differ, by up to {largest}"
        );
        let seed = format!(", Seed: {}, ", 5 + i);
        assert!(one_parameters.contains(&seed), "{one_parameters}");
        assert!(three_parameters.contains(&seed), "{three_parameters}");
        assert!(
            three_parameters.contains(&format!("Batch size: 3, Batch pos: {i}")),
            "{three_parameters}"
        );
        images.push(one);
    }
    assert_ne!(images[0], images[1]);
    let (alone, _) = png_of(&dir.join("alone.png"));
    assert_eq!(images[1], alone, "image 1 is seed 6's");
    // --warmup warms both shapes of batches of 2 for 3 images: 2, and the last batch's 1.
    let stdout = generate(
        "warm",
        &["--num_images", "3", "--batch_size", "2", "--warmup"],
    );
    assert!(
        stdout.contains("warm-up: 2 image(s)")
            && stdout.contains("warm-up (last batch of 1): 1 image(s)"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
