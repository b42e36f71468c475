//! [`EMAModel`] against diffusers 0.42.1's `EMAModel` over 30 steps, its `step_if`, its
//! store/copy_to/restore and its state file.
//!
//! The fixture `ema.safetensors` comes from `gen_ema` in `tools/fixtures/generate.py`: four
//! LoRA-like float32 parameters moved by SGD with momentum for 30 steps, tracked by two
//! `EMAModel`s (the defaults with `update_after_step=5`; the warm-up schedule with non-default
//! `inv_gamma`, `power`, `decay` and `min_decay`, both clamps reached). It holds the parameters
//! after every optimizer step, and each run's shadow parameters and `cur_decay_value` after every
//! EMA step; the settings are read from its metadata. The test writes the recorded parameters into
//! its own and steps the average, so only the average is compared.
//!
//! # Error model
//! The decay is float64 on both sides: `pow` (the warm-up) is within 2 ulp in any libm, the rest
//! correctly rounded, so the decays agree within `4·2⁻⁵³` absolute (a value in [0, 1]). Its float32
//! `1 − decay` may then round to a neighbour, and each step rounds three times (`s − p`, the
//! product, the subtraction): depth 4 per step, an earlier difference carried with factor
//! `decay ≤ 1`, so depth `4·steps` after `steps` steps ([`test_support::f32_bound`]).
//! With a CUDA device the run is repeated there, steps 3–30 replayed from one captured graph.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use optim8bit::{EMAConfig, EMAModel, Error};
use serde_json::Value;
use support::{Reference, read_runs, temp_path};
use tch::{Device, Kind, Tensor};
use test_support::{check, f32_bound, max_rel_error};

const FILE: &str = "ema.safetensors";

fn reference() -> Reference {
    read_runs(FILE, "ema")
}

/// `EMAModel(**settings)` as [`EMAConfig`]: the defaults, overridden by the run's keywords.
fn config(settings: &Value) -> EMAConfig {
    let mut c = EMAConfig::default();
    for (key, value) in settings.as_object().unwrap() {
        match key.as_str() {
            "decay" => c.decay = value.as_f64().unwrap(),
            "min_decay" => c.min_decay = value.as_f64().unwrap(),
            "update_after_step" => c.update_after_step = value.as_u64().unwrap(),
            "use_ema_warmup" => c.use_ema_warmup = value.as_bool().unwrap(),
            "inv_gamma" => c.inv_gamma = value.as_f64().unwrap(),
            "power" => c.power = value.as_f64().unwrap(),
            other => panic!("the fixture sets `{other}`, which EMAConfig lacks"),
        }
    }
    c
}

fn params_on(r: &Reference, device: Device) -> Vec<Tensor> {
    r.params
        .iter()
        .map(|n| r.tensors[&format!("{n}.initial")].to_device(device).copy())
        .collect()
}

/// Writes the recorded parameters of optimizer step `step` into `params`.
fn set_params(r: &Reference, params: &[Tensor], step: i64) {
    for (p, n) in params.iter().zip(&r.params) {
        p.shallow_clone()
            .copy_(&r.tensors[&format!("{n}.params")].get(step));
    }
}

fn check_run_on(r: &Reference, run: &str, device: Device) {
    let params = params_on(r, device);
    let mut ema = EMAModel::new(
        params.iter().map(Tensor::shallow_clone).collect(),
        config(&r.runs[run]),
    )
    .unwrap();
    let mut graph = None;
    let (mut worst, mut worst_decay) = (0.0f64, 0.0f64);
    let bound_decay = 4.0 * f64::EPSILON / 2.0;
    for step in 0..r.steps {
        set_params(r, &params, step);
        match &graph {
            Some(g) => torch_cuda::CudaGraph::replay(g).unwrap(),
            None if device.is_cuda() && step == 2 => {
                tch::Cuda::synchronize(0);
                let (g, recorded) = torch_cuda::CudaGraph::capture(
                    0,
                    None,
                    torch_cuda::CaptureMode::Global,
                    || ema.step(),
                )
                .unwrap();
                recorded.unwrap();
                g.replay().unwrap();
                graph = Some(g);
            }
            None => ema.step().unwrap(),
        }
        let decay = ema.cur_decay_value().double_value(&[]);
        let expected = r.tensors[&format!("{run}.decay")].double_value(&[step]);
        worst_decay = worst_decay.max((decay - expected).abs());
        assert_eq!(ema.optimization_step().double_value(&[]), (step + 1) as f64);
        let bound = f32_bound(4.0 * (step + 1) as f64);
        for (s, n) in ema.shadow_params().iter().zip(&r.params) {
            let expected = r.tensors[&format!("{run}.{n}")].get(step);
            let error = max_rel_error(s, &expected);
            assert!(
                error <= bound,
                "{run} on {device:?}, step {}, {n}: error {error:e} > bound {bound:e}",
                step + 1
            );
            worst = worst.max(error);
        }
    }
    check(
        &format!("ema {run} decay on {device:?}"),
        worst_decay,
        bound_decay,
    );
    // Every step was checked against its own bound; the last step's is the largest.
    check(
        &format!("ema {run} shadow params on {device:?}"),
        worst,
        f32_bound(4.0 * r.steps as f64),
    );
}

#[test]
fn the_average_and_its_decay_follow_diffusers_ema_model() {
    let r = reference();
    assert_eq!(r.runs.len(), 2);
    for run in r.runs.keys() {
        check_run_on(&r, run, Device::Cpu);
        if test_support::cuda() {
            check_run_on(&r, run, Device::Cuda(0));
        }
    }
}

#[test]
fn a_false_condition_leaves_the_average_untouched_and_a_true_one_steps() {
    let r = reference();
    let params = params_on(&r, Device::Cpu);
    let settings = &r.runs["warmup"];
    let handles = || params.iter().map(Tensor::shallow_clone).collect();
    let mut gated = EMAModel::new(handles(), config(settings)).unwrap();
    let mut plain = EMAModel::new(handles(), config(settings)).unwrap();
    let no = Tensor::from(false);
    let yes = Tensor::from(1.0f32);
    for step in 0..r.steps {
        set_params(&r, &params, step);
        let before: Vec<Tensor> = gated.shadow_params().iter().map(Tensor::copy).collect();
        gated.step_if(&no).unwrap();
        for (s, b) in gated.shadow_params().iter().zip(&before) {
            assert!(s.equal(b), "a false condition moved the average");
        }
        assert_eq!(
            gated.optimization_step().double_value(&[]),
            step as f64,
            "a false condition counted a step"
        );
        gated.step_if(&yes).unwrap();
        plain.step().unwrap();
        for (g, p) in gated.shadow_params().iter().zip(plain.shadow_params()) {
            assert!(g.equal(p), "step_if(true) differs from step()");
        }
    }
    let wrong = Tensor::from_slice(&[true, false]);
    assert!(matches!(
        gated.step_if(&wrong),
        Err(Error::StepCondition { .. })
    ));
}

#[test]
fn store_copy_to_restore_swap_the_average_in_and_out() {
    let params = vec![
        Tensor::from_slice(&[1.0f32, 2.0]),
        Tensor::from_slice(&[3.0f32]),
    ];
    let mut ema = EMAModel::new(
        params.iter().map(Tensor::shallow_clone).collect(),
        EMAConfig::default(),
    )
    .unwrap();
    assert!(matches!(ema.restore(), Err(Error::EmaNotStored)));
    for _ in 0..3 {
        for p in &params {
            let _ = p.shallow_clone().g_add_scalar_(1.0);
        }
        ema.step().unwrap();
    }
    let raw: Vec<Tensor> = params.iter().map(Tensor::copy).collect();
    assert!(!raw[0].equal(&ema.shadow_params()[0]));
    ema.store().unwrap();
    ema.copy_to().unwrap();
    for (p, s) in params.iter().zip(ema.shadow_params()) {
        assert!(p.equal(s), "copy_to left a raw weight");
    }
    ema.restore().unwrap();
    for (p, r) in params.iter().zip(&raw) {
        assert!(p.equal(r), "restore did not bring the raw weights back");
    }
    assert!(
        matches!(ema.restore(), Err(Error::EmaNotStored)),
        "restore drops the copy"
    );
}

#[test]
fn the_state_file_resumes_bit_for_bit_and_refuses_other_settings() {
    let r = reference();
    let settings = config(&r.runs["warmup"]);
    let params = params_on(&r, Device::Cpu);
    let handles = || params.iter().map(Tensor::shallow_clone).collect::<Vec<_>>();
    let mut whole = EMAModel::new(handles(), settings).unwrap();
    let mut first = EMAModel::new(handles(), settings).unwrap();
    let path = temp_path("ema-state.safetensors");
    for step in 0..r.steps {
        set_params(&r, &params, step);
        whole.step().unwrap();
        if step < 10 {
            first.step().unwrap();
        }
        if step == 9 {
            first.save(&path).unwrap();
        }
    }
    // A fresh average (another starting point) takes the saved state and continues.
    let mut resumed = EMAModel::new(handles(), settings).unwrap();
    resumed.load(&path).unwrap();
    assert_eq!(resumed.optimization_step().double_value(&[]), 10.0);
    let mut replay = EMAModel::new(handles(), settings).unwrap();
    replay.load(&path).unwrap();
    for step in 10..r.steps {
        set_params(&r, &params, step);
        replay.step().unwrap();
    }
    for (a, b) in replay.shadow_params().iter().zip(whole.shadow_params()) {
        assert!(a.equal(b), "a resumed average differs from the whole run's");
    }

    let other = settings.with_power(0.5);
    let mut mismatched = EMAModel::new(handles(), other).unwrap();
    let before = mismatched.shadow_params()[0].copy();
    match mismatched.load(&path) {
        Err(Error::StateMismatch { key, .. }) => assert_eq!(key, "power"),
        other => panic!("expected a mismatch on `power`, got {other:?}"),
    }
    assert!(
        mismatched.shadow_params()[0].equal(&before),
        "a refused load changed the state"
    );
    let mut fewer = EMAModel::new(handles().into_iter().take(3).collect(), settings).unwrap();
    assert!(matches!(
        fewer.load(&path),
        Err(Error::StateMismatch { ref key, .. }) if key == "shadow_params.3"
    ));
    assert!(matches!(
        resumed.load(temp_path("no-such-ema.safetensors")),
        Err(Error::UnreadableStateFile { .. })
    ));
}

#[test]
fn bad_settings_and_parameters_are_refused_naming_them() {
    let p = || vec![Tensor::zeros([2], (Kind::Float, Device::Cpu))];
    let bad = |config: EMAConfig, name: &str| match EMAModel::new(p(), config) {
        Err(Error::InvalidHyperParameter { name: n, .. }) => assert_eq!(n, name),
        other => panic!("expected `{name}` refused, got {other:?}"),
    };
    bad(EMAConfig::default().with_decay(1.5), "decay");
    bad(EMAConfig::default().with_min_decay(-0.1), "min_decay");
    bad(EMAConfig::default().with_inv_gamma(0.0), "inv_gamma");
    bad(EMAConfig::default().with_power(f64::NAN), "power");
    let half = vec![
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        Tensor::zeros([2], (Kind::Half, Device::Cpu)),
    ];
    assert!(matches!(
        EMAModel::new(half, EMAConfig::default()),
        Err(Error::EmaParameter { index: 1, .. })
    ));
}
