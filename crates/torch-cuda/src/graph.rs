//! CUDA graphs: record a fixed sequence of device work once, replay it with one launch.
//!
//! A thin wrapper over libtorch's `at::cuda::CUDAGraph`, the object behind PyTorch's
//! `torch.cuda.graph`: [`CudaGraph::capture`] waits for the device, makes a fresh side stream current
//! (capture is not allowed on the default stream), runs the closure while the stream records instead
//! of executing, and instantiates the graph. Tensors the closure allocates come from the graph's
//! private memory pool and stay valid for every replay; [`CudaGraph::replay`] reruns the recorded
//! kernels on the same memory. libtorch's CUDA generator is registered with the graph: each replay
//! draws fresh random numbers from the generator's current seed and offset, so re-seeding before a
//! replay reproduces an eager run's draws.
//!
//! What may be captured: device work only — no host reads of tensor values, no host-to-device
//! copies from pageable memory, no shapes that depend on data, and every tensor the replays read
//! or write must outlive the graph. Inputs are copied into tensors allocated before the capture.

use std::ffi::c_void;

use crate::Error;

#[cfg(torch_cuda_shim)]
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::c_void;
    unsafe extern "C" {
        pub fn torch_cuda_graph_new() -> *mut c_void;
        pub fn torch_cuda_graph_free(graph: *mut c_void);
        pub fn torch_cuda_graph_capture_begin(
            graph: *mut c_void,
            device: i32,
            share: *mut c_void,
            mode: i32,
        ) -> i32;
        pub fn torch_cuda_graph_capture_end(graph: *mut c_void) -> i32;
        pub fn torch_cuda_graph_register_generator(
            graph: *mut c_void,
            generator: *mut c_void,
        ) -> i32;
        pub fn torch_cuda_graph_replay(graph: *mut c_void) -> i32;
        pub fn torch_cuda_synchronize(device: i32) -> i32;
    }
}

#[cfg(torch_cuda_shim)]
fn last_error(what: &str) -> Error {
    Error::Graph(format!("{what}: {}", crate::shim_last_error()))
}

fn unavailable() -> Error {
    Error::Graph(
        if cfg!(torch_cuda_shim) {
            "no CUDA device"
        } else {
            crate::NO_SHIM
        }
        .into(),
    )
}

/// How strictly CUDA forbids unsafe API calls from other threads during a capture
/// (`cudaStreamCaptureMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptureMode {
    /// Unsafe calls from any thread fail (PyTorch's default).
    #[default]
    Global,
    /// Unsafe calls from the capturing thread fail.
    ThreadLocal,
    /// Nothing is checked.
    Relaxed,
}

/// A captured CUDA graph; replays on the thread's current stream.
#[derive(Debug)]
pub struct CudaGraph {
    raw: *mut c_void,
    device: usize,
}

impl CudaGraph {
    /// Captures the device work `record` enqueues on `device`, in the memory pool of `share_pool_with`
    /// (graphs replayed in the order they were captured may share one) or a new private pool.
    /// Returns the graph and what `record` returned. If `record` fails, the capture is ended and
    /// discarded and its error returned as `Ok((None, Err(e)))`-like: see the second element.
    ///
    /// # Errors
    /// [`Error::Graph`] without CUDA or the shim, or when libtorch refuses to capture (e.g. the closure
    /// read a tensor on the host).
    pub fn capture<T>(
        device: usize,
        share_pool_with: Option<&CudaGraph>,
        mode: CaptureMode,
        record: impl FnOnce() -> T,
    ) -> Result<(CudaGraph, T), Error> {
        Self::capture_with(device, share_pool_with, mode, &[], record)
    }

    /// [`CudaGraph::capture`] with CUDA generators of their own ([`crate::rng::Generator::on`])
    /// registered with the graph (`torch.cuda.CUDAGraph.register_generator_state`), so that the
    /// recorded work may draw from them: each replay draws from the generator's seed and offset at
    /// that time, as it does from libtorch's default generator.
    ///
    /// # Errors
    /// As [`CudaGraph::capture`]; a generator on another device than `device`.
    pub fn capture_with<T>(
        device: usize,
        share_pool_with: Option<&CudaGraph>,
        mode: CaptureMode,
        generators: &[&crate::rng::Generator],
        record: impl FnOnce() -> T,
    ) -> Result<(CudaGraph, T), Error> {
        if let Some(other) = generators
            .iter()
            .find(|g| g.device() != tch::Device::Cuda(device))
        {
            return Err(Error::Graph(format!(
                "a generator on {:?} cannot be registered with a graph of CUDA device {device}",
                other.device()
            )));
        }
        if !tch::Cuda::is_available() || device >= tch::Cuda::device_count() as usize {
            return Err(unavailable());
        }
        #[cfg(torch_cuda_shim)]
        {
            // SAFETY: the shim allocates a graph object or returns null; every call catches C++
            // exceptions; `raw` is freed exactly once, by Drop.
            #[allow(unsafe_code)]
            unsafe {
                let raw = ffi::torch_cuda_graph_new();
                if raw.is_null() {
                    return Err(last_error("allocating the graph"));
                }
                let graph = CudaGraph { raw, device };
                for generator in generators {
                    if ffi::torch_cuda_graph_register_generator(graph.raw, generator.raw()) != 0 {
                        return Err(last_error("registering a generator"));
                    }
                }
                let share = share_pool_with.map_or(std::ptr::null_mut(), |g| g.raw);
                let mode = match mode {
                    CaptureMode::Global => 0,
                    CaptureMode::ThreadLocal => 1,
                    CaptureMode::Relaxed => 2,
                };
                if ffi::torch_cuda_graph_capture_begin(graph.raw, device as i32, share, mode) != 0 {
                    return Err(last_error("beginning the capture"));
                }
                let value = record();
                if ffi::torch_cuda_graph_capture_end(graph.raw) != 0 {
                    return Err(last_error("ending the capture"));
                }
                Ok((graph, value))
            }
        }
        #[cfg(not(torch_cuda_shim))]
        {
            let _ = (share_pool_with, mode, generators, record);
            Err(unavailable())
        }
    }

    /// Launches the captured work again, on the current stream.
    ///
    /// # Errors
    /// [`Error::Graph`] when libtorch refuses the replay.
    pub fn replay(&self) -> Result<(), Error> {
        #[cfg(torch_cuda_shim)]
        {
            // SAFETY: `raw` is a live graph object owned by `self`; the shim catches exceptions.
            #[allow(unsafe_code)]
            let status = unsafe { ffi::torch_cuda_graph_replay(self.raw) };
            if status != 0 {
                return Err(last_error("replaying"));
            }
            Ok(())
        }
        #[cfg(not(torch_cuda_shim))]
        {
            Err(unavailable())
        }
    }

    /// The device the graph was captured on.
    pub fn device(&self) -> usize {
        self.device
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(torch_cuda_shim)]
        {
            // SAFETY: `raw` came from torch_cuda_graph_new and is freed only here.
            #[allow(unsafe_code)]
            unsafe {
                ffi::torch_cuda_graph_free(self.raw);
            }
        }
    }
}

/// Waits until `device` has finished all queued work (`torch.cuda.synchronize`); false without
/// CUDA or the shim.
pub fn synchronize(device: usize) -> bool {
    if !tch::Cuda::is_available() {
        return false;
    }
    #[cfg(torch_cuda_shim)]
    {
        // SAFETY: plain call; the shim catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_cuda_synchronize(device as i32) };
        status == 0
    }
    #[cfg(not(torch_cuda_shim))]
    {
        let _ = device;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn a_captured_update_replays_on_the_same_memory() {
        let _serial = crate::test_lock();
        if !tch::Cuda::is_available() {
            let err = CudaGraph::capture(0, None, CaptureMode::Global, || ()).unwrap_err();
            assert!(err.to_string().contains("CUDA"), "{err}");
            return;
        }
        let device = Device::Cuda(0);
        let x = Tensor::ones([1024], (Kind::Float, device));
        let mut acc = Tensor::zeros([1024], (Kind::Float, device));
        // Warm-up outside the capture, as PyTorch advises.
        let _ = acc.g_add_(&(&x * 2.0));
        let _ = acc.zero_();
        let (graph, ()) = CudaGraph::capture(0, None, CaptureMode::Global, || {
            let _ = acc.g_add_(&(&x * 2.0));
        })
        .unwrap();
        assert_eq!(
            acc.sum(Kind::Float).double_value(&[]),
            0.0,
            "capturing runs nothing"
        );
        for _ in 0..3 {
            graph.replay().unwrap();
        }
        assert_eq!(acc.sum(Kind::Float).double_value(&[]), 3.0 * 2.0 * 1024.0);
        // New input values through the same memory.
        let _ = x.shallow_clone().fill_(0.5);
        graph.replay().unwrap();
        assert_eq!(acc.sum(Kind::Float).double_value(&[]), 7.0 * 1024.0);
    }

    #[test]
    fn reseeding_before_a_replay_reproduces_the_eager_draws() {
        let _serial = crate::test_lock();
        if !tch::Cuda::is_available() {
            return;
        }
        let device = Device::Cuda(0);
        let mut out = Tensor::zeros([4096], (Kind::Float, device));
        tch::manual_seed(7);
        let eager = Tensor::randn([4096], (Kind::Float, device));
        let (graph, ()) = CudaGraph::capture(0, None, CaptureMode::Global, || {
            out.copy_(&Tensor::randn([4096], (Kind::Float, device)));
        })
        .unwrap();
        tch::manual_seed(7);
        graph.replay().unwrap();
        assert!(
            out.equal(&eager),
            "replay after re-seeding drew other numbers"
        );
        graph.replay().unwrap();
        assert!(!out.equal(&eager), "a second replay must draw new numbers");
    }
}
