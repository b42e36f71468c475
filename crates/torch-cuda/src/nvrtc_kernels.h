// Kernels of our own compiled at run time by NVRTC and launched through the CUDA runtime, shared
// by the ops that use them (src/group_norm.cpp, src/geglu.cpp, src/fp8.cpp). A program is a CUDA
// source embedded by build.rs (it may include "store_types.cuh", src/store_types.cuh, the storage
// type and its conversions); NVRTC compiles it once per (GPU architecture, storage type, vector
// width) with
//   STORE_KIND  0 = float, 1 = bfloat16, 2 = float16
//   VEC         elements per vector access (1, 2, 4 or 8)
// and the CUDA runtime loads the CUBIN and launches its kernels on the current stream, so an op can
// be captured in a CUDA graph once it has run eagerly. NVRTC and the runtime's library functions are
// looked up at run time (libnvrtc beside the libcudart that libtorch loaded), so nothing is linked
// beyond libtorch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

namespace torch_cuda_kernels {

// One CUDA source and the kernels it defines, in the order an op indexes them.
struct Program {
    const char* source;               // the CUDA text
    const char* file;                 // its name, for NVRTC's messages
    const char* label;                // the op, for error messages ("channels-last group norm")
    std::vector<const char*> kernels;  // the extern "C" kernel names
};

// The loaded kernels of one (program, architecture, type, vector width).
struct Kernels {
    std::vector<char> cubin;
    cudaLibrary_t library = nullptr;
    std::vector<cudaKernel_t> kernel;
};

// NVRTC's CUBIN of `program` for sm_`arch`, storage type `kind` and vector width `vec`; throws with
// NVRTC's log when it does not compile. Needs no GPU.
std::vector<char> compile(const Program& program, int arch, int kind, int vec);

// The kernels of `program` for (arch, kind, vec), compiled and loaded at their first use; a failure
// is remembered and repeated without compiling again.
const Kernels& kernels(const Program& program, int arch, int kind, int vec);

// Launches kernel `which` of `k` on `stream`.
void launch(const Program& program, const Kernels& k, int which, dim3 grid, dim3 block, size_t shared,
            std::vector<void*> args, cudaStream_t stream);

// STORE_KIND of a tensor type (float, bfloat16, half); throws naming `label` for another type.
int store_kind(at::ScalarType type, const char* label);

// The device's compute capability as major * 10 + minor (90 for Hopper).
int arch_of(const at::Tensor& x);

// The device's number of multiprocessors.
int multiprocessors(const at::Tensor& x);

// Whether the tensor's data starts at a multiple of `bytes`.
bool aligned(const at::Tensor& t, int64_t bytes);

// A grid-stride launch of 256-thread blocks over `vectors` items: at most 16 blocks per multiprocessor.
dim3 elementwise_grid(int64_t vectors, int sms);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The message of the last failed entry point on this thread.
std::string& last_error();

// Runs `body`, catching every C++ exception: 0 on success, -1 with the message in last_error().
template <typename F>
int guarded(F&& body) {
    try {
        body();
        return 0;
    } catch (const c10::Error& e) {
        last_error() = e.what_without_backtrace();
    } catch (const std::exception& e) {
        last_error() = e.what();
    } catch (...) {
        last_error() = "unknown C++ exception";
    }
    return -1;
}

}  // namespace torch_cuda_kernels
