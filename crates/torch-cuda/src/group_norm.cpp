// Group norm (optionally followed by SiLU) over channels-last CUDA maps, as one autograd function,
// for crates/torch-cuda/src/group_norm.rs. libtorch's CUDA group norm reads NCHW only: given a
// channels-last map it copies it to NCHW and returns NCHW, so a channels-last network pays two
// layout copies around every norm. The kernels (src/group_norm_nhwc.cu, embedded by build.rs) read
// and write NHWC directly; NVRTC compiles them at first use for the device's architecture, and the
// CUDA runtime loads and launches them on the current stream, so the op can be captured in a CUDA
// graph once it has run eagerly. NVRTC and the runtime's library functions are looked up at run time
// (libnvrtc beside the libcudart that libtorch loaded), so nothing is linked beyond libtorch.
//
// Every entry point catches C++ exceptions and reports failure by its return value, leaving the
// message for torch_gn_last_error().
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nvrtc.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "group_norm_nhwc_src.h"  // kGroupNormSource: src/group_norm_nhwc.cu as a string

namespace at::cuda {
cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device);
}

namespace {

thread_local std::string last_error;

// The functions of NVRTC and of the CUDA runtime this file calls, found at run time.
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

enum Kernel { kStats, kStatsFinish, kApply, kBwdPartial, kBwdChannelSums, kBwdCoefficients, kBwdDx, kKernels };
const char* const kKernelNames[kKernels] = {"gn_stats",           "gn_stats_finish",     "gn_apply", "gn_bwd_partial",
                                            "gn_bwd_channel_sums", "gn_bwd_coefficients", "gn_bwd_dx"};

// The storage types the kernels take (STORE_KIND in the source).
int store_kind(at::ScalarType type) {
    switch (type) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        case at::kHalf: return 2;
        default: TORCH_CHECK(false, "channels-last group norm: unsupported type ", type, " (float, bfloat16, half)");
    }
}

// NVRTC's output for one (architecture, storage type, vector width): the CUBIN, or why it failed.
std::vector<char> compile(int arch, int kind, int vec) {
    const Api& a = api();
    TORCH_CHECK(a.missing.empty(), "channels-last group norm: ", a.missing);
    nvrtcProgram program;
    nvrtcResult status = a.create_program(&program, kGroupNormSource, "group_norm_nhwc.cu", 0, nullptr, nullptr);
    TORCH_CHECK(status == NVRTC_SUCCESS, "NVRTC: ", a.nvrtc_error(status));
    const std::string arch_flag = "--gpu-architecture=sm_" + std::to_string(arch);
    const std::string kind_flag = "-DSTORE_KIND=" + std::to_string(kind);
    const std::string vec_flag = "-DVEC=" + std::to_string(vec);
    const char* options[] = {arch_flag.c_str(), kind_flag.c_str(), vec_flag.c_str()};
    status = a.compile_program(program, 3, options);
    if (status != NVRTC_SUCCESS) {
        size_t size = 0;
        a.log_size(program, &size);
        std::string log(size, '\0');
        if (size > 0) {
            a.log(program, &log[0]);
        }
        a.destroy_program(&program);
        TORCH_CHECK(false, "NVRTC could not compile the group norm kernels for sm_", arch, ": ", a.nvrtc_error(status), "\n",
                    log);
    }
    size_t size = 0;
    a.cubin_size(program, &size);
    std::vector<char> cubin(size);
    a.cubin(program, cubin.data());
    a.destroy_program(&program);
    return cubin;
}

struct Kernels {
    std::vector<char> cubin;
    cudaLibrary_t library = nullptr;
    cudaKernel_t kernel[kKernels] = {};
};

// The loaded kernels of (architecture, type, vector width), compiled at their first use; a failure
// is remembered and repeated without compiling again.
const Kernels& kernels(int arch, int kind, int vec) {
    static std::mutex mutex;
    static std::map<std::tuple<int, int, int>, Kernels> loaded;
    static std::map<std::tuple<int, int, int>, std::string> failed;
    std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(arch, kind, vec);
    const auto hit = loaded.find(key);
    if (hit != loaded.end()) {
        return hit->second;
    }
    const auto miss = failed.find(key);
    TORCH_CHECK(miss == failed.end(), miss->second);
    try {
        Kernels k;
        k.cubin = compile(arch, kind, vec);
        const Api& a = api();
        cudaError_t status = a.load_library(&k.library, k.cubin.data(), nullptr, nullptr, 0, nullptr, nullptr, 0);
        TORCH_CHECK(status == cudaSuccess, "loading the group norm kernels: ", a.cuda_error(status));
        for (int i = 0; i < kKernels; ++i) {
            status = a.get_kernel(&k.kernel[i], k.library, kKernelNames[i]);
            TORCH_CHECK(status == cudaSuccess, "kernel ", kKernelNames[i], ": ", a.cuda_error(status));
        }
        return loaded.emplace(key, std::move(k)).first->second;
    } catch (const c10::Error& e) {
        failed.emplace(key, e.what_without_backtrace());
        throw;
    }
}

void launch(const Kernels& k, Kernel which, dim3 grid, dim3 block, size_t shared, std::vector<void*> args,
            cudaStream_t stream) {
    const Api& a = api();
    const cudaError_t status =
        a.launch(reinterpret_cast<const void*>(k.kernel[which]), grid, block, args.data(), shared, stream);
    TORCH_CHECK(status == cudaSuccess, "launching ", kKernelNames[which], ": ", a.cuda_error(status));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const at::Tensor& t, int64_t bytes) {
    return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % static_cast<std::uintptr_t>(bytes) == 0;
}

// How a map of this shape is cut into work: vector width, threads per block (whole rows of C / VEC
// threads), rows per block and the number of row chunks S.
struct Plan {
    int vec = 1;
    int threads = 0;
    int rows = 0;
    int chunks = 0;
    int sms = 0;
};

Plan plan_for(const at::Tensor& x, int64_t groups, std::initializer_list<const at::Tensor*> vectors) {
    const int64_t n = x.size(0), c = x.size(1), l = x.size(2) * x.size(3);
    Plan p;
    for (int vec : {8, 4, 2, 1}) {
        const int64_t bytes = vec * static_cast<int64_t>(x.element_size());
        bool ok = (c / groups) % vec == 0;
        for (const at::Tensor* t : vectors) {
            ok = ok && aligned(*t, bytes);
        }
        if (ok) {
            p.vec = vec;
            break;
        }
    }
    const int64_t per_row = c / p.vec;
    TORCH_CHECK(per_row <= 1024, "channels-last group norm: ", c, " channels need more than 1024 threads per row");
    const int64_t k = std::max<int64_t>(1, 256 / per_row);
    TORCH_CHECK(2 * k * c * 4 <= 48 * 1024, "channels-last group norm: ", c, " channels exceed the kernels' shared memory");
    p.threads = static_cast<int>(per_row * k);
    p.sms = at::cuda::getDeviceProperties(x.device().index())->multiProcessorCount;
    // About four blocks per multiprocessor over the batch, each of whole passes of k rows.
    const int64_t target = std::max<int64_t>(1, ceil_div(4 * p.sms, n));
    int64_t rows = ceil_div(ceil_div(l, target), k) * k;
    p.rows = static_cast<int>(std::max<int64_t>(rows, k));
    p.chunks = static_cast<int>(ceil_div(l, p.rows));
    return p;
}

int arch_of(const at::Tensor& x) {
    const cudaDeviceProp* props = at::cuda::getDeviceProperties(x.device().index());
    return props->major * 10 + props->minor;
}

dim3 elementwise_grid(int64_t vectors, int sms) {
    return dim3(static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(vectors, 256), 16 * sms))));
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 4, "channels-last group norm: a 4-dimensional CUDA tensor is needed, got ",
                x.sizes(), " on ", x.device());
    TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "channels-last group norm: ", groups, " groups do not divide ",
                x.size(1), " channels");
    TORCH_CHECK(weight.numel() == x.size(1) && bias.numel() == x.size(1),
                "channels-last group norm: weight and bias need one value per channel (", x.size(1), ")");
    TORCH_CHECK(x.size(0) <= 65535, "channels-last group norm: batch ", x.size(0), " exceeds 65535");
    TORCH_CHECK(x.size(2) * x.size(3) < (int64_t{1} << 31), "channels-last group norm: map too large");
}

// Forward: y, mean and rstd ([N, G] fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& input, const at::Tensor& weight_in,
                                                            const at::Tensor& bias_in, int64_t groups, double eps,
                                                            bool silu) {
    check_inputs(input, weight_in, bias_in, groups);
    c10::DeviceGuard guard(input.device());
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor weight = weight_in.to(x.scalar_type()).contiguous();
    const at::Tensor bias = bias_in.to(x.scalar_type()).contiguous();
    const int kind = store_kind(x.scalar_type());
    at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
    const Plan p = plan_for(x, groups, {&x, &y});
    const Kernels& k = kernels(arch_of(x), kind, p.vec);
    int n = static_cast<int>(x.size(0)), c = static_cast<int>(x.size(1)), g = static_cast<int>(groups);
    int l = static_cast<int>(x.size(2) * x.size(3)), s = p.chunks, rows = p.rows, silu_flag = silu ? 1 : 0;
    float eps_f = static_cast<float>(eps);
    const auto f32 = x.options().dtype(at::kFloat);
    at::Tensor part = at::empty({n, s, g, 3}, f32);
    at::Tensor mean = at::empty({n, g}, f32);
    at::Tensor rstd = at::empty({n, g}, f32);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    const void* x_ptr = x.data_ptr();
    void* part_ptr = part.data_ptr();
    launch(k, kStats, dim3(s, n), dim3(p.threads), 3 * p.threads * sizeof(float),
           {&x_ptr, &part_ptr, &l, &c, &g, &s, &rows}, stream);
    void* mean_ptr = mean.data_ptr();
    void* rstd_ptr = rstd.data_ptr();
    // A warp per (n, g).
    launch(k, kStatsFinish, dim3(static_cast<unsigned int>(ceil_div(int64_t{32} * n * g, 256))), dim3(256), 0,
           {&part_ptr, &mean_ptr, &rstd_ptr, &n, &g, &s, &eps_f}, stream);
    long long vectors = static_cast<long long>(x.numel() / p.vec);
    const void* w_ptr = weight.data_ptr();
    const void* b_ptr = bias.data_ptr();
    void* y_ptr = y.data_ptr();
    launch(k, kApply, elementwise_grid(vectors, p.sms), dim3(256), 0,
           {&x_ptr, &w_ptr, &b_ptr, &mean_ptr, &rstd_ptr, &y_ptr, &vectors, &l, &c, &g, &silu_flag}, stream);
    return {y, mean, rstd};
}

// Backward: dx, and dweight, dbias (undefined unless wanted).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                             const at::Tensor& mean, const at::Tensor& rstd,
                                                             int64_t groups, bool silu, bool want_affine) {
    c10::DeviceGuard guard(x.device());
    const at::Tensor dy = grad.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor weight = weight_in.to(x.scalar_type()).contiguous();
    const at::Tensor bias = bias_in.to(x.scalar_type()).contiguous();
    at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
    const Plan p = plan_for(x, groups, {&x, &dy, &dx});
    const Kernels& k = kernels(arch_of(x), store_kind(x.scalar_type()), p.vec);
    int n = static_cast<int>(x.size(0)), c = static_cast<int>(x.size(1)), g = static_cast<int>(groups);
    int l = static_cast<int>(x.size(2) * x.size(3)), s = p.chunks, rows = p.rows, silu_flag = silu ? 1 : 0;
    int affine_flag = want_affine ? 1 : 0;
    const auto f32 = x.options().dtype(at::kFloat);
    at::Tensor part_ds = at::empty({n, s, c}, f32);
    at::Tensor part_db = at::empty({n, s, c}, f32);
    at::Tensor ds = at::empty({n, c}, f32);
    at::Tensor db = at::empty({n, c}, f32);
    at::Tensor coef = at::empty({n, g, 2}, f32);
    at::Tensor daffine = at::empty({2, want_affine ? c : 1}, f32);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    const void* dy_ptr = dy.data_ptr();
    const void* x_ptr = x.data_ptr();
    const void* w_ptr = weight.data_ptr();
    const void* b_ptr = bias.data_ptr();
    const void* mean_ptr = mean.data_ptr();
    const void* rstd_ptr = rstd.data_ptr();
    void* part_ds_ptr = part_ds.data_ptr();
    void* part_db_ptr = part_db.data_ptr();
    const int per_row = c / p.vec;
    const int k_rows = p.threads / per_row;
    launch(k, kBwdPartial, dim3(s, n), dim3(p.threads), 2 * static_cast<size_t>(k_rows) * c * sizeof(float),
           {&dy_ptr, &x_ptr, &w_ptr, &b_ptr, &mean_ptr, &rstd_ptr, &part_ds_ptr, &part_db_ptr, &l, &c, &g, &s, &rows,
            &silu_flag},
           stream);
    void* ds_ptr = ds.data_ptr();
    void* db_ptr = db.data_ptr();
    // 32 channels of one sample per block, 8 threads each.
    launch(k, kBwdChannelSums, dim3(static_cast<unsigned int>(ceil_div(c, 32)), static_cast<unsigned int>(n)), dim3(256), 0,
           {&part_ds_ptr, &part_db_ptr, &ds_ptr, &db_ptr, &n, &c, &s}, stream);
    void* coef_ptr = coef.data_ptr();
    void* daffine_ptr = daffine.data_ptr();
    const int64_t coefficient_threads = n * g + (want_affine ? c : 0);
    launch(k, kBwdCoefficients, dim3(static_cast<unsigned int>(ceil_div(coefficient_threads, 256))), dim3(256), 0,
           {&ds_ptr, &db_ptr, &w_ptr, &mean_ptr, &rstd_ptr, &coef_ptr, &daffine_ptr, &n, &l, &c, &g, &affine_flag},
           stream);
    long long vectors = static_cast<long long>(x.numel() / p.vec);
    void* dx_ptr = dx.data_ptr();
    launch(k, kBwdDx, elementwise_grid(vectors, p.sms), dim3(256), 0,
           {&dy_ptr, &x_ptr, &w_ptr, &b_ptr, &mean_ptr, &rstd_ptr, &coef_ptr, &dx_ptr, &vectors, &l, &c, &g, &silu_flag},
           stream);
    if (!want_affine) {
        return {dx, at::Tensor(), at::Tensor()};
    }
    return {dx, daffine[0].to(weight_in.scalar_type()), daffine[1].to(bias_in.scalar_type())};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct GroupNormNhwc : public torch::autograd::Function<GroupNormNhwc> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bias, int64_t groups, double eps, bool silu) {
        auto [y, mean, rstd] = forward_impl(x, weight, bias, groups, eps, silu);
        ctx->save_for_backward({x.contiguous(at::MemoryFormat::ChannelsLast), weight, bias, mean, rstd});
        ctx->saved_data["groups"] = groups;
        ctx->saved_data["silu"] = silu;
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        if (!grads[0].defined()) {  // the output took no part in what is differentiated
            return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
        }
        const auto saved = ctx->get_saved_variables();
        const bool want_affine = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
        auto [dx, dweight, dbias] = backward_impl(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                                  ctx->saved_data["groups"].toInt(),
                                                  ctx->saved_data["silu"].toBool(), want_affine);
        return {dx, dweight, dbias, at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

template <typename F>
int guarded(F&& body) {
    try {
        body();
        return 0;
    } catch (const c10::Error& e) {
        last_error = e.what_without_backtrace();
    } catch (const std::exception& e) {
        last_error = e.what();
    } catch (...) {
        last_error = "unknown C++ exception";
    }
    return -1;
}

}  // namespace

extern "C" {

const char* torch_gn_last_error() { return last_error.c_str(); }

// Group norm of a 4-dimensional CUDA tensor (any layout; channels-last avoids a copy) with per-channel
// weight and bias, then SiLU when `silu`; the result is channels-last, recorded for autograd.
int torch_gn_nhwc(void* x, void* weight, void* bias, int64_t groups, double eps, int silu, void** out) {
    return guarded([&] {
        at::Tensor y = GroupNormNhwc::apply(*static_cast<const at::Tensor*>(x), *static_cast<const at::Tensor*>(weight),
                                            *static_cast<const at::Tensor*>(bias), groups, eps, silu != 0);
        *out = new at::Tensor(std::move(y));
    });
}

// Compiles the kernels for sm_`arch` (e.g. 90) and a storage type (0 float, 1 bfloat16, 2 half) and
// vector width with NVRTC, without loading them (no device needed): whether this machine's NVRTC
// accepts the source.
int torch_gn_compile(int arch, int kind, int vec) {
    return guarded([&] {
        TORCH_CHECK(kind >= 0 && kind <= 2 && (vec == 1 || vec == 2 || vec == 4 || vec == 8),
                    "no such kernel variant: kind ", kind, ", vector width ", vec);
        compile(arch, kind, vec);
    });
}

}  // extern "C"
