//! [`Optimizer`]: one type over every optimizer of the crate. Its state memory agrees with what
//! each config computes from the shapes alone; it steps, skips and resumes as the optimizer it
//! holds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use optim8bit::{
    AdafactorConfig, AdamWConfig, LionConfig, Optimizer, OptimizerConfig, ParamGroup, ProdigyConfig,
};
use support::{set_grad, temp_path};
use tch::{Device, Kind, Tensor};

fn configs() -> Vec<(&'static str, OptimizerConfig)> {
    vec![
        ("adamw", OptimizerConfig::AdamW(AdamWConfig::fp32())),
        (
            "adamw8bit",
            OptimizerConfig::AdamW(AdamWConfig::eight_bit()),
        ),
        ("lion", OptimizerConfig::Lion(LionConfig::default())),
        (
            "prodigy",
            OptimizerConfig::Prodigy(ProdigyConfig::default()),
        ),
        (
            "prodigy_no_beta1",
            OptimizerConfig::Prodigy(ProdigyConfig::default().with_beta1(0.0)),
        ),
        (
            "adafactor",
            OptimizerConfig::Adafactor(AdafactorConfig::default().with_relative_step(false)),
        ),
        (
            "adafactor_beta1",
            OptimizerConfig::Adafactor(
                AdafactorConfig::default()
                    .with_relative_step(false)
                    .with_beta1(Some(0.9)),
            ),
        ),
    ]
}

/// Shapes of a LoRA (down and up of linears, a conv down, a DoRA magnitude vector), one large
/// enough for 8-bit states.
const SHAPES: [&[i64]; 5] = [&[4, 1280], &[1280, 4], &[4, 8, 3, 3], &[640], &[4, 40]];

/// Deterministic values of `shape` for `seed`, without libtorch's process-wide generator (the
/// tests of this file run in parallel).
fn values(shape: &[i64], seed: f64) -> Tensor {
    let numel: i64 = shape.iter().product();
    Tensor::arange(numel, (Kind::Float, Device::Cpu))
        .multiply_scalar(0.37)
        .g_add_scalar(seed)
        .sin()
        .reshape(shape)
}

fn params(seed: i64) -> Vec<Tensor> {
    SHAPES
        .iter()
        .map(|s| values(s, seed as f64).set_requires_grad(true))
        .collect()
}

fn build(config: OptimizerConfig, params: &[Tensor]) -> Optimizer {
    let lr = match config {
        OptimizerConfig::Prodigy(_) => 1.0,
        _ => 1e-3,
    };
    let groups = vec![
        ParamGroup::new(
            params[..3].iter().map(Tensor::shallow_clone).collect(),
            lr,
            1e-2,
        ),
        ParamGroup::new(
            params[3..].iter().map(Tensor::shallow_clone).collect(),
            lr,
            1e-3,
        ),
    ];
    config.build(groups).unwrap()
}

fn set_grads(params: &[Tensor], step: i64) {
    for (i, p) in params.iter().enumerate() {
        set_grad(p, &values(&p.size(), 100.0 + 7.0 * step as f64 + i as f64));
    }
}

#[test]
fn state_bytes_agree_with_the_config_and_the_memory_held() {
    for (name, config) in configs() {
        let opt = build(config, &params(0));
        let expected: i64 = SHAPES.iter().map(|s| config.state_bytes(s)).sum();
        assert_eq!(opt.state_bytes(), expected, "{name}");
        assert_eq!(opt.config(), config, "{name}");
        let numel: i64 = SHAPES.iter().map(|s| s.iter().product::<i64>()).sum();
        assert_eq!(opt.param_count(), numel, "{name}");
        assert!(expected > 0, "{name}");
    }
    // 8-bit AdamW: 2 bytes + absmax for the 5120-element tensors, fp32 for the rest.
    let eight = OptimizerConfig::AdamW(AdamWConfig::eight_bit());
    assert_eq!(eight.state_bytes(&[4, 1280]), 2 * 5120 + 8 * 20);
    assert_eq!(eight.state_bytes(&[640]), 8 * 640);
    // Adafactor factors the last two dimensions.
    let ada = OptimizerConfig::Adafactor(AdafactorConfig::default());
    assert_eq!(ada.state_bytes(&[4, 8, 3, 3]), 4 * 4 * 8 * (3 + 3));
}

/// Through the one type: steps move the parameters, a false condition moves nothing, and a state
/// saved after 3 steps and loaded into a fresh optimizer continues bit-identically.
#[test]
fn steps_skip_and_resume_as_the_optimizer_it_holds() {
    for (name, config) in configs() {
        let straight = params(0);
        let mut a = build(config, &straight);
        let first = params(0);
        let mut b = build(config, &first);
        for step in 0..3 {
            set_grads(&straight, step);
            a.step_if(&Tensor::from(true)).unwrap();
            a.zero_grad().unwrap();
            set_grads(&first, step);
            b.step().unwrap();
            b.zero_grad().unwrap();
        }
        let path = temp_path(&format!("enum-{name}.safetensors"));
        b.save(&path).unwrap();
        let resumed: Vec<Tensor> = first
            .iter()
            .map(|p| p.detach().copy().set_requires_grad(true))
            .collect();
        let mut c = build(config, &resumed);
        c.load(&path).unwrap();
        assert_eq!(c.step_count().double_value(&[]), 3.0, "{name}");
        let before: Vec<Tensor> = resumed.iter().map(|p| p.detach().copy()).collect();
        set_grads(&resumed, 99);
        c.step_if(&Tensor::from(false)).unwrap();
        for (p, q) in resumed.iter().zip(&before) {
            assert!(p.equal(q), "{name}: a skipped step moved a parameter");
        }
        for step in 3..6 {
            set_grads(&straight, step);
            a.step().unwrap();
            set_grads(&resumed, step);
            c.step().unwrap();
        }
        for (i, (p, q)) in straight.iter().zip(&resumed).enumerate() {
            assert!(p.equal(q), "{name}: parameter {i} differs after resume");
        }
        let initial = params(0);
        assert!(
            straight.iter().zip(&initial).any(|(p, q)| !p.equal(q)),
            "{name}: nothing moved"
        );
        // Another optimizer's state file is refused.
        let other = if name.starts_with("lion") {
            "adamw"
        } else {
            "lion"
        };
        let (_, other_config) = configs().into_iter().find(|(n, _)| *n == other).unwrap();
        let mut wrong = build(other_config, &params(0));
        assert!(wrong.load(&path).is_err(), "{name} loaded into {other}");
    }
}
