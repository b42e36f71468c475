//! What the workspace's tests share: where the fixtures are, how far apart two results are, and
//! how far apart they may be.
//!
//! # The error model behind every numeric bound
//!
//! Our results and the reference libraries' results are float32 computations of the same formulas,
//! run by different kernels: libtorch picks plain, AVX2 or AVX-512 code at run time, and each sums
//! in its own order and fuses multiply-adds differently; the references were computed once, on
//! the machine that generated the fixtures. Each operation rounds with a relative error of at most
//! the unit roundoff `u = 2⁻²⁴` (float32); two correct evaluations differ only by those roundings.
//!
//! Rounding errors behave as independent, zero-mean random variables (Higham and Mary,
//! "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019):
//! a result that passes through `n` roundings on its way from the inputs is then off by at most
//! `λ·√n·u` relative, except with probability `2·exp(−λ²/2)`. Two evaluations, ours and the
//! reference, differ by at most `√2·λ·√n·u`. With `λ = 7` that fails with probability below
//! `10⁻¹⁰` per value, so it holds on any CPU, over the largest fixture, without being tuned on one
//! machine. Tests measure `max |a − b| / max |b|` (see [`max_rel_error`]) and compare it with
//! [`f32_bound`] of the computation's *depth* `n`, counted next to each bound:
//!
//! - an elementwise operation adds 1;
//! - a sum or dot product of `k` terms adds `k` ([`sum_depth`]; the order of the additions is the
//!   kernel's choice, so the bound takes the sequential one, whose error grows like `√k`);
//! - a layer adds its reductions and elementwise operations; a network adds its layers along the
//!   longest path; an iterative loop adds its steps, each multiplied by how much the step's
//!   recurrence amplifies an earlier error (stated where it is above 1).
//!
//! A bound is derived, not observed: the measured error is printed (`numeric <name>: error …
//! bound …`) so a run shows the margin, and `docs/NUMERICS.md` lists them. Values that must be
//! bit-exact (seeded noise, the 8-bit quantization map, the DDPM schedule) are compared with
//! `equal`, not with a bound.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

/// float32's unit roundoff, `2⁻²⁴`.
pub const F32_UNIT_ROUNDOFF: f64 = 5.960_464_477_539_063e-8;

/// The confidence factor of the probabilistic bound: a value exceeds it with probability below
/// `2·exp(−λ²/2) ≈ 4.6·10⁻¹¹`.
pub const LAMBDA: f64 = 7.0;

/// The bound on `max |a − b| / max |b|` for two float32 evaluations of a computation with `depth`
/// roundings on its longest path: `√2·λ·√depth·u`.
pub fn f32_bound(depth: f64) -> f64 {
    std::f64::consts::SQRT_2 * LAMBDA * depth.sqrt() * F32_UNIT_ROUNDOFF
}

/// The depth a sum (or dot product) of `terms` terms adds: one rounding per term.
pub fn sum_depth(terms: usize) -> f64 {
    terms as f64
}

/// Prints `numeric <name>: error <e> bound <b>` and fails when the error is above the bound (or not
/// a number).
pub fn check(name: &str, error: f64, bound: f64) {
    println!("numeric {name}: error {error:.3e} bound {bound:.3e}");
    assert!(
        error <= bound,
        "{name}: error {error:e} exceeds its bound {bound:e}"
    );
}

/// `max |a − b| / max |b|`, computed in f64 on the CPU: the error measure used against golden
/// outputs (relative to the reference's largest value, so values near zero do not dominate).
pub fn max_rel_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shape mismatch");
    let a = actual.to_kind(Kind::Double).to_device(Device::Cpu);
    let e = expected.to_kind(Kind::Double).to_device(Device::Cpu);
    let diff = (&a - &e).abs().max().double_value(&[]);
    let scale = e.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
    diff / scale
}

/// The fixtures folder: `SDXL_FIXTURES` when set (the GPU harness runs test binaries away from the
/// checkout they were built in), else the repository's `tests/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("SDXL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

/// The path of fixture `name` (a file or folder under [`fixtures_dir`]), which must exist: a missing
/// one fails the test, naming the path and how to make it.
pub fn fixture(name: impl AsRef<Path>) -> PathBuf {
    let path = fixtures_dir().join(name);
    assert!(
        path.exists(),
        "missing fixture {}: regenerate it with tools/fixtures/regenerate.sh \
         (tools/fixtures/README.md says which generator writes it)",
        path.display()
    );
    path
}

/// Depths of the building blocks: the roundings on the longest path through each, in the counting
/// of the crate documentation.
pub mod depth {
    /// SiLU, GELU, tanh and friends: a few roundings inside the function (`exp`, a division, …).
    pub const ACTIVATION: f64 = 4.0;

    /// A sum (or dot product) of `terms` terms.
    pub fn sum(terms: i64) -> f64 {
        terms as f64
    }

    /// A convolution of `in_channels` with a `kernel`×`kernel` window, with its bias.
    pub fn conv(in_channels: i64, kernel: i64) -> f64 {
        sum(in_channels * kernel * kernel) + 1.0
    }

    /// A linear layer of `in_features` inputs, with its bias.
    pub fn linear(in_features: i64) -> f64 {
        sum(in_features) + 1.0
    }

    /// A group or layer norm over `values` values: the mean, the variance (squares summed), then
    /// normalising, scaling and shifting.
    pub fn norm(values: i64) -> f64 {
        2.0 * sum(values) + 5.0
    }

    /// One head of scaled dot-product attention over `keys` keys: q·k of `head_dim` terms, the
    /// softmax (the maximum, `exp`, the sum of `keys` terms, a division), the weighted sum of values.
    pub fn attention(head_dim: i64, keys: i64) -> f64 {
        sum(head_dim) + 1.0 + ACTIVATION + sum(keys) + 1.0 + sum(keys)
    }

    /// diffusers' `ResnetBlock2D` at `height`×`width`: norm, SiLU, 3×3 convolution, the time
    /// embedding added, norm, SiLU, 3×3 convolution, the shortcut added (a 1×1 convolution when
    /// the channels change runs beside the main path).
    pub fn resnet(
        in_channels: i64,
        out_channels: i64,
        groups: i64,
        height: i64,
        width: i64,
    ) -> f64 {
        let pixels = height * width;
        norm(in_channels / groups * pixels)
            + ACTIVATION
            + conv(in_channels, 3)
            + 1.0
            + norm(out_channels / groups * pixels)
            + ACTIVATION
            + conv(out_channels, 3)
            + 1.0
    }

    /// diffusers' `Transformer2DModel` of `layers` `BasicTransformerBlock`s over `height`×`width`
    /// tokens of `channels` channels in `heads` heads, cross-attending `context_tokens` tokens of
    /// `context_dim`: group norm, projection in, per layer (layer norm, self-attention, output
    /// projection, residual; layer norm, cross-attention, residual; layer norm, GEGLU feed-forward to
    /// 4·channels and back, residual), projection out, residual.
    #[allow(clippy::too_many_arguments)]
    pub fn transformer(
        channels: i64,
        groups: i64,
        height: i64,
        width: i64,
        heads: i64,
        layers: i64,
        context_tokens: i64,
        context_dim: i64,
    ) -> f64 {
        let tokens = height * width;
        let head_dim = channels / heads;
        let attention_block = |keys: i64, key_dim: i64| {
            norm(channels)
                + linear(key_dim.max(channels))
                + attention(head_dim, keys)
                + linear(channels)
                + 1.0
        };
        let feed_forward =
            norm(channels) + linear(channels) + ACTIVATION + 1.0 + linear(4 * channels) + 1.0;
        let layer = attention_block(tokens, channels)
            + attention_block(context_tokens, context_dim)
            + feed_forward;
        norm(channels / groups * tokens)
            + linear(channels)
            + layers as f64 * layer
            + linear(channels)
            + 1.0
    }
}

/// The shape of an SDXL-style UNet, for [`unet_depth`]: what the depth of a forward pass depends on.
#[derive(Debug, Clone)]
pub struct UNetShape {
    /// Latent channels in.
    pub in_channels: i64,
    /// `block_out_channels`, top level first.
    pub channels: Vec<i64>,
    /// Attention heads per level (top first); ignored where a level has no transformer.
    pub heads: Vec<i64>,
    /// Transformer layers of each level's down block (0: a plain `DownBlock2D`), top first.
    pub transformer_layers: Vec<i64>,
    /// Transformer layers of the mid block.
    pub mid_transformer_layers: i64,
    /// ResNets per down block (up blocks have one more).
    pub layers_per_block: i64,
    /// Groups of every group norm.
    pub groups: i64,
    /// Latent height and width.
    pub height: i64,
    /// Latent width.
    pub width: i64,
    /// Tokens and width of the text context.
    pub context_tokens: i64,
    /// Width of the text context.
    pub context_dim: i64,
}

/// The depth of a UNet forward pass along its longest path: `conv_in`, each down level (its
/// ResNets and transformers, the downsampler), the mid block (ResNet, transformer, ResNet), each
/// up level (one more ResNet and transformer than down, reading the skip connection too, the
/// upsampler), the output norm, SiLU and `conv_out`. The time and text-time embeddings run beside
/// the main path and enter each ResNet with one addition (counted there).
pub fn unet_depth(shape: &UNetShape) -> f64 {
    let levels = shape.channels.len();
    let (mut h, mut w) = (shape.height, shape.width);
    let mut total = depth::conv(shape.in_channels, 3);
    let level_blocks = |level: usize, resnet_in: i64, h: i64, w: i64, count: i64| {
        let c = shape.channels[level];
        let mut d = 0.0;
        for i in 0..count {
            let input = if i == 0 { resnet_in } else { c };
            d += depth::resnet(input, c, shape.groups, h, w);
            if shape.transformer_layers[level] > 0 {
                d += depth::transformer(
                    c,
                    shape.groups,
                    h,
                    w,
                    shape.heads[level],
                    shape.transformer_layers[level],
                    shape.context_tokens,
                    shape.context_dim,
                );
            }
        }
        d
    };
    let mut previous = shape.channels[0];
    for level in 0..levels {
        total += level_blocks(level, previous, h, w, shape.layers_per_block);
        previous = shape.channels[level];
        if level + 1 < levels {
            total += depth::conv(previous, 3);
            h = (h + 1) / 2;
            w = (w + 1) / 2;
        }
    }
    let deepest = levels - 1;
    let c = shape.channels[deepest];
    total += 2.0 * depth::resnet(c, c, shape.groups, h, w)
        + depth::transformer(
            c,
            shape.groups,
            h,
            w,
            shape.heads[deepest],
            shape.mid_transformer_layers,
            shape.context_tokens,
            shape.context_dim,
        );
    for level in (0..levels).rev() {
        // The first ResNet of an up level reads the concatenated skip connection: twice the channels.
        total += level_blocks(
            level,
            2 * shape.channels[level],
            h,
            w,
            shape.layers_per_block + 1,
        );
        if level > 0 {
            h *= 2;
            w *= 2;
            total += depth::conv(shape.channels[level], 3);
        }
    }
    total
        + depth::norm(shape.channels[0] / shape.groups * h * w)
        + depth::ACTIVATION
        + depth::conv(shape.channels[0], 3)
}

/// Whether a CUDA device is there. Without one the CUDA part of a test is skipped (this says so on
/// stdout), unless `SDXL_REQUIRE_CUDA=1` — what the GPU machine's harness sets — makes that a failure.
///
/// # Panics
/// When `SDXL_REQUIRE_CUDA=1` and tch sees no CUDA device.
pub fn cuda() -> bool {
    let required = std::env::var("SDXL_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let present = tch::Cuda::is_available();
    assert!(
        present || !required,
        "SDXL_REQUIRE_CUDA=1 but tch sees no CUDA device"
    );
    if !present {
        println!(
            "no CUDA device: the CUDA part is skipped (SDXL_REQUIRE_CUDA=1 makes this a failure)"
        );
    }
    present
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_grows_with_the_square_root_of_the_depth() {
        assert!((f32_bound(1.0) - 5.9e-7).abs() < 1e-8);
        assert!((f32_bound(400.0) / f32_bound(100.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    #[should_panic(expected = "exceeds its bound")]
    fn check_fails_above_the_bound() {
        check("example", 2e-6, 1e-6);
    }

    #[test]
    #[should_panic(expected = "exceeds its bound")]
    fn check_fails_on_nan() {
        check("example", f64::NAN, 1.0);
    }

    #[test]
    #[should_panic(expected = "missing fixture")]
    fn a_missing_fixture_names_itself() {
        let _ = fixture("no-such-fixture.safetensors");
    }
}
