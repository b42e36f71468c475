// The priority order of libtorch's scaled-dot-product-attention backends (at::globalContext(), what
// torch.nn.attention.sdpa_kernel(..., set_priority=True) sets from Python), for
// crates/torch-cuda/src/sdp.rs. Every entry point catches C++ exceptions and reports failure by its
// return value, leaving the message for torch_kernels_last_error().
#include <ATen/Context.h>
#include <ATen/SDPBackend.h>

#include <cstdint>
#include <vector>

#include "nvrtc_kernels.h"

extern "C" {

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
