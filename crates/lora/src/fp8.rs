//! fp8 storage for frozen base weights: `float8_e4m3fn` with one fp32 scale per tensor.
//!
//! A frozen base weight is only ever read, so it can be kept in one byte per element and widened
//! to the compute type just before its matmul. The scheme is the per-tensor scaling of
//! transformer-engine / torchao's `Float8Tensor` (`scale = amax / 448`, 448 being the largest
//! finite e4m3fn value, so the largest weight maps onto the top of the fp8 range), applied to
//! storage only: the arithmetic stays in bf16 / fp32. [`quantize_base_fp8`] converts every linear
//! layer of a model; LoRA / DoRA adapters on top keep their own full-precision tensors.

use std::fmt;

use tch::{Kind, Tensor};

use crate::Result;
use crate::linear::HasLinears;

/// The largest finite `float8_e4m3fn` value.
pub const E4M3_MAX: f64 = 448.0;

/// Quantizes `weight` to `float8_e4m3fn` with one scale for the whole tensor.
///
/// Returns `(quantized, scale)` with `scale = amax / 448` as a 0-dim fp32 tensor on the weight's
/// device (1 for an all-zero tensor), so that `quantized · scale ≈ weight`. No value is read back
/// to the host.
///
/// # Errors
/// Only libtorch errors.
pub(crate) fn quantize_e4m3(weight: &Tensor) -> Result<(Tensor, Tensor)> {
    tch::no_grad(|| {
        let weight = weight.f_to_kind(Kind::Float)?;
        let amax = weight.f_abs()?.f_max()?;
        // An all-zero tensor quantizes to zeros with any scale; 1 avoids dividing by zero.
        let scale = (&amax / E4M3_MAX).f_where_self(&amax.f_gt(0.0)?, &amax.f_ones_like()?)?;
        Ok((to_e4m3(&weight, &scale)?, scale))
    })
}

/// `x / scale` in `float8_e4m3fn`, `scale` a 0-dim fp32 tensor that maps `x`'s largest magnitude
/// onto 448. The division is computed in `x`'s type.
fn to_e4m3(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    // The clamp only guards against the last bit of the division's rounding: libtorch turns
    // values past the fp8 range into NaN rather than saturating.
    Ok(x.f_div(scale)?
        .f_clamp_(-E4M3_MAX, E4M3_MAX)?
        .f_to_kind(Kind::Float8e4m3fn)?)
}

/// Widens an fp8 tensor made by [`quantize_e4m3`] back to `kind` (`quantized · scale`).
///
/// Graph-capturable: a cast and a multiplication by a device tensor.
///
/// # Errors
/// Only libtorch errors.
#[cfg(test)]
pub(crate) fn dequantize_e4m3(quantized: &Tensor, scale: &Tensor, kind: Kind) -> Result<Tensor> {
    // e4m3 → bf16 / fp16 / fp32 is exact; the product is rounded once, to `kind`.
    Ok(quantized.f_to_kind(kind)?.f_mul(scale)?)
}

/// How a linear layer whose base weight is stored in fp8 computes its base product
/// ([`set_fp8_products`], [`crate::Linear::set_fp8_products`]).
#[derive(Debug, Clone, Copy, Default)]
pub enum Fp8Products {
    /// The weight widened to the compute type before a product in that type (the default): the
    /// same arithmetic as the full-precision layer on the rounded weight, differentiable.
    #[default]
    Widened,
    /// An fp8 × fp8 product (libtorch's `_scaled_mm`, Hopper's fp8 tensor cores on CUDA): the
    /// input is quantized to e4m3 with one scale for the call (its largest magnitude / 448, as
    /// the weight's), the product accumulates in fp32 and is written in the compute type, bias
    /// included. Taken where the input needs no gradient (inference, or a layer upstream of every
    /// adapter) and the layer allows it: bf16 or fp16 compute, input and output widths multiples of
    /// 16; elsewhere the layer widens as [`Fp8Products::Widened`]. The input's rounding adds an
    /// error of the weight's size: each input value moves by at most 2⁻⁴ of itself.
    Scaled,
    /// As [`Fp8Products::Scaled`], by the given product for every input, also one that needs a
    /// gradient (training): the layers downstream of an adapter multiply in fp8 too, and autograd
    /// keeps no widened weight for them. Widths and types as for `Scaled`; where the product fails
    /// (a GPU without fp8 tensor cores), the layer widens.
    ScaledBy(Fp8Product),
}

impl PartialEq for Fp8Products {
    /// Equal kinds; two [`Fp8Products::ScaledBy`] are equal when their products are the
    /// same function (compared by address, as [`std::ptr::fn_addr_eq`] does).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Widened, Self::Widened) | (Self::Scaled, Self::Scaled) => true,
            (Self::ScaledBy(a), Self::ScaledBy(b)) => std::ptr::fn_addr_eq(*a, *b),
            _ => false,
        }
    }
}

impl Eq for Fp8Products {}

/// A differentiable fp8 × fp8 base product for [`Fp8Products::ScaledBy`]:
/// `(x, weight, weight_scale, bias)` ↦ `x · (weight · weight_scale)ᵀ + bias` in `x`'s type, with `x`
/// quantized per call as [`Fp8Products::Scaled`] does it, recorded for autograd so that `x` gets its
/// gradient (the widened layer's: the output's gradient times the widened weight). `weight` is
/// `[out, in]` in e4m3 and `weight_scale` its 0-dim fp32 scale; the error is a message.
///
/// This crate depends on tch alone, which cannot define an autograd operation; the
/// `torch-cuda` crate's `fp8::linear` is one (a C++ `autograd::Function`, with the input's
/// quantization in two kernels of its own on CUDA):
/// `|x, w, s, b| torch_cuda::fp8::linear(x, w, s, b, Backward::Widened).map_err(|e| e.to_string())`.
pub type Fp8Product =
    fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>) -> std::result::Result<Tensor, String>;

/// Sets how every linear layer of `model` whose base weight is stored in fp8 computes its base
/// product; returns how many such layers there are.
pub fn set_fp8_products(model: &mut dyn HasLinears, products: Fp8Products) -> usize {
    let mut count = 0;
    model.for_each_linear(&mut |_, linear| {
        count += usize::from(linear.set_fp8_products(products));
    });
    count
}

/// `x · (weight · weight_scale)ᵀ + bias` by an fp8 × fp8 product ([`Fp8Products::Scaled`]): `x`
/// `[..., in]` in `kind` (bf16 or fp16), `weight` `[out, in]` in e4m3 with its 0-dim fp32 scale,
/// `bias` `[out]` in `kind`. The input's scale is computed on the device (no value read back), so
/// the product can be captured in a CUDA graph.
///
/// # Errors
/// libtorch errors (e.g. widths that are not multiples of 16 on CUDA).
pub(crate) fn scaled_product(
    x: &Tensor,
    weight: &Tensor,
    weight_scale: &Tensor,
    bias: Option<&Tensor>,
    kind: Kind,
) -> Result<Tensor> {
    let mut shape = x.size();
    let rows = x
        .f_reshape([-1, *shape.last().unwrap_or(&1)])?
        .f_contiguous()?;
    // The largest magnitude in one reduction (an ∞-norm), floored so an all-zero input divides
    // by a positive scale.
    let amax =
        rows.f_flatten(0, -1)?
            .f_linalg_norm(f64::INFINITY, None::<&[i64]>, false, Kind::Float)?;
    let scale = (amax.f_clamp_min(1e-12)? / E4M3_MAX).f_to_kind(Kind::Float)?;
    let out = to_e4m3(&rows, &scale)?.f_internal_scaled_mm(
        &weight.f_tr()?,
        &scale,
        weight_scale,
        bias,
        None::<&Tensor>,
        kind,
        // Hopper's fast accumulation, as inference libraries use for the forward product.
        true,
    )?;
    if let Some(last) = shape.last_mut() {
        *last = weight.size()[0];
    }
    Ok(out.f_reshape(shape)?)
}

/// The bytes a tensor's elements occupy.
pub(crate) fn tensor_bytes(tensor: &Tensor) -> i64 {
    tensor.numel() as i64 * tensor.kind().elt_size_in_bytes() as i64
}

/// What [`quantize_base_fp8`] (or a model's own quantizer, e.g. for convolutions) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fp8Report {
    /// Layers whose base weight was converted now.
    pub quantized: usize,
    /// Layers whose base weight was fp8 already (left as they were).
    pub already_fp8: usize,
    /// Bytes of every visited layer's base weight (and fp8 scale) before.
    pub bytes_before: i64,
    /// The same after: one byte per element plus four per scale.
    pub bytes_after: i64,
}

impl fmt::Display for Fp8Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: f64 = 1024.0 * 1024.0;
        write!(
            f,
            "fp8 base weights: {} layers quantized ({} already fp8), their weights {:.1} MiB → {:.1} MiB",
            self.quantized,
            self.already_fp8,
            self.bytes_before as f64 / MIB,
            self.bytes_after as f64 / MIB
        )
    }
}

/// Stores the base weight of every linear layer of `model` in fp8 ([`crate::Linear::quantize_fp8`]),
/// each computing in the type its weight had. Biases stay as they are.
///
/// The variable store that created the weights holds the same tensors, so it shrinks too (the
/// full-precision bytes are freed), and its weight variables are fp8 afterwards: load weights
/// before quantizing, not after, and do not cast that store with `VarStore::set_kind`.
///
/// # Errors
/// [`crate::Error::QuantizeMerged`] for a layer with merged adapters (unmerge first), libtorch
/// errors. Layers before the failing one stay quantized.
pub fn quantize_base_fp8(model: &mut dyn HasLinears) -> Result<Fp8Report> {
    let mut report = Fp8Report::default();
    let mut failure = None;
    model.for_each_linear(&mut |module, linear| {
        if failure.is_some() {
            return;
        }
        let before = linear.base_weight_bytes();
        if linear.is_fp8() {
            report.already_fp8 += 1;
        } else if let Err(error) = linear.quantize_fp8(module, None) {
            failure = Some(error);
            return;
        } else {
            report.quantized += 1;
        }
        report.bytes_before += before;
        report.bytes_after += linear.base_weight_bytes();
    });
    failure.map_or(Ok(report), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn round_trip_is_within_e4m3_precision_and_zero_tensors_get_scale_one() {
        tch::manual_seed(7);
        let weight = Tensor::randn([64, 48], (Kind::Float, Device::Cpu)) * 0.02;
        let (quantized, scale) = quantize_e4m3(&weight).unwrap();
        assert_eq!(
            (quantized.kind(), scale.kind(), scale.dim()),
            (Kind::Float8e4m3fn, Kind::Float, 0)
        );
        let amax = weight.abs().max().double_value(&[]);
        assert!((scale.double_value(&[]) - amax / 448.0).abs() < 1e-9);
        // The largest weight lands exactly on 448.
        assert_eq!(
            quantized.to_kind(Kind::Float).abs().max().double_value(&[]),
            448.0
        );
        let restored = dequantize_e4m3(&quantized, &scale, Kind::Float).unwrap();
        // e4m3 keeps 3 mantissa bits: relative rounding error ≤ 2⁻⁴ for normal values.
        let error = (&restored - &weight).abs();
        let bound = weight.abs() * 0.0625 + scale.double_value(&[]) * 2f64.powi(-9);
        assert_eq!(error.le_tensor(&bound).all().int64_value(&[]), 1);
        let (zeros, zero_scale) =
            quantize_e4m3(&Tensor::zeros([3, 2], (Kind::BFloat16, Device::Cpu))).unwrap();
        assert_eq!(zero_scale.double_value(&[]), 1.0);
        assert_eq!(
            zeros
                .to_kind(Kind::Float)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }
}
