//! Unit tests of `config`.

use super::*;

fn parse(args: &[&str]) -> Result<TrainConfig> {
    TrainConfig::from_args(args.iter().map(|s| (*s).to_owned()))
}

#[test]
fn defaults_are_the_seed_recipe() {
    let c = TrainConfig::default();
    assert_eq!(
        (
            c.resolution,
            c.train_batch_size,
            c.gradient_accumulation_steps,
            c.rank
        ),
        (512, 2, 2, 4)
    );
    assert_eq!((c.max_train_steps, c.max_train_samples), (1200, Some(75)));
    assert_eq!(
        c.instance_prompt.as_deref(),
        Some("Naruto style anime character")
    );
    assert!(c.use_8bit_adam);
    assert_eq!(c.mixed_precision, MixedPrecision::Bf16);
    c.validate().unwrap();
}

#[test]
fn flags_in_both_spellings_and_switches() {
    let c = parse(&[
        "--rank=8",
        "--gradient_checkpointing",
        "--learning_rate",
        "5e-5",
        "--use_8bit_adam",
        "false",
        "--snr_gamma",
        "5",
        "--instance_prompt",
        "none",
        "--lr_scheduler",
        "cosine",
    ])
    .unwrap();
    assert_eq!(c.rank, 8);
    assert!(c.gradient_checkpointing);
    assert_eq!(c.learning_rate, 5e-5);
    assert!(!c.use_8bit_adam);
    assert_eq!(c.snr_gamma, Some(5.0));
    assert_eq!(c.instance_prompt, None);
    assert_eq!(c.lr_scheduler, SchedulerKind::Cosine);
}

#[test]
fn bad_flags_are_named() {
    let message = |args: &[&str]| parse(args).unwrap_err().to_string();
    assert!(message(&["--rnak", "4"]).contains("--rnak"));
    assert!(message(&["--rank", "four"]).contains("--rank"));
    assert!(message(&["--resolution", "500"]).contains("--resolution"));
    assert!(message(&["--mixed_precision", "fp8"]).contains("--mixed_precision"));
    assert_eq!(
        parse(&["--mixed_precision", "fp16"])
            .unwrap()
            .mixed_precision,
        MixedPrecision::Fp16
    );
    assert!(message(&["--center_crop", "false"]).contains("--cache_latents"));
    let disk = message(&["--cache_latents_to_disk", "--cache_latents", "false"]);
    assert!(disk.starts_with("--cache_latents_to_disk"), "{disk}");
    parse(&["--random_flip"]).unwrap();
    assert!(message(&["--max_train_steps"]).contains("--max_train_steps"));
    assert!(message(&["rank"]).contains("rank"));
}

#[test]
fn toml_file_then_flags() {
    let dir = std::env::temp_dir().join(format!("trainer-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("run.toml");
    std::fs::write(
        &file,
        "rank = 16\nlearning_rate = 2e-4\noutput_dir = \"out\"\n",
    )
    .unwrap();
    let c = parse(&["--rank", "8", "--config", file.to_str().unwrap()]).unwrap();
    assert_eq!((c.rank, c.learning_rate), (8, 2e-4));
    assert_eq!(c.output_dir, PathBuf::from("out"));
    // What a checkpoint records reads back the same.
    let again: TrainConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
    assert_eq!(again, c);
    // Settings cleared from a default value stay cleared through a file.
    let cleared = parse(&[
        "--instance_prompt",
        "none",
        "--variant",
        "none",
        "--max_train_samples",
        "none",
    ])
    .unwrap();
    let text = cleared.to_toml().unwrap();
    assert!(text.contains("instance_prompt = \"none\""), "{text}");
    let again: TrainConfig = toml::from_str(&text).unwrap();
    assert_eq!(again, cleared);
    assert_eq!(
        (
            again.instance_prompt,
            again.variant,
            again.max_train_samples
        ),
        (None, None, None)
    );
    let numbers: TrainConfig = toml::from_str("max_train_samples = 12").unwrap();
    assert_eq!(numbers.max_train_samples, Some(12));
    std::fs::write(&file, "rnak = 16\n").unwrap();
    let err = parse(&["--config", file.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("run.toml") && err.contains("rnak"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_every_flag_with_its_default() {
    let help = TrainConfig::flags_help();
    assert!(help.contains("--pretrained_model_name_or_path <text>"));
    assert!(help.contains("--use_8bit_adam [true|false]"));
    assert!(help.contains("(default: 1200)"));
}
