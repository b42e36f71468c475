//! What libtorch has that tch does not expose: CUDA facilities, and CPU numbers made portable.
//!
//! CUDA graphs ([`CudaGraph`], over `at::cuda::CUDAGraph`); libtorch's Kineto profiler ([`Profiler`]); multi-tensor operations ([`foreach`]); a group norm (+ SiLU) over channels-last maps and a fused GEGLU with kernels of their own, compiled at run time by NVRTC ([`group_norm`], [`geglu`]); an fp8 × fp8 linear product recorded for autograd ([`fp8`]); the priority of libtorch's attention kernels ([`sdp`]); the caching allocator's memory statistics, the same numbers as PyTorch's
//! `torch.cuda.max_memory_allocated()` / `max_memory_reserved()`, so GPU benchmarks compare like with
//! like; and the TF32 switches (`torch.backends.cuda.matmul.allow_tf32`,
//! `torch.backends.cudnn.allow_tf32`), so fp32 parity checks run both sides in full precision. The functions go through a small C++ shim (`src/shim.cpp`) compiled against the pinned
//! PyTorch's headers; where those headers are missing the crate still builds and the functions return
//! `None` / `false`.
//!
//! Process groups for data-parallel training ([`dist`]): c10d's `TCPStore`, `ProcessGroupGloo` and
//! `ProcessGroupNCCL` through a second shim (`src/dist.cpp`, `src/dist_nccl.cpp`); docs/DISTRIBUTED.md.
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//!
//! // CPU numbers that do not depend on the CPU: `torch.randn` from a seeded generator, as
//! // PyTorch's AVX2 kernels compute it on every machine.
//! tch::manual_seed(0);
//! let a = torch_cuda::portable::randn(&[4, 8])?;
//! tch::manual_seed(0);
//! assert!(a.equal(&torch_cuda::portable::randn(&[4, 8])?));
//!
//! // Multi-tensor operations go through the shim, compiled where PyTorch's headers were found.
//! let grads = [Tensor::ones([3], (Kind::Float, Device::Cpu)), Tensor::ones([2, 2], (Kind::Float, Device::Cpu))];
//! if torch_cuda::shim_compiled() {
//!     torch_cuda::foreach::zero_(&grads)?;
//!     assert!(grads.iter().all(|g| g.abs().sum(Kind::Float).double_value(&[]) == 0.0));
//! }
//!
//! // The caching allocator's statistics exist for CUDA devices only.
//! if !tch::Cuda::is_available() {
//!     assert_eq!(torch_cuda::memory_stats(0), None);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod dist;
pub mod foreach;
pub mod fp8;
pub mod geglu;
pub mod graph;
pub mod group_norm;
pub mod portable;
mod profiler;
pub mod rng;
pub mod sdp;

pub use graph::{CaptureMode, CudaGraph};
pub use profiler::{Profiler, ProfilerOptions};

/// What a call through the shim failed at; the text says why, in libtorch's words where it refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Capturing or replaying a [`CudaGraph`].
    #[error("CUDA graph: {0}")]
    Graph(String),
    /// Starting the [`Profiler`] or writing its trace.
    #[error("profiler: {0}")]
    Profiler(String),
    /// A [`foreach`] operation.
    #[error("foreach: {0}")]
    Foreach(String),
    /// Saving or restoring a random generator's state ([`rng`]).
    #[error("random state: {0}")]
    Rng(String),
    /// Joining a process group or a collective ([`dist`]).
    #[error("distributed: {0}")]
    Dist(String),
    /// Compiling or running one of the crate's own operations ([`group_norm`], [`geglu`], [`fp8`]).
    #[error("kernel: {0}")]
    Kernel(String),
}

/// The message of the last failed call into the kernels' shim (group norm, GEGLU, fp8, attention
/// order) on this thread.
#[cfg(torch_cuda_shim)]
pub(crate) fn kernel_last_error() -> String {
    #[allow(unsafe_code)]
    unsafe extern "C" {
        fn torch_kernels_last_error() -> *const std::ffi::c_char;
    }
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message, copied at once.
    #[allow(unsafe_code)]
    unsafe { std::ffi::CStr::from_ptr(torch_kernels_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The `STORE_KIND` of an NVRTC kernel variant for `kind` (0 fp32, 1 bf16, 2 fp16), or the error
/// naming the operation (`label`) and the type.
pub(crate) fn store_kind(kind: tch::Kind, label: &str) -> Result<i32, Error> {
    match kind {
        tch::Kind::Float => Ok(0),
        tch::Kind::BFloat16 => Ok(1),
        tch::Kind::Half => Ok(2),
        other => Err(Error::Kernel(format!(
            "{label}: unsupported type {other:?}"
        ))),
    }
}

/// Why a function that needs the shim cannot run in this build.
pub(crate) const NO_SHIM: &str =
    "this build has no CUDA shim (torch's CUDA headers were not found at build time)";

/// The caching allocator's counters for one device, in bytes, over all memory pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryStats {
    /// Bytes held by live tensors now.
    pub allocated: u64,
    /// Highest `allocated` since the start or the last [`reset_peak_memory_stats`].
    pub peak_allocated: u64,
    /// Bytes the allocator holds from the driver now (live tensors plus its cache).
    pub reserved: u64,
    /// Highest `reserved` since the start or the last reset.
    pub peak_reserved: u64,
}

impl MemoryStats {
    /// `peak_allocated` in GiB, the unit of the benchmark tables.
    pub fn peak_allocated_gib(&self) -> f64 {
        self.peak_allocated as f64 / (1u64 << 30) as f64
    }

    /// `peak_reserved` in GiB.
    pub fn peak_reserved_gib(&self) -> f64 {
        self.peak_reserved as f64 / (1u64 << 30) as f64
    }
}

#[cfg(torch_cuda_shim)]
#[allow(unsafe_code)]
mod ffi {
    unsafe extern "C" {
        pub fn torch_cuda_memory_stats(device: i32, out: *mut i64) -> i32;
        pub fn torch_cuda_reset_peak_memory_stats(device: i32) -> i32;
        pub fn torch_cuda_empty_cache() -> i32;
        pub fn torch_cuda_set_allow_tf32(cublas: i32, cudnn: i32) -> i32;
        pub fn torch_cuda_last_error() -> *const std::ffi::c_char;
        pub fn torch_grad_enabled() -> i32;
        pub fn torch_cuda_compute_capability(device: i32, out: *mut i32) -> i32;
        pub fn torch_cuda_device_name(
            device: i32,
            out: *mut std::ffi::c_char,
            capacity: i32,
        ) -> i32;
    }
}

/// Whether autograd records operations on this thread (`torch.is_grad_enabled()`; false inside
/// `tch::no_grad`), or `None` without the shim.
pub fn grad_enabled() -> Option<bool> {
    #[cfg(torch_cuda_shim)]
    {
        // SAFETY: plain call reading a thread-local flag.
        #[allow(unsafe_code)]
        let enabled = unsafe { ffi::torch_grad_enabled() };
        Some(enabled != 0)
    }
    #[cfg(not(torch_cuda_shim))]
    {
        None
    }
}

/// The message of the shim's last failure on this thread.
#[cfg(torch_cuda_shim)]
pub(crate) fn shim_last_error() -> String {
    // SAFETY: the shim returns a pointer to a thread-local, NUL-terminated string that lives until
    // the next failing call on this thread; it is copied at once.
    #[allow(unsafe_code)]
    unsafe { std::ffi::CStr::from_ptr(ffi::torch_cuda_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Memory statistics of CUDA device `device`, or `None` without CUDA (or without the shim).
pub fn memory_stats(device: usize) -> Option<MemoryStats> {
    if !tch::Cuda::is_available() || device >= tch::Cuda::device_count() as usize {
        return None;
    }
    #[cfg(torch_cuda_shim)]
    {
        let mut out = [0i64; 4];
        // SAFETY: `out` has the four slots the shim writes; the shim catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_cuda_memory_stats(device as i32, out.as_mut_ptr()) };
        let bytes = |v: i64| u64::try_from(v).unwrap_or(0);
        (status == 0).then(|| MemoryStats {
            allocated: bytes(out[0]),
            peak_allocated: bytes(out[1]),
            reserved: bytes(out[2]),
            peak_reserved: bytes(out[3]),
        })
    }
    #[cfg(not(torch_cuda_shim))]
    {
        None
    }
}

/// Restarts the peak counters of device `device`; false without CUDA or the shim.
pub fn reset_peak_memory_stats(device: usize) -> bool {
    if memory_stats(device).is_none() {
        return false;
    }
    #[cfg(torch_cuda_shim)]
    {
        // SAFETY: plain call; the shim catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_cuda_reset_peak_memory_stats(device as i32) };
        status == 0
    }
    #[cfg(not(torch_cuda_shim))]
    {
        false
    }
}

/// Returns the allocator's unused cached blocks to the driver (`torch.cuda.empty_cache()`); false
/// without CUDA or the shim.
pub fn empty_cache() -> bool {
    if !tch::Cuda::is_available() {
        return false;
    }
    #[cfg(torch_cuda_shim)]
    {
        // SAFETY: plain call; the shim catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_cuda_empty_cache() };
        status == 0
    }
    #[cfg(not(torch_cuda_shim))]
    {
        false
    }
}

/// Lets (or forbids) float32 matrix products (cuBLAS) and convolutions (cuDNN) use TF32; false
/// without the shim.
pub fn set_allow_tf32(cublas: bool, cudnn: bool) -> bool {
    #[cfg(torch_cuda_shim)]
    {
        // SAFETY: plain call; the shim catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_cuda_set_allow_tf32(i32::from(cublas), i32::from(cudnn)) };
        status == 0
    }
    #[cfg(not(torch_cuda_shim))]
    {
        let _ = (cublas, cudnn);
        false
    }
}

/// The compute capability `(major, minor)` of CUDA device `device`
/// (`torch.cuda.get_device_capability`), or `None` without CUDA, without that device or without
/// the shim.
pub fn compute_capability(device: usize) -> Option<(i32, i32)> {
    if !tch::Cuda::is_available() || device >= tch::Cuda::device_count() as usize {
        return None;
    }
    #[cfg(torch_cuda_shim)]
    {
        let mut out = [0i32; 2];
        // SAFETY: `out` has the two slots the shim writes; the shim catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_cuda_compute_capability(device as i32, out.as_mut_ptr()) };
        (status == 0).then_some((out[0], out[1]))
    }
    #[cfg(not(torch_cuda_shim))]
    {
        None
    }
}

/// The name CUDA gives a device (e.g. `NVIDIA H100 80GB HBM3`); `None` for a device that is not there
/// or in a build without the shim.
pub fn device_name(device: usize) -> Option<String> {
    if !tch::Cuda::is_available() || device >= tch::Cuda::device_count() as usize {
        return None;
    }
    #[cfg(torch_cuda_shim)]
    {
        let mut out = [0 as std::ffi::c_char; 256];
        // SAFETY: the shim writes at most `out.len()` bytes, NUL-terminated, and catches every C++
        // exception.
        #[allow(unsafe_code)]
        let status = unsafe {
            ffi::torch_cuda_device_name(device as i32, out.as_mut_ptr(), out.len() as i32)
        };
        // SAFETY: the buffer is NUL-terminated (zeroed, and the shim's snprintf terminates it).
        #[allow(unsafe_code)]
        let name = unsafe { std::ffi::CStr::from_ptr(out.as_ptr()) };
        (status == 0).then(|| name.to_string_lossy().into_owned())
    }
    #[cfg(not(torch_cuda_shim))]
    {
        None
    }
}

/// Whether this build carries the C++ shim (it does wherever the pinned PyTorch's CUDA headers were
/// found at build time).
pub fn shim_compiled() -> bool {
    cfg!(torch_cuda_shim)
}

/// Serializes this crate's tests: a graph capture in the global mode fails when another thread
/// launches CUDA work meanwhile, as parallel tests would.
#[cfg(test)]
pub(crate) fn test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grad_mode_follows_no_grad() {
        let _serial = test_lock();
        if !shim_compiled() {
            assert_eq!(grad_enabled(), None);
            return;
        }
        assert_eq!(grad_enabled(), Some(true));
        assert_eq!(tch::no_grad(grad_enabled), Some(false));
        assert_eq!(grad_enabled(), Some(true));
    }

    #[test]
    fn statistics_follow_allocations_on_cuda_and_are_absent_without_it() {
        let _serial = test_lock();
        if !tch::Cuda::is_available() {
            assert_eq!(memory_stats(0), None);
            assert!(!reset_peak_memory_stats(0));
            return;
        }
        assert!(
            shim_compiled(),
            "CUDA is available but the shim was not compiled"
        );
        let before = memory_stats(0).unwrap();
        let t = tch::Tensor::zeros([64, 1024, 1024], (tch::Kind::Float, tch::Device::Cuda(0)));
        let during = memory_stats(0).unwrap();
        assert!(
            during.allocated >= before.allocated + (256 << 20),
            "{before:?} -> {during:?}"
        );
        drop(t);
        assert!(reset_peak_memory_stats(0));
        let after = memory_stats(0).unwrap();
        assert!(
            after.peak_allocated < during.peak_allocated,
            "{during:?} -> {after:?}"
        );
    }
}

#[cfg(test)]
mod capability_tests {
    #[test]
    fn device_names_are_there_exactly_for_cuda_devices() {
        let count = if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        };
        for device in 0..count {
            if super::shim_compiled() {
                let name = super::device_name(device).unwrap();
                assert!(!name.is_empty(), "device {device}");
            }
        }
        assert_eq!(super::device_name(count), None);
    }

    #[test]
    fn compute_capability_is_there_exactly_for_cuda_devices() {
        let count = if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        };
        for device in 0..count {
            if let Some((major, minor)) = super::compute_capability(device) {
                assert!(major >= 3 && (0..10).contains(&minor), "{major}.{minor}");
            } else {
                assert!(!super::shim_compiled(), "device {device}: no capability");
            }
        }
        assert_eq!(super::compute_capability(count), None);
    }
}
