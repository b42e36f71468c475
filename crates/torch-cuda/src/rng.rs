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
