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
    assert_eq!(c.optimizer_kind().unwrap(), OptimizerKind::AdamW8bit);
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
    assert_eq!(c.use_8bit_adam, Some(false));
    assert_eq!(c.optimizer_kind().unwrap(), OptimizerKind::AdamW);
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
    let gradients = message(&["--fp8_gradients", "--fp8_base_weights"]);
    assert!(
        gradients.starts_with("--fp8_gradients") && gradients.contains("--fp8_compute"),
        "{gradients}"
    );
    let fp8 = message(&["--fp8_compute"]);
    assert!(
        fp8.starts_with("--fp8_compute") && fp8.contains("--fp8_base_weights"),
        "{fp8}"
    );
    let fp32 = message(&[
        "--fp8_compute",
        "--fp8_base_weights",
        "--mixed_precision",
        "no",
    ]);
    assert!(
        fp32.starts_with("--fp8_compute") && fp32.contains("bf16 or fp16"),
        "{fp32}"
    );
    assert!(
        parse(&[
            "--fp8_compute",
            "--fp8_base_weights",
            "--mixed_precision",
            "fp16"
        ])
        .unwrap()
        .fp8_compute
    );
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
    // One line, naming where (the parser's own text draws the line over several).
    assert!(
        !err.contains('\n') && err.contains("line 1, column 1 (`rnak = 16`)"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_every_flag_with_its_default() {
    let help = TrainConfig::flags_help();
    assert!(help.contains("--pretrained_model_name_or_path <text>"));
    assert!(help.contains("--use_8bit_adam [true|false]"));
    assert!(help.contains("--optimizer <AdamW|AdamW8bit|Prodigy|Adafactor|Lion|Lion8bit>"));
    assert!(help.contains("(default: 1200)"));
}

#[test]
fn optimizer_flags_choose_the_optimizer_as_diffusers_and_kohya_spell_it() {
    let kind = |args: &[&str]| parse(args).unwrap().optimizer_kind().unwrap();
    assert_eq!(kind(&[]), OptimizerKind::AdamW8bit);
    assert_eq!(kind(&["--use_8bit_adam"]), OptimizerKind::AdamW8bit);
    assert_eq!(kind(&["--optimizer", "AdamW"]), OptimizerKind::AdamW);
    assert_eq!(
        kind(&["--optimizer", "AdamW", "--use_8bit_adam"]),
        OptimizerKind::AdamW8bit
    );
    assert_eq!(kind(&["--optimizer=adamw8bit"]), OptimizerKind::AdamW8bit);
    assert_eq!(
        kind(&["--optimizer_type", "Prodigy", "--learning_rate", "1"]),
        OptimizerKind::Prodigy
    );
    assert_eq!(kind(&["--optimizer", "LION"]), OptimizerKind::Lion);
    assert_eq!(
        kind(&["--optimizer", "adafactor"]),
        OptimizerKind::Adafactor
    );
    let message = |args: &[&str]| parse(args).unwrap_err().to_string();
    let err = message(&["--optimizer", "prodigy", "--use_8bit_adam", "true"]);
    assert!(
        err.contains("--use_8bit_adam") && err.contains("Prodigy"),
        "{err}"
    );
    let err = message(&["--optimizer", "AdamW8bit", "--use_8bit_adam=false"]);
    assert!(
        err.contains("--use_8bit_adam") && err.contains("AdamW8bit"),
        "{err}"
    );
    assert_eq!(kind(&["--optimizer", "lion8bit"]), OptimizerKind::Lion8bit);
    let err = message(&["--optimizer", "lion4bit"]);
    assert!(
        err.contains("--optimizer") && err.contains("lion4bit") && err.contains("Lion8bit"),
        "{err}"
    );
    let err = message(&["--prodigy_d_coef", "2"]);
    assert!(
        err.contains("--prodigy_d_coef") && err.contains("AdamW8bit"),
        "{err}"
    );
    let err = message(&["--optimizer", "lion", "--adafactor_relative_step=false"]);
    assert!(err.contains("--adafactor_relative_step"), "{err}");
    let err = message(&["--optimizer", "adafactor", "--lr_scheduler", "cosine"]);
    assert!(
        err.contains("--adafactor_relative_step") && err.contains("Cosine"),
        "{err}"
    );
    let err = message(&["--optimizer", "prodigy", "--prodigy_beta3", "1.5"]);
    assert!(err.contains("beta3"), "{err}");
    let err = message(&["--adam_beta2", "1"]);
    assert!(err.contains("--adam_beta2"), "{err}");
    // In a TOML file too, under kohya's name, in any case.
    let c: TrainConfig = toml::from_str("optimizer_type = \"prodigy\"").unwrap();
    assert_eq!(c.optimizer, Some(OptimizerKind::Prodigy));
    let c: TrainConfig = toml::from_str("optimizer = \"Lion\"").unwrap();
    assert_eq!(
        toml::from_str::<TrainConfig>(&c.to_toml().unwrap()).unwrap(),
        c
    );
}

#[test]
fn each_optimizer_takes_its_flags_and_learning_rates() {
    use optim8bit::OptimizerConfig;
    let setup = |args: &[&str]| parse(args).unwrap().optimizer_setup().unwrap();
    // Lion: lion-pytorch's β₂ unless --adam_beta2 is given.
    match setup(&["--optimizer", "lion"]).config {
        OptimizerConfig::Lion(c) => assert_eq!((c.beta1, c.beta2), (0.9, 0.99)),
        other => panic!("{other:?}"),
    }
    match setup(&["--optimizer", "lion", "--adam_beta2", "0.98"]).config {
        OptimizerConfig::Lion(c) => assert_eq!(c.beta2, 0.98),
        other => panic!("{other:?}"),
    }
    match setup(&["--adam_beta1", "0.8"]).config {
        OptimizerConfig::AdamW(c) => assert_eq!((c.beta1, c.beta2), (0.8, 0.999)),
        other => panic!("{other:?}"),
    }
    // Prodigy: diffusers' defaults and flags; one rate for the text encoders too.
    let p = setup(&[
        "--optimizer=prodigy",
        "--learning_rate=1",
        "--prodigy_d_coef=2",
        "--prodigy_safeguard_warmup=false",
        "--prodigy_beta3=0.9",
        "--train_text_encoder",
    ]);
    match p.config {
        OptimizerConfig::Prodigy(c) => {
            assert_eq!((c.d_coef, c.beta3, c.eps), (2.0, Some(0.9), 1e-8));
            assert!(c.decouple && c.use_bias_correction && !c.safeguard_warmup);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((p.unet_lr, p.text_encoder_lr), (1.0, 1.0));
    // Adafactor: transformers' relative step by default (rates 0), a fixed rate without it.
    let a = setup(&["--optimizer=adafactor"]);
    assert_eq!((a.unet_lr, a.text_encoder_lr), (0.0, 0.0));
    let a = setup(&[
        "--optimizer=adafactor",
        "--adafactor_relative_step=false",
        "--adafactor_scale_parameter=false",
        "--lr_scheduler=cosine",
    ]);
    assert_eq!(a.unet_lr, 1e-4);
    match a.config {
        OptimizerConfig::Adafactor(c) => {
            assert!(!c.relative_step && !c.scale_parameter && !c.warmup_init);
        }
        other => panic!("{other:?}"),
    }
    let notes = parse(&["--optimizer=prodigy"]).unwrap().optimizer_notes();
    assert!(notes[0].contains("1.0"), "{notes:?}");
}

#[test]
fn optimizer_args_take_several_words_as_kohya_passes_them() {
    use optim8bit::OptimizerConfig;
    let c = parse(&[
        "--optimizer_type",
        "Adafactor",
        "--optimizer_args",
        "relative_step=False",
        "scale_parameter=False",
        "warmup_init=False",
        "--lr_scheduler",
        "cosine",
    ])
    .unwrap();
    let setup = c.optimizer_setup().unwrap();
    match setup.config {
        OptimizerConfig::Adafactor(a) => assert!(!a.relative_step && !a.scale_parameter),
        other => panic!("{other:?}"),
    }
    assert_eq!(setup.unet_lr, 1e-4);
    assert_eq!(c.lr_scheduler, SchedulerKind::Cosine);
    let err = parse(&["--optimizer", "lion", "--optimizer_args", "d_coef=2"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--optimizer_args") && err.contains("d_coef"),
        "{err}"
    );
}

#[test]
fn a_preset_then_the_config_file_then_flags() {
    let dir = std::env::temp_dir().join(format!("trainer-preset-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("run.toml");
    std::fs::write(&file, "learning_rate = 0.5\noptimizer_type = \"Prodigy\"\n").unwrap();
    let preset = TrainConfig::tiny_demo(Path::new("model"), Path::new("data"), Path::new("out"));
    let args = ["--config", file.to_str().unwrap(), "--seed", "3"];
    let c =
        TrainConfig::from_args_over(preset.clone(), args.iter().map(|s| (*s).to_owned())).unwrap();
    // The preset's settings the file leaves out stay; the file's keys and the flags override.
    assert_eq!((c.resolution, c.max_train_samples), (64, None));
    assert_eq!(c.pretrained_model_name_or_path, "model");
    assert_eq!(c.learning_rate, 0.5);
    assert_eq!(c.optimizer, Some(OptimizerKind::Prodigy));
    assert_eq!(c.seed, 3);
    assert_eq!(
        TrainConfig {
            learning_rate: 0.5,
            optimizer: Some(OptimizerKind::Prodigy),
            seed: 3,
            ..preset.clone()
        },
        c
    );
    // The file's mistakes are still named with the file.
    std::fs::write(&file, "rnak = 16\n").unwrap();
    let err = TrainConfig::from_args_over(preset, args.iter().map(|s| (*s).to_owned()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("run.toml") && err.contains("rnak"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn settings_that_failed_late_are_refused_naming_their_flag() {
    let message = |args: &[&str]| parse(args).unwrap_err().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--num_validation_images", "0"], "--num_validation_images"),
        (
            &["--validation_inference_steps", "0"],
            "--validation_inference_steps",
        ),
        (
            &["--validation_guidance_scale", "inf"],
            "--validation_guidance_scale",
        ),
        (
            &["--validation_guidance_scale", "nan"],
            "--validation_guidance_scale",
        ),
        (
            &["--validation_guidance_scale", "-inf"],
            "--validation_guidance_scale",
        ),
        (&["--caption_dropout_rate", "1.5"], "--caption_dropout_rate"),
        (&["--caption_dropout_rate", "nan"], "--caption_dropout_rate"),
        (
            &["--caption_tag_dropout_rate", "-0.1"],
            "--caption_tag_dropout_rate",
        ),
        (&["--resolution", "10000000"], "--resolution"),
        (&["--resolution", "8200"], "--resolution"),
        (
            &["--enable_bucket", "--max_bucket_reso", "100000"],
            "--max_bucket_reso",
        ),
        (
            &[
                "--enable_bucket",
                "--min_bucket_reso",
                "2048",
                "--max_bucket_reso",
                "1024",
            ],
            "--min_bucket_reso",
        ),
        (&["--bucket_reso_steps", "0"], "--bucket_reso_steps"),
        (
            &["--dataloader_num_workers", "100000"],
            "--dataloader_num_workers",
        ),
        (
            &["--lr_scheduler", "polynomial", "--lr_power", "nan"],
            "--lr_power",
        ),
        (
            &[
                "--lr_scheduler",
                "cosine_with_restarts",
                "--lr_num_cycles",
                "0",
            ],
            "--lr_num_cycles",
        ),
        (&["--lr_num_cycles", "inf"], "--lr_num_cycles"),
    ];
    for &(args, flag) in cases {
        let text = message(args);
        assert!(text.starts_with(&format!("{flag}: ")), "{args:?}: {text}");
    }
    let huge = message(&["--resolution", "10000000"]);
    assert!(huge.contains("GiB"), "{huge}");
    // The largest accepted values still parse.
    parse(&["--resolution", "8192", "--validation_guidance_scale", "0"]).unwrap();
}

/// An unknown flag close to a known one names it; one far from all names none.
#[test]
fn unknown_flags_suggest_the_closest_flag() {
    let message = |args: &[&str]| parse(args).unwrap_err().to_string();
    let typo = message(&["--max_train_step", "5"]);
    assert!(
        typo.contains("unknown flag `--max_train_step` (did you mean `--max_train_steps`?)"),
        "{typo}"
    );
    let typo = message(&["--resolutoin=64"]);
    assert!(typo.contains("(did you mean `--resolution`?)"), "{typo}");
    let far = message(&["--frobnicate"]);
    assert!(
        far.contains("unknown flag `--frobnicate`") && !far.contains("did you mean"),
        "{far}"
    );
}
