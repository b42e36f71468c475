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
        pub fn torch_rng_save_again(
            snapshot: *mut std::ffi::c_void,
            out: *mut *mut std::ffi::c_void,
        ) -> i32;
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
        pub fn torch_rng_generator_new_on(
            cuda_device: i32,
            seed: u64,
            out: *mut *mut std::ffi::c_void,
        ) -> i32;
        pub fn torch_rng_generator_seed(generator: *mut std::ffi::c_void, seed: u64) -> i32;
        pub fn torch_rng_generator_randn_like(
            generator: *mut std::ffi::c_void,
            shape: *const i64,
            ndim: i64,
            like: *const std::ffi::c_void,
            out: *mut *mut std::ffi::c_void,
        ) -> i32;
        pub fn torch_rng_generator_randint(
            generator: *mut std::ffi::c_void,
            high: i64,
            shape: *const i64,
            ndim: i64,
            out: *mut *mut std::ffi::c_void,
        ) -> i32;
        pub fn torch_rng_generator_uniform_like(
            generator: *mut std::ffi::c_void,
            shape: *const i64,
            ndim: i64,
            lo: f64,
            hi: f64,
            like: *const std::ffi::c_void,
            out: *mut *mut std::ffi::c_void,
        ) -> i32;
        pub fn torch_rng_generator_dropout(
            generator: *mut std::ffi::c_void,
            input: *const std::ffi::c_void,
            p: f64,
            out: *mut *mut std::ffi::c_void,
        ) -> i32;
        pub fn torch_rng_generator_save(
            generator: *mut std::ffi::c_void,
            out: *mut *mut std::ffi::c_void,
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

    /// A snapshot of a generator of its own (see [`Generator`]), for a recomputation that must draw
    /// what the first run drew from it.
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message.
    #[allow(unsafe_code)]
    pub fn of(generator: &Generator) -> Result<Self, Error> {
        #[cfg(torch_rng_shim)]
        {
            let mut snapshot = std::ptr::null_mut();
            // SAFETY: the generator is live; `snapshot` receives a heap object owned by the
            // returned value, freed in Drop.
            let status = unsafe { ffi::torch_rng_generator_save(generator.raw(), &mut snapshot) };
            if status != 0 {
                return Err(Error::Rng(last_error()));
            }
            Ok(Self {
                snapshot,
                device: generator.device(),
            })
        }
        #[cfg(not(torch_rng_shim))]
        Err(no_shim(generator.device()))
    }

    /// A snapshot of the same generator (the default one of this device, or the generator of its
    /// own) as it stands now.
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message.
    #[allow(unsafe_code)]
    pub fn save_again(&self) -> Result<Self, Error> {
        #[cfg(torch_rng_shim)]
        {
            let mut snapshot = std::ptr::null_mut();
            // SAFETY: `self.snapshot` is live; `snapshot` receives a heap object owned by the
            // returned value, freed in Drop.
            let status = unsafe { ffi::torch_rng_save_again(self.snapshot, &mut snapshot) };
            if status != 0 {
                return Err(Error::Rng(last_error()));
            }
            Ok(Self {
                snapshot,
                device: self.device,
            })
        }
        #[cfg(not(torch_rng_shim))]
        Err(no_shim(self.device))
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

/// A random generator of its own on one device, `torch.Generator(device).manual_seed(seed)`:
/// libtorch's Mersenne Twister on the CPU, its Philox generator on CUDA, drawn by libtorch's kernels,
/// but independent of the process-wide default generators that [`tch::manual_seed`] seeds. Two users
/// with a generator each (two pipelines or two trainers in two threads) draw the same numbers as
/// each alone, and a generator seeded like the default one draws what the default one would.
///
/// Draws take `&self`: libtorch locks the generator's own mutex around every draw (and this crate
/// around re-seeding), so one generator may be shared, e.g. between a trainer's step and its
/// adapters' dropout. On CUDA, work captured in a graph may draw from it once it is registered with
/// the graph ([`crate::CudaGraph::capture_with`]).
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
    device: Device,
}

// SAFETY: the shim's `at::Generator` is owned by this value alone, and libtorch locks the
// generator's own mutex around every draw (the shim around re-seeding); using it from several
// threads is sound.
#[allow(unsafe_code)]
unsafe impl Send for Generator {}
#[allow(unsafe_code)]
unsafe impl Sync for Generator {}

#[cfg(not(torch_rng_shim))]
fn no_shim(device: Device) -> Error {
    Error::Rng(format!(
        "this build has no generator shim for {device:?} (torch's headers were not found at build time)"
    ))
}

/// Reads the tensor the shim made (`new at::Tensor`) into a `tch::Tensor` owning it, or the error.
#[cfg(torch_rng_shim)]
#[allow(unsafe_code)]
fn made(status: i32, out: *mut std::ffi::c_void) -> Result<tch::Tensor, Error> {
    if status != 0 {
        return Err(Error::Rng(last_error()));
    }
    // SAFETY: on success the shim stored a heap `at::Tensor` (tch's C_tensor) in `out`, whose
    // ownership passes to the returned tensor.
    Ok(unsafe { tch::Tensor::from_ptr(out.cast()) })
}

fn check_shape(shape: &[i64]) -> Result<(), Error> {
    if shape.iter().any(|&d| d < 0) {
        return Err(Error::Rng(format!("negative dimension in {shape:?}")));
    }
    Ok(())
}

impl Generator {
    /// A CPU generator seeded with `seed`.
    ///
    /// # Errors
    /// [`Error::Rng`] where this build has no random-state shim (see [`available`]).
    pub fn new(seed: u64) -> Result<Self, Error> {
        Self::on(Device::Cpu, seed)
    }

    /// A generator on `device` (the CPU or a CUDA device) seeded with `seed`: it draws what the
    /// device's default generator draws after `tch::manual_seed(seed)`.
    ///
    /// # Errors
    /// [`Error::Rng`] where this build cannot make one for `device` (see [`available`]), or with
    /// libtorch's message (no such CUDA device).
    #[allow(unsafe_code)]
    pub fn on(device: Device, seed: u64) -> Result<Self, Error> {
        let index = match device {
            Device::Cpu => -1,
            Device::Cuda(index) => index as i32,
            other => {
                return Err(Error::Rng(format!("no generator of its own on {other:?}")));
            }
        };
        if !available(device) {
            return Err(Error::Rng(format!(
                "this build cannot make a generator on {device:?} (torch-cuda was built without \
                 torch's{} headers)",
                if index >= 0 { " or CUDA's" } else { "" }
            )));
        }
        #[cfg(torch_rng_shim)]
        {
            let mut generator = std::ptr::null_mut();
            // SAFETY: `generator` receives a heap object owned by the returned value, freed in Drop.
            if unsafe { ffi::torch_rng_generator_new_on(index, seed, &mut generator) } != 0 {
                return Err(Error::Rng(last_error()));
            }
            Ok(Self { generator, device })
        }
        #[cfg(not(torch_rng_shim))]
        {
            let _ = seed;
            Err(no_shim(device))
        }
    }

    /// The device this generator draws for.
    pub fn device(&self) -> Device {
        self.device
    }

    fn on_cpu(&self, what: &str) -> Result<(), Error> {
        if self.device != Device::Cpu {
            return Err(Error::Rng(format!(
                "`{what}` reads its draws on the host: a generator on {:?} draws with \
                 `randn_on_device`",
                self.device
            )));
        }
        Ok(())
    }

    #[cfg(torch_rng_shim)]
    pub(crate) fn raw(&self) -> *mut std::ffi::c_void {
        self.generator
    }

    /// `generator.manual_seed(seed)`: the stream starts again from `seed`. Not during a CUDA graph
    /// capture (libtorch refuses); between replays it sets what the next replay draws.
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message.
    #[allow(unsafe_code)]
    pub fn manual_seed(&self, seed: u64) -> Result<(), Error> {
        #[cfg(torch_rng_shim)]
        {
            // SAFETY: the generator is live; the shim locks its mutex.
            if unsafe { ffi::torch_rng_generator_seed(self.generator, seed) } != 0 {
                return Err(Error::Rng(last_error()));
            }
            Ok(())
        }
        #[cfg(not(torch_rng_shim))]
        {
            let _ = seed;
            Err(no_shim(self.device))
        }
    }

    /// `torch.randn(shape, generator=g, dtype=kind, device=g.device)`: standard normal draws on
    /// this generator's device.
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message (a negative dimension, a kind with no normal
    /// distribution).
    #[allow(unsafe_code)]
    pub fn randn_on_device(&self, shape: &[i64], kind: tch::Kind) -> Result<tch::Tensor, Error> {
        check_shape(shape)?;
        #[cfg(torch_rng_shim)]
        {
            let like = tch::Tensor::empty([0], (kind, Device::Cpu));
            let mut out = std::ptr::null_mut();
            // SAFETY: the generator and `like` are live; `shape` has `shape.len()` sizes.
            let status = unsafe {
                ffi::torch_rng_generator_randn_like(
                    self.generator,
                    shape.as_ptr(),
                    shape.len() as i64,
                    like.as_ptr().cast(),
                    &mut out,
                )
            };
            made(status, out)
        }
        #[cfg(not(torch_rng_shim))]
        {
            let _ = kind;
            Err(no_shim(self.device))
        }
    }

    /// `torch.randint(high, shape, generator=g, device=g.device)`: int64 draws uniform in
    /// `[0, high)` on this generator's device.
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message (`high` ≤ 0, a negative dimension).
    #[allow(unsafe_code)]
    pub fn randint(&self, high: i64, shape: &[i64]) -> Result<tch::Tensor, Error> {
        check_shape(shape)?;
        #[cfg(torch_rng_shim)]
        {
            let mut out = std::ptr::null_mut();
            // SAFETY: the generator is live; `shape` has `shape.len()` sizes.
            let status = unsafe {
                ffi::torch_rng_generator_randint(
                    self.generator,
                    high,
                    shape.as_ptr(),
                    shape.len() as i64,
                    &mut out,
                )
            };
            made(status, out)
        }
        #[cfg(not(torch_rng_shim))]
        {
            let _ = high;
            Err(no_shim(self.device))
        }
    }

    /// `torch.zeros(shape, dtype=kind).uniform_(lo, hi, generator=g)` on this generator's device:
    /// what tch's `nn::Init::Uniform` draws from the default generator.
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message (`lo > hi`, a negative dimension).
    #[allow(unsafe_code)]
    pub fn uniform(
        &self,
        shape: &[i64],
        lo: f64,
        hi: f64,
        kind: tch::Kind,
    ) -> Result<tch::Tensor, Error> {
        check_shape(shape)?;
        #[cfg(torch_rng_shim)]
        {
            let like = tch::Tensor::empty([0], (kind, Device::Cpu));
            let mut out = std::ptr::null_mut();
            // SAFETY: the generator and `like` are live; `shape` has `shape.len()` sizes.
            let status = unsafe {
                ffi::torch_rng_generator_uniform_like(
                    self.generator,
                    shape.as_ptr(),
                    shape.len() as i64,
                    lo,
                    hi,
                    like.as_ptr().cast(),
                    &mut out,
                )
            };
            made(status, out)
        }
        #[cfg(not(torch_rng_shim))]
        {
            let _ = (lo, hi, kind);
            Err(no_shim(self.device))
        }
    }

    /// `torch.nn.functional.dropout(xs, p, training=True)` with its mask drawn from this generator,
    /// differentiable: on CUDA libtorch's fused dropout kernel, elsewhere a Bernoulli mask scaled by
    /// `1 / (1 - p)`, as `at::dropout` takes them — so it draws what `xs.dropout(p, true)` draws
    /// from a default generator seeded alike. `p == 0` returns `xs`.
    ///
    /// # Errors
    /// [`Error::Rng`]: `p` outside `[0, 1)`, `xs` on another device than the generator.
    #[allow(unsafe_code)]
    pub fn dropout(&self, xs: &tch::Tensor, p: f64) -> Result<tch::Tensor, Error> {
        if p == 0.0 {
            return Ok(xs.shallow_clone());
        }
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Rng(format!(
                "dropout probability {p} is not in [0, 1)"
            )));
        }
        #[cfg(torch_rng_shim)]
        {
            let mut out = std::ptr::null_mut();
            // SAFETY: the generator and `xs` are live.
            let status = unsafe {
                ffi::torch_rng_generator_dropout(self.generator, xs.as_ptr().cast(), p, &mut out)
            };
            made(status, out)
        }
        #[cfg(not(torch_rng_shim))]
        Err(no_shim(self.device))
    }

    /// `torch.rand(n, generator=g)`: `n` float32 uniform numbers in [0, 1).
    ///
    /// # Errors
    /// [`Error::Rng`] with libtorch's message.
    #[allow(unsafe_code)]
    pub fn rand(&mut self, n: usize) -> Result<Vec<f32>, Error> {
        self.on_cpu("rand")?;
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
        self.on_cpu("randn")?;
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
