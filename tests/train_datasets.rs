//! The trainer on real-world datasets (issue 16), end to end on the tiny SDXL-shaped model on the
//! CPU: images of any size, rows that cannot be used.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::Path;

use trainer::TrainConfig;
use trainer::run::LORA_FILE;

#[path = "common/training.rs"]
mod training;

use training::{assert_bit_identical, fixture, run_output, scratch, tiny};

/// A short run of the tiny model on `dataset` at 64 px.
fn short(dataset: &Path, out: &Path) -> TrainConfig {
    tiny(out)
        .with_dataset_name(dataset.display().to_string())
        .with_max_train_steps(2)
        .with_gradient_accumulation_steps(1)
        .with_checkpointing_steps(100)
        .with_validation_prompt(None)
}

#[test]
fn images_smaller_than_the_resolution_are_resized_up_unless_no_upscale() {
    // 40 to 100 px images at 64 px: several are smaller than the crop.
    let dir = scratch("upscale");
    let dataset = fixture("captioned-images/imagefolder");
    let config = short(&dataset, &dir.join("run"));
    let (ok, stderr) = run_output(&config);
    assert!(ok, "training failed:\n{stderr}");
    assert!(dir.join("run").join(LORA_FILE).is_file());

    let refused = config
        .with_no_upscale(true)
        .with_output_dir(dir.join("refused"));
    let (ok, stderr) = run_output(&refused);
    assert!(!ok, "--no_upscale trained on images below 64 px");
    assert!(
        stderr.contains("is smaller than the 64x64 crop (upscaling is off"),
        "{stderr}"
    );
    assert!(
        stderr.contains("metadata.jsonl line"),
        "names no row: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn skip_bad_images_trains_past_unusable_rows_and_lists_them_at_the_end() {
    let dir = scratch("bad-rows");
    let dataset = dir.join("data");
    std::fs::create_dir_all(&dataset).unwrap();
    std::fs::copy(
        fixture("captioned-images/bad-rows.parquet"),
        dataset.join("bad-rows.parquet"),
    )
    .unwrap();
    let config = short(&dataset, &dir.join("stops"));
    let (ok, stderr) = run_output(&config);
    assert!(!ok, "a dataset with an undecodable row trained");
    assert!(stderr.contains("row 1"), "names no row: {stderr}");

    let skipping = config
        .with_skip_bad_images(true)
        .with_output_dir(dir.join("skips"));
    let (ok, stderr) = run_output(&skipping);
    assert!(ok, "training failed:\n{stderr}");
    let end = stderr
        .rfind("2 row(s) were left out (--skip_bad_images):")
        .unwrap_or_else(|| panic!("no list of two rows at the end:\n{stderr}"));
    let listed = &stderr[end..];
    assert!(
        listed.contains("row 1") && listed.contains("row 5"),
        "{listed}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Copies the files of `from` (not recursively) into a new folder `to`.
fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        } else if path.is_dir() {
            copy_folder(&path, &to.join(path.file_name().unwrap()));
        }
    }
}

/// The "(N reused, M encoded)" counts the run printed.
fn cache_counts(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains("latents cached in"))
        .unwrap_or_else(|| panic!("no cache line:\n{stderr}"));
    let inner = &line[line.rfind('(').unwrap() + 1..line.rfind(')').unwrap()];
    let numbers: Vec<u64> = inner
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn latents_cached_on_disk_are_reused_bit_identically_and_follow_image_and_vae() {
    let dir = scratch("disk-cache");
    let dataset = dir.join("images");
    copy_folder(&fixture("captioned-images/imagefolder"), &dataset);
    let model = dir.join("model");
    copy_folder(&fixture("tiny-sdxl"), &model);
    // Flips are drawn per step and both mirror images are cached, so latents stay cached.
    let memory = short(&dataset, &dir.join("memory"))
        .with_pretrained_model_name_or_path(model.display().to_string())
        .with_random_flip(true)
        .with_max_train_steps(4);
    let (ok, stderr) = run_output(&memory);
    assert!(ok, "training failed:\n{stderr}");
    let on_disk = |name: &str| {
        memory
            .clone()
            .with_cache_latents_to_disk(true)
            .with_latents_cache_dir(Some(dir.join("cache")))
            .with_output_dir(dir.join(name))
    };
    // 8 images, each with its mirror image: 16 entries, encoded by the first run, reused by the next.
    let (ok, stderr) = run_output(&on_disk("first"));
    assert!(ok, "training failed:\n{stderr}");
    assert_eq!(cache_counts(&stderr), (0, 16));
    let (ok, stderr) = run_output(&on_disk("second"));
    assert!(ok, "training failed:\n{stderr}");
    assert_eq!(cache_counts(&stderr), (16, 0));
    for run in ["first", "second"] {
        assert_bit_identical(
            &dir.join("memory").join(LORA_FILE),
            &dir.join(run).join(LORA_FILE),
        );
    }

    // An edited image under the same name: its two entries are encoded again.
    let mut edited = image::open(dataset.join("000.png")).unwrap().to_rgb8();
    image::imageops::invert(&mut edited);
    edited.save(dataset.join("000.png")).unwrap();
    let (ok, stderr) = run_output(&on_disk("edited"));
    assert!(ok, "training failed:\n{stderr}");
    assert_eq!(cache_counts(&stderr), (14, 2));
    // Another VAE (here: its config file changed): everything is encoded again.
    let vae_config = model.join("vae/config.json");
    let text = std::fs::read_to_string(&vae_config).unwrap();
    std::fs::write(&vae_config, format!("{text}\n")).unwrap();
    let (ok, stderr) = run_output(&on_disk("other-vae"));
    assert!(ok, "training failed:\n{stderr}");
    assert_eq!(cache_counts(&stderr), (0, 16));
    let _ = std::fs::remove_dir_all(dir);
}

/// A kohya-style folder: `3_sks fox/` with six of the fixture images, four with `.caption` files of
/// comma-separated tags (the first being the trigger) and two without (they get the class tokens).
fn kohya_folder(root: &Path) -> Vec<String> {
    let sub = root.join("3_sks fox");
    std::fs::create_dir_all(&sub).unwrap();
    let images = fixture("captioned-images/imagefolder");
    let mut captions = Vec::new();
    for (i, name) in [
        "000.png", "001.png", "003.png", "004.png", "006.png", "007.png",
    ]
    .iter()
    .enumerate()
    {
        std::fs::copy(images.join(name), sub.join(name)).unwrap();
        if i < 4 {
            let caption = format!("sks fox, tag{i}a, tag{i}b, tag{i}c, tag{i}d");
            std::fs::write(sub.join(name).with_extension("caption"), &caption).unwrap();
            captions.push(caption);
        }
    }
    captions
}

#[test]
fn kohya_folders_repeat_images_and_caption_rules_change_the_prompts_per_step() {
    use trainer::plan::Plan;
    let dir = scratch("captions");
    let captions = kohya_folder(&dir.join("data"));
    let config = short(&dir.join("data"), &dir.join("run"))
        .with_instance_prompt(None)
        .with_caption_extension(".caption".into())
        .with_shuffle_caption(true)
        .with_keep_tokens(1)
        .with_max_train_steps(40);
    let plan = Plan::open(&config, None).unwrap();
    // Six images, each three times per epoch, in batches of 2.
    assert_eq!(plan.dataset().len(), 6);
    assert_eq!(plan.steps_per_epoch(), 9);
    let steps = plan.micro_steps(0..40).unwrap();
    let mut orders = std::collections::BTreeSet::new();
    for prompt in steps.iter().flat_map(|s| &s.prompts) {
        if prompt == "sks fox" {
            continue; // an image without a caption file: the folder's class tokens
        }
        let tags: Vec<&str> = prompt.split(", ").collect();
        assert_eq!(tags[0], "sks fox", "the kept tag moved: {prompt}");
        let mut sorted = tags.clone();
        sorted.sort_unstable();
        let original = captions
            .iter()
            .find(|c| c.contains(tags[1].trim_end_matches(|ch: char| ch.is_ascii_alphabetic())))
            .unwrap_or_else(|| panic!("`{prompt}` is no caption's shuffle"));
        let mut expected: Vec<&str> = original.split(", ").collect();
        expected.sort_unstable();
        assert_eq!(sorted, expected, "tags lost or invented: {prompt}");
        orders.insert(prompt.clone());
    }
    assert!(
        orders.len() > captions.len(),
        "shuffling gave only {} distinct prompts",
        orders.len()
    );
    // Every prompt dropped at rate 1; none at rate 0 (the plan is otherwise unchanged).
    let dropped = Plan::open(&config.clone().with_caption_dropout_rate(1.0), None).unwrap();
    let dropped = dropped.micro_steps(0..40).unwrap();
    assert!(
        dropped
            .iter()
            .flat_map(|s| &s.prompts)
            .all(String::is_empty)
    );
    let items = |steps: &[trainer::plan::MicroStep]| -> Vec<usize> {
        steps
            .iter()
            .flat_map(|s| s.keys.iter().map(|k| k.item))
            .collect()
    };
    assert_eq!(items(&dropped), items(&steps));

    // End to end: the run encodes every distinct prompt of its plan.
    let (ok, stderr) = run_output(
        &config
            .with_max_train_steps(4)
            .with_caption_dropout_rate(0.25),
    );
    assert!(ok, "training failed:\n{stderr}");
    assert!(
        stderr.contains("prompts: the dataset's captions"),
        "{stderr}"
    );
    let encoded = stderr
        .lines()
        .find_map(|l| {
            l.split("[trainer] ")
                .nth(1)?
                .split(" distinct prompt(s)")
                .next()?
                .parse::<usize>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no prompt count:\n{stderr}"));
    assert!(encoded > 2, "{encoded} prompts for 8 shuffled samples");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_mixed_size_dataset_trains_with_kohya_buckets_never_mixing_them_in_a_batch() {
    use trainer::plan::Plan;
    let dir = scratch("buckets");
    // Eight images of 40 to 100 px and several aspect ratios, buckets of about 64² px.
    let config = short(&fixture("captioned-images/imagefolder"), &dir.join("run"))
        .with_enable_bucket(true)
        .with_min_bucket_reso(32)
        .with_max_bucket_reso(128)
        .with_bucket_reso_steps(32)
        .with_train_batch_size(1)
        .with_max_train_steps(6)
        .with_random_flip(true);
    let plan = Plan::open(&config, None).unwrap();
    let buckets = plan.describe_buckets();
    assert!(
        buckets.matches(", ").count() >= 1,
        "one bucket only: {buckets}"
    );
    let sizes = plan.dataset().config().buckets.sizes().to_vec();
    for &(w, h) in &sizes {
        assert_eq!((w % 32, h % 32), (0, 0), "{w}x{h}");
        assert!(w * h <= 64 * 64, "{w}x{h} is larger than the area");
    }
    let steps = plan.micro_steps(0..6).unwrap();
    let used: std::collections::BTreeSet<usize> = steps.iter().map(|s| s.bucket).collect();
    assert!(
        used.len() > 1,
        "the first six micro-steps used one bucket: {used:?}"
    );
    let batched = config.clone().with_train_batch_size(2);
    let plan = Plan::open(&batched, None).unwrap();
    for step in plan.micro_steps(0..20).unwrap() {
        for key in &step.keys {
            assert_eq!(plan.dataset().items()[key.item].bucket, step.bucket);
        }
    }

    let (ok, stderr) = run_output(&config);
    assert!(ok, "training failed:\n{stderr}");
    assert!(stderr.contains(&format!("bucket(s) {buckets}")), "{stderr}");
    assert!(dir.join("run").join(LORA_FILE).is_file());
    let _ = std::fs::remove_dir_all(dir);
}

/// Copies the named fixture images into `folder`, with `captions[i]` as `.caption` files where given.
fn image_folder(folder: &Path, names: &[&str], captions: &[Option<&str>]) {
    std::fs::create_dir_all(folder).unwrap();
    let images = fixture("captioned-images/imagefolder");
    for (i, name) in names.iter().enumerate() {
        std::fs::copy(images.join(name), folder.join(name)).unwrap();
        if let Some(Some(caption)) = captions.get(i) {
            std::fs::write(folder.join(name).with_extension("caption"), caption).unwrap();
        }
    }
}

#[test]
fn a_kohya_dataset_config_with_two_subsets_and_a_regularization_subset_trains() {
    use trainer::plan::Plan;
    let dir = scratch("kohya-toml");
    image_folder(
        &dir.join("train/fox"),
        &["000.png", "001.png", "003.png"],
        &[
            Some("sks fox, red"),
            Some("sks fox, snow"),
            Some("sks fox, grass"),
        ],
    );
    image_folder(
        &dir.join("train/more"),
        &["004.png", "006.png", "007.png"],
        &[],
    );
    image_folder(&dir.join("reg"), &["002.jpg", "005.jpg"], &[]);
    let toml = format!(
        r#"
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{0}/train/fox"
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = "{0}/train/more"
  class_tokens = "sks fox"

  [[datasets.subsets]]
  image_dir = "{0}/reg"
  class_tokens = "fox"
  is_reg = true
"#,
        dir.display()
    );
    let file = dir.join("dataset.toml");
    std::fs::write(&file, toml).unwrap();
    let config = short(&dir.join("unused"), &dir.join("run"))
        .with_dataset_config(Some(file.clone()))
        .with_train_batch_size(7)
        // the file's batch_size wins, as in kohya
        .with_resolution(128)
        // and its resolution
        .with_max_train_steps(4)
        .with_prior_loss_weight(0.5);
    let (resolved, kohya) = config.clone().resolve_dataset_config().unwrap();
    assert_eq!((resolved.train_batch_size, resolved.resolution), (2, 64));
    assert_eq!(resolved.instance_prompt, None);
    let plan = Plan::open(&resolved, kohya.as_ref()).unwrap();
    let dataset = plan.dataset();
    assert_eq!(dataset.subsets().len(), 3);
    // kohya balances the regularization images to the 3·2 + 3 = 9 training images: 5 + 4 repeats.
    let reg: Vec<u32> = (0..dataset.len())
        .filter(|&i| dataset.is_reg(i))
        .map(|i| dataset.items()[i].repeats)
        .collect();
    assert_eq!(reg, [5, 4]);
    let steps = plan.micro_steps(0..20).unwrap();
    for step in &steps {
        for ((key, prompt), &reg) in step.keys.iter().zip(&step.prompts).zip(&step.reg) {
            assert_eq!(reg, dataset.is_reg(key.item));
            if reg {
                assert_eq!(prompt, "fox");
            } else {
                assert!(prompt.starts_with("sks fox"), "{prompt}");
            }
        }
        let weights = plan.loss_weights(step, 0.5).unwrap();
        for (c, &reg) in weights.coefficients.iter().zip(&step.reg) {
            assert_eq!(*c, if reg { 0.25 } else { 0.5 }, "kohya: weight / batch");
        }
    }
    assert!(steps.iter().any(|s| s.reg.iter().any(|&r| r)));

    let (ok, stderr) = run_output(&config);
    assert!(ok, "training failed:\n{stderr}");
    assert!(dir.join("run").join(LORA_FILE).is_file());

    // A key kohya has that this trainer does not: an error naming it.
    std::fs::write(
        &file,
        "[general]\ncolor_aug = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"x\"\n",
    )
    .unwrap();
    let (ok, stderr) = run_output(&config.with_output_dir(dir.join("refused")));
    assert!(!ok);
    assert!(
        stderr.contains("color_aug") && stderr.contains("dataset.toml"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn prior_preservation_generates_the_missing_class_images_and_trains_on_both() {
    use trainer::plan::Plan;
    let dir = scratch("prior");
    let class_dir = dir.join("class");
    let config = short(&fixture("captioned-images/imagefolder"), &dir.join("run"))
        .with_with_prior_preservation(true)
        .with_class_data_dir(Some(class_dir.clone()))
        .with_class_prompt(Some("a fox".into()))
        .with_num_class_images(3)
        .with_class_inference_steps(2)
        .with_prior_loss_weight(0.5)
        .with_max_train_steps(3);
    let (ok, stderr) = run_output(&config);
    assert!(ok, "training failed:\n{stderr}");
    assert!(stderr.contains("(3 generated)"), "{stderr}");
    assert!(dir.join("run").join(LORA_FILE).is_file());

    // Each micro-step: the instance batch, then as many class images, weighted as diffusers does.
    let plan = Plan::open(&config, None).unwrap();
    assert_eq!(plan.batch_size(&config), 4);
    for step in plan.micro_steps(0..6).unwrap() {
        assert_eq!(step.reg, [false, false, true, true]);
        assert_eq!(&step.prompts[2..], ["a fox", "a fox"]);
        let weights = plan.loss_weights(&step, 0.5).unwrap();
        assert_eq!(weights.coefficients, [0.5, 0.5, 0.25, 0.25]);
        assert_eq!(weights.snr_mask, [1.0, 1.0, 0.0, 0.0]);
    }
    // The next run finds them.
    let (ok, stderr) = run_output(&config.with_output_dir(dir.join("again")));
    assert!(ok, "training failed:\n{stderr}");
    assert!(stderr.contains("(0 generated)"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}
