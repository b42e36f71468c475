// Group norm (optionally followed by SiLU) over channels-last CUDA maps, as one autograd function,
// for crates/torch-cuda/src/group_norm.rs. libtorch's CUDA group norm reads NCHW only: given a
// channels-last map it copies it to NCHW and returns NCHW, so a channels-last network pays two
// layout copies around every norm. The kernels (src/group_norm_nhwc.cu, embedded by build.rs) read
// and write NHWC directly; NVRTC compiles them at first use for the device's architecture, and the
// CUDA runtime loads and launches them on the current stream, so the op can be captured in a CUDA
// graph once it has run eagerly (src/nvrtc_kernels.h).
//
// Every entry point catches C++ exceptions and reports failure by its return value, leaving the
// message for torch_kernels_last_error().
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "nvrtc_kernels.h"

#include "group_norm_nhwc_src.h"  // kGroupNormSource: src/group_norm_nhwc.cu as a string

namespace {

using namespace torch_cuda_kernels;

enum GroupNormKernel { kStats, kStatsFinish, kApply, kBwdPartial, kBwdChannelSums, kBwdCoefficients, kBwdDx };

const Program kGroupNorm{kGroupNormSource,
                         "group_norm_nhwc.cu",
                         "channels-last group norm",
                         {"gn_stats", "gn_stats_finish", "gn_apply", "gn_bwd_partial", "gn_bwd_channel_sums",
                          "gn_bwd_coefficients", "gn_bwd_dx"}};

const Kernels& kernels_for(const at::Tensor& x, int vec) {
    return kernels(kGroupNorm, arch_of(x), store_kind(x.scalar_type(), kGroupNorm.label), vec);
}

void launch(const Kernels& k, GroupNormKernel which, dim3 grid, dim3 block, size_t shared, std::vector<void*> args,
            cudaStream_t stream) {
    torch_cuda_kernels::launch(kGroupNorm, k, which, grid, block, shared, std::move(args), stream);
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
    p.sms = multiprocessors(x);
    // About four blocks per multiprocessor over the batch, each of whole passes of k rows.
    const int64_t target = std::max<int64_t>(1, ceil_div(4 * p.sms, n));
    int64_t rows = ceil_div(ceil_div(l, target), k) * k;
    p.rows = static_cast<int>(std::max<int64_t>(rows, k));
    p.chunks = static_cast<int>(ceil_div(l, p.rows));
    return p;
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
    at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
    const Plan p = plan_for(x, groups, {&x, &y});
    const Kernels& k = kernels_for(x, p.vec);
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
    const Kernels& k = kernels_for(x, p.vec);
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

}  // namespace

extern "C" {

// Group norm of a 4-dimensional CUDA tensor (any layout; channels-last avoids a copy) with per-channel
// weight and bias, then SiLU when `silu`; the result is channels-last, recorded for autograd.
int torch_gn_nhwc(void* x, void* weight, void* bias, int64_t groups, double eps, int silu, void** out) {
    return torch_cuda_kernels::guarded([&] {
        at::Tensor y = GroupNormNhwc::apply(*static_cast<const at::Tensor*>(x), *static_cast<const at::Tensor*>(weight),
                                            *static_cast<const at::Tensor*>(bias), groups, eps, silu != 0);
        *out = new at::Tensor(std::move(y));
    });
}

// Compiles the kernels for sm_`arch` (e.g. 90) and a storage type (0 float, 1 bfloat16, 2 half) and
// vector width with NVRTC, without loading them (no device needed): whether this machine's NVRTC
// accepts the source.
int torch_gn_compile(int arch, int kind, int vec) {
    return torch_cuda_kernels::guarded([&] {
        TORCH_CHECK(kind >= 0 && kind <= 2 && (vec == 1 || vec == 2 || vec == 4 || vec == 8),
                    "no such kernel variant: kind ", kind, ", vector width ", vec);
        torch_cuda_kernels::compile(kGroupNorm, arch, kind, vec);
    });
}

}  // extern "C"
