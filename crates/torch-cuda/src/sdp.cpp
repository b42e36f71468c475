// The priority order of libtorch's scaled-dot-product-attention backends (at::globalContext(), what
// torch.nn.attention.sdpa_kernel(..., set_priority=True) sets from Python), for
// crates/torch-cuda/src/sdp.rs. Every entry point catches C++ exceptions and reports failure by its
// return value, leaving the message for torch_kernels_last_error().
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/SDPBackend.h>
#include <c10/core/GradMode.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "nvrtc_kernels.h"

extern "C" {

// libtorch settles its default order once, at its first attention on CUDA (sdp_utils.cpp's
// priority_order(): cuDNN first on compute capability 9.x/10.x with a cuDNN newer than 9.15.0, unless
// TORCH_CUDNN_SDPA_DEPRIORITIZED is set), overwriting whatever order was set before. One tiny
// attention on the current CUDA device makes that happen now (once per process), so that an order
// read or set afterwards is the one libtorch keeps. Nothing happens without CUDA.
int torch_sdp_settle_default() {
    return torch_cuda_kernels::guarded([&] {
        static std::once_flag once;
        std::call_once(once, [] {
            if (!at::hasCUDA()) {
                return;
            }
            c10::NoGradGuard no_grad;
            const auto q = at::zeros({1, 1, 8, 64}, at::TensorOptions().dtype(at::kHalf).device(at::kCUDA));
            at::scaled_dot_product_attention(q, q, q);
        });
    });
}

// Writes the at::num_sdp_backends backends in the order libtorch tries them (at::SDPBackend values).
int torch_sdp_priority(int64_t* out) {
    return torch_cuda_kernels::guarded([&] {
        const auto order = at::globalContext().sDPPriorityOrder();
        for (int i = 0; i < at::num_sdp_backends; ++i) {
            out[i] = static_cast<int64_t>(order[i]);
        }
    });
}

// Sets the order: `n` at::SDPBackend values, each backend once (libtorch checks it).
int torch_sdp_set_priority(const int64_t* order, int n) {
    return torch_cuda_kernels::guarded([&] {
        at::globalContext().setSDPPriorityOrder(std::vector<int64_t>(order, order + n));
    });
}

}  // extern "C"
