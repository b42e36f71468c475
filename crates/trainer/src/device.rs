//! The training device: `--device`, libtorch's cuBLAS workspace under gradient checkpointing, and
//! handing cached blocks back after a stage frees a model.

use tch::Device;

use crate::config::TrainConfig;
use crate::{Error, Result};

/// libtorch's cuBLAS workspace setting (`:SIZE_KIB:COUNT`, as in `CUBLAS_WORKSPACE_CONFIG` of PyTorch).
const CUBLAS_WORKSPACE_VARIABLE: &str = "CUBLAS_WORKSPACE_CONFIG";

/// Chooses the device of `--device` and sets libtorch up for it (cuDNN benchmarking, the cuBLAS
/// workspace of the memory-saving mode).
///
/// # Errors
/// [`Error::InvalidOption`] naming `--device`.
pub(crate) fn open(config: &TrainConfig) -> Result<Device> {
    if config.gradient_checkpointing && std::env::var_os(CUBLAS_WORKSPACE_VARIABLE).is_none() {
        // Checkpointing is the memory-saving mode: a 4 MiB cuBLAS workspace instead of
        // libtorch's 32 MiB per handle and stream on Hopper (what that takes off the peak:
        // docs/BENCHMARKS.md, "GPU runs of 2026-12-01, third session", call O). libtorch reads
        // the variable when it first creates a cuBLAS workspace, which happens only later, in
        // the first matrix product on the device.
        // SAFETY: nothing here reads the environment concurrently; the trainer has not started
        // its loader threads or any device work yet. A variable the user set is left alone.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var(CUBLAS_WORKSPACE_VARIABLE, ":4096:1");
        }
    }
    let device = pick(&config.device)?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(config.cudnn_benchmark);
    }
    Ok(device)
}

/// `--device`.
fn pick(name: &str) -> Result<Device> {
    let bad = |problem: String| Error::InvalidOption {
        option: "--device",
        problem,
    };
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "cuda:0" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) if (index as i64) < tch::Cuda::device_count() => {
                Ok(Device::Cuda(index))
            }
            _ if other.starts_with("cuda") => {
                Err(bad(format!("`{other}`: no such CUDA device here")))
            }
            _ => Err(bad(format!("`{other}` is not auto, cpu, cuda or cuda:N"))),
        },
    }
}

/// Returns libtorch's cached device blocks after a model was dropped.
pub(crate) fn free_cache(device: Device) {
    if device.is_cuda() {
        torch_cuda::empty_cache();
    }
}

/// The CUDA ordinal of `device` (0 on the CPU).
pub(crate) fn index(device: Device) -> usize {
    match device {
        Device::Cuda(index) => index,
        _ => 0,
    }
}

/// Peak allocated memory since the last reset, GiB (CUDA only).
pub(crate) fn peak_memory_gib(device: Device) -> Option<f64> {
    device
        .is_cuda()
        .then(|| torch_cuda::memory_stats(index(device)))
        .flatten()
        .map(|s| s.peak_allocated_gib())
}
