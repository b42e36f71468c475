// An fp8 × fp8 linear product recorded for autograd, for crates/torch-cuda/src/fp8.rs: the input is
// quantized per call to e4m3 (one scale, its largest magnitude / 448, computed on the device) and
// multiplied by a frozen e4m3 weight with ATen's _scaled_mm (Hopper's fp8 tensor cores on CUDA,
// oneDNN on the CPU); the backward gives the input's gradient by the widened weight, as the
// widened layer's backward does, or (fp8 backward) by the output gradient quantized per call to e5m2
// times the e4m3 weight, transposed for the product. Only the fp8 weight and its scale are kept for
// the backward: no widened copy of the weight and no copy of the input.
//
// Every entry point catches C++ exceptions and reports failure by its return value, leaving the
// message for torch_kernels_last_error().
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "nvrtc_kernels.h"

#include "fp8_quantize_src.h"  // kFp8QuantizeSource: src/fp8_quantize.cu as a string

namespace {

using namespace torch_cuda_kernels;

constexpr double kE4m3Max = 448.0;
constexpr double kE5m2Max = 57344.0;

enum QuantizeKernel { kAmax, kQuantize };

// The fp8 format of a quantized operand: e4m3fn for inputs and weights, e5m2 for gradients.
enum class Format { kE4m3, kE5m2 };

const Program kFp8Quantize{kFp8QuantizeSource, "fp8_quantize.cu", "fp8 quantization", {"fp8_amax", "fp8_quantize"}};

// libtorch's operations for an operand's quantization (the CPU's route, and the definition the CUDA
// kernels follow): (fp8 values in `format`, fp32 scale).
std::pair<at::Tensor, at::Tensor> quantize_aten(const at::Tensor& rows, Format format) {
    const double top = format == Format::kE5m2 ? kE5m2Max : kE4m3Max;
    const at::ScalarType type = format == Format::kE5m2 ? at::kFloat8_e5m2 : at::kFloat8_e4m3fn;
    // The largest magnitude in one reduction, floored so that an all-zero input divides by a
    // positive scale; the division is computed in the input's type and saturated before the cast
    // (libtorch turns values past the fp8 range into NaN or infinity rather than saturating).
    const at::Tensor amax = at::linalg_vector_norm(rows, INFINITY, std::nullopt, false, at::kFloat);
    const at::Tensor scale = amax.clamp_min(1e-12).div(top).to(at::kFloat);
    return {rows.div(scale).clamp_(-top, top).to(type), scale};
}

// The widest vector (8, 4, 2 or 1 elements) that divides the element count and to which the input
// and the output are aligned.
int quantize_vector_width(const at::Tensor& x, const at::Tensor& out) {
    for (int vec : {8, 4, 2, 1}) {
        if (x.numel() % vec == 0 && aligned(x, vec * static_cast<int64_t>(x.element_size())) && aligned(out, vec)) {
            return vec;
        }
    }
    return 1;
}

// An operand's quantization by src/fp8_quantize.cu on CUDA (two kernels after zeroing one word),
// libtorch's operations elsewhere: (fp8 values in `format`, fp32 scale), bit for bit the same.
std::pair<at::Tensor, at::Tensor> quantize_input(const at::Tensor& input, Format format) {
    const at::Tensor rows = input.contiguous();
    if (!rows.is_cuda() || rows.numel() == 0) {
        return quantize_aten(rows, format);
    }
    c10::DeviceGuard guard(rows.device());
    at::Tensor amax_bits = at::zeros({1}, rows.options().dtype(at::kInt));
    at::Tensor scale = at::empty({}, rows.options().dtype(at::kFloat));
    at::Tensor quantized = at::empty(
        rows.sizes(), rows.options().dtype(format == Format::kE5m2 ? at::kFloat8_e5m2 : at::kFloat8_e4m3fn));
    const int vec = quantize_vector_width(rows, quantized);
    const Kernels& k = kernels(kFp8Quantize, arch_of(rows), store_kind(rows.scalar_type(), kFp8Quantize.label), vec);
    const void* x_ptr = rows.data_ptr();
    void* bits_ptr = amax_bits.data_ptr();
    void* q_ptr = quantized.data_ptr();
    void* scale_ptr = scale.data_ptr();
    long long vectors = static_cast<long long>(rows.numel() / vec);
    int e5m2 = format == Format::kE5m2 ? 1 : 0;
    const dim3 grid = elementwise_grid(vectors, multiprocessors(rows));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rows.device().index()).stream();
    launch(kFp8Quantize, k, kAmax, grid, dim3(256), 0, {&x_ptr, &bits_ptr, &vectors}, stream);
    launch(kFp8Quantize, k, kQuantize, grid, dim3(256), 0, {&x_ptr, &q_ptr, &bits_ptr, &scale_ptr, &vectors, &e5m2}, stream);
    return {quantized, scale};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                  const std::optional<at::Tensor>& bias) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                "fp8 linear: the input must be bf16 or fp16, got ", x.scalar_type());
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat8_e4m3fn,
                "fp8 linear: the weight must be a 2-d float8_e4m3fn tensor, got ", weight.scalar_type(), " of shape ",
                weight.sizes());
    TORCH_CHECK(weight_scale.numel() == 1 && weight_scale.scalar_type() == at::kFloat,
                "fp8 linear: the weight's scale must be one fp32 value, got ", weight_scale.scalar_type(),
                " of shape ", weight_scale.sizes());
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "fp8 linear: the input's last dimension (",
                x.dim() >= 1 ? x.size(-1) : 0, ") is not the weight's input width (", weight.size(1), ")");
    TORCH_CHECK(weight.size(0) % 16 == 0 && weight.size(1) % 16 == 0,
                "fp8 linear: the weight's widths must be multiples of 16, got ", weight.sizes());
    TORCH_CHECK(x.device() == weight.device() && weight_scale.device() == weight.device(),
                "fp8 linear: the input (", x.device(), "), weight (", weight.device(), ") and scale (",
                weight_scale.device(), ") must share a device");
    if (bias.has_value() && bias->defined()) {
        TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type(),
                    "fp8 linear: the bias must be [", weight.size(0), "] in the input's type, got ",
                    bias->scalar_type(), " of shape ", bias->sizes());
    }
}

// x · (weight · weight_scale)ᵀ + bias with x quantized to e4m3 by its ∞-norm / 448; the output in x's type.
at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                        const std::optional<at::Tensor>& bias) {
    c10::DeviceGuard guard(x.device());
    const auto [quantized, scale] = quantize_input(x.reshape({-1, x.size(-1)}), Format::kE4m3);
    const at::Tensor out = at::_scaled_mm(quantized, weight.t(), scale, weight_scale.reshape({}), bias,
                                          std::nullopt, x.scalar_type(), /*use_fast_accum=*/true);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return out.reshape(shape);
}

struct Fp8Linear : public torch::autograd::Function<Fp8Linear> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                              bool fp8_backward) {
        at::Tensor out = forward_impl(x, weight, weight_scale, bias);
        ctx->save_for_backward({weight, weight_scale});
        ctx->saved_data["input_shape"] = x.sizes().vec();
        // An absent bias is no input of the node (needs_input_grad has no index for it).
        ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
        ctx->saved_data["fp8_backward"] = fp8_backward;
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const at::Tensor& grad = grads[0];
        if (!grad.defined()) {  // the output took no part in what is differentiated
            return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
        }
        const auto saved = ctx->get_saved_variables();
        const at::Tensor& weight = saved[0];
        const at::Tensor& weight_scale = saved[1];
        const std::vector<int64_t> input_shape = ctx->saved_data["input_shape"].toIntVector();
        const at::Tensor grad_rows = grad.reshape({-1, weight.size(0)});
        at::Tensor grad_x;
        if (ctx->needs_input_grad(0) && ctx->saved_data["fp8_backward"].toBool()) {
            // The output gradient in e5m2 (its range) by its largest magnitude, times the e4m3 weight:
            // _scaled_mm takes its second operand column-major, so the weight goes transposed
            // ([in, out] row-major, one byte per element). fp32 accumulation without the fast mode.
            const auto [grad_q, grad_scale] = quantize_input(grad_rows, Format::kE5m2);
            const at::Tensor transposed = weight.t().contiguous();
            grad_x = at::_scaled_mm(grad_q, transposed.t(), grad_scale, weight_scale.reshape({}), std::nullopt,
                                    std::nullopt, grad.scalar_type(), /*use_fast_accum=*/false)
                         .reshape(input_shape);
        } else if (ctx->needs_input_grad(0)) {
            // The widened layer's backward: the product by the weight widened to the gradient's type
            // (e4m3 → bf16/fp16 is exact; one rounding for the scale).
            const at::Tensor widened = weight.to(grad.scalar_type()).mul(weight_scale.reshape({}));
            grad_x = grad_rows.mm(widened).reshape(input_shape);
        }
        at::Tensor grad_bias;
        if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
            grad_bias = grad_rows.sum(0);
        }
        return {grad_x, at::Tensor(), at::Tensor(), grad_bias, at::Tensor()};
    }
};

}  // namespace

extern "C" {

// The fp8 linear product of `x` by the e4m3 `weight` with its fp32 `weight_scale` and an optional
// `bias` (null for none), recorded for autograd (the input's gradient in fp8 too when
// `fp8_backward`); the output in x's type.
int torch_fp8_linear(void* x, void* weight, void* weight_scale, void* bias, int fp8_backward, void** out) {
    return torch_cuda_kernels::guarded([&] {
        const at::Tensor& input = *static_cast<const at::Tensor*>(x);
        const at::Tensor& w = *static_cast<const at::Tensor*>(weight);
        const at::Tensor& s = *static_cast<const at::Tensor*>(weight_scale);
        std::optional<at::Tensor> b;
        if (bias != nullptr) {
            b = *static_cast<const at::Tensor*>(bias);
        }
        check_inputs(input, w, s, b);
        at::Tensor y = Fp8Linear::apply(input, w, s, b, fp8_backward != 0);
        *out = new at::Tensor(std::move(y));
    });
}

// The quantization alone (CUDA kernels on a CUDA tensor, libtorch's operations elsewhere): the e4m3
// (or, with `e5m2`, e5m2) values of `x` (its shape) and their fp32 scale.
int torch_fp8_quantize(void* x, int e5m2, void** quantized, void** scale) {
    return torch_cuda_kernels::guarded([&] {
        const at::Tensor& input = *static_cast<const at::Tensor*>(x);
        TORCH_CHECK(input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf ||
                        input.scalar_type() == at::kFloat,
                    "fp8 quantization: the input must be fp32, bf16 or fp16, got ", input.scalar_type());
        at::NoGradGuard no_grad;
        auto [q, s] = quantize_input(input, e5m2 != 0 ? Format::kE5m2 : Format::kE4m3);
        *quantized = new at::Tensor(q.view(input.sizes()));
        *scale = new at::Tensor(std::move(s));
    });
}

// Compiles the quantization kernels for sm_`arch`, a storage type (0 float, 1 bfloat16, 2 half) and a
// vector width with NVRTC, without loading them (no device needed).
int torch_fp8_quantize_compile(int arch, int kind, int vec) {
    return torch_cuda_kernels::guarded([&] {
        TORCH_CHECK(kind >= 0 && kind <= 2 && (vec == 1 || vec == 2 || vec == 4 || vec == 8),
                    "no such kernel variant: kind ", kind, ", vector width ", vec);
        torch_cuda_kernels::compile(kFp8Quantize, arch, kind, vec);
    });
}

}  // extern "C"
