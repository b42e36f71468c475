//! Tests of the kohya dataset configuration reader.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

/// A config as kohya's documentation writes them: two training subsets and a regularisation
/// subset in one dataset, and a second dataset at another resolution.
const REALISTIC: &str = r#"
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = 1024
batch_size = 2
enable_bucket = true
min_bucket_reso = 512
max_bucket_reso = 2048
bucket_reso_steps = 64
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = "train/10_sks dog"
  class_tokens = "sks dog"
  num_repeats = 10
  keep_tokens_separator = "|||"
  caption_dropout_rate = 0.05

  [[datasets.subsets]]
  image_dir = "train/closeups"
  num_repeats = 4
  caption_extension = "caption"
  caption_tag_dropout_rate = 0.1
  caption_prefix = "sks dog,"
  random_crop = true
  flip_aug = false
  color_aug = false

  [[datasets.subsets]]
  is_reg = true
  image_dir = "reg/dog"
  class_tokens = "dog"
  shuffle_caption = false

[[datasets]]
resolution = [896, 1152]
caption_separator = ";"
keep_tokens = 0

  [[datasets.subsets]]
  image_dir = "style"
  cache_info = true
"#;

fn subset(image_dir: &str) -> KohyaSubset {
    KohyaSubset {
        image_dir: image_dir.into(),
        is_reg: false,
        class_tokens: None,
        caption_extension: ".caption".into(),
        num_repeats: 1,
        flip_aug: false,
        random_crop: false,
        cache_info: false,
        captions: CaptionRules::default(),
    }
}

#[test]
fn a_realistic_config_resolves_every_key() {
    let config = KohyaDatasetConfig::from_toml_str(REALISTIC).unwrap();
    let general_captions = CaptionRules::default()
        .with_shuffle_caption(true)
        .with_keep_tokens(1);
    let expected = KohyaDatasetConfig {
        datasets: vec![
            KohyaDataset {
                resolution: Some((1024, 1024)),
                batch_size: 2,
                enable_bucket: true,
                min_bucket_reso: 512,
                max_bucket_reso: 2048,
                bucket_reso_steps: 64,
                bucket_no_upscale: true,
                subsets: vec![
                    KohyaSubset {
                        class_tokens: Some("sks dog".into()),
                        caption_extension: ".txt".into(),
                        num_repeats: 10,
                        flip_aug: true,
                        captions: general_captions
                            .clone()
                            .with_keep_tokens_separator(Some("|||".into()))
                            .with_caption_dropout_rate(0.05),
                        ..subset("train/10_sks dog")
                    },
                    KohyaSubset {
                        caption_extension: ".caption".into(),
                        num_repeats: 4,
                        random_crop: true,
                        captions: general_captions
                            .clone()
                            .with_caption_tag_dropout_rate(0.1)
                            .with_caption_prefix(Some("sks dog,".into())),
                        ..subset("train/closeups")
                    },
                    KohyaSubset {
                        is_reg: true,
                        class_tokens: Some("dog".into()),
                        caption_extension: ".txt".into(),
                        flip_aug: true,
                        captions: general_captions.clone().with_shuffle_caption(false),
                        ..subset("reg/dog")
                    },
                ],
            },
            KohyaDataset {
                resolution: Some((896, 1152)),
                batch_size: 1,
                enable_bucket: false,
                min_bucket_reso: 256,
                max_bucket_reso: 1024,
                bucket_reso_steps: 64,
                bucket_no_upscale: false,
                subsets: vec![KohyaSubset {
                    caption_extension: ".txt".into(),
                    flip_aug: true,
                    cache_info: true,
                    captions: general_captions
                        .clone()
                        .with_caption_separator(";".into())
                        .with_keep_tokens(0),
                    ..subset("style")
                }],
            },
        ],
    };
    assert_eq!(config, expected);
}

#[test]
fn subsets_inherit_from_their_dataset_then_general_then_kohya_defaults() {
    let text = r#"
[general]
num_repeats = 3
resolution = 768
batch_size = 4
caption_prefix = "general"
keep_tokens_separator = ""

[[datasets]]
num_repeats = 5
batch_size = 8
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "b"
  num_repeats = 7
  caption_prefix = "own"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "c"
"#;
    let config = KohyaDatasetConfig::from_toml_str(text).unwrap();
    let [first, second] = config.datasets.as_slice() else {
        panic!("{config:?}")
    };
    assert_eq!((first.batch_size, second.batch_size), (8, 4));
    assert_eq!(first.resolution, Some((768, 768)));
    assert_eq!(second.resolution, Some((768, 768)));
    let repeats: Vec<u32> = config
        .datasets
        .iter()
        .flat_map(|d| d.subsets.iter().map(|s| s.num_repeats))
        .collect();
    assert_eq!(repeats, [5, 7, 3]);
    let prefixes: Vec<_> = config
        .datasets
        .iter()
        .flat_map(|d| d.subsets.iter().map(|s| s.captions.caption_prefix.clone()))
        .collect();
    assert_eq!(
        prefixes,
        [
            Some("general".into()),
            Some("own".into()),
            Some("general".into())
        ]
    );
    // An empty separator is kohya's "off"; everything unset is kohya's command-line default.
    let c = &second.subsets[0];
    assert_eq!(c.captions.keep_tokens_separator, None);
    assert_eq!(c.caption_extension, ".caption");
    assert_eq!(c.captions.caption_separator, ",");
    assert!(!c.is_reg && c.class_tokens.is_none());
    assert_eq!(
        (
            second.enable_bucket,
            second.min_bucket_reso,
            second.max_bucket_reso,
            second.bucket_reso_steps
        ),
        (false, 256, 1024, 64)
    );

    // No resolution anywhere: left to the command line, as in kohya.
    let config =
        KohyaDatasetConfig::from_toml_str("[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"x\"")
            .unwrap();
    assert_eq!(config.datasets[0].resolution, None);
}

fn problems(text: &str) -> Vec<String> {
    match KohyaDatasetConfig::from_toml_str(text) {
        Err(KohyaConfigError::Invalid { problems, .. }) => {
            problems.iter().map(ToString::to_string).collect()
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unsupported_keys_are_all_named_with_their_tables() {
    let text = r#"
[general]
token_warmup_step = 0.5
enable_wildcard = false
[[datasets]]
face_crop_aug_range = [2.0, 4.0]
  [[datasets.subsets]]
  image_dir = "a"
  token_warmup_min = 1
  [[datasets.subsets]]
  image_dir = "b"
  color_aug = true
  secondary_separator = ";;;"
  alpha_mask = true
  [[datasets.subsets]]
  metadata_file = "meta.json"
  image_dir = "c"
"#;
    assert_eq!(
        problems(text),
        [
            "general.token_warmup_step: not supported (only 0, kohya's default, is accepted)",
            "datasets[0].face_crop_aug_range: not supported",
            "datasets[0].subsets[1].alpha_mask: not supported (only `false`, kohya's default, is accepted)",
            "datasets[0].subsets[1].color_aug: not supported (only `false`, kohya's default, is accepted)",
            "datasets[0].subsets[1].secondary_separator: not supported",
            "datasets[0].subsets[2].metadata_file: not supported",
        ]
    );
}

#[test]
fn unknown_and_misplaced_keys_are_named() {
    let text = r#"
reolution = 512
[general]
image_dir = "a"
prior_loss_weight = 1.0
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  num_repeat = 3
  batch_size = 2
  shufle_caption = true
  frobnicate = 1
"#;
    assert_eq!(
        problems(text),
        [
            "reolution: unknown key (did you mean `resolution`?)",
            "general.image_dir: not allowed here (kohya reads it only in [[datasets.subsets]])",
            "general.prior_loss_weight: a kohya command-line option, not a dataset config key",
            "datasets[0].subsets[0].batch_size: not allowed here (kohya reads it per dataset: put it in [[datasets]] or [general])",
            "datasets[0].subsets[0].frobnicate: unknown key",
            "datasets[0].subsets[0].num_repeat: unknown key (did you mean `num_repeats`?)",
            "datasets[0].subsets[0].shufle_caption: unknown key (did you mean `shuffle_caption`?)",
        ]
    );
}

#[test]
fn bad_values_name_the_key() {
    let text = r#"
[general]
caption_dropout_rate = 1.5
[[datasets]]
resolution = [512]
batch_size = 0
min_bucket_reso = 1024
max_bucket_reso = 512
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 0
  [[datasets.subsets]]
  num_repeats = "10"
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = -1
  caption_separator = ""
  shuffle_caption = "yes"
"#;
    assert_eq!(
        problems(text),
        [
            "general.caption_dropout_rate: 1.5 is not a probability between 0 and 1",
            "datasets[0].batch_size: must be at least 1, found 0",
            "datasets[0].resolution: expected an integer or [width, height], found an array of 1",
            "datasets[0].subsets[0].num_repeats: must be at least 1, found 0",
            "datasets[0].subsets[1].num_repeats: expected an integer, found a string",
            "datasets[0].subsets[1].image_dir: missing (every subset needs its image folder)",
            "datasets[0].subsets[2].caption_separator: must not be empty",
            "datasets[0].subsets[2].keep_tokens: must be at least 0, found -1",
            "datasets[0].subsets[2].shuffle_caption: expected true or false, found a string",
            "datasets[0].subsets[2].image_dir: the same folder as datasets[0].subsets[0] (kohya would ignore this subset)",
            "datasets[0].min_bucket_reso: 1024 is above max_bucket_reso 512",
        ]
    );
}

#[test]
fn missing_tables_syntax_errors_and_files_are_reported() {
    assert_eq!(problems(""), ["datasets: no [[datasets]] table"]);
    assert_eq!(
        problems("[[datasets]]\nbatch_size = 1"),
        ["datasets[0].subsets: no [[datasets.subsets]] table"]
    );
    assert_eq!(
        problems("general = 3\ndatasets = [1]"),
        [
            "general: expected a table, found an integer",
            "datasets[0]: expected a table, found an integer",
        ]
    );
    let error = KohyaDatasetConfig::from_toml_str("[general\n").unwrap_err();
    assert!(
        matches!(error, KohyaConfigError::Syntax { .. }),
        "{error:?}"
    );

    let dir = std::env::temp_dir().join(format!("kohya-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dataset.toml");
    std::fs::write(
        &file,
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"a\"\ncolor_aug = true\n",
    )
    .unwrap();
    let message = KohyaDatasetConfig::from_file(&file)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        format!(
            "{}: datasets[0].subsets[0].color_aug: not supported (only `false`, kohya's default, is accepted)",
            file.display()
        )
    );
    std::fs::write(
        &file,
        "[[datasets]]\n[[datasets.subsets]]\ncolor_aug = true\n",
    )
    .unwrap();
    let message = KohyaDatasetConfig::from_file(&file)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(
            "2 problems in the kohya dataset config:\n  datasets[0].subsets[0].color_aug"
        ),
        "{message}"
    );
    let message = KohyaDatasetConfig::from_file(&dir.join("absent.toml"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("absent.toml"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}
