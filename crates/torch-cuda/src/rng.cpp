// Snapshots of a device's default random generator, for recomputation that must draw what the
// first run drew (gradient checkpointing with dropout), as torch.utils.checkpoint's
// preserve_rng_state does. Built whenever torch's headers are present; the CUDA part only when
// CUDA's headers are too (RNG_SHIM_CUDA). Every function catches C++ exceptions and reports failure
// by its return value, leaving the message for torch_rng_last_error().
//
// CPU: at::Generator::get_state / set_state (the Mersenne-Twister state as a byte tensor).
// CUDA: the Philox offset of the default generator's CUDAGeneratorState. Outside a graph capture that
// is `philox_offset_per_thread_` (with the seed), exactly what get_state / set_state copy; during a
// capture kernels take their offset from `offset_intragraph_` (added at replay to the offset the
// replay starts from, see Note [CUDA Graph-safe RNG states] in ATen/cuda/CUDAGeneratorImpl.h), which
// no public accessor reads or writes while capturing. CUDAGeneratorState is a public struct, but the
// generator keeps its pointer in a private member; it is reached here through the standard rule
// that explicit template instantiations are exempt from access checks. The member's name and type
// are those of the pinned PyTorch: a release that changes them fails to compile this file rather
// than misbehave.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_dropout.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>

#ifdef RNG_SHIM_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

namespace {

thread_local std::string last_error;

template <typename F>
int guarded(F&& body) {
    try {
        body();
        return 0;
    } catch (const std::exception& e) {
        last_error = e.what();
    } catch (...) {
        last_error = "unknown C++ exception";
    }
    return -1;
}

#ifdef RNG_SHIM_CUDA
// Access to CUDAGeneratorImpl::state_ (see the header comment).
struct StateMember {
    using type = c10::intrusive_ptr<at::CUDAGeneratorState> at::CUDAGeneratorImpl::*;
    friend type member(StateMember);
};
template <typename Tag, typename Tag::type Member>
struct Expose {
    friend typename Tag::type member(Tag) { return Member; }
};
template struct Expose<StateMember, &at::CUDAGeneratorImpl::state_>;

at::CUDAGeneratorState& cuda_state(const at::Generator& generator) {
    auto* impl = at::check_generator<at::CUDAGeneratorImpl>(generator);
    return *(impl->*member(StateMember{}));
}
#endif

// What a snapshot holds: the generator it was taken of, and its state then (a CPU generator's state
// tensor, or a CUDA generator's seed and offset).
struct Snapshot {
    at::Generator generator;
    at::Tensor cpu_state;
    uint64_t seed = 0;
    uint64_t offset = 0;
    bool capturing = false;
};

at::Generator default_generator(int cuda_device) {
#ifdef RNG_SHIM_CUDA
    if (cuda_device >= 0) {
        return at::cuda::detail::getDefaultCUDAGenerator(static_cast<c10::DeviceIndex>(cuda_device));
    }
#endif
    if (cuda_device >= 0) {
        throw std::runtime_error("this build has no CUDA random-state support (no CUDA headers at build time)");
    }
    return at::detail::getDefaultCPUGenerator();
}

void take(Snapshot& snap) {
    at::Generator& generator = snap.generator;
    std::lock_guard<std::mutex> lock(generator.mutex());
    if (generator.device().is_cpu()) {
        snap.cpu_state = generator.get_state();
        return;
    }
#ifdef RNG_SHIM_CUDA
    auto& state = cuda_state(generator);
    // `capturing_` is set by the capture of every graph the state is registered with (the default
    // generator's always is) and cleared at its end: no CUDA runtime call needed.
    snap.capturing = state.capturing_;
    snap.seed = state.seed_;
    snap.offset = snap.capturing ? state.offset_intragraph_ : state.philox_offset_per_thread_;
#endif
}

void put(const Snapshot& snap) {
    at::Generator generator = snap.generator;
    std::lock_guard<std::mutex> lock(generator.mutex());
    if (generator.device().is_cpu()) {
        generator.set_state(snap.cpu_state);
        return;
    }
#ifdef RNG_SHIM_CUDA
    auto& state = cuda_state(generator);
    bool capturing = state.capturing_;
    if (capturing != snap.capturing) {
        throw std::runtime_error(
            "a random state saved outside a CUDA graph capture cannot be restored inside one, nor the reverse");
    }
    if (capturing) {
        // The seed cannot change during a capture (set_current_seed refuses).
        state.offset_intragraph_ = snap.offset;
    } else {
        state.seed_ = snap.seed;
        state.philox_offset_per_thread_ = snap.offset;
    }
#endif
}

Snapshot* snapshot_of(const at::Generator& generator) {
    auto* snap = new Snapshot{generator};
    try {
        take(*snap);
    } catch (...) {
        delete snap;
        throw;
    }
    return snap;
}

at::Generator& generator_at(void* generator) { return *static_cast<at::Generator*>(generator); }

at::IntArrayRef dims(const int64_t* shape, int64_t ndim) {
    return at::IntArrayRef(shape, static_cast<size_t>(ndim));
}

const at::Tensor& tensor_at(const void* tensor) { return *static_cast<const at::Tensor*>(tensor); }

}  // namespace

extern "C" {

const char* torch_rng_last_error() { return last_error.c_str(); }

// Whether CUDA generators are supported by this build.
int torch_rng_has_cuda() {
#ifdef RNG_SHIM_CUDA
    return 1;
#else
    return 0;
#endif
}

// A snapshot of the default generator of `cuda_device` (-1: the CPU's) in *out; free it with
// torch_rng_free.
int torch_rng_save(int cuda_device, void** out) {
    return guarded([&] { *out = snapshot_of(default_generator(cuda_device)); });
}

// Makes the generator the snapshot was taken of draw from where it stood then.
int torch_rng_restore(void* snapshot) {
    return guarded([&] { put(*static_cast<Snapshot*>(snapshot)); });
}

void torch_rng_free(void* snapshot) { delete static_cast<Snapshot*>(snapshot); }

// A new snapshot, in *out, of the generator `snapshot` was taken of, as it stands now.
int torch_rng_save_again(void* snapshot, void** out) {
    return guarded([&] { *out = snapshot_of(static_cast<Snapshot*>(snapshot)->generator); });
}

void torch_rng_generator_free(void* generator) { delete static_cast<at::Generator*>(generator); }

// torch.rand(n, generator=g): n float32 uniform numbers in [0, 1), written to out.
int torch_rng_generator_rand(void* generator, int64_t n, float* out) {
    return guarded([&] {
        auto& g = *static_cast<at::Generator*>(generator);
        at::Tensor drawn = at::rand({n}, g, at::TensorOptions().dtype(at::kFloat));
        std::memcpy(out, drawn.const_data_ptr<float>(), static_cast<size_t>(n) * sizeof(float));
    });
}

// torch.randn(shape, generator=g) in float32 with libtorch's own kernel, written to out (the product
// of the shape's ndim sizes).
int torch_rng_generator_randn(void* generator, const int64_t* shape, int64_t ndim, float* out) {
    return guarded([&] {
        auto& g = *static_cast<at::Generator*>(generator);
        at::Tensor drawn = at::randn(at::IntArrayRef(shape, static_cast<size_t>(ndim)), g,
                                     at::TensorOptions().dtype(at::kFloat));
        std::memcpy(out, drawn.const_data_ptr<float>(), static_cast<size_t>(drawn.numel()) * sizeof(float));
    });
}

// A generator of its own on `cuda_device` (-1: the CPU), seeded: torch.Generator(device).manual_seed(seed).
// Free with torch_rng_generator_free.
int torch_rng_generator_new_on(int cuda_device, uint64_t seed, void** out) {
    return guarded([&] {
        if (cuda_device < 0) {
            *out = new at::Generator(at::make_generator<at::CPUGeneratorImpl>(seed));
            return;
        }
#ifdef RNG_SHIM_CUDA
        auto generator = at::make_generator<at::CUDAGeneratorImpl>(static_cast<c10::DeviceIndex>(cuda_device));
        {
            std::lock_guard<std::mutex> lock(generator.mutex());
            generator.set_current_seed(seed);
        }
        *out = new at::Generator(generator);
#else
        throw std::runtime_error("this build has no CUDA generators (no CUDA headers at build time)");
#endif
    });
}

// generator.manual_seed(seed): the stream starts again from `seed` (on CUDA: offset 0).
int torch_rng_generator_seed(void* generator, uint64_t seed) {
    return guarded([&] {
        auto& g = generator_at(generator);
        std::lock_guard<std::mutex> lock(g.mutex());
        g.set_current_seed(seed);
    });
}

// The device of the generator: -1 for the CPU, else the CUDA device index.
int torch_rng_generator_device(void* generator) {
    const auto device = generator_at(generator).device();
    return device.is_cpu() ? -1 : static_cast<int>(device.index());
}

// torch.randn(shape, generator=g, dtype=like.dtype, device=g.device) as a new tensor in *out.
int torch_rng_generator_randn_like(void* generator, const int64_t* shape, int64_t ndim, const void* like,
                                   void** out) {
    return guarded([&] {
        auto& g = generator_at(generator);
        auto options = tensor_at(like).options().device(g.device());
        *out = new at::Tensor(at::randn(dims(shape, ndim), g, options));
    });
}

// torch.randint(high, shape, generator=g, dtype=int64, device=g.device) as a new tensor in *out.
int torch_rng_generator_randint(void* generator, int64_t high, const int64_t* shape, int64_t ndim, void** out) {
    return guarded([&] {
        auto& g = generator_at(generator);
        auto options = at::TensorOptions().dtype(at::kLong).device(g.device());
        *out = new at::Tensor(at::randint(high, dims(shape, ndim), g, options));
    });
}

// torch.zeros(shape, dtype=like.dtype, device=g.device).uniform_(lo, hi, generator=g) in *out (how
// tch initialises a variable with Init::Uniform, from this generator).
int torch_rng_generator_uniform_like(void* generator, const int64_t* shape, int64_t ndim, double lo, double hi,
                                     const void* like, void** out) {
    return guarded([&] {
        auto& g = generator_at(generator);
        auto options = tensor_at(like).options().device(g.device());
        at::Tensor drawn = at::zeros(dims(shape, ndim), options);
        drawn.uniform_(lo, hi, g);
        *out = new at::Tensor(drawn);
    });
}

// torch.nn.functional.dropout(input, p, training=True) with its masks from this generator, with
// autograd: libtorch's own two routes, as at::dropout takes them — on CUDA the fused kernel
// (native_dropout's, through _fused_dropout, which takes a generator; it keeps with probability
// 1 - p), elsewhere a Bernoulli(1 - p) mask scaled by 1 / (1 - p) and multiplied in.
int torch_rng_generator_dropout(void* generator, const void* input, double p, void** out) {
    return guarded([&] {
        auto& g = generator_at(generator);
        const at::Tensor& x = tensor_at(input);
        if (x.device() != g.device()) {
            throw std::runtime_error("dropout: the input is on another device than the generator");
        }
        if (!(p > 0.0 && p < 1.0)) {
            throw std::runtime_error("dropout: p must be in (0, 1)");
        }
        if (x.is_cuda() && x.numel() > 0) {
            *out = new at::Tensor(std::get<0>(at::_fused_dropout(x, 1.0 - p, g)));
            return;
        }
        at::Tensor noise = at::empty_like(x);
        noise.bernoulli_(1.0 - p, g);
        noise.div_(1.0 - p);
        *out = new at::Tensor(x.mul(noise));
    });
}

// A snapshot of this generator's state in *out (as torch_rng_save for the default ones).
int torch_rng_generator_save(void* generator, void** out) {
    return guarded([&] { *out = snapshot_of(generator_at(generator)); });
}

}  // extern "C"
