//! Lion (fp32 and 8-bit momentum), Prodigy and Adafactor: state files (resume equal to an uninterrupted run, foreign
//! states refused), `step_if`, parameters without gradients. Uses the fixture of
//! `tests/extra_optimizers.rs` for parameters, gradients and settings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use optim8bit::{Adafactor, AdafactorConfig, Lion, ParamGroup, Prodigy, ProdigyConfig};
use support::extra::{Any, build, initial_params, reference, saved, set_grads};
use support::{set_grad, temp_path};
use tch::Tensor;

/// Saving after 10 steps, loading into a fresh optimizer over copies of the parameters and taking
/// the other 10 steps gives bit-identical parameters and states to 20 uninterrupted steps.
#[test]
fn resume_equals_an_uninterrupted_run() {
    let r = reference();
    for run in [
        "lion",
        "lion8bit",
        "prodigy",
        "prodigy_plain",
        "prodigy_coupled",
        "adafactor_relative",
        "adafactor_fixed",
    ] {
        let straight = initial_params(&r);
        let mut opt = build(&r, run, &straight);
        let first = initial_params(&r);
        let mut interrupted = build(&r, run, &first);
        for step in 0..10 {
            set_grads(&r, &straight, step);
            opt.step();
            set_grads(&r, &first, step);
            interrupted.step();
        }
        let path = temp_path(&format!("{run}-resume.safetensors"));
        interrupted.save(&path);
        // A fresh process: new parameters holding the values at step 10, a new optimizer.
        let resumed: Vec<Tensor> = first
            .iter()
            .map(|p| p.detach().copy().set_requires_grad(true))
            .collect();
        let mut opt2 = build(&r, run, &resumed);
        opt2.load(&path);
        for step in 10..r.steps {
            set_grads(&r, &straight, step);
            opt.step();
            set_grads(&r, &resumed, step);
            opt2.step();
        }
        for (a, b) in straight.iter().zip(&resumed) {
            assert!(a.equal(b), "{run}: resumed parameters differ");
        }
        let (a, b) = (
            saved(&opt, &format!("{run}-a")),
            saved(&opt2, &format!("{run}-b")),
        );
        assert_eq!(a.len(), b.len());
        for (key, t) in &a {
            assert!(t.equal(&b[key]), "{run}: state {key} differs after resume");
        }
    }
}

/// `step_if(false)` leaves parameters and every state bit-identical; `step_if(true)` is `step`.
#[test]
fn step_if_false_changes_nothing() {
    let r = reference();
    for run in ["lion", "lion8bit", "prodigy", "adafactor_fixed"] {
        let params = initial_params(&r);
        let mut opt = build(&r, run, &params);
        let twin = initial_params(&r);
        let mut stepped = build(&r, run, &twin);
        for step in 0..3 {
            set_grads(&r, &params, step);
            opt.step();
            set_grads(&r, &twin, step);
            stepped.step();
        }
        let before = saved(&opt, &format!("{run}-before"));
        let kept: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
        set_grads(&r, &params, 3);
        let no = Tensor::from(false);
        match &mut opt {
            Any::Lion(o) => o.step_if(&no),
            Any::Prodigy(o) => o.step_if(&no),
            Any::Adafactor(o) => o.step_if(&no),
        }
        .unwrap();
        let after = saved(&opt, &format!("{run}-after"));
        for (key, t) in &before {
            assert!(
                t.equal(&after[key]),
                "{run}: {key} changed by a skipped step"
            );
        }
        for (p, k) in params.iter().zip(&kept) {
            assert!(p.equal(k), "{run}: a skipped step moved a parameter");
        }
        let yes = Tensor::from(1.0f32);
        match &mut opt {
            Any::Lion(o) => o.step_if(&yes),
            Any::Prodigy(o) => o.step_if(&yes),
            Any::Adafactor(o) => o.step_if(&yes),
        }
        .unwrap();
        set_grads(&r, &twin, 3);
        stepped.step();
        for (p, q) in params.iter().zip(&twin) {
            assert!(p.equal(q), "{run}: step_if(true) differs from step");
        }
    }
}

/// A state file of another optimizer or other settings is refused, naming the key, and changes
/// nothing.
#[test]
fn load_refuses_a_foreign_state() {
    let r = reference();
    let params = initial_params(&r);
    let lion = build(&r, "lion", &params);
    let path = temp_path("lion-state.safetensors");
    lion.save(&path);
    let Any::Prodigy(mut prodigy) = build(&r, "prodigy", &params) else {
        unreachable!()
    };
    let message = prodigy.load(&path).unwrap_err().to_string();
    assert!(
        message.contains("lion-state.safetensors") && message.contains("missing"),
        "{message}"
    );
    let Any::Adafactor(mut a) = build(&r, "adafactor_fixed", &params) else {
        unreachable!()
    };
    let path = temp_path("adafactor-relative.safetensors");
    build(&r, "adafactor_relative", &params).save(&path);
    let message = a.load(&path).unwrap_err().to_string();
    assert!(
        message.contains("adafactor-relative.safetensors"),
        "{message}"
    );
    assert_eq!(a.step_count().double_value(&[]), 0.0);
    let message = Adafactor::new(
        vec![ParamGroup::new(vec![params[0].shallow_clone()], 1e-3, 0.0)],
        AdafactorConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("param_groups[0].lr"), "{message}");
    let message = Prodigy::new(
        vec![
            ParamGroup::new(vec![params[0].shallow_clone()], 1.0, 0.0),
            ParamGroup::new(vec![params[1].shallow_clone()], 0.5, 0.0),
        ],
        ProdigyConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("param_groups[1].lr"), "{message}");
}

/// A parameter without a gradient is skipped (as in the references): it keeps its value while
/// the others, in another group, move.
#[test]
fn parameters_without_gradients_are_left_alone() {
    let r = reference();
    for run in [
        "lion",
        "lion8bit",
        "prodigy",
        "adafactor_relative",
        "adafactor_fixed",
    ] {
        let params = initial_params(&r);
        let any = build(&r, run, &params);
        let (lr, wd) = match &any {
            Any::Lion(o) => (o.learning_rate(0).unwrap(), o.weight_decay(0).unwrap()),
            Any::Prodigy(o) => (o.learning_rate(0).unwrap(), o.weight_decay(0).unwrap()),
            Any::Adafactor(o) => (o.learning_rate(0).unwrap(), o.weight_decay(0).unwrap()),
        };
        let groups = vec![
            ParamGroup::new(vec![params[0].shallow_clone()], lr, wd),
            ParamGroup::new(vec![params[1].shallow_clone()], lr, wd),
        ];
        let mut opt = match any {
            Any::Lion(o) => Any::Lion(Lion::new(groups, *o.config()).unwrap()),
            Any::Prodigy(o) => Any::Prodigy(Prodigy::new(groups, *o.config()).unwrap()),
            Any::Adafactor(o) => Any::Adafactor(Adafactor::new(groups, *o.config()).unwrap()),
        };
        let untouched = params[1].detach().copy();
        let before = params[0].detach().copy();
        for step in 0..3 {
            set_grad(
                &params[0],
                &r.tensors[&format!("{}.grads", r.params[0])].get(step),
            );
            opt.step();
        }
        assert!(!params[1].grad().defined(), "{run}");
        assert!(
            params[1].equal(&untouched),
            "{run}: moved without a gradient"
        );
        assert!(
            !params[0].equal(&before),
            "{run}: the other parameter did not move"
        );
    }
}
