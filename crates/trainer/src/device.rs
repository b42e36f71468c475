//! The training device: `--device`, libtorch's cuBLAS workspace under gradient checkpointing, and
//! handing cached blocks back after a stage frees a model.

use tch::Device;

use crate::config::{MixedPrecision, TrainConfig};
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

/// The device of process `world` of a data-parallel run: on CUDA, device `LOCAL_RANK` (as
/// torchrun scripts call `torch.cuda.set_device(local_rank)`); one process keeps `device`.
///
/// # Errors
/// [`Error::Environment`] when `LOCAL_RANK` names a device this machine does not have.
pub(crate) fn for_rank(device: Device, world: &crate::distributed::World) -> Result<Device> {
    if !device.is_cuda() || world.world_size == 1 {
        return Ok(device);
    }
    let count = tch::Cuda::device_count();
    if world.local_rank as i64 >= count {
        return Err(Error::Environment {
            variable: "LOCAL_RANK",
            problem: format!(
                "{} names a CUDA device, and this machine has {count}",
                world.local_rank
            ),
        });
    }
    Ok(Device::Cuda(world.local_rank))
}

/// Refuses `--mixed_precision bf16` on a CUDA device without native bf16, suggesting fp16.
///
/// # Errors
/// [`Error::InvalidOption`] naming `--mixed_precision`.
pub(crate) fn check_precision(precision: MixedPrecision, device: Device) -> Result<()> {
    let capability = match device {
        Device::Cuda(index) => torch_cuda::compute_capability(index),
        _ => None,
    };
    precision_supported(precision, device, capability)
}

/// The decision of [`check_precision`] given the device's compute capability (`None`: unknown,
/// or not a CUDA device). bf16 needs compute capability 8.0 (Ampere) or newer, as
/// `torch.cuda.is_bf16_supported(including_emulation=False)` decides: older GPUs have no bf16
/// arithmetic (torch would emulate it, slowly) and train in fp16 with loss scaling instead. The
/// CPU computes bf16 in any case; an unknown capability (a build without the CUDA shim) is let
/// through, and libtorch then reports what it cannot do.
pub(crate) fn precision_supported(
    precision: MixedPrecision,
    device: Device,
    capability: Option<(i32, i32)>,
) -> Result<()> {
    match (precision, capability) {
        (MixedPrecision::Bf16, Some((major, minor))) if major < 8 => Err(Error::InvalidOption {
            option: "--mixed_precision",
            problem: format!(
                "bf16 needs a GPU of compute capability 8.0 or newer (Ampere); {device:?} has \
                 {major}.{minor}. Use --mixed_precision fp16 (fp16 weights with dynamic loss \
                 scaling) or --mixed_precision no"
            ),
        }),
        _ => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_before_ampere_is_refused_naming_the_flag_and_suggesting_fp16() {
        let gpu = Device::Cuda(0);
        for capability in [(7, 5), (7, 0), (6, 1)] {
            let err = precision_supported(MixedPrecision::Bf16, gpu, Some(capability))
                .unwrap_err()
                .to_string();
            assert!(err.contains("--mixed_precision"), "{err}");
            assert!(err.contains("fp16"), "{err}");
            assert!(
                err.contains(&format!("{}.{}", capability.0, capability.1)),
                "{err}"
            );
        }
        for capability in [(8, 0), (8, 6), (9, 0), (12, 0)] {
            precision_supported(MixedPrecision::Bf16, gpu, Some(capability)).unwrap();
        }
        for other in [MixedPrecision::Fp16, MixedPrecision::No] {
            precision_supported(other, gpu, Some((7, 5))).unwrap();
        }
        // The CPU, and a capability this build cannot read, are not refused.
        precision_supported(MixedPrecision::Bf16, Device::Cpu, None).unwrap();
        check_precision(MixedPrecision::Bf16, Device::Cpu).unwrap();
    }
}
