//! The schedulers against diffusers' golden arrays (`tests/fixtures/schedulers.safetensors`, written by
//! `tools/fixtures/generate.py --only schedulers`): timesteps, sigmas and `init_noise_sigma` for several
//! step counts, every step of a 6-step sampling loop, and the DDPM training schedule.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use common::{fixture, rel};
use std::collections::BTreeMap;

use sdxl_model::Error;
use sdxl_model::schedulers::{
    DdpmConfig, DdpmSchedule, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, build,
};
use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};

use test_support::{check, f32_bound};

/// Timesteps, sigmas and `init_noise_sigma` are float64 computations (numpy's formulas, repeated in
/// f64) on the bit-exact float32 ᾱ, stored as float32: one float32 rounding on each side, and the
/// f64 steps' own error far below it.
fn schedule_bound() -> f64 {
    f32_bound(2.0)
}

/// One scheduler step on given inputs: `scale_model_input` (a square root and a division) and the
/// update (a multistep solver combines up to three model outputs with their step ratios: about 16
/// elementwise operations).
fn step_bound() -> f64 {
    f32_bound(18.0)
}

/// A 6-step loop with `fake_model` (two activations and four operations) feeding the steps: 6 ×
/// (12 + 18) roundings; an earlier step's error reaches the end through the later updates, whose
/// multistep coefficients sum to at most 10 in magnitude on these schedules.
fn loop_bound() -> f64 {
    10.0 * f32_bound(6.0 * 30.0)
}

struct Golden {
    file: TensorFile,
    configs: BTreeMap<String, serde_json::Value>,
}

impl Golden {
    fn open() -> Self {
        let path = fixture("schedulers.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let configs = metadata.metadata().as_ref().unwrap()["configs"].clone();
        Self {
            file: TensorFile::open(&path).unwrap(),
            configs: serde_json::from_str(&configs).unwrap(),
        }
    }

    fn has(&self, key: &str) -> bool {
        self.file.keys().unwrap().iter().any(|k| k == key)
    }

    fn get(&self, key: &str) -> Tensor {
        self.file.tensor(key, Device::Cpu, None).unwrap()
    }

    fn values(&self, key: &str) -> Vec<f64> {
        Vec::<f64>::try_from(&self.get(key).to_kind(Kind::Double).reshape([-1])).unwrap()
    }

    fn scheduler(&self, case: &str) -> Box<dyn Scheduler> {
        let json = &self.configs[case];
        let config = SchedulerConfig::from_json(&json.to_string()).unwrap();
        let kind: SchedulerKind = json["_class_name"].as_str().unwrap().parse().unwrap();
        build(kind, &config).unwrap()
    }
}

fn rel_values(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(
        actual.len(),
        expected.len(),
        "lengths differ: {actual:?} vs {expected:?}"
    );
    let scale = expected
        .iter()
        .fold(f64::MIN_POSITIVE, |m, v| m.max(v.abs()));
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0, f64::max)
        / scale
}

/// The stand-in for the UNet that the generator uses (`_fake_model`), with the same libtorch ops.
fn fake_model(sample: &Tensor, timestep: f64) -> Tensor {
    (sample * 0.7 + timestep / 1000.0).tanh() * 0.9 + (sample * 1.3).sin() * 0.2
}

#[test]
fn timesteps_and_sigmas_match_diffusers() {
    let golden = Golden::open();
    let mut checked = 0;
    let mut worst = 0f64;
    for case in golden.configs.keys() {
        let mut scheduler = golden.scheduler(case);
        for steps in [1, 4, 30, 50, 61] {
            let prefix = format!("{case}/n{steps}");
            if case.starts_with("ddim") && steps == 61 && case.contains("trailing") {
                // diffusers' "trailing" spacing gives 62 timesteps here, the last one −1, which DDIM
                // cannot step from (diffusers would read ᾱ[−1] = ᾱ[999]): refused with an error.
                let timesteps = golden.values(&format!("{prefix}/timesteps"));
                assert_eq!(
                    (timesteps.len(), timesteps.last().copied()),
                    (62, Some(-1.0))
                );
                let err = scheduler.set_timesteps(steps).unwrap_err();
                assert!(err.to_string().contains("timestep -1"), "{err}");
                continue;
            }
            scheduler.set_timesteps(steps).unwrap();
            let timesteps = golden.values(&format!("{prefix}/timesteps"));
            let err = rel_values(scheduler.timesteps(), &timesteps);
            assert!(
                err <= schedule_bound(),
                "{prefix} timesteps: {err:e}\n{:?}\n{timesteps:?}",
                scheduler.timesteps()
            );
            worst = worst.max(err);
            let sigmas_key = format!("{prefix}/sigmas");
            match scheduler.sigmas() {
                Some(sigmas) => {
                    let sigmas: Vec<f64> = sigmas.iter().map(|&s| f64::from(s)).collect();
                    let err = rel_values(&sigmas, &golden.values(&sigmas_key));
                    assert!(err <= schedule_bound(), "{prefix} sigmas: {err:e}");
                    worst = worst.max(err);
                }
                None => assert!(!golden.has(&sigmas_key), "{prefix}: diffusers has sigmas"),
            }
            let init = golden.values(&format!("{prefix}/init_noise_sigma"))[0];
            let err = (scheduler.init_noise_sigma() - init).abs() / init;
            assert!(
                err <= schedule_bound(),
                "{prefix} init_noise_sigma {} vs {init}",
                scheduler.init_noise_sigma()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 17 * 5 - 1);
    check(
        &format!("scheduler timesteps and sigmas, worst of {checked} schedules"),
        worst,
        schedule_bound(),
    );
}

/// Every step of each case's loop, fed diffusers' own sample and model output, gives diffusers' result.
#[test]
fn step_updates_match_diffusers() {
    let golden = Golden::open();
    let mut worst = 0f64;
    for case in golden.configs.keys() {
        let loops: &[&str] = if case == "ddim" {
            &["loop", "loop_eta"]
        } else {
            &["loop"]
        };
        for &name in loops {
            let mut scheduler = golden.scheduler(case);
            if name == "loop_eta" {
                scheduler = Box::new(
                    sdxl_model::schedulers::DdimScheduler::new({
                        let mut config = sdxl_model::schedulers::DdimConfig::from_config(
                            &SchedulerConfig::from_json(&golden.configs[case].to_string()).unwrap(),
                        )
                        .unwrap();
                        config.eta = 0.6;
                        config
                    })
                    .unwrap(),
                );
            }
            scheduler.set_timesteps(6).unwrap();
            assert_eq!(scheduler.timesteps().len(), 6);
            for i in 0..6 {
                let key = |what: &str| format!("{case}/{name}/{i}/{what}");
                assert_eq!(scheduler.step_index(), i);
                let sample = golden.get(&key("sample"));
                let scaled = scheduler.scale_model_input(&sample).unwrap();
                let err = rel(&scaled, &golden.get(&key("scaled")));
                assert!(
                    err <= step_bound(),
                    "{case}/{name} step {i} scale_model_input: {err:e}"
                );
                let noise = golden.has(&key("noise")).then(|| golden.get(&key("noise")));
                assert_eq!(noise.is_some(), scheduler.is_stochastic(), "{case}/{name}");
                let prev = scheduler
                    .step(&golden.get(&key("model_output")), &sample, noise.as_ref())
                    .unwrap();
                let err = rel(&prev, &golden.get(&key("prev_sample")));
                assert!(err <= step_bound(), "{case}/{name} step {i}: {err:e}");
                worst = worst.max(err);
            }
            // The schedule is used up.
            let sample = golden.get(&format!("{case}/{name}/final"));
            assert!(matches!(
                scheduler.step(&sample, &sample, None),
                Err(Error::SchedulerExhausted {
                    step_index: 6,
                    steps: 6
                })
            ));
        }
    }
    check("scheduler step updates, worst step", worst, step_bound());
}

/// A complete sampling loop run by the Rust scheduler alone, with the fake model, ends where
/// diffusers' did (the multistep history and the noise come from the Rust side).
#[test]
fn sampling_loops_match_diffusers() {
    let golden = Golden::open();
    let mut worst = 0f64;
    for case in golden.configs.keys() {
        let mut scheduler = golden.scheduler(case);
        scheduler.set_timesteps(6).unwrap();
        let mut sample = golden.get(&format!("{case}/loop/initial"));
        for (i, &t) in scheduler.timesteps().to_vec().iter().enumerate() {
            let model_output = fake_model(&scheduler.scale_model_input(&sample).unwrap(), t);
            let noise_key = format!("{case}/loop/{i}/noise");
            let noise = golden.has(&noise_key).then(|| golden.get(&noise_key));
            sample = scheduler
                .step(&model_output, &sample, noise.as_ref())
                .unwrap();
        }
        let err = rel(&sample, &golden.get(&format!("{case}/loop/final")));
        assert!(err <= loop_bound(), "{case}: final latents {err:e}");
        worst = worst.max(err);
    }
    check(
        "scheduler 6-step loops, worst final latents",
        worst,
        loop_bound(),
    );
}

#[test]
fn ddpm_training_schedule_matches_diffusers() {
    let golden = Golden::open();
    let schedule = DdpmSchedule::new(DdpmConfig::sdxl(), Device::Cpu).unwrap();
    // ᾱ is made bit-exact on every CPU (docs/NUMERICS.md).
    assert!(
        schedule
            .alphas_cumprod()
            .equal(&golden.get("ddpm/alphas_cumprod"))
    );
    let (latents, noise, t) = (
        golden.get("ddpm/latents"),
        golden.get("ddpm/noise"),
        golden.get("ddpm/timesteps"),
    );
    let checks = [
        ("noisy", schedule.add_noise(&latents, &noise, &t).unwrap()),
        (
            "velocity",
            schedule.get_velocity(&latents, &noise, &t).unwrap(),
        ),
        (
            "noisy_bf16",
            schedule
                .add_noise(
                    &latents.to_kind(Kind::BFloat16),
                    &noise.to_kind(Kind::BFloat16),
                    &t,
                )
                .unwrap()
                .to_kind(Kind::Float),
        ),
        ("snr", schedule.snr(&t).unwrap()),
        (
            "min_snr_weights_epsilon",
            schedule.min_snr_weights(&t, 5.0).unwrap(),
        ),
    ];
    // From the bit-exact ᾱ: two square roots, two products and a sum (add_noise, velocity), or
    // with the SNR and min-SNR weights up to six operations.
    for (name, actual) in checks {
        let err = rel(&actual, &golden.get(&format!("ddpm/{name}")));
        check(&format!("DDPM {name} vs diffusers"), err, f32_bound(6.0));
    }
    let v_schedule = DdpmSchedule::new(
        {
            let mut config = DdpmConfig::sdxl();
            config.prediction_type = PredictionType::VPrediction;
            config
        },
        Device::Cpu,
    )
    .unwrap();
    let err = rel(
        &v_schedule.min_snr_weights(&t, 5.0).unwrap(),
        &golden.get("ddpm/min_snr_weights_v_prediction"),
    );
    check("DDPM min-SNR v weights vs diffusers", err, f32_bound(6.0));
    assert!(
        v_schedule
            .target(&latents, &noise, &t)
            .unwrap()
            .equal(&v_schedule.get_velocity(&latents, &noise, &t).unwrap())
    );
    assert!(schedule.target(&latents, &noise, &t).unwrap().equal(&noise));
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let sdxl = SchedulerConfig::sdxl();
    for kind in SchedulerKind::ALL {
        let mut scheduler = build(kind, &sdxl).unwrap();
        for steps in [0, 1001] {
            let err = scheduler.set_timesteps(steps).unwrap_err();
            assert!(
                err.to_string().contains("num_inference_steps"),
                "{kind:?}: {err}"
            );
        }
        scheduler.set_timesteps(3).unwrap();
        let sample = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let wrong = Tensor::zeros([1, 4, 2, 3], (Kind::Float, Device::Cpu));
        assert!(
            matches!(
                scheduler.step(&wrong, &sample, None),
                Err(Error::SchedulerShape {
                    what: "model_output",
                    ..
                })
            ),
            "{kind:?}"
        );
        for _ in 0..3 {
            let _ = scheduler.step(&sample, &sample, None).unwrap();
        }
        assert!(matches!(
            scheduler.step(&sample, &sample, None),
            Err(Error::SchedulerExhausted { .. })
        ));
        assert_eq!(kind.short_name().parse::<SchedulerKind>().unwrap(), kind);
    }
    assert!("LMSDiscreteScheduler".parse::<SchedulerKind>().is_err());
    let config = |json: &str| SchedulerConfig::from_json(json).unwrap();
    for (kind, json, key) in [
        (
            SchedulerKind::DpmSolverMultistep,
            r#"{"algorithm_type": "sde-dpmsolver++"}"#,
            "algorithm_type",
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            r#"{"solver_order": 4}"#,
            "solver_order",
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            r#"{"use_lu_lambdas": true}"#,
            "use_lu_lambdas",
        ),
        (
            SchedulerKind::Ddim,
            r#"{"thresholding": true}"#,
            "thresholding",
        ),
        (
            SchedulerKind::EulerDiscrete,
            r#"{"interpolation_type": "log_linear"}"#,
            "interpolation_type",
        ),
        (
            SchedulerKind::EulerAncestralDiscrete,
            r#"{"prediction_type": "sample"}"#,
            "prediction_type",
        ),
        (
            SchedulerKind::EulerDiscrete,
            r#"{"timestep_spacing": "even"}"#,
            "timestep_spacing",
        ),
    ] {
        let err = build(kind, &config(json)).err().unwrap();
        assert!(err.to_string().contains(key), "{kind:?} {json}: {err}");
    }
    let missing = SchedulerConfig::from_file("/nonexistent/scheduler_config.json").unwrap_err();
    assert!(
        missing
            .to_string()
            .contains("/nonexistent/scheduler_config.json"),
        "{missing}"
    );
    let schedule = DdpmSchedule::new(DdpmConfig::sdxl(), Device::Cpu).unwrap();
    let latents = Tensor::zeros([2, 4, 2, 2], (Kind::Float, Device::Cpu));
    let three = Tensor::from_slice(&[1i64, 2, 3]);
    assert!(matches!(
        schedule.add_noise(&latents, &latents, &three),
        Err(Error::SchedulerShape {
            what: "timesteps",
            ..
        })
    ));
}

/// The typed `sdxl()` presets are what SDXL's `scheduler_config.json` gives each class.
#[test]
fn presets_equal_the_sdxl_file() {
    use sdxl_model::schedulers::{
        DdimConfig, DpmSolverMultistepConfig, EulerAncestralDiscreteConfig, EulerDiscreteConfig,
    };
    let file = SchedulerConfig::sdxl();
    assert_eq!(
        EulerDiscreteConfig::from_config(&file).unwrap(),
        EulerDiscreteConfig::sdxl()
    );
    assert_eq!(
        EulerAncestralDiscreteConfig::from_config(&file).unwrap(),
        EulerAncestralDiscreteConfig::sdxl()
    );
    assert_eq!(DdimConfig::from_config(&file).unwrap(), DdimConfig::sdxl());
    assert_eq!(
        DpmSolverMultistepConfig::from_config(&file).unwrap(),
        DpmSolverMultistepConfig::sdxl()
    );
    assert_eq!(DdpmConfig::from_config(&file).unwrap(), DdpmConfig::sdxl());
}

/// `--zero_terminal_snr`'s training schedule against diffusers' `DDPMScheduler(rescale_betas_zero_snr=True)`
/// over SDXL's config (fixture `ddpm_zero_terminal_snr`): the last ᾱ is exactly 0, so the last
/// timestep's noisy latents are the noise itself and its velocity is minus the latents.
#[test]
fn zero_terminal_snr_training_schedule_matches_diffusers() {
    let golden = TensorFile::open(fixture("ddpm-zero-terminal-snr.safetensors")).unwrap();
    let get = |key: &str| golden.tensor(key, Device::Cpu, None).unwrap();
    let mut config = SchedulerConfig::sdxl();
    config.rescale_betas_zero_snr = Some(true);
    config.prediction_type = Some("v_prediction".into());
    let schedule =
        DdpmSchedule::new(DdpmConfig::from_config(&config).unwrap(), Device::Cpu).unwrap();
    let alphas = schedule.alphas_cumprod();
    assert_eq!(alphas.double_value(&[999]), 0.0);
    // ᾱ: a cumulative product over 1000 betas, then the rescale (a square root, a shift, a scale, a
    // square, a ratio per step) and the product again.
    check(
        "ZTSNR ᾱ vs diffusers",
        rel(alphas, &get("alphas_cumprod")),
        f32_bound(2.0 * 1000.0 + 6.0),
    );
    let (latents, noise, t) = (get("latents"), get("noise"), get("timesteps"));
    let noisy = schedule.add_noise(&latents, &noise, &t).unwrap();
    let velocity = schedule.get_velocity(&latents, &noise, &t).unwrap();
    // From ᾱ's error: two square roots, two products and a sum.
    let bound = f32_bound(2.0 * 1000.0 + 12.0);
    check(
        "ZTSNR noisy vs diffusers",
        rel(&noisy, &get("noisy")),
        bound,
    );
    check(
        "ZTSNR velocity vs diffusers",
        rel(&velocity, &get("velocity")),
        bound,
    );
    assert!(noisy.get(4).equal(&noise.get(4)));
    assert!(velocity.get(4).equal(&-latents.get(4)));
    assert!(
        schedule
            .target(&latents, &noise, &t)
            .unwrap()
            .equal(&velocity)
    );
    // min-SNR-γ for v-prediction, min(SNR, γ)/(SNR + 1): finite everywhere, 0 at the last timestep.
    let weights = schedule.min_snr_weights(&t, 5.0).unwrap();
    assert!(bool::try_from(weights.isfinite().all()).unwrap());
    assert_eq!(weights.double_value(&[4]), 0.0);
}

/// `dpm++2m_karras` is DPM++ 2M with Karras sigmas whatever the config says: built from the plain
/// DPM++ 2M case's config it lays out diffusers' `use_karras_sigmas=True` schedule.
#[test]
fn dpm_2m_karras_kind_turns_karras_sigmas_on() {
    let golden = Golden::open();
    let kind: SchedulerKind = "dpm++2m_karras".parse().unwrap();
    assert_eq!(kind, SchedulerKind::DpmSolverMultistepKarras);
    let plain = &golden.configs["dpmpp_2m"];
    assert_eq!(plain["use_karras_sigmas"], serde_json::json!(false));
    let config = SchedulerConfig::from_json(&plain.to_string()).unwrap();
    let mut karras = build(kind, &config).unwrap();
    let mut plain = build(SchedulerKind::DpmSolverMultistep, &config).unwrap();
    for steps in [4, 30] {
        karras.set_timesteps(steps).unwrap();
        plain.set_timesteps(steps).unwrap();
        let expected = golden.values(&format!("dpmpp_2m_karras/n{steps}/timesteps"));
        let err = rel_values(karras.timesteps(), &expected);
        assert!(err <= schedule_bound(), "{steps} steps: {err:e}");
        assert_ne!(karras.timesteps(), plain.timesteps());
        let sigmas = golden.values(&format!("dpmpp_2m_karras/n{steps}/sigmas"));
        let actual: Vec<f64> = karras.sigmas().unwrap().iter().map(|&s| s as f64).collect();
        let err = rel_values(&actual, &sigmas);
        assert!(err <= schedule_bound(), "{steps} steps, sigmas: {err:e}");
    }
}
