//! The fp16 loss scaler inside [`optimizer_step`]: an overflow skips the step without counting
//! against `--max_nonfinite_steps`, halves the scale and leaves the parameters untouched; clean
//! steps see the unscaled gradients and grow the scale after the interval.

use super::tests::backward;
use super::*;
use optim8bit::GradScalerConfig;

fn setup() -> (Tensor, Optimizer, StepSettings, Accumulators) {
    super::tests::setup_in(Kind::Half)
}

fn scaled(growth_interval: i64) -> (Tensor, Optimizer, StepSettings, Accumulators) {
    let (param, optimizer, settings, mut acc) = setup();
    let config = GradScalerConfig::default().with_growth_interval(growth_interval);
    acc.scaler = Some(GradScaler::new(config, Device::Cpu).unwrap());
    (param, optimizer, settings, acc)
}

/// A micro-step's backward as `micro_step` does it: `loss / accumulation`, scaled.
fn scaled_backward(param: &Tensor, factor: f64, settings: &StepSettings, acc: &mut Accumulators) {
    let loss = (param * factor).sum(Kind::Float);
    let _ = acc.step_loss.fill_(loss.double_value(&[]));
    backward_scaled(&loss, settings, acc).unwrap();
}

fn scale_of(acc: &Accumulators) -> f64 {
    acc.scaler
        .as_ref()
        .unwrap()
        .scale_tensor()
        .double_value(&[])
}

#[test]
fn an_fp16_overflow_skips_the_step_halves_the_scale_and_is_not_a_nonfinite_skip() {
    let (param, mut optimizer, settings, mut acc) = scaled(2000);
    let before = param.detach().copy();
    // 1e35 · 65536 overflows float32: a finite loss with infinite scaled gradients.
    scaled_backward(&param, 1e35, &settings, &mut acc);
    assert!(param.grad().isinf().all().int64_value(&[]) == 1);
    let params = [param.shallow_clone()];
    optimizer_step(&mut optimizer, &params, &settings, &mut acc, true).unwrap();
    assert!(
        param.detach().equal(&before),
        "an overflow moved the parameters"
    );
    assert_eq!(optimizer.step_count().double_value(&[]), 0.0);
    assert_eq!(scale_of(&acc), 32768.0);
    assert_eq!(acc.overflows.double_value(&[]), 1.0);
    assert_eq!(acc.skipped.double_value(&[]), 0.0);
    assert_eq!(acc.window_steps.double_value(&[]), 0.0);

    // A non-finite loss is a non-finite skip (and an overflow of the scaler's state too).
    scaled_backward(&param, f64::NAN, &settings, &mut acc);
    optimizer_step(&mut optimizer, &params, &settings, &mut acc, true).unwrap();
    assert_eq!(acc.skipped.double_value(&[]), 1.0);
    assert_eq!(acc.overflows.double_value(&[]), 1.0);
    assert_eq!(scale_of(&acc), 16384.0);
    assert!(param.detach().equal(&before));
}

#[test]
fn fp16_steps_see_unscaled_gradients_and_the_scale_grows_after_the_interval() {
    let (param, mut optimizer, mut settings, mut acc) = scaled(2);
    settings.max_grad_norm = 1e9; // no clipping: the norm is the unscaled gradient's
    let params = [param.shallow_clone()];
    for step in 1..=2 {
        scaled_backward(&param, 0.5, &settings, &mut acc);
        assert_eq!(param.grad().double_value(&[0]), 0.5 * 65536.0);
        optimizer_step(&mut optimizer, &params, &settings, &mut acc, true).unwrap();
        assert_eq!(
            acc.grad_norm.double_value(&[]),
            (3.0f64 * 0.25).sqrt() as f32 as f64
        );
        assert_eq!(optimizer.step_count().double_value(&[]), f64::from(step));
    }
    assert_eq!(
        scale_of(&acc),
        131072.0,
        "two clean steps with growth_interval 2"
    );
    assert_eq!(
        (
            acc.skipped.double_value(&[]),
            acc.overflows.double_value(&[])
        ),
        (0.0, 0.0)
    );
    // The same two steps without a scaler move the parameters identically (the scale is a
    // power of two: scaling and unscaling are exact).
    let (plain, mut plain_optimizer, settings_plain, mut plain_acc) = setup();
    let settings_plain = StepSettings {
        max_grad_norm: 1e9,
        ..settings_plain
    };
    for _ in 0..2 {
        backward(&plain, 0.5);
        optimizer_step(
            &mut plain_optimizer,
            &[plain.shallow_clone()],
            &settings_plain,
            &mut plain_acc,
            true,
        )
        .unwrap();
    }
    assert!(plain.detach().equal(&param.detach()));
}
