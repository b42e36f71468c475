// GEGLU (`h * gelu(gate)` of the two halves of the last dimension) as one autograd function with
// kernels of our own (src/geglu.cu, embedded by build.rs, compiled by NVRTC: src/nvrtc_kernels.h),
// for crates/torch-cuda/src/geglu.rs. libtorch computes it as chunk, GELU and a product on strided
// halves (its unvectorized kernels), and chunk's backward copies the two halves' gradients together;
// here the forward and the backward are one pass each with libtorch's arithmetic.
//
// Every entry point catches C++ exceptions and reports failure by its return value, leaving the
// message for torch_kernels_last_error().
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <vector>

#include "nvrtc_kernels.h"

#include "geglu_src.h"  // kGegluSource: src/geglu.cu as a string

namespace {

using namespace torch_cuda_kernels;

enum GegluKernel { kForward, kBackward };

const Program kGeglu{kGegluSource, "geglu.cu", "GEGLU", {"geglu_fwd", "geglu_bwd"}};

// The widest vector (8, 4, 2 or 1 elements) that divides the inner width and to which every
// tensor's data is aligned.
int vector_width(int64_t inner, std::initializer_list<const at::Tensor*> tensors) {
    for (int vec : {8, 4, 2, 1}) {
        bool ok = inner % vec == 0;
        for (const at::Tensor* t : tensors) {
            ok = ok && aligned(*t, vec * static_cast<int64_t>(t->element_size()));
        }
        if (ok) {
            return vec;
        }
    }
    return 1;
}

void check_input(const at::Tensor& proj) {
    TORCH_CHECK(proj.is_cuda() && proj.dim() >= 1, "GEGLU: a CUDA tensor is needed, got ", proj.sizes(), " on ",
                proj.device());
    TORCH_CHECK(proj.size(-1) % 2 == 0 && proj.size(-1) > 0, "GEGLU: the last dimension (", proj.size(-1),
                ") must be even");
    TORCH_CHECK(proj.size(-1) / 2 < (int64_t{1} << 31), "GEGLU: the inner width is too large");
}

at::Tensor forward_impl(const at::Tensor& input) {
    check_input(input);
    c10::DeviceGuard guard(input.device());
    const at::Tensor proj = input.contiguous();
    const int64_t inner64 = proj.size(-1) / 2;
    std::vector<int64_t> shape = proj.sizes().vec();
    shape.back() = inner64;
    at::Tensor out = at::empty(shape, proj.options());
    if (out.numel() == 0) {
        return out;
    }
    const int vec = vector_width(inner64, {&proj, &out});
    const Kernels& k = kernels(kGeglu, arch_of(proj), store_kind(proj.scalar_type(), kGeglu.label), vec);
    const void* proj_ptr = proj.data_ptr();
    void* out_ptr = out.data_ptr();
    long long vectors = static_cast<long long>(out.numel() / vec);
    int inner = static_cast<int>(inner64);
    launch(kGeglu, k, kForward, elementwise_grid(vectors, multiprocessors(proj)), dim3(256), 0,
           {&proj_ptr, &out_ptr, &vectors, &inner}, c10::cuda::getCurrentCUDAStream(proj.device().index()).stream());
    return out;
}

at::Tensor backward_impl(const at::Tensor& grad, const at::Tensor& proj) {
    c10::DeviceGuard guard(proj.device());
    const at::Tensor dout = grad.to(proj.scalar_type()).contiguous();
    at::Tensor dproj = at::empty_like(proj);
    if (dout.numel() == 0) {
        return dproj;
    }
    const int64_t inner64 = proj.size(-1) / 2;
    const int vec = vector_width(inner64, {&proj, &dout, &dproj});
    const Kernels& k = kernels(kGeglu, arch_of(proj), store_kind(proj.scalar_type(), kGeglu.label), vec);
    const void* dout_ptr = dout.data_ptr();
    const void* proj_ptr = proj.data_ptr();
    void* dproj_ptr = dproj.data_ptr();
    long long vectors = static_cast<long long>(dout.numel() / vec);
    int inner = static_cast<int>(inner64);
    launch(kGeglu, k, kBackward, elementwise_grid(vectors, multiprocessors(proj)), dim3(256), 0,
           {&dout_ptr, &proj_ptr, &dproj_ptr, &vectors, &inner},
           c10::cuda::getCurrentCUDAStream(proj.device().index()).stream());
    return dproj;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Geglu : public torch::autograd::Function<Geglu> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& proj) {
        at::Tensor out = forward_impl(proj);
        ctx->save_for_backward({proj.contiguous()});
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        if (!grads[0].defined()) {  // the output took no part in what is differentiated
            return {at::Tensor()};
        }
        const auto saved = ctx->get_saved_variables();
        return {backward_impl(grads[0], saved[0])};
    }
};

}  // namespace

extern "C" {

// GEGLU of a CUDA tensor whose last dimension holds [h, gate]: h * gelu(gate), recorded for autograd.
int torch_geglu(void* proj, void** out) {
    return torch_cuda_kernels::guarded([&] {
        at::Tensor y = Geglu::apply(*static_cast<const at::Tensor*>(proj));
        *out = new at::Tensor(std::move(y));
    });
}

// Compiles the kernels for sm_`arch`, a storage type (0 float, 1 bfloat16, 2 half) and a vector width
// with NVRTC, without loading them (no device needed).
int torch_geglu_compile(int arch, int kind, int vec) {
    return torch_cuda_kernels::guarded([&] {
        TORCH_CHECK(kind >= 0 && kind <= 2 && (vec == 1 || vec == 2 || vec == 4 || vec == 8),
                    "no such kernel variant: kind ", kind, ", vector width ", vec);
        torch_cuda_kernels::compile(kGeglu, arch, kind, vec);
    });
}

}  // extern "C"
