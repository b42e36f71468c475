//! libtorch's Kineto profiler, the one `torch.profiler` drives in Python: operators on the host,
//! and kernels, copies and memsets on CUDA devices, written as a Chrome trace (JSON) that
//! `chrome://tracing`, Perfetto, TensorBoard's profiler plugin and `tools/gpu/profile_summary.py` read.
//!
//! Kernels launched by a CUDA graph replay are recorded too (CUPTI reports each node).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether a [`Profiler`] of this process is running (libtorch does not refuse a second start).
static RUNNING: AtomicBool = AtomicBool::new(false);

use crate::Error;

#[cfg(torch_cuda_shim)]
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::c_char;
    unsafe extern "C" {
        pub fn torch_profiler_start(cuda: i32, shapes: i32, memory: i32) -> i32;
        pub fn torch_profiler_stop(path: *const c_char) -> i32;
    }
}

/// What to record besides host operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ProfilerOptions {
    /// Kernels, copies and memsets on CUDA devices (needs CUDA).
    pub cuda: bool,
    /// Each operator's input shapes.
    pub shapes: bool,
    /// Every allocation and free, with the allocator's running totals (`[memory]` events).
    pub memory: bool,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
impl ProfilerOptions {
    /// Sets [`ProfilerOptions::cuda`].
    #[must_use]
    pub fn with_cuda(mut self, cuda: bool) -> Self {
        self.cuda = cuda;
        self
    }

    /// Sets [`ProfilerOptions::shapes`].
    #[must_use]
    pub fn with_shapes(mut self, shapes: bool) -> Self {
        self.shapes = shapes;
        self
    }

    /// Sets [`ProfilerOptions::memory`].
    #[must_use]
    pub fn with_memory(mut self, memory: bool) -> Self {
        self.memory = memory;
        self
    }
}

/// A running profiler; [`Profiler::finish`] stops it and writes the trace. Dropping it unfinished
/// stops it and discards what it recorded. One may run at a time per process.
#[derive(Debug)]
pub struct Profiler {
    running: bool,
}

impl Profiler {
    /// Starts recording.
    ///
    /// # Errors
    /// [`Error::Profiler`] without the shim, when `options.cuda` is asked for without CUDA, or when
    /// libtorch refuses (a profiler is already running).
    pub fn start(options: ProfilerOptions) -> Result<Profiler, Error> {
        if options.cuda && !tch::Cuda::is_available() {
            return Err(Error::Profiler(
                "CUDA activity was asked for but no CUDA device is available".into(),
            ));
        }
        #[cfg(torch_cuda_shim)]
        {
            if RUNNING.swap(true, Ordering::SeqCst) {
                return Err(Error::Profiler(
                    "a profiler is already running in this process".into(),
                ));
            }
            // SAFETY: plain call; the shim catches every C++ exception.
            #[allow(unsafe_code)]
            let status = unsafe {
                ffi::torch_profiler_start(
                    i32::from(options.cuda),
                    i32::from(options.shapes),
                    i32::from(options.memory),
                )
            };
            if status != 0 {
                RUNNING.store(false, Ordering::SeqCst);
                return Err(Error::Profiler(format!(
                    "starting: {}",
                    crate::shim_last_error()
                )));
            }
            Ok(Profiler { running: true })
        }
        #[cfg(not(torch_cuda_shim))]
        {
            Err(Error::Profiler(crate::NO_SHIM.into()))
        }
    }

    /// Stops recording and writes the trace to `path` (through a temporary file beside it, so a
    /// trace at `path` is always complete).
    ///
    /// # Errors
    /// [`Error::Profiler`] naming `path` when it cannot be written.
    pub fn finish(mut self, path: &Path) -> Result<(), Error> {
        self.running = false;
        let partial = path.with_extension("json.partial");
        self::stop(&partial)?;
        std::fs::rename(&partial, path).map_err(|e| {
            Error::Profiler(format!(
                "moving {} to {}: {e}",
                partial.display(),
                path.display()
            ))
        })
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if self.running {
            let discard = std::env::temp_dir()
                .join(format!("torch-cuda-discarded-{}.json", std::process::id()));
            if stop(&discard).is_ok() {
                let _ = std::fs::remove_file(&discard);
            }
        }
    }
}

fn stop(path: &Path) -> Result<(), Error> {
    #[cfg(torch_cuda_shim)]
    {
        RUNNING.store(false, Ordering::SeqCst);
        let text = path
            .to_str()
            .ok_or_else(|| Error::Profiler(format!("{} is not UTF-8", path.display())))?;
        let c_path = std::ffi::CString::new(text)
            .map_err(|_| Error::Profiler(format!("{} holds a NUL byte", path.display())))?;
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call; the shim catches
        // every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_profiler_stop(c_path.as_ptr()) };
        if status != 0 {
            return Err(Error::Profiler(format!(
                "writing {}: {}",
                path.display(),
                crate::shim_last_error()
            )));
        }
        if !path.exists() {
            return Err(Error::Profiler(format!(
                "libtorch wrote no trace at {}",
                path.display()
            )));
        }
        Ok(())
    }
    #[cfg(not(torch_cuda_shim))]
    {
        let _ = path;
        Err(Error::Profiler(crate::NO_SHIM.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn a_profiled_matrix_product_appears_in_the_trace_with_its_shapes() {
        let _serial = crate::test_lock();
        if !crate::shim_compiled() {
            assert!(Profiler::start(ProfilerOptions::default()).is_err());
            return;
        }
        let dir = std::env::temp_dir().join(format!("torch-cuda-profiler-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace.json");
        let cuda = tch::Cuda::is_available();
        let device = if cuda {
            tch::Device::Cuda(0)
        } else {
            tch::Device::Cpu
        };
        let profiler = Profiler::start(ProfilerOptions {
            cuda,
            shapes: true,
            memory: true,
        })
        .unwrap();
        let a = Tensor::ones([48, 32], (Kind::Float, device));
        let b = Tensor::ones([32, 16], (Kind::Float, device));
        let c = a.mm(&b);
        assert_eq!(c.sum(Kind::Float).double_value(&[]), 48.0 * 16.0 * 32.0);
        // A second profiler cannot start while this one runs.
        assert!(Profiler::start(ProfilerOptions::default()).is_err());
        profiler.finish(&path).unwrap();
        let trace = std::fs::read_to_string(&path).unwrap();
        assert!(trace.contains("\"aten::mm\""), "no aten::mm in the trace");
        assert!(trace.contains("[48, 32]"), "no input shapes in the trace");
        assert!(
            trace.contains("[memory]"),
            "no allocation events in the trace"
        );
        if cuda {
            assert!(
                trace.contains("\"cat\": \"kernel\""),
                "no CUDA kernels in the trace"
            );
        }
        // The profiler can run again once finished.
        let again = Profiler::start(ProfilerOptions::default()).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
