// C entry points over libtorch's CUDA caching allocator, for crates/torch-cuda/src/lib.rs.
// Every function catches C++ exceptions (e.g. no CUDA device) and reports failure by its return value.
#include <ATen/Context.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cstdint>

extern "C" {

// out[0..4]: allocated bytes now, peak allocated, reserved bytes now, peak reserved (all pools).
int torch_cuda_memory_stats(int device, int64_t* out) {
    try {
        // Before the first CUDA allocation the allocator is not set up (and would throw): nothing is
        // allocated or reserved yet.
        if (!c10::cuda::CUDACachingAllocator::get()->initialized()) {
            out[0] = out[1] = out[2] = out[3] = 0;
            return 0;
        }
        const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
        const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
        out[0] = stats.allocated_bytes[all].current;
        out[1] = stats.allocated_bytes[all].peak;
        out[2] = stats.reserved_bytes[all].current;
        out[3] = stats.reserved_bytes[all].peak;
        return 0;
    } catch (...) {
        return -1;
    }
}

int torch_cuda_reset_peak_memory_stats(int device) {
    try {
        if (!c10::cuda::CUDACachingAllocator::get()->initialized()) {
            return 0;
        }
        c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
        return 0;
    } catch (...) {
        return -1;
    }
}

int torch_cuda_empty_cache() {
    try {
        c10::cuda::CUDACachingAllocator::emptyCache();
        return 0;
    } catch (...) {
        return -1;
    }
}

// Whether float32 matrix products (cuBLAS) and convolutions (cuDNN) may use TF32, as
// torch.backends.cuda.matmul.allow_tf32 / torch.backends.cudnn.allow_tf32 set it in Python.
int torch_cuda_set_allow_tf32(int cublas, int cudnn) {
    try {
        at::globalContext().setAllowTF32CuBLAS(cublas != 0);
        at::globalContext().setAllowTF32CuDNN(cudnn != 0);
        return 0;
    } catch (...) {
        return -1;
    }
}

}  // extern "C"
