//! Process groups for data-parallel training over PyTorch's c10d: rendezvous through c10d's
//! `TCPStore` (hosted by rank 0 at `MASTER_ADDR:MASTER_PORT`), collectives on CPU tensors through
//! c10d's `ProcessGroupGloo` and on CUDA tensors through `ProcessGroupNCCL` (device `LOCAL_RANK`),
//! the objects `torch.distributed.init_process_group` creates. No transport of our own:
//! `src/dist.cpp` and `src/dist_nccl.cpp` only create libtorch's objects and wait on their work.
//!
//! Every collective waits at most the group's timeout. When one fails (a peer closed its
//! connection, or did not answer in time), the surviving ranks mark the failure in the store and
//! the error names the ranks that did not (or rank 0, the store's host, when the store itself is
//! gone): a rank that dies or hangs makes the others' calls return an [`Error::Dist`] within about
//! the timeout (plus a 2 s grace period to collect the names) rather than hang.
//!
//! What a float all-reduce guarantees: Gloo's ring all-reduce (`ProcessGroupGloo` with the
//! default `allreduce`) gives every rank the same bits, and for two ranks each element is one
//! IEEE addition `a + b`, which is commutative, so the result is exactly the rounded sum whatever
//! the order. For more ranks the order of the additions depends on the ring position of each
//! chunk, so the sum is a rounded sum of that order, not bitwise equal to a sequential sum (still
//! equal on every rank). `all_reduce_mean` divides the sum by the world size afterwards (exact for
//! power-of-two world sizes).
//!
//! NCCL collectives run on the caller's current CUDA stream (`asyncOp = false`), so they can be
//! captured in a CUDA graph ([`crate::CudaGraph`], in [`crate::CaptureMode::ThreadLocal`]); a
//! timed-out NCCL collective is aborted by ProcessGroupNCCL's watchdog, which ends the process.
//! The NCCL backend is built only where CUDA's, CCCL's and NCCL's headers are
//! ([`nccl_available`]). docs/DISTRIBUTED.md has the details and the upstream sources.
//!
//! ```no_run
//! use std::time::Duration;
//! use tch::{Kind, Tensor};
//! let group = torch_cuda::dist::ProcessGroup::from_env(Duration::from_secs(60))?;
//! let grads = Tensor::ones([8], (Kind::Float, tch::Device::Cpu));
//! group.all_reduce_mean(&grads)?; // in place: tch tensors are handles
//! let rows = group.all_gather(&grads)?; // [8 × world size]
//! group.barrier()?;
//! # Ok::<(), torch_cuda::Error>(())
//! ```

use std::time::Duration;

use tch::Tensor;

use crate::Error;

#[cfg(torch_dist_shim)]
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::{c_char, c_void};
    unsafe extern "C" {
        pub fn torch_dist_last_error() -> *const c_char;
        pub fn torch_dist_new(
            master_addr: *const c_char,
            port: i32,
            rank: i32,
            size: i32,
            timeout_ms: i64,
            cuda_device: i32,
            out: *mut *mut c_void,
        ) -> i32;
        pub fn torch_dist_free(group: *mut c_void);
        pub fn torch_dist_all_reduce(group: *mut c_void, tensor: *mut c_void, op: i32) -> i32;
        pub fn torch_dist_broadcast(group: *mut c_void, tensor: *mut c_void, root: i32) -> i32;
        pub fn torch_dist_barrier(group: *mut c_void) -> i32;
        pub fn torch_dist_all_gather(
            group: *mut c_void,
            tensor: *mut c_void,
            out: *mut *mut c_void,
        ) -> i32;
    }
}

/// Whether this build has process groups (torch's c10d headers were found at build time).
pub fn available() -> bool {
    cfg!(torch_dist_shim)
}

/// Whether this build has the NCCL backend (CUDA's, CCCL's and NCCL's headers were found too).
pub fn nccl_available() -> bool {
    cfg!(torch_dist_nccl)
}

/// How [`ProcessGroup::all_reduce`] combines the ranks' values (c10d's `ReduceOp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise minimum.
    Min,
    /// Elementwise maximum (e.g. of a 0-dim "non-finite seen" flag: any rank's 1 wins).
    Max,
}

/// Where and how a process joins its group: torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `MASTER_ADDR`, `MASTER_PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// This process's rank on its host (its CUDA device index).
    pub local_rank: usize,
    /// Host of rank 0's `TCPStore`.
    pub master_addr: String,
    /// Port of rank 0's `TCPStore`.
    pub master_port: u16,
}

impl GroupConfig {
    /// Reads the variables torchrun sets.
    ///
    /// # Errors
    /// [`Error::Dist`] naming the variable that is missing or not a valid value.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`GroupConfig::from_env`], with `lookup` in place of the environment.
    ///
    /// # Errors
    /// [`Error::Dist`] naming the variable that is missing or not a valid value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let get = |name: &str| {
            lookup(name).ok_or_else(|| {
                Error::Dist(format!(
                    "environment variable {name} is not set (torchrun sets it)"
                ))
            })
        };
        let number = |name: &str| -> Result<u64, Error> {
            let value = get(name)?;
            value.trim().parse().map_err(|_| {
                Error::Dist(format!(
                    "environment variable {name}={value:?} is not a non-negative integer"
                ))
            })
        };
        let config = Self {
            rank: number("RANK")? as usize,
            world_size: number("WORLD_SIZE")? as usize,
            local_rank: number("LOCAL_RANK")? as usize,
            master_addr: get("MASTER_ADDR")?,
            master_port: u16::try_from(number("MASTER_PORT")?).map_err(|_| {
                Error::Dist("environment variable MASTER_PORT is not a port (0..=65535)".into())
            })?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.world_size == 0 || self.world_size > i32::MAX as usize {
            return Err(Error::Dist(format!(
                "WORLD_SIZE={} must be at least 1",
                self.world_size
            )));
        }
        if self.rank >= self.world_size {
            return Err(Error::Dist(format!(
                "RANK={} is not below WORLD_SIZE={}",
                self.rank, self.world_size
            )));
        }
        if self.master_addr.trim().is_empty() || self.master_addr.contains('\0') {
            return Err(Error::Dist(format!(
                "MASTER_ADDR={:?} is not a host name",
                self.master_addr
            )));
        }
        Ok(())
    }
}

/// A c10d process group: this process's membership, with Gloo for CPU tensors and, where CUDA
/// is, NCCL for CUDA tensors (on device `LOCAL_RANK`).
#[derive(Debug)]
pub struct ProcessGroup {
    config: GroupConfig,
    timeout: Duration,
    nccl: bool,
    #[cfg(torch_dist_shim)]
    handle: *mut std::ffi::c_void,
}

// SAFETY: the c10d objects are used from one thread at a time (`&self` methods are serialised by
// the caller's ownership; c10d's backends are themselves thread-safe for enqueueing).
#[allow(unsafe_code)]
unsafe impl Send for ProcessGroup {}

#[cfg(torch_dist_shim)]
#[allow(unsafe_code)]
fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
    unsafe { std::ffi::CStr::from_ptr(ffi::torch_dist_last_error()) }
        .to_string_lossy()
        .into_owned()
}

impl ProcessGroup {
    /// Joins the group torchrun describes in the environment (see [`GroupConfig::from_env`]),
    /// waiting at most `timeout` for the others, and for each later collective.
    ///
    /// # Errors
    /// [`Error::Dist`]: a missing or bad variable (named), or a rendezvous that failed in time.
    pub fn from_env(timeout: Duration) -> Result<Self, Error> {
        Self::new(GroupConfig::from_env()?, timeout)
    }

    /// Joins the group `config` describes, with an NCCL backend on CUDA device `local_rank`
    /// when this build has NCCL ([`nccl_available`]) and CUDA is available (see
    /// [`ProcessGroup::with_backends`]).
    ///
    /// # Errors
    /// As [`ProcessGroup::with_backends`].
    pub fn new(config: GroupConfig, timeout: Duration) -> Result<Self, Error> {
        let nccl = nccl_available() && tch::Cuda::is_available();
        Self::with_backends(config, timeout, nccl)
    }

    /// Joins the group `config` describes: rank 0 hosts the `TCPStore` at
    /// `master_addr:master_port` and waits for the others to connect; every rank then creates
    /// its Gloo backend (which connects every pair of ranks) and, if `nccl`, its NCCL backend
    /// bound to CUDA device `local_rank` (connected eagerly, as `init_process_group(device_id=)`).
    ///
    /// # Errors
    /// [`Error::Dist`]: a bad `config`, the store not reached or not joined by every rank within
    /// `timeout`, Gloo's connection failing, or `nccl` in a build without it.
    #[allow(unsafe_code)]
    pub fn with_backends(
        config: GroupConfig,
        timeout: Duration,
        nccl: bool,
    ) -> Result<Self, Error> {
        config.validate()?;
        #[cfg(torch_dist_shim)]
        {
            let addr = std::ffi::CString::new(config.master_addr.clone())
                .map_err(|_| Error::Dist("MASTER_ADDR contains a NUL byte".into()))?;
            let timeout_ms = i64::try_from(timeout.as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            let mut handle = std::ptr::null_mut();
            // SAFETY: `addr` outlives the call; `handle` receives an object owned by the result.
            let status = unsafe {
                ffi::torch_dist_new(
                    addr.as_ptr(),
                    i32::from(config.master_port),
                    config.rank as i32,
                    config.world_size as i32,
                    timeout_ms,
                    if nccl { config.local_rank as i32 } else { -1 },
                    &mut handle,
                )
            };
            if status != 0 {
                return Err(Error::Dist(last_error()));
            }
            Ok(Self {
                config,
                timeout,
                nccl,
                handle,
            })
        }
        #[cfg(not(torch_dist_shim))]
        {
            let _ = (timeout, nccl);
            Err(Error::Dist(
                "this build has no c10d shim (torch's c10d headers were not found at build time)"
                    .into(),
            ))
        }
    }

    /// This process's place in the group.
    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.config.world_size
    }

    /// Whether CUDA tensors can be reduced (this group has an NCCL backend).
    pub fn has_nccl(&self) -> bool {
        self.nccl
    }

    /// How long each collective may wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Combines `tensor` over all ranks in place with `op` (every rank gets the result).
    ///
    /// # Errors
    /// [`Error::Dist`]: a CUDA tensor (not supported yet), a dtype Gloo does not reduce, or a
    /// peer that died or did not answer within the timeout (named).
    #[allow(unsafe_code)]
    pub fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<(), Error> {
        let code = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Min => 1,
            ReduceOp::Max => 2,
        };
        self.check_device(tensor)?;
        #[cfg(torch_dist_shim)]
        // SAFETY: `handle` is live and the tensor is borrowed for the call.
        self.status(unsafe {
            ffi::torch_dist_all_reduce(self.handle, tensor.as_ptr().cast_mut().cast(), code)
        })?;
        #[cfg(not(torch_dist_shim))]
        let _ = code;
        Ok(())
    }

    /// Sums `tensor` over all ranks in place.
    ///
    /// # Errors
    /// As [`ProcessGroup::all_reduce`].
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<(), Error> {
        self.all_reduce(tensor, ReduceOp::Sum)
    }

    /// Averages `tensor` over all ranks in place: the sum, then divided by the world size.
    ///
    /// # Errors
    /// As [`ProcessGroup::all_reduce`].
    pub fn all_reduce_mean(&self, tensor: &Tensor) -> Result<(), Error> {
        self.all_reduce(tensor, ReduceOp::Sum)?;
        let _ = tensor
            .shallow_clone()
            .g_div_scalar_(self.config.world_size as f64);
        Ok(())
    }

    /// Copies rank `root`'s `tensor` into every rank's `tensor` (same shape and dtype everywhere).
    ///
    /// # Errors
    /// As [`ProcessGroup::all_reduce`], or `root` out of range.
    #[allow(unsafe_code)]
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<(), Error> {
        if root >= self.config.world_size {
            return Err(Error::Dist(format!(
                "broadcast root {root} is not below the world size {}",
                self.config.world_size
            )));
        }
        self.check_device(tensor)?;
        #[cfg(torch_dist_shim)]
        // SAFETY: `handle` is live and the tensor is borrowed for the call.
        self.status(unsafe {
            ffi::torch_dist_broadcast(self.handle, tensor.as_ptr().cast_mut().cast(), root as i32)
        })?;
        Ok(())
    }

    /// Every rank's `tensor` (equal shapes and dtypes on every rank) concatenated along dimension
    /// 0 in rank order (0-dim tensors become one row each); a new tensor on `tensor`'s device.
    ///
    /// # Errors
    /// As [`ProcessGroup::all_reduce`]; tensors of different shapes on different ranks.
    #[allow(unsafe_code)]
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Tensor, Error> {
        self.check_device(tensor)?;
        #[cfg(torch_dist_shim)]
        {
            let mut out = std::ptr::null_mut();
            // SAFETY: `handle` is live, the tensor is borrowed for the call, and `out` receives a
            // new at::Tensor that the returned Tensor owns (tch frees it with `delete`).
            self.status(unsafe {
                ffi::torch_dist_all_gather(self.handle, tensor.as_ptr().cast_mut().cast(), &mut out)
            })?;
            // SAFETY: as above.
            Ok(unsafe { Tensor::from_ptr(out.cast()) })
        }
        #[cfg(not(torch_dist_shim))]
        Err(Error::Dist("this build has no c10d shim".into()))
    }

    /// Returns once every rank has called it (or fails within the timeout, naming the ranks that
    /// did not).
    ///
    /// # Errors
    /// [`Error::Dist`] naming the ranks that did not answer.
    #[allow(unsafe_code)]
    pub fn barrier(&self) -> Result<(), Error> {
        #[cfg(torch_dist_shim)]
        {
            // SAFETY: `handle` is live.
            self.status(unsafe { ffi::torch_dist_barrier(self.handle) })?;
        }
        Ok(())
    }

    fn check_device(&self, tensor: &Tensor) -> Result<(), Error> {
        match tensor.device() {
            tch::Device::Cpu => Ok(()),
            tch::Device::Cuda(index) if self.nccl && index == self.config.local_rank => Ok(()),
            tch::Device::Cuda(index) if self.nccl => Err(Error::Dist(format!(
                "a tensor on cuda:{index}, but this rank's NCCL backend is on cuda:{}",
                self.config.local_rank
            ))),
            device => Err(Error::Dist(format!(
                "collectives on {device:?} tensors need an NCCL backend, which this group has not \
                 (CPU tensors go through Gloo)"
            ))),
        }
    }

    #[cfg(torch_dist_shim)]
    fn status(&self, status: i32) -> Result<(), Error> {
        if status == 0 {
            Ok(())
        } else {
            Err(Error::Dist(last_error()))
        }
    }
}

#[cfg(torch_dist_shim)]
#[allow(unsafe_code)]
impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: made by torch_dist_new, freed once.
        unsafe { ffi::torch_dist_free(self.handle) }
    }
}
