//! Which of libtorch's fused attention kernels `scaled_dot_product_attention` tries first.
//!
//! libtorch holds one process-wide priority order of its SDPA backends (flash attention, then the
//! memory-efficient kernel, the math fallback, cuDNN's attention, then an overridable slot, by
//! default) and runs the first one that supports the call's inputs. PyTorch sets it with
//! `torch.nn.attention.sdpa_kernel(backends, set_priority=True)`; tch has no binding, so this module
//! reads and sets it through the shim. [`with_first`] runs a closure with chosen backends first and
//! restores the previous order afterwards, as that context manager does, so a model can pick its
//! attention kernels per call without changing anyone else's. The order is read when an attention is
//! dispatched: a CUDA graph captured under one order replays those kernels.
//!
//! libtorch settles its own default once, at its first attention on CUDA: on compute capability 9.x
//! and 10.x (Hopper, Blackwell) with a cuDNN newer than 9.15.0 it then puts cuDNN's attention first
//! (`sdp_utils.cpp`'s `priority_order`, unless `TORCH_CUDNN_SDPA_DEPRIORITIZED` is set), overwriting
//! any order set before. [`priority`] therefore has libtorch settle it first (one tiny attention on
//! the GPU, once per process, where CUDA is available), so the order read — and restored by
//! [`with_first`] — is the one libtorch keeps.

use crate::Error;

/// One of libtorch's scaled-dot-product-attention backends (`at::SDPBackend`,
/// `torch.nn.attention.SDPBackend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The unfused reference (`MATH`).
    Math,
    /// FlashAttention-2's kernels (`FLASH_ATTENTION`).
    Flash,
    /// The memory-efficient kernels (`EFFICIENT_ATTENTION`).
    Efficient,
    /// cuDNN's fused attention (`CUDNN_ATTENTION`).
    Cudnn,
    /// A backend registered by an out-of-tree device (`OVERRIDEABLE`).
    Overrideable,
}

impl Backend {
    /// Every backend, in `at::SDPBackend`'s numbering.
    const ALL: [Self; 5] = [
        Self::Math,
        Self::Flash,
        Self::Efficient,
        Self::Cudnn,
        Self::Overrideable,
    ];

    /// `at::SDPBackend`'s value.
    fn code(self) -> i64 {
        match self {
            Self::Math => 0,
            Self::Flash => 1,
            Self::Efficient => 2,
            Self::Cudnn => 3,
            Self::Overrideable => 4,
        }
    }

    fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.code() == code)
    }
}

#[cfg(torch_cuda_shim)]
#[allow(unsafe_code)]
mod ffi {
    unsafe extern "C" {
        pub fn torch_sdp_settle_default() -> i32;
        pub fn torch_sdp_priority(out: *mut i64) -> i32;
        pub fn torch_sdp_set_priority(order: *const i64, n: i32) -> i32;
    }
}

/// The order in which libtorch tries its attention backends, every backend once — after libtorch has
/// settled its default where CUDA is available (the module's documentation).
///
/// # Errors
/// [`Error::Kernel`] without the shim, when libtorch's first attention on CUDA fails, or for a value
/// libtorch gives that this crate does not know.
pub fn priority() -> Result<Vec<Backend>, Error> {
    #[cfg(torch_cuda_shim)]
    {
        // SAFETY: no arguments; the shim catches every exception.
        #[allow(unsafe_code)]
        if unsafe { ffi::torch_sdp_settle_default() } != 0 {
            return Err(Error::Kernel(crate::kernel_last_error()));
        }
        let mut codes = [0i64; Backend::ALL.len()];
        // SAFETY: `codes` has the slots the shim writes (at::num_sdp_backends, checked at compile
        // time by the shim's own loop bound being that constant); the shim catches every exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_sdp_priority(codes.as_mut_ptr()) };
        if status != 0 {
            return Err(Error::Kernel(crate::kernel_last_error()));
        }
        codes
            .iter()
            .map(|&code| {
                Backend::from_code(code).ok_or_else(|| {
                    Error::Kernel(format!("attention backends: unknown backend {code}"))
                })
            })
            .collect()
    }
    #[cfg(not(torch_cuda_shim))]
    {
        Err(Error::Kernel(crate::NO_SHIM.into()))
    }
}

/// Sets the order: `first` in their order, then the other backends in the order they had.
///
/// # Errors
/// [`Error::Kernel`] without the shim, or libtorch's refusal.
pub fn set_first(first: &[Backend]) -> Result<(), Error> {
    let mut order: Vec<Backend> = Vec::with_capacity(Backend::ALL.len());
    for backend in first.iter().copied().chain(priority()?) {
        if !order.contains(&backend) {
            order.push(backend);
        }
    }
    set_priority(&order)
}

/// Sets the whole order.
fn set_priority(order: &[Backend]) -> Result<(), Error> {
    #[cfg(torch_cuda_shim)]
    {
        let codes: Vec<i64> = order.iter().map(|b| b.code()).collect();
        // SAFETY: `codes` holds `len` values for the call; the shim copies them.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_sdp_set_priority(codes.as_ptr(), codes.len() as i32) };
        if status != 0 {
            return Err(Error::Kernel(crate::kernel_last_error()));
        }
        Ok(())
    }
    #[cfg(not(torch_cuda_shim))]
    {
        let _ = order;
        Err(Error::Kernel(crate::NO_SHIM.into()))
    }
}

/// Runs `f` with `first` tried before the other backends, then restores the order there was (also
/// when `f` panics): `torch.nn.attention.sdpa_kernel(first + others, set_priority=True)`.
///
/// # Errors
/// [`Error::Kernel`] when the order cannot be read or set (without the shim); `f` has not run then.
pub fn with_first<T>(first: &[Backend], f: impl FnOnce() -> T) -> Result<T, Error> {
    struct Restore(Vec<Backend>);
    impl Drop for Restore {
        fn drop(&mut self) {
            // Restoring an order read from libtorch cannot be refused.
            let _ = set_priority(&self.0);
        }
    }
    let previous = priority()?;
    set_first(first)?;
    let _restore = Restore(previous);
    Ok(f())
}

#[cfg(all(test, torch_cuda_shim))]
mod tests {
    use super::*;

    #[test]
    fn cudnn_first_for_a_call_then_the_order_there_was() {
        let _lock = crate::test_lock();
        let before = priority().unwrap();
        assert_eq!(before.len(), 5);
        if !tch::Cuda::is_available() {
            // (With CUDA, libtorch may have put cuDNN first: the module's documentation.)
            assert_eq!(
                before[0],
                Backend::Flash,
                "libtorch's default tries flash attention first"
            );
        }
        let inside = with_first(&[Backend::Cudnn], || priority().unwrap()).unwrap();
        assert_eq!(inside[0], Backend::Cudnn);
        // The others keep their relative order.
        let rest: Vec<_> = before
            .iter()
            .copied()
            .filter(|b| *b != Backend::Cudnn)
            .collect();
        assert_eq!(&inside[1..], rest.as_slice());
        assert_eq!(priority().unwrap(), before);
        // A panic inside restores it too.
        let caught = std::panic::catch_unwind(|| {
            with_first(&[Backend::Math, Backend::Cudnn], || panic!("inside")).unwrap()
        });
        assert!(caught.is_err());
        assert_eq!(priority().unwrap(), before);
    }
}
