//! An fp8 × fp8 linear product that autograd can differentiate: what training on fp8-stored frozen
//! weights needs to multiply in fp8.
//!
//! libtorch's `_scaled_mm` (Hopper's and Ada's fp8 tensor cores on CUDA, oneDNN on the CPU) has no
//! derivative, so a layer whose input needs a gradient (every layer downstream of a LoRA) has to
//! widen its weight to bf16 and multiply in bf16, and autograd then keeps that widened copy until
//! the backward pass. [`linear`] is one autograd operation instead (a C++ `autograd::Function` in
//! `src/fp8.cpp`): forward, the input is quantized to e4m3 with one scale per call (its largest
//! magnitude / 448, computed on the device, so it can be captured in a CUDA graph) and multiplied by
//! the e4m3 weight, accumulating in fp32, the bias added, the output in the input's type; backward,
//! the input's gradient is the output's gradient times the weight widened to bf16/fp16 — the widened
//! layer's backward, value for value — or, with [`Backward::Fp8`], an fp8 product too (the output's
//! gradient in e5m2). It keeps only the fp8 weight and its scale for the backward.
//! The weight and its scale get no gradient (they are frozen); the bias gets one if it asks. On CUDA
//! the input's quantization is two kernels of our own ([`quantize`]) instead of libtorch's seven.
//!
//! The rounding this adds to the widened layer is the input's: each input value moves by at most
//! 2⁻⁴ of itself (e4m3's 3 mantissa bits), plus half a step of e4m3's subnormals (2⁻¹⁰ · scale).

use tch::Tensor;

use crate::Error;

#[cfg(torch_cuda_shim)]
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::c_void;
    unsafe extern "C" {
        pub fn torch_fp8_quantize(
            x: *mut c_void,
            e5m2: i32,
            quantized: *mut *mut c_void,
            scale: *mut *mut c_void,
        ) -> i32;
        pub fn torch_fp8_quantize_compile(arch: i32, kind: i32, vec: i32) -> i32;
        pub fn torch_fp8_linear(
            x: *mut c_void,
            weight: *mut c_void,
            weight_scale: *mut c_void,
            bias: *mut c_void,
            fp8_backward: i32,
            out: *mut *mut c_void,
        ) -> i32;
    }
}

/// How [`linear`]'s backward computes the input's gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backward {
    /// The output's gradient times the weight widened to the gradient's type: the widened layer's
    /// backward, value for value (the default).
    #[default]
    Widened,
    /// An fp8 × fp8 product as well: the output's gradient quantized per call to e5m2 (its range:
    /// largest magnitude / 57344; 2 mantissa bits, so each value moves by at most 2⁻³ of itself),
    /// times the e4m3 weight transposed (one byte per element) for libtorch's `_scaled_mm`, with fp32
    /// accumulation. Transformer-engine's recipe for gradients; costs the widened weight's
    /// bandwidth and half the product's time, for that rounding.
    Fp8,
}

/// An fp8 format of [`quantize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `float8_e4m3fn` (largest 448, 3 mantissa bits): inputs and weights.
    E4m3,
    /// `float8_e5m2` (largest 57344, 2 mantissa bits): gradients.
    E5m2,
}

/// `x · (weight · weight_scale)ᵀ + bias` by an fp8 × fp8 product, recorded for autograd (see the
/// module documentation; `backward` chooses how the input's gradient is computed): `x` `[..., in]` in bf16 or fp16, `weight` `[out, in]` in
/// `float8_e4m3fn` with both widths multiples of 16, `weight_scale` one fp32 value, `bias` `[out]` in
/// `x`'s type; the output `[..., out]` in `x`'s type. CPU or CUDA (compute capability 8.9 or newer:
/// libtorch refuses older GPUs).
///
/// # Errors
/// [`Error::Kernel`] naming what is wrong with the inputs, libtorch's refusal (e.g. a GPU without
/// fp8 tensor cores), or the lack of the shim in this build; nothing is computed then.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    weight_scale: &Tensor,
    bias: Option<&Tensor>,
    backward: Backward,
) -> Result<Tensor, Error> {
    #[cfg(torch_cuda_shim)]
    {
        let bias_ptr = bias.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut _);
        let mut out = std::ptr::null_mut();
        // SAFETY: the tensors are live tch tensors (at::Tensor pointers) for the call, the bias
        // pointer is null or one of them; the shim catches every C++ exception and on success
        // stores a heap at::Tensor in `out`.
        #[allow(unsafe_code)]
        let status = unsafe {
            ffi::torch_fp8_linear(
                x.as_ptr() as *mut _,
                weight.as_ptr() as *mut _,
                weight_scale.as_ptr() as *mut _,
                bias_ptr,
                i32::from(backward == Backward::Fp8),
                &mut out,
            )
        };
        if status != 0 {
            return Err(Error::Kernel(crate::kernel_last_error()));
        }
        // SAFETY: `out` holds the shim's new at::Tensor, whose ownership passes to the result.
        #[allow(unsafe_code)]
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }
    #[cfg(not(torch_cuda_shim))]
    {
        let _ = (x, weight, weight_scale, bias, backward);
        Err(Error::Kernel(crate::NO_SHIM.into()))
    }
}

/// Why `device` cannot run fp8 products, if it cannot: a CUDA device without fp8 tensor cores
/// (compute capability below 8.9: libtorch's `_scaled_mm` refuses it) or of unknown capability,
/// described as `cuda:N of compute capability M.m`. The CPU can (oneDNN).
pub fn unsupported_device(device: tch::Device) -> Option<String> {
    let tch::Device::Cuda(index) = device else {
        return None;
    };
    match crate::compute_capability(index) {
        Some(capability) if capability >= (8, 9) => None,
        Some((major, minor)) => Some(format!(
            "cuda:{index} of compute capability {major}.{minor}"
        )),
        None => Some(format!("cuda:{index} of unknown compute capability")),
    }
}

/// The quantization of [`linear`]'s operands alone: `x` (fp32, bf16 or fp16) as fp8 values of its
/// shape in `format` and their one fp32 scale (0-dim), `x ≈ values · scale`: the scale is
/// `max(amax, 1e-12) / M` (M the format's largest finite value, 448 or 57344), each value `x / scale`
/// computed in fp32, rounded to `x`'s type, clamped to ±M and converted as libtorch converts. On CUDA by two kernels of our own
/// (`src/fp8_quantize.cu`, compiled at first use by NVRTC: the largest magnitude, then the values),
/// elsewhere by libtorch's operations; the same numbers either way. No gradient.
///
/// # Errors
/// [`Error::Kernel`] for another type, when NVRTC cannot compile the kernels, or without the shim.
pub fn quantize(x: &Tensor, format: Format) -> Result<(Tensor, Tensor), Error> {
    #[cfg(torch_cuda_shim)]
    {
        let (mut quantized, mut scale) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: `x` is a live tch tensor for the call; on success the shim stores two heap
        // at::Tensors, whose ownership passes to the results.
        #[allow(unsafe_code)]
        let status = unsafe {
            ffi::torch_fp8_quantize(
                x.as_ptr() as *mut _,
                i32::from(format == Format::E5m2),
                &mut quantized,
                &mut scale,
            )
        };
        if status != 0 {
            return Err(Error::Kernel(crate::kernel_last_error()));
        }
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Ok(unsafe {
            (
                Tensor::from_ptr(quantized.cast()),
                Tensor::from_ptr(scale.cast()),
            )
        })
    }
    #[cfg(not(torch_cuda_shim))]
    {
        let _ = (x, format);
        Err(Error::Kernel(crate::NO_SHIM.into()))
    }
}

/// Compiles the quantization kernels with this machine's NVRTC for `sm_<arch>`, the input type
/// `kind` (fp32, bf16, fp16) and a vector width of 1, 2, 4 or 8 elements, without loading them:
/// needs no GPU.
///
/// # Errors
/// [`Error::Kernel`] with NVRTC's log, without the shim or NVRTC, or for another type or width.
pub fn compile_check(arch: i32, kind: tch::Kind, vec: i32) -> Result<(), Error> {
    let kind = crate::store_kind(kind, "fp8 quantization")?;
    #[cfg(torch_cuda_shim)]
    {
        // SAFETY: plain call; the shim catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_fp8_quantize_compile(arch, kind, vec) };
        if status != 0 {
            return Err(Error::Kernel(crate::kernel_last_error()));
        }
        Ok(())
    }
    #[cfg(not(torch_cuda_shim))]
    {
        let _ = (arch, kind, vec);
        Err(Error::Kernel(crate::NO_SHIM.into()))
    }
}

#[cfg(all(test, torch_cuda_shim))]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// A weight `[out, in]` in e4m3 with its per-tensor scale (amax / 448), and its widened value.
    fn fp8_weight(out: i64, width: i64, kind: Kind) -> (Tensor, Tensor, Tensor) {
        let w = Tensor::randn([out, width], (Kind::Float, Device::Cpu)) * 0.05;
        let scale = w.abs().max() / 448.0;
        let quantized = (&w / &scale)
            .clamp(-448.0, 448.0)
            .to_kind(Kind::Float8e4m3fn);
        let widened = quantized.to_kind(kind) * &scale;
        (quantized, scale, widened)
    }

    /// The forward by hand with libtorch's own operations: what `src/fp8.cpp` computes.
    fn reference(x: &Tensor, weight: &Tensor, scale: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let (width, out) = (weight.size()[1], weight.size()[0]);
        let rows = x.reshape([-1, width]);
        let amax = rows.abs().max().to_kind(Kind::Float);
        let x_scale = amax.clamp_min(1e-12) / 448.0;
        let quantized = (&rows / &x_scale)
            .clamp(-448.0, 448.0)
            .to_kind(Kind::Float8e4m3fn);
        let product = quantized.internal_scaled_mm(
            &weight.tr(),
            &x_scale,
            scale,
            bias,
            None::<&Tensor>,
            x.kind(),
            true,
        );
        let mut shape = x.size();
        shape.pop();
        shape.push(out);
        product.reshape(shape)
    }

    #[test]
    fn forward_is_the_scaled_product_and_backward_is_the_widened_layers() {
        tch::manual_seed(11);
        for kind in [Kind::BFloat16, Kind::Half] {
            let (weight, scale, widened) = fp8_weight(48, 32, kind);
            let bias = (Tensor::randn([48], (Kind::Float, Device::Cpu)) * 0.1).to_kind(kind);
            let x = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu)).to_kind(kind);
            let upstream = Tensor::randn([2, 5, 48], (Kind::Float, Device::Cpu)).to_kind(kind);

            let leaf = x.detach().set_requires_grad(true);
            let y = linear(&leaf, &weight, &scale, Some(&bias), Backward::Widened).unwrap();
            assert_eq!((y.size(), y.kind()), (vec![2, 5, 48], kind));
            assert!(y.equal(&reference(&x, &weight, &scale, Some(&bias))));
            (&y * &upstream).sum(Kind::Float).backward();
            let grad = leaf.grad();

            // The widened layer's input gradient on the same upstream gradient.
            let widened_leaf = x.detach().set_requires_grad(true);
            let widened_y = widened_leaf.linear(&widened, Some(&bias));
            (&widened_y * &upstream).sum(Kind::Float).backward();
            assert!(
                grad.equal(&widened_leaf.grad()),
                "{kind:?}: the input's gradient differs from the widened layer's"
            );

            // Against the widened forward: within the input's rounding (2⁻⁴ of each |x|, plus a
            // subnormal half-step) times |W|, plus the output's rounding in `kind`.
            let x32 = x.to_kind(Kind::Float);
            let w32 = widened.to_kind(Kind::Float);
            let exact = x32.linear(&w32, Some(&bias.to_kind(Kind::Float)));
            let x_scale = x32.abs().max().double_value(&[]) / 448.0;
            let bound = (x32.abs() * 0.0625 + x_scale * 2f64.powi(-10))
                .linear::<Tensor>(&w32.abs(), None)
                + exact.abs() * 2f64.powi(-7)
                + 1e-6;
            let error = (y.to_kind(Kind::Float) - &exact).abs();
            assert_eq!(
                error.le_tensor(&bound).all().int64_value(&[]),
                1,
                "{kind:?}: largest excess {}",
                (&error - &bound).max().double_value(&[])
            );
        }
    }

    #[test]
    fn a_bias_asking_for_a_gradient_gets_the_sum_of_the_output_gradient_and_no_input_needs_none() {
        tch::manual_seed(12);
        let (weight, scale, _) = fp8_weight(16, 16, Kind::BFloat16);
        let bias = Tensor::zeros([16], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([3, 16], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let y = linear(&x, &weight, &scale, Some(&bias), Backward::Widened).unwrap();
        y.sum(Kind::Float).backward();
        let expected = Tensor::full([16], 3.0, (Kind::BFloat16, Device::Cpu));
        assert!(bias.grad().equal(&expected));

        // Without a bias, the input's gradient.
        let leaf = x.detach().set_requires_grad(true);
        linear(&leaf, &weight, &scale, None, Backward::Widened)
            .unwrap()
            .sum(Kind::Float)
            .backward();
        assert_eq!(leaf.grad().size(), vec![3, 16]);
        // Nothing asks for a gradient: the output is plain, and equals the reference.
        let plain = linear(&x, &weight, &scale, None, Backward::Widened).unwrap();
        assert!(!plain.requires_grad());
        assert!(plain.equal(&reference(&x, &weight, &scale, None)));
        // An all-zero input gives zeros (its scale is floored, not zero).
        let zeros = Tensor::zeros([2, 16], (Kind::BFloat16, Device::Cpu));
        let y = linear(&zeros, &weight, &scale, None, Backward::Widened).unwrap();
        assert_eq!(y.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn quantize_gives_the_values_and_scale_the_product_uses() {
        tch::manual_seed(13);
        let x =
            (Tensor::randn([3, 5, 16], (Kind::Float, Device::Cpu)) * 4.0).to_kind(Kind::BFloat16);
        let (values, scale) = quantize(&x, Format::E4m3).unwrap();
        assert_eq!(
            (values.size(), values.kind(), scale.dim(), scale.kind()),
            (vec![3, 5, 16], Kind::Float8e4m3fn, 0, Kind::Float)
        );
        let amax = x.abs().max().to_kind(Kind::Float).double_value(&[]);
        assert_eq!(scale.double_value(&[]), f64::from((amax as f32) / 448.0));
        let expected = (&x / &scale)
            .clamp(-448.0, 448.0)
            .to_kind(Kind::Float8e4m3fn);
        assert!(
            values
                .to_kind(Kind::Float)
                .equal(&expected.to_kind(Kind::Float))
        );
        // The largest magnitude lands on ±448.
        assert_eq!(
            values.to_kind(Kind::Float).abs().max().double_value(&[]),
            448.0
        );
        // e5m2: largest magnitude onto 57344.
        let (values, scale) = quantize(&x, Format::E5m2).unwrap();
        assert_eq!(values.kind(), Kind::Float8e5m2);
        assert_eq!(scale.double_value(&[]), f64::from((amax as f32) / 57344.0));
        let expected = (&x / &scale)
            .clamp(-57344.0, 57344.0)
            .to_kind(Kind::Float8e5m2);
        assert!(
            values
                .to_kind(Kind::Float)
                .equal(&expected.to_kind(Kind::Float))
        );
        let ints = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
        let err = quantize(&ints, Format::E5m2).unwrap_err().to_string();
        assert!(err.contains("fp32, bf16 or fp16, got Long"), "{err}");
    }

    /// `Backward::Fp8`: the same forward; the input's gradient is the e5m2-quantized output gradient
    /// times the widened weight up to the product's fp32 accumulation and the output's rounding, and
    /// so within e5m2's rounding (2⁻³ of each value, plus a subnormal half-step) of the widened one.
    #[test]
    fn the_fp8_backward_is_the_e5m2_gradient_times_the_weight() {
        tch::manual_seed(14);
        for kind in [Kind::BFloat16, Kind::Half] {
            let (weight, scale, widened) = fp8_weight(48, 32, kind);
            let x = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu)).to_kind(kind);
            // Output gradients over several orders of magnitude.
            let upstream = (Tensor::randn([2, 5, 48], (Kind::Float, Device::Cpu))
                * Tensor::randn([2, 5, 48], (Kind::Float, Device::Cpu)).exp())
            .to_kind(kind);
            let leaf = x.detach().set_requires_grad(true);
            let y = linear(&leaf, &weight, &scale, None, Backward::Fp8).unwrap();
            let plain = linear(&x, &weight, &scale, None, Backward::Widened).unwrap();
            assert!(y.equal(&plain), "{kind:?}: the forward changed");
            (&y * &upstream).sum(Kind::Float).backward();
            let grad = leaf.grad().to_kind(Kind::Float);

            let (values, grad_scale) = quantize(&upstream, Format::E5m2).unwrap();
            assert_eq!(values.kind(), Kind::Float8e5m2);
            let dequantized = values.to_kind(Kind::Float) * &grad_scale;
            let w32 = widened.to_kind(Kind::Float);
            let expected = dequantized.matmul(&w32);
            let magnitude = dequantized.abs().matmul(&w32.abs());
            let excess = ((&grad - &expected).abs() - (&magnitude * 2f64.powi(-7) + 1e-6))
                .max()
                .double_value(&[]);
            assert!(
                excess <= 0.0,
                "{kind:?}: past the product's rounding by {excess}"
            );

            let g32 = upstream.to_kind(Kind::Float);
            let exact = g32.matmul(&w32);
            let bound = (g32.abs() * 0.125 + grad_scale.double_value(&[]) * 2f64.powi(-17))
                .matmul(&w32.abs())
                + &magnitude * 2f64.powi(-7)
                + 1e-6;
            let excess = ((&grad - &exact).abs() - bound).max().double_value(&[]);
            assert!(excess <= 0.0, "{kind:?}: past e5m2's rounding by {excess}");
            assert!(!grad.equal(&exact), "{kind:?}: no rounding at all");
        }
    }

    #[test]
    fn the_cpu_runs_fp8_products_and_a_missing_gpu_is_named() {
        assert_eq!(unsupported_device(tch::Device::Cpu), None);
        if !tch::Cuda::is_available() {
            assert_eq!(
                unsupported_device(tch::Device::Cuda(0)).as_deref(),
                Some("cuda:0 of unknown compute capability")
            );
        }
    }

    #[test]
    fn bad_inputs_are_refused_naming_what_is_wrong() {
        let (weight, scale, _) = fp8_weight(32, 16, Kind::BFloat16);
        let x = Tensor::zeros([2, 16], (Kind::BFloat16, Device::Cpu));
        let message = |x: &Tensor, w: &Tensor, s: &Tensor, b: Option<&Tensor>| {
            linear(x, w, s, b, Backward::Fp8).unwrap_err().to_string()
        };
        let fp32 = x.to_kind(Kind::Float);
        assert!(message(&fp32, &weight, &scale, None).contains("bf16 or fp16, got Float"));
        let narrow = Tensor::zeros([2, 8], (Kind::BFloat16, Device::Cpu));
        assert!(message(&narrow, &weight, &scale, None).contains("last dimension (8)"));
        let wide = weight.to_kind(Kind::BFloat16);
        assert!(message(&x, &wide, &scale, None).contains("float8_e4m3fn"));
        let (odd, odd_scale, _) = fp8_weight(24, 16, Kind::BFloat16);
        assert!(message(&x, &odd, &odd_scale, None).contains("multiples of 16"));
        let two_scales = Tensor::ones([2], (Kind::Float, Device::Cpu));
        assert!(message(&x, &weight, &two_scales, None).contains("one fp32 value"));
        let bias = Tensor::zeros([31], (Kind::BFloat16, Device::Cpu));
        assert!(message(&x, &weight, &scale, Some(&bias)).contains("bias must be [32]"));
    }
}
