// NVRTC compilation, loading and launching of our own kernels (see nvrtc_kernels.h).
#include "nvrtc_kernels.h"

#include <c10/core/DeviceGuard.h>
#include <dlfcn.h>
#include <nvrtc.h>

#include <map>
#include <mutex>
#include <tuple>

#include "store_types_src.h"  // kStoreTypesSource: src/store_types.cuh as a string

namespace at::cuda {
cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device);
}

namespace torch_cuda_kernels {

namespace {

// The functions of NVRTC and of the CUDA runtime the kernels need, found at run time.
struct Api {
    decltype(&nvrtcCreateProgram) create_program = nullptr;
    decltype(&nvrtcCompileProgram) compile_program = nullptr;
    decltype(&nvrtcGetProgramLogSize) log_size = nullptr;
    decltype(&nvrtcGetProgramLog) log = nullptr;
    decltype(&nvrtcGetCUBINSize) cubin_size = nullptr;
    decltype(&nvrtcGetCUBIN) cubin = nullptr;
    decltype(&nvrtcDestroyProgram) destroy_program = nullptr;
    decltype(&nvrtcGetErrorString) nvrtc_error = nullptr;
    cudaError_t (*load_library)(cudaLibrary_t*, const void*, cudaJitOption*, void**, unsigned int,
                                cudaLibraryOption*, void**, unsigned int) = nullptr;
    cudaError_t (*get_kernel)(cudaKernel_t*, cudaLibrary_t, const char*) = nullptr;
    cudaError_t (*launch)(const void*, dim3, dim3, void**, size_t, cudaStream_t) = nullptr;
    const char* (*cuda_error)(cudaError_t) = nullptr;
    std::string missing;  // why the API is unavailable, empty when complete
};

template <typename F>
bool find(void* lib, const char* name, F& out) {
    out = reinterpret_cast<F>(dlsym(lib, name));
    return out != nullptr;
}

Api load_api() {
    Api api;
    const std::string cudart_name = "libcudart.so." + std::to_string(CUDART_VERSION / 1000);
    void* cudart = dlopen(cudart_name.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (cudart == nullptr) {
        api.missing = cudart_name + " is not loaded (libtorch has no CUDA)";
        return api;
    }
    if (!find(cudart, "cudaLibraryLoadData", api.load_library) || !find(cudart, "cudaLibraryGetKernel", api.get_kernel) ||
        !find(cudart, "cudaLaunchKernel", api.launch) || !find(cudart, "cudaGetErrorString", api.cuda_error)) {
        api.missing = cudart_name + " lacks cudaLibraryLoadData, cudaLibraryGetKernel or cudaLaunchKernel";
        return api;
    }
    // NVRTC of the runtime's CUDA major version: on the library path, else beside libcudart (the
    // PyTorch wheel's nvidia/cu13/lib).
    const std::string nvrtc_name = "libnvrtc.so." + std::to_string(CUDART_VERSION / 1000);
    void* nvrtc = dlopen(nvrtc_name.c_str(), RTLD_NOW | RTLD_LOCAL);
    Dl_info info;
    if (nvrtc == nullptr && dladdr(reinterpret_cast<void*>(api.launch), &info) != 0 && info.dli_fname != nullptr) {
        std::string path = info.dli_fname;
        const auto slash = path.rfind('/');
        if (slash != std::string::npos) {
            nvrtc = dlopen((path.substr(0, slash + 1) + nvrtc_name).c_str(), RTLD_NOW | RTLD_LOCAL);
        }
    }
    if (nvrtc == nullptr) {
        api.missing = nvrtc_name + " not found (on the library path or beside " + cudart_name + ")";
        return api;
    }
    // NVRTC opens its builtins library by name at compile time, which the library path may not
    // find (the wheel's folder is reached through libtorch's RPATH only): load it from NVRTC's own
    // folder first, so that NVRTC finds it loaded.
    nvrtcResult (*version)(int*, int*) = nullptr;
    int major = 0, minor = 0;
    if (find(nvrtc, "nvrtcVersion", version) && version(&major, &minor) == NVRTC_SUCCESS &&
        dladdr(reinterpret_cast<void*>(version), &info) != 0 && info.dli_fname != nullptr) {
        std::string path = info.dli_fname;
        const auto slash = path.rfind('/');
        const std::string builtins =
            "libnvrtc-builtins.so." + std::to_string(major) + "." + std::to_string(minor);
        if (dlopen(builtins.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr && slash != std::string::npos) {
            dlopen((path.substr(0, slash + 1) + builtins).c_str(), RTLD_NOW | RTLD_GLOBAL);
        }
    }
    if (!find(nvrtc, "nvrtcCreateProgram", api.create_program) || !find(nvrtc, "nvrtcCompileProgram", api.compile_program) ||
        !find(nvrtc, "nvrtcGetProgramLogSize", api.log_size) || !find(nvrtc, "nvrtcGetProgramLog", api.log) ||
        !find(nvrtc, "nvrtcGetCUBINSize", api.cubin_size) || !find(nvrtc, "nvrtcGetCUBIN", api.cubin) ||
        !find(nvrtc, "nvrtcDestroyProgram", api.destroy_program) || !find(nvrtc, "nvrtcGetErrorString", api.nvrtc_error)) {
        api.missing = nvrtc_name + " lacks a function this op needs";
    }
    return api;
}

const Api& api() {
    static const Api loaded = load_api();
    return loaded;
}

}  // namespace

std::string& last_error() {
    thread_local std::string message;
    return message;
}

}  // namespace torch_cuda_kernels

// The message of the last failed entry point of the kernels' ops (group norm, GEGLU, fp8, attention
// order) on this thread: what `torch_cuda_kernels::guarded` stored.
extern "C" const char* torch_kernels_last_error() { return torch_cuda_kernels::last_error().c_str(); }

namespace torch_cuda_kernels {

int store_kind(at::ScalarType type, const char* label) {
    switch (type) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        case at::kHalf: return 2;
        default: TORCH_CHECK(false, label, ": unsupported type ", type, " (float, bfloat16, half)");
    }
}

std::vector<char> compile(const Program& program, int arch, int kind, int vec) {
    const Api& a = api();
    TORCH_CHECK(a.missing.empty(), program.label, ": ", a.missing);
    nvrtcProgram handle;
    // Every program may include the storage types (src/store_types.cuh) by that name.
    const char* headers[] = {kStoreTypesSource};
    const char* include_names[] = {"store_types.cuh"};
    nvrtcResult status = a.create_program(&handle, program.source, program.file, 1, headers, include_names);
    TORCH_CHECK(status == NVRTC_SUCCESS, "NVRTC: ", a.nvrtc_error(status));
    const std::string arch_flag = "--gpu-architecture=sm_" + std::to_string(arch);
    const std::string kind_flag = "-DSTORE_KIND=" + std::to_string(kind);
    const std::string vec_flag = "-DVEC=" + std::to_string(vec);
    const char* options[] = {arch_flag.c_str(), kind_flag.c_str(), vec_flag.c_str()};
    status = a.compile_program(handle, 3, options);
    if (status != NVRTC_SUCCESS) {
        size_t size = 0;
        a.log_size(handle, &size);
        std::string log(size, '\0');
        if (size > 0) {
            a.log(handle, &log[0]);
        }
        a.destroy_program(&handle);
        TORCH_CHECK(false, "NVRTC could not compile the ", program.label, " kernels for sm_", arch, ": ",
                    a.nvrtc_error(status), "\n", log);
    }
    size_t size = 0;
    a.cubin_size(handle, &size);
    std::vector<char> cubin(size);
    a.cubin(handle, cubin.data());
    a.destroy_program(&handle);
    return cubin;
}

const Kernels& kernels(const Program& program, int arch, int kind, int vec) {
    static std::mutex mutex;
    static std::map<std::tuple<const Program*, int, int, int>, Kernels> loaded;
    static std::map<std::tuple<const Program*, int, int, int>, std::string> failed;
    std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(&program, arch, kind, vec);
    const auto hit = loaded.find(key);
    if (hit != loaded.end()) {
        return hit->second;
    }
    const auto miss = failed.find(key);
    TORCH_CHECK(miss == failed.end(), miss->second);
    try {
        Kernels k;
        k.cubin = compile(program, arch, kind, vec);
        const Api& a = api();
        cudaError_t status = a.load_library(&k.library, k.cubin.data(), nullptr, nullptr, 0, nullptr, nullptr, 0);
        TORCH_CHECK(status == cudaSuccess, "loading the ", program.label, " kernels: ", a.cuda_error(status));
        k.kernel.resize(program.kernels.size());
        for (size_t i = 0; i < program.kernels.size(); ++i) {
            status = a.get_kernel(&k.kernel[i], k.library, program.kernels[i]);
            TORCH_CHECK(status == cudaSuccess, "kernel ", program.kernels[i], ": ", a.cuda_error(status));
        }
        return loaded.emplace(key, std::move(k)).first->second;
    } catch (const c10::Error& e) {
        failed.emplace(key, e.what_without_backtrace());
        throw;
    }
}

void launch(const Program& program, const Kernels& k, int which, dim3 grid, dim3 block, size_t shared,
            std::vector<void*> args, cudaStream_t stream) {
    const Api& a = api();
    const cudaError_t status =
        a.launch(reinterpret_cast<const void*>(k.kernel.at(which)), grid, block, args.data(), shared, stream);
    TORCH_CHECK(status == cudaSuccess, "launching ", program.kernels.at(which), ": ", a.cuda_error(status));
}

int arch_of(const at::Tensor& x) {
    const cudaDeviceProp* props = at::cuda::getDeviceProperties(x.device().index());
    return props->major * 10 + props->minor;
}

int multiprocessors(const at::Tensor& x) {
    return at::cuda::getDeviceProperties(x.device().index())->multiProcessorCount;
}

bool aligned(const at::Tensor& t, int64_t bytes) {
    return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % static_cast<std::uintptr_t>(bytes) == 0;
}

dim3 elementwise_grid(int64_t vectors, int sms) {
    return dim3(static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(vectors, 256), 16 * sms))));
}

}  // namespace torch_cuda_kernels
