//! libtorch's CPU numbers that must not depend on the CPU, computed in scalar code.
//!
//! libtorch picks its CPU kernels at run time (plain, AVX2, AVX-512; `ATEN_CPU_CAPABILITY` forces
//! one), and a few float32 kernels give other last bits with and without AVX2 because their
//! vectorised builds use other functions or fused multiply-adds. Where a value is part of what a
//! user relies on, the same numbers on every machine, this module computes what the AVX2 kernels
//! compute (the numbers PyTorch gives on nearly every x86-64 machine today, and on the GPU
//! machines), with the same operations in the same order and `f32::mul_add` where the AVX2 build
//! fuses a multiply and an add (`mul_add` rounds once on every CPU). docs/NUMERICS.md has the
//! derivations and how each was checked.
//!
//! - [`randn`]: `torch.randn` from a seeded CPU generator: libtorch's Box–Muller transform
//!   (`normal_fill` in ATen's `native/cpu/DistributionTemplates.h`) evaluates `log` and `sincos` with
//!   the Cephes polynomials of `native/cpu/avx_mathfun.h` under AVX2 and AVX-512, and with the C
//!   library's `logf`, `cosf`, `sinf` otherwise; about 1 % of the values differ in the last bit.
//! - [`linspace`]: float32 `torch.linspace`, which the DDPM training schedule and bitsandbytes'
//!   8-bit quantization map are built from; its AVX2 build fuses `start + step·i`.

use tch::{Device, Kind, Tensor};

/// Box–Muller works on blocks of 16 uniform numbers: the first 8 give radii, the last 8 angles.
const BLOCK: usize = 16;

/// A float32 tensor of `shape` on the CPU drawn from libtorch's default generator (seeded with
/// [`tch::manual_seed`]) as `torch.randn` draws it with AVX2, on any CPU: the uniform draws come
/// from the generator (integer arithmetic, the same everywhere), the transform is computed here.
///
/// Consumes the generator exactly as `torch.randn` does, so draws before and after it stay in
/// step with PyTorch's. Tensors of fewer than 16 elements take libtorch's own sampler, which uses
/// double precision and the C library there on every CPU.
///
/// # Errors
/// libtorch errors (a negative dimension).
pub fn randn(shape: &[i64]) -> Result<Tensor, tch::TchError> {
    randn_from(
        shape,
        |n| {
            let drawn = Tensor::f_rand([n as i64], (Kind::Float, Device::Cpu))?;
            Vec::<f32>::try_from(&drawn)
        },
        |shape| Tensor::f_randn(shape, (Kind::Float, Device::Cpu)),
        |e| e,
    )
}

/// [`randn`] from `generator` instead of the default generator: `torch.randn(shape,
/// generator=g)` as PyTorch computes it with AVX2, on any CPU.
///
/// # Errors
/// [`crate::Error::Rng`] with libtorch's message (a negative dimension).
pub fn randn_with(
    generator: &mut crate::rng::Generator,
    shape: &[i64],
) -> Result<Tensor, crate::Error> {
    let generator = std::cell::RefCell::new(generator);
    randn_from(
        shape,
        |n| generator.borrow_mut().rand(n),
        |shape| generator.borrow_mut().randn(shape),
        |e| crate::Error::Rng(e.to_string()),
    )
}

/// The Box–Muller transform of [`randn`] over uniform draws `uniform(n)`; `small` draws a tensor of
/// fewer than 16 elements (libtorch's own sampler); `torch_error` wraps libtorch's errors.
fn randn_from<E>(
    shape: &[i64],
    mut uniform: impl FnMut(usize) -> Result<Vec<f32>, E>,
    small: impl FnOnce(&[i64]) -> Result<Tensor, E>,
    torch_error: impl Fn(tch::TchError) -> E,
) -> Result<Tensor, E> {
    let numel: i64 = shape.iter().product();
    if numel < BLOCK as i64 {
        return small(shape);
    }
    let numel = numel as usize;
    let mut values = uniform(numel)?;
    for block in values.chunks_exact_mut(BLOCK) {
        box_muller_16(block);
    }
    // As libtorch: a ragged end is replaced by a block of 16 fresh draws ending at the last element.
    if !numel.is_multiple_of(BLOCK) {
        let tail = uniform(BLOCK)?;
        let last = &mut values[numel - BLOCK..];
        last.copy_from_slice(&tail);
        box_muller_16(last);
    }
    Tensor::f_from_slice(&values)
        .and_then(|t| t.f_reshape(shape))
        .map_err(torch_error)
}

/// float32 `torch.linspace(start, end, steps)` as libtorch's CPU kernel computes it with AVX2:
/// `start + step·i` for the first half and `end − step·(steps − 1 − i)` for the second, each a
/// fused multiply-add, with `step = (end − start)/(steps − 1)` in float32. `start` and `end` are
/// the float32 values PyTorch rounds its arguments to.
pub fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps <= 1 {
        return vec![start; steps];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `normal_fill_16_AVX2` with mean 0 and standard deviation 1, one lane at a time: uniforms
/// `u ∈ [0, 1)` in, standard normal numbers out.
fn box_muller_16(block: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: computed in double, rounded once.
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..BLOCK / 2 {
        let u1 = 1.0 - block[j]; // (0, 1] for the logarithm
        let u2 = block[j + BLOCK / 2];
        let radius = (-2.0 * log(u1)).sqrt();
        let (sin, cos) = sincos(two_pi * u2);
        block[j] = radius * cos;
        block[j + BLOCK / 2] = radius * sin;
    }
}

/// `log256_ps` of `avx_mathfun.h` for one lane (Cephes' `logf`), for `x > 0`.
///
/// Where the C++ multiplies and the product's only use is an addition, the compiler that built
/// libtorch fused the two into one rounding; the same places use `mul_add` here.
#[allow(clippy::excessive_precision)] // the C++ source's literals, digit for digit
fn log(x: f32) -> f32 {
    // The C++ writes double literals that are rounded to float; so do we, to get the same floats.
    const P: [f64; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const Q1: f32 = -2.12194440e-4_f64 as f32;
    const Q2: f32 = 0.693359375;
    const SQRT_HALF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32; // `0.707106781186547524` there
    if x.is_nan() || x <= 0.0 {
        return f32::NAN;
    }
    // Split x = m · 2^e with m in [0.5, 1), denormals cut off at the smallest normal number.
    let x = x.max(f32::MIN_POSITIVE);
    let exponent = ((x.to_bits() >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mantissa = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
    // if m < √½ { e -= 1; x = m + m − 1 } else { x = m − 1 }
    let below = mantissa < SQRT_HALF;
    let e = exponent - if below { 1.0 } else { 0.0 };
    let x = (mantissa - 1.0) + if below { mantissa } else { 0.0 };
    let z = x * x;
    let mut y = P[0] as f32;
    for p in &P[1..] {
        y = y.mul_add(x, *p as f32);
    }
    let y = (y * x).mul_add(z, e * Q1);
    let y = y - z * 0.5; // exact product: fused or not, one rounding
    let x = x + y;
    e.mul_add(Q2, x)
}

/// `sincos256_ps` of `avx_mathfun.h` for one lane (Cephes' `sinf`/`cosf`): `(sin x, cos x)`.
#[allow(clippy::excessive_precision)] // the C++ source's literals, digit for digit
fn sincos(x: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.27323954473516_f64 as f32;
    const MINUS_DP: [f64; 3] = [
        -0.78515625,
        -2.4187564849853515625e-4,
        -3.77489497744594108e-8,
    ];
    const COS: [f64; 3] = [
        2.443315711809948E-005,
        -1.388731625493765E-003,
        4.166664568298827E-002,
    ];
    const SIN: [f64; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1];
    let sign_of_x = x.to_bits() & 0x8000_0000;
    let x = x.abs();
    // The octant j (even), as `cvttps` truncates and `(j + 1) & !1` rounds up to even.
    let j = (((x * FOUR_OVER_PI) as i32) + 1) & !1;
    let y = j as f32;
    let sin_sign = sign_of_x ^ (((j & 4) as u32) << 29);
    let cos_sign = ((!(j - 2) & 4) as u32) << 29;
    let use_cos_poly_for_cos = j & 2 == 0;
    // Extended-precision reduction x − y·π/4 in three parts.
    let x = MINUS_DP.iter().fold(x, |x, dp| y.mul_add(*dp as f32, x));
    let z = x * x;
    let c = (COS[0] as f32)
        .mul_add(z, COS[1] as f32)
        .mul_add(z, COS[2] as f32)
        * z;
    let c = c.mul_add(z, -(z * 0.5)) + 1.0;
    let s = (SIN[0] as f32)
        .mul_add(z, SIN[1] as f32)
        .mul_add(z, SIN[2] as f32)
        * z;
    let s = s.mul_add(x, x);
    let (sin, cos) = if use_cos_poly_for_cos { (s, c) } else { (c, s) };
    (
        f32::from_bits(sin.to_bits() ^ sin_sign),
        f32::from_bits(cos.to_bits() ^ cos_sign),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within one float32 ulp of the exact functions over the inputs Box–Muller gives them (the
    /// log relative to max(1, |log u|), as its absolute error grows with the result).
    #[test]
    fn log_and_sincos_are_accurate_over_the_unit_interval() {
        let (mut worst_log, mut worst_trig) = (0f64, 0f64);
        for i in 1..=(1 << 16) {
            let u = i as f32 / (1 << 16) as f32;
            let exact = f64::from(u).ln();
            worst_log = worst_log.max((f64::from(log(u)) - exact).abs() / exact.abs().max(1.0));
            let theta = (2.0 * std::f64::consts::PI) as f32 * (u - 1.0 / 65536.0);
            let (s, c) = sincos(theta);
            let t = f64::from(theta);
            worst_trig = worst_trig
                .max((f64::from(s) - t.sin()).abs())
                .max((f64::from(c) - t.cos()).abs());
        }
        let ulp = f64::from(f32::EPSILON);
        assert!(worst_log <= ulp, "log: {worst_log:e}");
        assert!(worst_trig <= ulp, "sin/cos: {worst_trig:e}");
        assert!(log(0.0).is_nan() && log(-1.0).is_nan());
    }

    #[test]
    fn draws_follow_the_generator_and_shape() {
        tch::manual_seed(3);
        let a = randn(&[2, 3, 5]).unwrap();
        tch::manual_seed(3);
        let b = randn(&[2, 3, 5]).unwrap();
        assert_eq!(a.size(), [2, 3, 5]);
        assert!(a.equal(&b));
        // 30 = one block of 16 and a ragged end: the last 16 values are a second block.
        let values = Vec::<f32>::try_from(a.reshape([-1])).unwrap();
        assert!(values.iter().all(|v| v.is_finite()));
        assert_eq!(randn(&[3]).unwrap().size(), [3]);
    }
}
