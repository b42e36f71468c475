// The NCCL backend of src/dist.cpp's process group: c10d::ProcessGroupNCCL (libtorch_cuda.so, with
// the NCCL library of the nvidia-nccl wheel). Built only when CUDA's and NCCL's headers are present
// (ProcessGroupNCCL.hpp includes <nccl.h>); src/dist.cpp calls it under DIST_NCCL.
//
// The backend is created with the group's timeout. ProcessGroupNCCL enforces it with its watchdog
// thread: a collective that has not completed on the GPU within the timeout is aborted, and with
// the default TORCH_NCCL_ASYNC_ERROR_HANDLING (3, "skip clean-up") the watchdog then ends the
// process after logging the timed-out work (op type, sequence number, the rank), so a dead or
// hung peer makes every other rank exit non-zero within about the timeout.
#define USE_C10D_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <cstdint>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

// Creates the backend for CUDA device `device` over `store` (a c10d::Store owned by the caller);
// returns a c10d::Backend with one reference, which the caller adopts. Throws on failure (caught by
// the caller's guard).
c10d::Backend* torch_dist_nccl_new(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                   int64_t timeout_ms, int device) {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    // CUDA and its caching allocator initialised on this device before the backend (Python has
    // done so by the time init_process_group runs; ProcessGroupNCCL's streams and events expect it).
    (void)at::empty({1}, at::TensorOptions().device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, options);
    // Bind the communicator to this rank's device now (eager init), as init_process_group does
    // with device_id, so that the first collective does not pay for it inside a capture.
    backend->eagerConnectSingleDevice(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
    return static_cast<c10d::Backend*>(backend.release());
}
