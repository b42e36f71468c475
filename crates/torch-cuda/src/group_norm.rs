//! Group norm, optionally followed by SiLU, over channels-last CUDA maps: one autograd operation
//! whose kernels read and write the NHWC layout.
//!
//! libtorch's CUDA group norm reads NCHW only: a channels-last map is copied to NCHW first and the
//! result comes back NCHW, so a network kept channels-last (for cuDNN's NHWC convolutions) would pay
//! two layout copies around every norm. [`group_norm`] takes the map as it is, computes with
//! libtorch's formulas in fp32 (statistics rounded to the input's type, as libtorch's; SiLU applied
//! to the rounded norm, as two separate ops would; the backward as libtorch's, SiLU's part included),
//! and writes a channels-last result. Its reductions run in a fixed order, so results repeat exactly
//! from run to run; against libtorch's kernels they differ only in the order of the sums. Fusing the
//! SiLU saves its separate pass forward and backward, and autograd keeps only the norm's input and
//! its statistics (no SiLU input).
//!
//! The kernels (`src/group_norm_nhwc.cu`) are compiled by NVRTC at their first use for the device's
//! architecture and launched on the current stream, so the operation can be captured in a CUDA graph
//! once it has run eagerly with the same type. Without the shim, without NVRTC, or for a shape they
//! do not take (a channel count whose row of vectors exceeds a thread block, a batch over 65,535),
//! [`group_norm`] returns an error and the caller uses libtorch's group norm instead.

use tch::{Kind, Tensor};

use crate::Error;

#[cfg(torch_cuda_shim)]
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::c_void;
    unsafe extern "C" {
        pub fn torch_gn_nhwc(
            x: *mut c_void,
            weight: *mut c_void,
            bias: *mut c_void,
            groups: i64,
            eps: f64,
            silu: i32,
            out: *mut *mut c_void,
        ) -> i32;
        pub fn torch_gn_compile(arch: i32, kind: i32, vec: i32) -> i32;
    }
}

/// `torch.nn.functional.group_norm(x, groups, weight, bias, eps)`, then SiLU when `silu`, for a
/// 4-dimensional CUDA tensor in fp32, bf16 or fp16 with one weight and bias value per channel. Any
/// layout is taken (a non-channels-last input is copied first); the result is channels-last and
/// recorded for autograd (gradients for the input and, where they require them, weight and bias).
///
/// # Errors
/// [`Error::Kernel`] without the shim or NVRTC, for a CPU tensor, another type, groups that do not
/// divide the channels, or a shape the kernels do not take; nothing is computed then.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: i64,
    eps: f64,
    silu: bool,
) -> Result<Tensor, Error> {
    if !x.device().is_cuda() {
        return Err(Error::Kernel(format!(
            "channels-last group norm: {:?} is not a CUDA device",
            x.device()
        )));
    }
    #[cfg(torch_cuda_shim)]
    {
        let mut out = std::ptr::null_mut();
        // SAFETY: the three handles are live tch tensors (at::Tensor pointers) for the call; the shim
        // catches every C++ exception and on success stores a heap at::Tensor in `out`.
        #[allow(unsafe_code)]
        let status = unsafe {
            ffi::torch_gn_nhwc(
                x.as_ptr() as *mut _,
                weight.as_ptr() as *mut _,
                bias.as_ptr() as *mut _,
                groups,
                eps,
                i32::from(silu),
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
        let _ = (weight, bias, groups, eps, silu);
        Err(Error::Kernel(crate::NO_SHIM.into()))
    }
}

/// Compiles the kernels with this machine's NVRTC for `sm_<arch>` (e.g. 90 for Hopper), the storage
/// type `kind` (fp32, bf16, fp16) and a vector width of 1, 2, 4 or 8 elements, without loading them:
/// needs no GPU. [`group_norm`] compiles the variant it needs on its first use; this checks that the
/// source compiles, e.g. on a machine without a GPU.
///
/// # Errors
/// [`Error::Kernel`] with NVRTC's log, without the shim or NVRTC, or for another type or width.
pub fn compile_check(arch: i32, kind: Kind, vec: i32) -> Result<(), Error> {
    let kind = crate::store_kind(kind, "channels-last group norm")?;
    #[cfg(torch_cuda_shim)]
    {
        // SAFETY: plain call; the shim catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_gn_compile(arch, kind, vec) };
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

/// Whether a 4-dimensional tensor is laid out channels-last (NHWC in memory: the channel stride is
/// 1 and each pixel holds its channels contiguously), as `x.is_contiguous(memory_format=torch.channels_last)`.
pub fn is_channels_last(x: &Tensor) -> bool {
    let size = x.size();
    let stride = x.stride();
    if size.len() != 4 {
        return false;
    }
    let (c, h, w) = (size[1], size[2], size[3]);
    // Dimensions of size 1 may have any stride, as in PyTorch's check.
    (c == 1 || stride[1] == 1)
        && (w == 1 || stride[3] == c)
        && (h == 1 || stride[2] == w * c)
        && (size[0] == 1 || stride[0] == h * w * c)
}

/// The tensor's values laid out channels-last (`x.contiguous(memory_format=torch.channels_last)`):
/// the same tensor when it already is, else a copy. Shape and values are unchanged; libtorch's
/// elementwise operations keep the layout and cuDNN then runs its NHWC convolution kernels. A
/// tensor that is not 4-dimensional is returned as it is.
pub fn to_channels_last(x: &Tensor) -> Tensor {
    if x.dim() != 4 || is_channels_last(x) {
        return x.shallow_clone();
    }
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    #[test]
    fn channels_last_layout_is_recognised_and_made() {
        let x = Tensor::arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu)).view([2, 3, 4, 5]);
        assert!(!is_channels_last(&x));
        let y = to_channels_last(&x);
        assert!(is_channels_last(&y));
        assert_eq!(y.size(), x.size());
        assert_eq!(y.stride(), [60, 1, 15, 3]);
        assert!(y.equal(&x));
        // Already channels-last: the same storage, no copy.
        assert_eq!(to_channels_last(&y).data_ptr(), y.data_ptr());
        // One channel: both layouts at once, as in PyTorch.
        assert!(is_channels_last(&Tensor::zeros(
            [2, 1, 4, 5],
            (Kind::Float, Device::Cpu)
        )));
        // Not 4-dimensional: unchanged.
        let v = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        assert!(!is_channels_last(&v));
        assert_eq!(to_channels_last(&v).stride(), [4, 1]);
    }

    #[test]
    fn a_cpu_tensor_is_refused_with_the_device_named() {
        let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let err = group_norm(&x, &w, &w, 2, 1e-5, false).unwrap_err();
        assert!(err.to_string().contains("Cpu"), "{err}");
    }

    #[test]
    fn an_unsupported_type_is_refused_before_compiling() {
        let err = compile_check(90, Kind::Int64, 1).unwrap_err();
        assert!(err.to_string().contains("Int64"), "{err}");
    }
}
