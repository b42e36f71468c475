//! 8-bit AdamW against fp32 AdamW on a small least-squares problem: over 500 full-batch steps the
//! two loss curves stay within 2 % of each other.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use optim8bit::{AdamW, AdamWConfig, ParamGroup};
use tch::{Device, Kind, Tensor};

const STEPS: usize = 500;

/// Trains `y ≈ x·W + b` (W `[32, 128]`, 4096 elements: 8-bit states; b `[128]`: fp32 states) on
/// noisy targets and returns the loss before each step.
fn loss_curve(config: AdamWConfig) -> Vec<f64> {
    tch::set_num_threads(1); // tiny tensors: threads only add overhead on a shared machine
    tch::manual_seed(42);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([256, 32], opts);
    let true_w = Tensor::randn([32, 128], opts) * 0.3;
    let true_b = Tensor::randn([128], opts);
    let y = x.matmul(&true_w) + &true_b + Tensor::randn([256, 128], opts) * 0.1;

    let w = (Tensor::randn([32, 128], opts) * 0.1).set_requires_grad(true);
    let b = Tensor::zeros([128], opts).set_requires_grad(true);
    let group = ParamGroup::new(vec![w.shallow_clone(), b.shallow_clone()], 3e-3, 1e-2);
    let mut optimizer = AdamW::new(vec![group], config).unwrap();
    let mut curve = Vec::with_capacity(STEPS);
    for _ in 0..STEPS {
        optimizer.zero_grad().unwrap();
        let loss = (x.matmul(&w) + &b - &y).square().mean(Kind::Float);
        curve.push(loss.double_value(&[]));
        loss.backward();
        optimizer.step().unwrap();
    }
    curve
}

#[test]
fn eight_bit_loss_curve_stays_within_two_percent_of_fp32() {
    let eight = loss_curve(AdamWConfig::eight_bit());
    let full = loss_curve(AdamWConfig::fp32());
    let deviation = |i: usize| (eight[i] - full[i]).abs() / full[i];
    for i in [0, 49, 99, 199, 299, 399, 499] {
        println!(
            "step {:3}: fp32 {:.5}  8-bit {:.5}  ({:+.3} %)",
            i + 1,
            full[i],
            eight[i],
            100.0 * (eight[i] - full[i]) / full[i]
        );
    }
    let worst = (0..STEPS)
        .max_by(|&a, &b| deviation(a).total_cmp(&deviation(b)))
        .unwrap();
    println!(
        "largest deviation: {:.3} % at step {}",
        100.0 * deviation(worst),
        worst + 1
    );
    // The problem is learnt (not a flat curve) ...
    assert!(
        full[STEPS - 1] < 0.05 * full[0],
        "fp32 AdamW did not learn: {} → {}",
        full[0],
        full[STEPS - 1]
    );
    // ... and the 8-bit curve follows the fp32 one at every step.
    assert!(
        deviation(worst) <= 0.02,
        "8-bit loss deviates by {:.2} % at step {}",
        100.0 * deviation(worst),
        worst + 1
    );
}
