//! Snapshots of a device's default random generator, so that a recomputation draws what the first
//! run drew: torch.utils.checkpoint's `preserve_rng_state` (`torch.get_rng_state` /
//! `torch.cuda.get_rng_state` before the forward, set again around the recomputation).
//!
//! On the CPU a snapshot is the generator's whole state. On CUDA it is the Philox seed and offset,
//! and during a CUDA graph capture the offset within the graph, so a recomputation captured in the
//! same graph replays the same draws at every replay (`src/rng.cpp` says how). Taking and restoring
//! a snapshot reads nothing from the device.
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! if let Some(saved) = torch_cuda::rng::RngState::save(Device::Cpu)? {
//!     let first = Tensor::rand([4], (Kind::Float, Device::Cpu));
//!     saved.restore()?;
//!     assert!(Tensor::rand([4], (Kind::Float, Device::Cpu)).equal(&first));
//! }
//! # Ok::<(), torch_cuda::Error>(())
//! ```

use tch::Device;

use crate::Error;

#[cfg(torch_rng_shim)]
#[allow(unsafe_code)]
mod ffi {
    unsafe extern "C" {
        pub fn torch_rng_last_error() -> *const std::ffi::c_char;
        pub fn torch_rng_save(cuda_device: i32, out: *mut *mut std::ffi::c_void) -> i32;
        pub fn torch_rng_restore(snapshot: *mut std::ffi::c_void) -> i32;
        pub fn torch_rng_free(snapshot: *mut std::ffi::c_void);
        pub fn torch_rng_generator_new(seed: u64, out: *mut *mut std::ffi::c_void) -> i32;
        pub fn torch_rng_generator_free(generator: *mut std::ffi::c_void);
        pub fn torch_rng_generator_rand(
            generator: *mut std::ffi::c_void,
            n: i64,
            out: *mut f32,
        ) -> i32;
        pub fn torch_rng_generator_randn(
            generator: *mut std::ffi::c_void,
            shape: *const i64,
            ndim: i64,
            out: *mut f32,
        ) -> i32;
    }
}

/// Whether this build can take snapshots of `device`'s generator (the CPU's when torch's headers
/// were found at build time, CUDA's when CUDA's were too).
pub fn available(device: Device) -> bool {
    let cpu = device == Device::Cpu && cfg!(torch_rng_shim);
    let cuda = matches!(device, Device::Cuda(_)) && cfg!(torch_rng_shim_cuda);
    cpu || cuda
}

/// The state of one device's default generator at the time of [`RngState::save`].
#[derive(Debug)]
pub struct RngState {
    #[cfg(torch_rng_shim)]
    snapshot: *mut std::ffi::c_void,
    device: Device,
}

#[cfg(torch_rng_shim)]
#[allow(unsafe_code)]
fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
    unsafe { std::ffi::CStr::from_ptr(ffi::torch_rng_last_error()) }
        .to_string_lossy()
        .into_owned()
}

impl RngState {
    /// A snapshot of `device`'s default generator, or `None` where this build cannot take one (see
    /// [`available`]).
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message (e.g. no such CUDA device).
    #[allow(unsafe_code)]
    pub fn save(device: Device) -> Result<Option<Self>, Error> {
        if !available(device) {
            return Ok(None);
        }
        #[cfg(torch_rng_shim)]
        {
            let index = match device {
                Device::Cuda(index) => index as i32,
                _ => -1,
            };
            let mut snapshot = std::ptr::null_mut();
            // SAFETY: `snapshot` receives a heap object owned by the returned value, freed in Drop.
            let status = unsafe { ffi::torch_rng_save(index, &mut snapshot) };
            if status != 0 {
                return Err(Error::Rng(last_error()));
            }
            Ok(Some(Self { snapshot, device }))
        }
        #[cfg(not(torch_rng_shim))]
        Ok(None)
    }

    /// The device whose generator this is.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Sets the generator back to this snapshot: its next draws are those that followed the save.
    ///
    /// # Errors
    /// [`Error::Rng`], e.g. for a CUDA snapshot taken outside a graph capture and restored inside
    /// one (or the reverse).
    #[allow(unsafe_code)]
    pub fn restore(&self) -> Result<(), Error> {
        #[cfg(torch_rng_shim)]
        {
            // SAFETY: `snapshot` is the live object made by torch_rng_save.
            let status = unsafe { ffi::torch_rng_restore(self.snapshot) };
            if status != 0 {
                return Err(Error::Rng(last_error()));
            }
        }
        Ok(())
    }
}

#[cfg(torch_rng_shim)]
#[allow(unsafe_code)]
impl Drop for RngState {
    fn drop(&mut self) {
        // SAFETY: made by torch_rng_save, freed once.
        unsafe { ffi::torch_rng_free(self.snapshot) }
    }
}

/// A CPU random generator of its own, `torch.Generator().manual_seed(seed)`: libtorch's
/// Mersenne Twister, drawn by libtorch's kernels, but independent of the process-wide default
/// generator that [`tch::manual_seed`] seeds. Two users with a generator each (two pipelines in two
/// threads) draw the same numbers as each alone.
///
/// ```
/// use torch_cuda::rng::Generator;
/// if torch_cuda::rng::available(tch::Device::Cpu) {
///     let mut a = Generator::new(7)?;
///     let first = a.rand(4)?;
///     let _ = tch::Tensor::rand([8], (tch::Kind::Float, tch::Device::Cpu)); // the default generator
///     assert_eq!(Generator::new(7)?.rand(4)?, first);
///     assert_ne!(a.rand(4)?, first); // the stream goes on
/// }
/// # Ok::<(), torch_cuda::Error>(())
/// ```
#[derive(Debug)]
pub struct Generator {
    #[cfg(torch_rng_shim)]
    generator: *mut std::ffi::c_void,
}

// SAFETY: the shim's `at::Generator` is owned by this value alone, and libtorch locks the
// generator's own mutex around every draw; moving it to another thread is sound.
#[allow(unsafe_code)]
unsafe impl Send for Generator {}

impl Generator {
    /// A generator seeded with `seed`.
    ///
    /// # Errors
    /// [`Error::Rng`] where this build has no random-state shim (see [`available`]).
    #[allow(unsafe_code)]
    pub fn new(seed: u64) -> Result<Self, Error> {
        #[cfg(torch_rng_shim)]
        {
            let mut generator = std::ptr::null_mut();
            // SAFETY: `generator` receives a heap object owned by the returned value, freed in Drop.
            if unsafe { ffi::torch_rng_generator_new(seed, &mut generator) } != 0 {
                return Err(Error::Rng(last_error()));
            }
            Ok(Self { generator })
        }
        #[cfg(not(torch_rng_shim))]
        {
            let _ = seed;
            Err(Error::Rng(
                "this build has no generator shim (torch's headers were not found at build time)"
                    .into(),
            ))
        }
    }

    /// `torch.rand(n, generator=g)`: `n` float32 uniform numbers in [0, 1).
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message.
    #[allow(unsafe_code)]
    pub fn rand(&mut self, n: usize) -> Result<Vec<f32>, Error> {
        let mut out = vec![0f32; n];
        #[cfg(torch_rng_shim)]
        {
            // SAFETY: the generator is live; `out` holds the `n` floats the shim writes.
            let status = unsafe {
                ffi::torch_rng_generator_rand(self.generator, n as i64, out.as_mut_ptr())
            };
            if status != 0 {
                return Err(Error::Rng(last_error()));
            }
        }
        Ok(out)
    }

    /// `torch.randn(shape, generator=g)` in float32 on the CPU, with libtorch's own kernel (whose
    /// last bits depend on the CPU's kernels; [`crate::portable::randn_with`] does not).
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message (a negative dimension).
    #[allow(unsafe_code)]
    pub fn randn(&mut self, shape: &[i64]) -> Result<tch::Tensor, Error> {
        if shape.iter().any(|&d| d < 0) {
            return Err(Error::Rng(format!("negative dimension in {shape:?}")));
        }
        let numel: i64 = shape.iter().product();
        let mut out = vec![0f32; numel as usize];
        #[cfg(torch_rng_shim)]
        {
            // SAFETY: the generator is live; `shape` has `shape.len()` sizes and `out` their product.
            let status = unsafe {
                ffi::torch_rng_generator_randn(
                    self.generator,
                    shape.as_ptr(),
                    shape.len() as i64,
                    out.as_mut_ptr(),
                )
            };
            if status != 0 {
                return Err(Error::Rng(last_error()));
            }
        }
        tch::Tensor::f_from_slice(&out)
            .and_then(|t| t.f_reshape(shape))
            .map_err(|e| Error::Rng(e.to_string()))
    }
}

#[cfg(torch_rng_shim)]
#[allow(unsafe_code)]
impl Drop for Generator {
    fn drop(&mut self) {
        // SAFETY: made by torch_rng_generator_new, freed once.
        unsafe { ffi::torch_rng_generator_free(self.generator) }
    }
}
