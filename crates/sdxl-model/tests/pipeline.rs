//! The text-to-image pipeline against diffusers' `StableDiffusionXLPipeline` on the tiny SDXL models
//! (fixture `tiny_pipeline`), PNG output, and LoRA on/off at inference (fp32, CPU). Each generation
//! draws from a generator of its own: the tests run in parallel without a lock.

// Helpers outside #[test] functions unwrap too: a fixture that fails to load should fail the test.
#![allow(clippy::unwrap_used)]

mod common;

use common::depth::{text_encoders_depth, unet_shape, vae_decode_depth};
use common::{fixture, rel};
use std::sync::Mutex;
use test_support::{check, f32_bound, unet_depth};

use sdxl_model::Error;
use sdxl_model::pipeline::{GenerateOptions, grid_row};
use sdxl_model::schedulers::{SchedulerConfig, SchedulerKind};
use sdxl_model::unet::UNetConfig;
use sdxl_model::vae::VaeTiling;
use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};

use common::tiny_pipeline as pipeline;

/// The case `gen_tiny_pipeline` ran, from the fixture's metadata.
fn case() -> (serde_json::Value, TensorFile) {
    let path = fixture("tiny-pipeline-io.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let case = serde_json::from_str(&meta.metadata().as_ref().unwrap()["case"]).unwrap();
    (case, TensorFile::open(path).unwrap())
}

fn options_of(case: &serde_json::Value) -> GenerateOptions {
    common::case_options(case).with_seed(case["seed"].as_u64().unwrap())
}

/// The bound on the final latents of a run with `options` against diffusers' `expected` latents
/// (docs/NUMERICS.md): the text encoders, then `steps` UNet passes at the latent size, with a gain:
/// classifier-free guidance scales a model-output error by up to `2w + 1`, and a step of the
/// sampler moves the latents by up to `σ_max` times the guided output, which is compared with the
/// final latents' size.
fn latents_bound(options: &GenerateOptions, expected: &Tensor) -> f64 {
    latents_bound_with(options, expected, &SchedulerConfig::sdxl())
}

/// [`latents_bound`] for a run with `scheduler_config`.
fn latents_bound_with(
    options: &GenerateOptions,
    expected: &Tensor,
    scheduler_config: &SchedulerConfig,
) -> f64 {
    let root = fixture("tiny-sdxl");
    let text = text_encoders_depth(&root, 77);
    let config = UNetConfig::from_file(root.join("unet/config.json")).unwrap();
    let context = Tensor::zeros(
        [1, 77, config.cross_attention_dim],
        (Kind::Float, Device::Cpu),
    );
    let unet = unet_depth(&unet_shape(&config, expected, &context));
    let mut scheduler = sdxl_model::schedulers::build(options.scheduler, scheduler_config).unwrap();
    scheduler.set_timesteps(options.steps).unwrap();
    let sigma_max = scheduler.init_noise_sigma();
    let latents_max = expected.abs().max().double_value(&[]);
    let gain = (2.0 * options.guidance_scale + 1.0) * sigma_max / latents_max;
    gain * f32_bound(text + options.steps as f64 * unet)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn tiny_pipeline_latents_and_images_match_diffusers_and_write_a_png() {
    let (case, io) = case();
    let pipe = pipeline();
    let options = options_of(&case);
    let latents = pipe.latents(&options).unwrap();
    let expected = io.tensor("latents", Device::Cpu, None).unwrap();
    check(
        "pipeline latents vs diffusers",
        rel(&latents, &expected),
        latents_bound(&options, &expected),
    );

    // The seeded noise is diffusers' torch.Generator().manual_seed(seed) noise; passing it in is the same run.
    let mut generator = torch_cuda::rng::Generator::new(options.seed).unwrap();
    let seeded =
        torch_cuda::portable::randn_with(&mut generator, &pipe.latent_shape(&options)).unwrap();
    assert_eq!(
        max_abs_diff(&seeded, &io.tensor("noise", Device::Cpu, None).unwrap()),
        0.0
    );
    let given = options_of(&case)
        .with_initial_noise(Some(seeded))
        .with_seed(options.seed + 1);
    assert_eq!(max_abs_diff(&pipe.latents(&given).unwrap(), &latents), 0.0);

    // The decoder on diffusers' own latents: its float error (below 10⁻³ of the range, see the
    // bound) can move a pixel across at most one rounding boundary of the 8-bit output.
    let images = pipe.decode(&expected).unwrap();
    assert_eq!(images.chw.size(), [2, 3, 64, 64]);
    assert_eq!(images.chw.kind(), Kind::Uint8);
    let vae_config =
        sdxl_model::vae::AutoencoderKLConfig::from_file(fixture("tiny-sdxl/vae/config.json"))
            .unwrap();
    let decode_bound = f32_bound(vae_decode_depth(&vae_config, 16, 16) + 3.0);
    assert!(
        255.0 * decode_bound < 0.5,
        "the decode bound allows more than rounding"
    );
    let expected_u8 = (io.tensor("images", Device::Cpu, None).unwrap() * 255.0).round();
    let pixel_error = max_abs_diff(&images.chw, &expected_u8);
    println!("pipeline images: max difference vs diffusers {pixel_error} (of 255)");
    assert!(pixel_error <= 1.0);
    let images = pipe.decode(&latents).unwrap();

    let dir = std::env::temp_dir().join(format!("sdxl-pipeline-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("out.png");
    images.save_png(1, &path).unwrap();
    let back = image::open(&path).unwrap().to_rgb8();
    assert_eq!(back, images.to_rgb(1).unwrap());
    assert_eq!(
        max_abs_diff(
            &Tensor::from_slice(back.as_raw()).view([64, 64, 3]),
            &images.hwc().get(1)
        ),
        0.0
    );
    let grid = grid_row(&[images.to_rgb(0).unwrap(), back]).unwrap();
    assert_eq!(grid.dimensions(), (128, 64));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn seeded_ancestral_run_with_negatives_and_two_images_per_prompt_matches_diffusers() {
    let (case, io) = case();
    let negatives = case["ancestral_negative_prompts"].as_array().unwrap();
    let options = options_of(&case)
        .with_negative_prompts(Some(
            negatives
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect(),
        ))
        .with_images_per_prompt(2)
        .with_scheduler(SchedulerKind::EulerAncestralDiscrete);
    let latents = pipeline().latents(&options).unwrap();
    let expected = io.tensor("ancestral_latents", Device::Cpu, None).unwrap();
    check(
        "pipeline seeded Euler ancestral latents vs diffusers",
        rel(&latents, &expected),
        latents_bound(&options, &expected),
    );
}

#[test]
fn another_aspect_ratio_matches_diffusers() {
    let (case, io) = case();
    let noise = io.tensor("wide_noise", Device::Cpu, None).unwrap();
    let options = options_of(&case)
        .with_height(48)
        .with_width(64)
        .with_initial_noise(Some(noise));
    let latents = pipeline().latents(&options).unwrap();
    let expected = io.tensor("wide_latents", Device::Cpu, None).unwrap();
    check(
        "pipeline 48x64 latents vs diffusers",
        rel(&latents, &expected),
        latents_bound(&options, &expected),
    );
}

#[test]
fn tiled_decode_engages_above_one_tile_and_keeps_the_size() {
    let (_, io) = case();
    let latents = io.tensor("latents", Device::Cpu, None).unwrap();
    let mut pipe = pipeline();
    let untiled = pipe.decode(&latents).unwrap();
    pipe.set_vae_tiling(Some(
        VaeTiling::default().with_sample_tile(32).with_overlap(0.25),
    ))
    .unwrap();
    let tiled = pipe.decode(&latents).unwrap();
    assert_eq!(tiled.chw.size(), untiled.chw.size());
    let mean_difference = (tiled.chw.to_kind(Kind::Float) - untiled.chw.to_kind(Kind::Float))
        .abs()
        .mean(Kind::Float);
    let mean_difference = mean_difference.double_value(&[]);
    println!(
        "tiled (32 px tiles) vs untiled decode: mean |difference| {mean_difference:.2} of 255"
    );
    // Tiled decoding itself equals diffusers' (tests/vae.rs); here: the pipeline uses it, so seams appear.
    assert!(mean_difference > 0.0);
    let error = pipe
        .set_vae_tiling(Some(
            VaeTiling::default().with_sample_tile(30).with_overlap(0.25),
        ))
        .unwrap_err();
    assert!(matches!(error, Error::InvalidSetting { .. }), "{error}");
}

#[test]
fn guidance_and_negatives_change_the_latents_and_bad_settings_are_named() {
    let (case, _) = case();
    let pipe = pipeline();
    let quick = || options_of(&case).with_steps(2);
    let base = pipe.latents(&quick()).unwrap();
    let negatives = vec!["blurry".to_owned(), "text, watermark".to_owned()];
    let with_negative = pipe
        .latents(&quick().with_negative_prompts(Some(negatives)))
        .unwrap();
    assert!(max_abs_diff(&base, &with_negative) > 1e-4);
    let unguided = pipe.latents(&quick().with_guidance_scale(1.0)).unwrap();
    assert!(max_abs_diff(&base, &unguided) > 1e-4);
    let two_each = pipe.latents(&quick().with_images_per_prompt(2)).unwrap();
    assert_eq!(two_each.size(), [4, 4, 16, 16]);

    let error = pipe.latents(&quick().with_height(62)).unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidSetting {
                setting: "height",
                ..
            }
        ),
        "{error}"
    );
    let noise = Some(Tensor::zeros([1, 4, 16, 16], (Kind::Float, Device::Cpu)));
    let error = pipe
        .latents(&quick().with_initial_noise(noise))
        .unwrap_err();
    assert!(error.to_string().contains("initial noise"), "{error}");
}

#[test]
fn lora_changes_the_output_and_scale_zero_equals_off() {
    let (case, _) = case();
    let mut pipe = pipeline();
    let quick = || options_of(&case).with_steps(2);
    let base = pipe.latents(&quick()).unwrap();
    let file = lora::format::read(
        fixture("lora/tiny-sdxl-diffusers.safetensors"),
        lora::format::ReadOptions::default(),
    )
    .unwrap();
    let attached = pipe.load_lora(&file.state, "style").unwrap();
    assert!(attached > 0);
    let with_lora = pipe.latents(&quick()).unwrap();
    let change = max_abs_diff(&with_lora, &base);
    println!("LoRA on vs off: max latent difference {change:.3e}");
    assert!(change > 1e-3);

    pipe.set_lora_multiplier("style", 0.0).unwrap();
    assert_eq!(
        max_abs_diff(&pipe.latents(&quick()).unwrap(), &base),
        0.0,
        "scale 0 must equal off"
    );
    pipe.set_lora_multiplier("style", 1.0).unwrap();
    pipe.set_lora_enabled("style", false).unwrap();
    assert_eq!(
        max_abs_diff(&pipe.latents(&quick()).unwrap(), &base),
        0.0,
        "disabled must equal the base"
    );
    pipe.set_lora_enabled("style", true).unwrap();
    assert_eq!(
        max_abs_diff(&pipe.latents(&quick()).unwrap(), &with_lora),
        0.0
    );
    assert!(matches!(
        pipe.set_lora_multiplier("absent", 1.0),
        Err(Error::Lora(_))
    ));
}

/// The bound of [`latents_bound`] for v-prediction with Euler: a step moves the latents by
/// `(σ_next − σ)/√(σ² + 1)` times the model output, at most 1 times its error, so the gain is
/// `(2w + 1)·(1 + guidance_rescale)` (the rescale mixes in the guided output scaled by a ratio of
/// standard deviations) over the final latents' size. With zero terminal SNR the first σ is
/// `√(1/ᾱ_T − 1)` with ᾱ_T = 2⁻²⁴ (4096), and the first step's update cancels latents of that size
/// down to σ₁'s: its rounding adds `σ_max·max|noise|` times a few units of roundoff per step.
fn v_prediction_latents_bound(
    options: &GenerateOptions,
    expected: &Tensor,
    scheduler_config: &SchedulerConfig,
    noise: &Tensor,
) -> f64 {
    let root = fixture("tiny-sdxl");
    let text = text_encoders_depth(&root, 77);
    let config = UNetConfig::from_file(root.join("unet/config.json")).unwrap();
    let context = Tensor::zeros(
        [1, 77, config.cross_attention_dim],
        (Kind::Float, Device::Cpu),
    );
    let unet = unet_depth(&unet_shape(&config, expected, &context));
    let mut scheduler = sdxl_model::schedulers::build(options.scheduler, scheduler_config).unwrap();
    scheduler.set_timesteps(options.steps).unwrap();
    let latents_max = expected.abs().max().double_value(&[]);
    let noise_max = noise.abs().max().double_value(&[]);
    let gain =
        (2.0 * options.guidance_scale + 1.0) * (1.0 + options.guidance_rescale) / latents_max;
    let cancellation = scheduler.init_noise_sigma() * noise_max / latents_max;
    gain * f32_bound(text + options.steps as f64 * unet)
        + cancellation * f32_bound(4.0 * options.steps as f64)
}

/// A zero-terminal-SNR v-prediction run as diffusers recommends sampling one (fixture
/// `tiny_pipeline_ztsnr`: rescaled betas, "trailing" timesteps, `guidance_rescale` 0.7) gives
/// diffusers' latents, with and without the rescale; the rescale moves them far more than the bound.
#[test]
fn zero_terminal_snr_sampling_with_guidance_rescale_matches_diffusers() {
    let path = fixture("tiny-pipeline-ztsnr-io.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let case: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["case"]).unwrap();
    let io = TensorFile::open(&path).unwrap();
    let mut pipe = pipeline();
    let overrides = &case["scheduler"];
    pipe.scheduler_config.prediction_type =
        Some(overrides["prediction_type"].as_str().unwrap().into());
    pipe.scheduler_config.rescale_betas_zero_snr = overrides["rescale_betas_zero_snr"].as_bool();
    pipe.scheduler_config.timestep_spacing =
        Some(overrides["timestep_spacing"].as_str().unwrap().into());
    let noise = io.tensor("noise", Device::Cpu, None).unwrap();
    let mut differences = Vec::new();
    for (key, rescale) in [
        ("latents", case["guidance_rescale"].as_f64().unwrap()),
        ("latents_no_rescale", 0.0),
    ] {
        let options = options_of(&case)
            .with_guidance_rescale(rescale)
            .with_initial_noise(Some(noise.copy()));
        let latents = pipe.latents(&options).unwrap();
        let expected = io.tensor(key, Device::Cpu, None).unwrap();
        let bound = v_prediction_latents_bound(&options, &expected, &pipe.scheduler_config, &noise);
        check(
            &format!("ztsnr pipeline {key} vs diffusers"),
            rel(&latents, &expected),
            bound,
        );
        differences.push((expected, bound));
    }
    let moved = rel(&differences[0].0, &differences[1].0);
    assert!(
        moved > 10.0 * differences[0].1,
        "guidance_rescale moves the latents by {moved:e}, not far beyond the bound {:e}",
        differences[0].1
    );
    let bad = options_of(&case).with_guidance_rescale(1.5);
    assert!(
        pipe.latents(&bad)
            .unwrap_err()
            .to_string()
            .contains("guidance_rescale")
    );
}

/// The step callback sees every step once, in order, with the total; it leaves the latents alone.
#[test]
fn the_step_callback_counts_every_step_and_changes_nothing() {
    let (case, _) = case();
    let pipe = pipeline();
    let quick = || options_of(&case).with_steps(3);
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    let watched = pipe
        .latents(
            &quick().with_on_step(Some(sdxl_model::pipeline::OnStep::new(
                move |done, total| {
                    log.lock().unwrap().push((done, total));
                },
            ))),
        )
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), [(1, 3), (2, 3), (3, 3)]);
    assert!(watched.equal(&pipe.latents(&quick()).unwrap()));
}

/// Two pipelines generating at once in two threads (seeded ancestral sampling: noise at every step)
/// give the images each gives alone, while a third thread draws from libtorch's default generator.
#[test]
fn two_pipelines_in_two_threads_give_what_each_gives_alone() {
    let (case, _) = case();
    let options = |seed: u64| {
        options_of(&case)
            .with_steps(3)
            .with_seed(seed)
            .with_scheduler(SchedulerKind::EulerAncestralDiscrete)
    };
    let (first, second) = (pipeline(), pipeline());
    let alone = [
        first.generate(&options(1)).unwrap().chw,
        second.generate(&options(2)).unwrap().chw,
    ];
    assert!(!alone[0].equal(&alone[1]), "the seeds should differ");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let together = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tch::manual_seed(0);
                let _ = Tensor::randn([256], (Kind::Float, Device::Cpu));
            }
        });
        // Each pipeline moves into its thread (a model is Send, not Sync).
        let options = &options;
        let a = scope.spawn(move || first.generate(&options(1)).unwrap().chw);
        let b = scope.spawn(move || second.generate(&options(2)).unwrap().chw);
        let together = [a.join().unwrap(), b.join().unwrap()];
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        together
    });
    for (i, (alone, together)) in alone.iter().zip(&together).enumerate() {
        assert!(
            alone.equal(together),
            "pipeline {i}: images differ when run together"
        );
    }
}

/// `image_seeds`: each image of a batch (an ancestral sampler: noise at every step) is the image its
/// seed gives alone, up to float32 rounding of the batched UNet; a count other than the batch's is
/// refused.
#[test]
fn image_seeds_make_each_image_its_seeds_whatever_the_batch() {
    let (case, _) = case();
    let pipe = pipeline();
    let quick = || {
        options_of(&case)
            .with_prompts(vec!["a fox".into()])
            .with_negative_prompts(None)
            .with_steps(3)
            .with_scheduler(SchedulerKind::EulerAncestralDiscrete)
    };
    let batch = pipe
        .latents(
            &quick()
                .with_images_per_prompt(2)
                .with_image_seeds(Some(vec![4, 9])),
        )
        .unwrap();
    for (i, seed) in [4, 9].into_iter().enumerate() {
        let alone = pipe.latents(&quick().with_seed(seed)).unwrap();
        let listed = pipe
            .latents(&quick().with_image_seeds(Some(vec![seed])))
            .unwrap();
        assert!(listed.equal(&alone), "one image seed is the seed");
        let difference = max_abs_diff(&batch.narrow(0, i as i64, 1), &alone);
        assert!(difference < 1e-4, "image {i}: {difference}");
    }
    let other = max_abs_diff(&batch.narrow(0, 0, 1), &batch.narrow(0, 1, 1));
    assert!(other > 0.1, "the seeds differ: {other}");
    let error = pipe
        .latents(&quick().with_image_seeds(Some(vec![1, 2])))
        .unwrap_err();
    assert!(matches!(error, Error::Shape { .. }), "{error}");
}
