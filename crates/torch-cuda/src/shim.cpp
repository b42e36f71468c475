// C entry points over what libtorch offers and tch does not expose (the CUDA caching allocator's
// statistics, CUDA graphs, the Kineto profiler, multi-tensor operations, grad mode), for
// crates/torch-cuda/src. Every function catches C++ exceptions (e.g. no CUDA device) and reports
// failure by its return value; most leave the message for torch_cuda_last_error().
#include <ATen/Context.h>
#include <cstdio>
#include <c10/core/Device.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cstdint>

// Declared as in ATen/cuda/CUDAContextLight.h (exported by libtorch_cuda), whose other includes
// (cuSPARSE, cuBLAS) need CUDA headers that the wheel's include folder does not all carry.
namespace at::cuda {
cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device);
}

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

// out[0], out[1]: the compute capability (major, minor) of CUDA device `device`, as
// torch.cuda.get_device_capability reads it (cudaDeviceProp.major / .minor).
int torch_cuda_compute_capability(int device, int* out) {
    try {
        const cudaDeviceProp* properties = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
        out[0] = properties->major;
        out[1] = properties->minor;
        return 0;
    } catch (...) {
        return -1;
    }
}

// Writes the device's name (NUL-terminated, at most `capacity` bytes) into `out`.
int torch_cuda_device_name(int device, char* out, int capacity) {
    try {
        const cudaDeviceProp* properties = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
        std::snprintf(out, static_cast<size_t>(capacity), "%s", properties->name);
        return 0;
    } catch (...) {
        return -1;
    }
}

}  // extern "C"

// ---- CUDA graphs: at::cuda::CUDAGraph captured on a side stream, replayed on the current one. ----
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>

#include <exception>
#include <stdexcept>
#include <optional>
#include <string>

namespace {

thread_local std::string last_error;

int fail(const std::exception& e) {
    last_error = e.what();
    return -1;
}

int fail_unknown() {
    last_error = "unknown C++ exception";
    return -1;
}

// Runs `body`, turning any C++ exception into the -1 / torch_cuda_last_error() convention.
template <typename F>
int guarded(F&& body) {
    try {
        body();
        return 0;
    } catch (const std::exception& e) {
        return fail(e);
    } catch (...) {
        return fail_unknown();
    }
}

// Streams are switched with c10_cuda's exported functions, not the inline guards, so that the shim
// calls nothing of the CUDA runtime directly (the binary then needs no libcudart of its own).
struct Graph {
    at::cuda::CUDAGraph graph;
    // The stream that was current before the capture, made current again at its end.
    std::optional<c10::cuda::CUDAStream> previous;
};

// One capture stream per device for every capture, as PyTorch's `torch.cuda.graph` keeps one
// default side stream: the caching allocator reuses a freed block only on the stream it was
// allocated on, so graphs that share a memory pool must be captured on the same stream for one to
// reuse what another's capture freed (with a fresh stream per capture every graph kept its own).
c10::cuda::CUDAStream capture_stream(c10::DeviceIndex index) {
    static std::mutex lock;
    static std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
    std::lock_guard<std::mutex> guard(lock);
    auto found = streams.find(index);
    if (found == streams.end()) {
        found = streams.emplace(index, c10::cuda::getStreamFromPool(false, index)).first;
    }
    return found->second;
}

void restore(Graph* g) {
    if (g->previous) {
        c10::cuda::setCurrentCUDAStream(*g->previous);
        g->previous.reset();
    }
}

}  // namespace

extern "C" {

const char* torch_cuda_last_error() { return last_error.c_str(); }

void* torch_cuda_graph_new() {
    try {
        return new Graph();
    } catch (const std::exception& e) {
        fail(e);
        return nullptr;
    } catch (...) {
        fail_unknown();
        return nullptr;
    }
}

void torch_cuda_graph_free(void* graph) {
    try {
        delete static_cast<Graph*>(graph);
    } catch (...) {
    }
}

// Registers a CUDA generator of its own (an at::Generator* from rng.cpp) with the graph before its
// capture, as torch.cuda.CUDAGraph.register_generator_state does: its draws inside the capture take
// their seed and offset from the generator at each replay (libtorch's default generator always is).
int torch_cuda_graph_register_generator(void* graph, void* generator) {
    try {
        static_cast<Graph*>(graph)->graph.register_generator_state(*static_cast<at::Generator*>(generator));
        return 0;
    } catch (const std::exception& e) {
        return fail(e);
    } catch (...) {
        return fail_unknown();
    }
}

// Waits for the device, makes `device`'s capture stream current and starts capturing on it, in the
// memory pool of `share` (another graph, never replayed concurrently) or a private one.
// `mode`: 0 global, 1 thread-local, 2 relaxed (cudaStreamCaptureMode).
int torch_cuda_graph_capture_begin(void* graph, int device, void* share, int mode) {
    try {
        auto* g = static_cast<Graph*>(graph);
        const auto index = static_cast<c10::DeviceIndex>(device);
        c10::cuda::device_synchronize();
        g->previous = c10::cuda::getCurrentCUDAStream(index);
        c10::cuda::setCurrentCUDAStream(capture_stream(index));
        at::cuda::MempoolId_t pool = {0, 0};
        if (share != nullptr) {
            pool = static_cast<Graph*>(share)->graph.pool();
        }
        g->graph.capture_begin(pool, static_cast<cudaStreamCaptureMode>(mode));
        return 0;
    } catch (const std::exception& e) {
        restore(static_cast<Graph*>(graph));
        return fail(e);
    } catch (...) {
        restore(static_cast<Graph*>(graph));
        return fail_unknown();
    }
}

// Ends the capture and instantiates the graph; the previous stream is current again.
int torch_cuda_graph_capture_end(void* graph) {
    auto* g = static_cast<Graph*>(graph);
    try {
        g->graph.capture_end();
        restore(g);
        return 0;
    } catch (const std::exception& e) {
        restore(g);
        return fail(e);
    } catch (...) {
        restore(g);
        return fail_unknown();
    }
}

// Launches the captured work on the current stream (and advances the RNG offsets it consumed).
int torch_cuda_graph_replay(void* graph) {
    return guarded([&] {
        static_cast<Graph*>(graph)->graph.replay();
    });
}

int torch_cuda_synchronize(int device) {
    return guarded([&] {
        c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
        c10::cuda::device_synchronize();
    });
}

}  // extern "C"

// ---- Profiler: libtorch's Kineto profiler (what torch.profiler drives in Python). ----
#include <torch/csrc/autograd/profiler_kineto.h>

#include <set>

extern "C" {

// Starts recording operators on the CPU (and kernels, copies and memsets on CUDA devices when
// `cuda`), with tensor shapes when `shapes`, and allocations when `memory`.
int torch_profiler_start(int cuda, int shapes, int memory) {
    return guarded([&] {
        using torch::profiler::impl::ActivityType;
        using torch::profiler::impl::ProfilerConfig;
        using torch::profiler::impl::ProfilerState;
        const ProfilerConfig config(ProfilerState::KINETO, shapes != 0, memory != 0);
        std::set<ActivityType> activities{ActivityType::CPU};
        if (cuda != 0) {
            activities.insert(ActivityType::CUDA);
        }
        torch::autograd::profiler::prepareProfiler(config, activities);
        torch::autograd::profiler::enableProfiler(config, activities);
    });
}

// Stops the profiler and writes what it recorded to `path` as a Chrome trace (JSON), the format of
// torch.profiler's export_chrome_trace.
int torch_profiler_stop(const char* path) {
    return guarded([&] {
        auto result = torch::autograd::profiler::disableProfiler();
        if (result == nullptr) {
            throw std::runtime_error("the profiler was not running");
        }
        result->save(path);
    });
}

}  // extern "C"

// ---- Multi-tensor ("foreach") operations: one kernel launch per chunk of a list, not per tensor. ----
// Tensors arrive as tch's handles, which point at at::Tensor objects.
#include <ATen/Functions.h>
#include <ATen/core/grad_mode.h>

#include <vector>

namespace {

std::vector<at::Tensor> tensor_list(void* const* tensors, int count) {
    std::vector<at::Tensor> list;
    list.reserve(static_cast<size_t>(count));
    for (int i = 0; i < count; ++i) {
        list.push_back(*static_cast<const at::Tensor*>(tensors[i]));
    }
    return list;
}

}  // namespace

extern "C" {

// Zeroes every tensor of the list in place (torch._foreach_zero_).
int torch_foreach_zero_(void* const* tensors, int count) {
    return guarded([&] {
        at::NoGradGuard no_grad;
        auto list = tensor_list(tensors, count);
        at::_foreach_zero_(list);
    });
}

// torch.nn.utils.clip_grad_norm_ as it runs on CUDA (foreach path): the 2-norm of every tensor,
// the 2-norm of those, `factor = min(max_norm · 1/(total + eps), 1)` and every tensor multiplied by
// it in place; `total` (a 0-dim fp32 tensor) receives the total norm.
int torch_foreach_clip_norm_(void* const* tensors, int count, double max_norm, double eps, void* total) {
    return guarded([&] {
        at::NoGradGuard no_grad;
        auto list = tensor_list(tensors, count);
        auto norms = at::_foreach_norm(list, 2);
        auto norm = at::linalg_vector_norm(at::stack(norms), 2);
        auto factor = at::clamp_max(at::mul(at::reciprocal(at::add(norm, eps)), max_norm), 1.0);
        at::_foreach_mul_(list, factor);
        static_cast<at::Tensor*>(total)->copy_(norm);
    });
}

}  // extern "C"

extern "C" {

// Whether autograd records operations on this thread (torch.is_grad_enabled()).
int torch_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

}  // extern "C"

extern "C" {

// Drops the tensor's gradient (`tensor.grad = None`): the next backward writes a fresh one instead
// of adding into it.
int torch_clear_grad(void* tensor) {
    return guarded([&] {
        static_cast<at::Tensor*>(tensor)->mutable_grad() = at::Tensor();
    });
}

}  // extern "C"
