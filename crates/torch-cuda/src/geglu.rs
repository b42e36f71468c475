//! GEGLU, `h · gelu(gate)` where `[h, gate]` are the two halves of the last dimension (the
//! feed-forward input of diffusers' `BasicTransformerBlock`), as one autograd operation with
//! kernels of our own.
//!
//! libtorch computes it as `chunk`, GELU and a product: the halves are strided views, on which its
//! elementwise kernels take their unvectorized path, and `chunk`'s backward copies the two halves'
//! gradients together. [`geglu`] reads each half with vector loads and writes the output (forward)
//! or the projection's whole gradient (backward) in one pass each, with libtorch's arithmetic value
//! for value: the exact (erf) GELU in fp32 rounded to the tensor's type, then the product rounded
//! again; backward the product's and GELU's gradients with the same roundings as the separate ops.
//! Autograd keeps only the projection (libtorch's route keeps the GELU output as well).
//!
//! The kernels (`src/geglu.cu`) are compiled by NVRTC at their first use for the device's
//! architecture and launched on the current stream, so the operation can be captured in a CUDA
//! graph once it has run eagerly with the same type. Without the shim or NVRTC, or for a CPU tensor,
//! [`geglu`] returns an error and the caller computes it with libtorch ([`geglu_reference`]).

use tch::{Kind, Tensor};

use crate::Error;

#[cfg(torch_cuda_shim)]
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::c_void;
    unsafe extern "C" {
        pub fn torch_geglu(proj: *mut c_void, out: *mut *mut c_void) -> i32;
        pub fn torch_geglu_compile(arch: i32, kind: i32, vec: i32) -> i32;
    }
}

/// libtorch's GEGLU of `proj` (any device): `h · gelu(gate)` with `[h, gate] = proj.chunk(2, -1)`,
/// as diffusers' `GEGLU` computes it. What [`geglu`] equals, and what runs where it cannot.
pub fn geglu_reference(proj: &Tensor) -> Tensor {
    let halves = proj.chunk(2, -1);
    &halves[0] * halves[1].gelu("none")
}

/// GEGLU of a CUDA tensor in fp32, bf16 or fp16 whose last dimension (even) holds `[h, gate]`: the
/// same values as [`geglu_reference`], recorded for autograd (the gradient of `proj`). A
/// non-contiguous input is copied first.
///
/// # Errors
/// [`Error::Kernel`] without the shim or NVRTC, for a CPU tensor, another type or an odd last
/// dimension; nothing is computed then.
pub fn geglu(proj: &Tensor) -> Result<Tensor, Error> {
    if !proj.device().is_cuda() {
        return Err(Error::Kernel(format!(
            "GEGLU: {:?} is not a CUDA device",
            proj.device()
        )));
    }
    #[cfg(torch_cuda_shim)]
    {
        let mut out = std::ptr::null_mut();
        // SAFETY: `proj` is a live tch tensor (an at::Tensor pointer) for the call; the shim catches
        // every C++ exception and on success stores a heap at::Tensor in `out`.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_geglu(proj.as_ptr() as *mut _, &mut out) };
        if status != 0 {
            return Err(Error::Kernel(crate::kernel_last_error()));
        }
        // SAFETY: `out` holds the shim's new at::Tensor, whose ownership passes to the result.
        #[allow(unsafe_code)]
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }
    #[cfg(not(torch_cuda_shim))]
    {
        Err(Error::Kernel(crate::NO_SHIM.into()))
    }
}

/// Compiles the kernels with this machine's NVRTC for `sm_<arch>`, the storage type `kind` (fp32,
/// bf16, fp16) and a vector width of 1, 2, 4 or 8 elements, without loading them: needs no GPU.
///
/// # Errors
/// [`Error::Kernel`] with NVRTC's log, without the shim or NVRTC, or for another type or width.
pub fn compile_check(arch: i32, kind: Kind, vec: i32) -> Result<(), Error> {
    let kind = crate::store_kind(kind, "GEGLU")?;
    #[cfg(torch_cuda_shim)]
    {
        // SAFETY: plain call; the shim catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_geglu_compile(arch, kind, vec) };
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

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    #[test]
    fn a_cpu_tensor_is_refused_with_the_device_named() {
        let x = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
        let err = geglu(&x).unwrap_err();
        assert!(err.to_string().contains("Cpu"), "{err}");
    }

    #[test]
    fn an_unsupported_type_is_refused_before_compiling() {
        let err = compile_check(90, Kind::Int64, 1).unwrap_err();
        assert!(err.to_string().contains("Int64"), "{err}");
    }

    #[test]
    fn the_reference_is_value_times_gelu_of_gate() {
        let proj = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0]).view([1, 4]);
        let y = geglu_reference(&proj);
        let gelu = |x: f64| x * 0.5 * (1.0 + libm_erf(x / 2f64.sqrt()));
        let expected = [gelu(0.5), 2.0 * gelu(-1.0)];
        for (i, e) in expected.iter().enumerate() {
            let got = y.double_value(&[0, i as i64]);
            assert!((got - e).abs() < 1e-6, "{got} vs {e}");
        }
    }

    /// erf by its series (enough terms for |x| ≤ 1).
    fn libm_erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..30 {
            sum += term / f64::from(2 * n + 1);
            term *= -x * x / f64::from(n + 1);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
