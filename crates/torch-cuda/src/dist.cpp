// c10d process groups for Rust (src/dist.rs): rendezvous through c10d::TCPStore (hosted by rank 0),
// collectives on CPU tensors through c10d::ProcessGroupGloo, both in libtorch_cpu.so. Built whenever
// torch's headers are present. Every function catches C++ exceptions and reports failure by its
// return value, leaving the message for torch_dist_last_error().
//
// The wheel has no Gloo headers; src/gloo_decls/ declares the few Gloo names ProcessGroupGloo.hpp
// mentions (see there). The object layout of ProcessGroupGloo does not depend on them (its Gloo
// members are smart pointers), so make_intrusive below allocates the size libtorch's constructor
// expects.
//
// When a collective fails (a peer died: Gloo reports the closed connection; or hung: the wait times
// out), each surviving rank sets the key `<prefix>/failed/<op>/<rank>` in the store and, for a short
// grace period, looks for the others' keys: the ranks whose key is missing are those that did not
// answer, and the error names them. If the store itself is unreachable, rank 0 (its host) is named.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifdef DIST_NCCL
// src/dist_nccl.cpp.
c10d::Backend* torch_dist_nccl_new(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                   int64_t timeout_ms, int device);
#endif

namespace {

thread_local std::string last_error;

// TORCH_CUDA_DIST_NATIVE_BACKTRACE=1: a crash (SIGSEGV, SIGBUS, SIGABRT) inside libtorch's c10d
// or NCCL prints the native stack to stderr before the process dies (what Python's faulthandler
// gives torch.distributed users), then lets the signal take its default course.
void print_native_stack(int signal) {
    const char header[] = "torch-cuda dist: fatal signal; native stack:\n";
    (void)!write(2, header, sizeof(header) - 1);
    void* frames[64];
    int depth = backtrace(frames, 64);
    backtrace_symbols_fd(frames, depth, 2);
    ::signal(signal, SIG_DFL);
    raise(signal);
}

void install_crash_stack() {
    const char* flag = std::getenv("TORCH_CUDA_DIST_NATIVE_BACKTRACE");
    if (flag != nullptr && flag[0] == '1') {
        for (int signal : {SIGSEGV, SIGBUS, SIGABRT}) {
            ::signal(signal, print_native_stack);
        }
    }
}

// An exception's message, without the C++ backtrace c10::Error appends.
std::string message(const std::exception& e) {
    if (auto* error = dynamic_cast<const c10::Error*>(&e)) {
        return error->what_without_backtrace();
    }
    return e.what();
}

template <typename F>
int guarded(F&& body) {
    try {
        body();
        return 0;
    } catch (const std::exception& e) {
        last_error = message(e);
    } catch (...) {
        last_error = "unknown C++ exception";
    }
    return -1;
}

struct Group {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::Backend> gloo;
    c10::intrusive_ptr<c10d::Backend> nccl;  // CUDA tensors; null without a CUDA device
    int rank;
    int size;
    std::chrono::milliseconds timeout;
    std::string master;
    uint64_t op = 0;
};

// The ranks that did not mark op `op` as failed within `grace` (see the header comment).
std::string silent_ranks(Group& group, uint64_t op, std::chrono::milliseconds grace) {
    std::string prefix = "torch-cuda-dist/failed/" + std::to_string(op) + "/";
    try {
        group.store->setTimeout(grace);
        group.store->set(prefix + std::to_string(group.rank), std::vector<uint8_t>{1});
        auto deadline = std::chrono::steady_clock::now() + grace;
        std::vector<int> missing;
        do {
            missing.clear();
            for (int r = 0; r < group.size; ++r) {
                if (r != group.rank && !group.store->check({prefix + std::to_string(r)})) {
                    missing.push_back(r);
                }
            }
            if (missing.empty()) {
                break;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        } while (std::chrono::steady_clock::now() < deadline);
        group.store->setTimeout(group.timeout);
        if (missing.empty()) {
            return "every other rank reported the failure too";
        }
        std::ostringstream out;
        out << "rank" << (missing.size() > 1 ? "s " : " ");
        for (size_t i = 0; i < missing.size(); ++i) {
            out << (i ? ", " : "") << missing[i];
        }
        out << " did not answer";
        return out.str();
    } catch (const std::exception& e) {
        return "rank 0 (the store's host, " + group.master + ") did not answer: " + message(e);
    }
}

// Runs one collective and waits for it with the group's timeout; on failure, names the ranks.
int collective(Group* group, const char* what,
               const std::function<c10::intrusive_ptr<c10d::Work>()>& issue) {
    uint64_t op = group->op++;
    try {
        auto work = issue();
        // ProcessGroupNCCL returns no Work for a collective issued with asyncOp = false: its kernel
        // is already queued on the caller's stream (what a CUDA graph capture records), so there is
        // nothing to wait for here; its timeout is the watchdog's.
        if (work && !work->wait(group->timeout)) {
            throw std::runtime_error("timed out");
        }
        return 0;
    } catch (const std::exception& e) {
        std::string cause = message(e);
        auto who = silent_ranks(*group, op, std::chrono::milliseconds(2000));
        last_error = std::string(what) + " on rank " + std::to_string(group->rank) + " of " +
                     std::to_string(group->size) + " failed (timeout " +
                     std::to_string(group->timeout.count()) + " ms): " + who + "; c10d: " + cause;
    } catch (...) {
        last_error = std::string(what) + ": unknown C++ exception";
    }
    return -1;
}

}  // namespace

extern "C" {

const char* torch_dist_last_error() { return last_error.c_str(); }

// cuda_device: this rank's CUDA device for the NCCL backend, or -1 for none.
int torch_dist_new(const char* master_addr, int port, int rank, int size, int64_t timeout_ms,
                   int cuda_device, void** out) {
    return guarded([&] {
        install_crash_stack();
        auto timeout = std::chrono::milliseconds(timeout_ms);
        c10d::TCPStoreOptions store_options;
        store_options.port = static_cast<std::uint16_t>(port);
        store_options.isServer = rank == 0;
        store_options.numWorkers = static_cast<std::size_t>(size);
        store_options.waitWorkers = true;
        store_options.timeout = timeout;
        auto group = std::make_unique<Group>();
        group->rank = rank;
        group->size = size;
        group->timeout = timeout;
        group->master = std::string(master_addr) + ":" + std::to_string(port);
        try {
            group->store = c10::make_intrusive<c10d::TCPStore>(master_addr, store_options);
        } catch (const std::exception& e) {
            throw std::runtime_error(
                "rendezvous at " + group->master + " (rank " + std::to_string(rank) + " of " +
                std::to_string(size) + ", timeout " + std::to_string(timeout_ms) + " ms): " +
                (rank == 0 ? "not every rank connected to this rank's store: "
                           : "rank 0's store did not answer: ") +
                message(e));
        }
        // Each backend keeps its keys under its own prefix, as init_process_group does.
        auto options = c10d::ProcessGroupGloo::Options::create_default(timeout);
        group->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
            c10::make_intrusive<c10d::PrefixStore>("gloo/", group->store), rank, size, options);
        if (cuda_device >= 0) {
#ifdef DIST_NCCL
            group->nccl = c10::intrusive_ptr<c10d::Backend>::reclaim(torch_dist_nccl_new(
                c10::make_intrusive<c10d::PrefixStore>("nccl/", group->store), rank, size,
                timeout_ms, cuda_device));
#else
            throw std::runtime_error(
                "this build has no NCCL backend (CUDA's or NCCL's headers were not found at build "
                "time)");
#endif
        }
        *out = group.release();
    });
}

void torch_dist_free(void* group) { delete static_cast<Group*>(group); }

namespace {
// The backend for `tensor`: NCCL for a CUDA tensor (run on the current stream: asyncOp false), Gloo
// for a CPU one.
c10d::Backend& backend_for(Group& group, const at::Tensor& tensor, bool& async_op) {
    async_op = true;
    if (!tensor.is_cuda()) {
        return *group.gloo;
    }
    if (!group.nccl) {
        throw std::runtime_error("a CUDA tensor, but this process group has no NCCL backend");
    }
    async_op = false;
    return *group.nccl;
}
}  // namespace

// op: 0 sum, 1 min, 2 max.
int torch_dist_all_reduce(void* handle, void* tensor, int op) {
    auto* group = static_cast<Group*>(handle);
    return collective(group, "all_reduce", [&] {
        std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
        c10d::AllreduceOptions options;
        auto& backend = backend_for(*group, tensors[0], options.asyncOp);
        options.reduceOp = op == 1   ? c10d::ReduceOp::MIN
                           : op == 2 ? c10d::ReduceOp::MAX
                                     : c10d::ReduceOp::SUM;
        options.timeout = group->timeout;
        return backend.allreduce(tensors, options);
    });
}

int torch_dist_broadcast(void* handle, void* tensor, int root) {
    auto* group = static_cast<Group*>(handle);
    return collective(group, "broadcast", [&] {
        std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
        c10d::BroadcastOptions options;
        auto& backend = backend_for(*group, tensors[0], options.asyncOp);
        options.rootRank = root;
        options.timeout = group->timeout;
        return backend.broadcast(tensors, options);
    });
}

// Gathers every rank's `tensor` (equal shapes) and returns, in *out (a new at::Tensor owned by the
// caller), their concatenation along dimension 0 in rank order.
int torch_dist_all_gather(void* handle, void* tensor, void** out) {
    auto* group = static_cast<Group*>(handle);
    at::Tensor gathered;
    std::vector<std::vector<at::Tensor>> outputs(1);
    int status = collective(group, "all_gather", [&] {
        std::vector<at::Tensor> inputs{static_cast<at::Tensor*>(tensor)->contiguous()};
        for (int r = 0; r < group->size; ++r) {
            outputs[0].push_back(at::empty_like(inputs[0]));
        }
        c10d::AllgatherOptions options;
        auto& backend = backend_for(*group, inputs[0], options.asyncOp);
        options.timeout = group->timeout;
        return backend.allgather(outputs, inputs, options);
    });
    if (status != 0) {
        return status;
    }
    return guarded([&] {
        std::vector<at::Tensor> parts = outputs[0];
        for (auto& part : parts) {
            if (part.dim() == 0) {
                part = part.reshape({1});
            }
        }
        *out = new at::Tensor(at::cat(parts, 0));
    });
}

int torch_dist_barrier(void* handle) {
    auto* group = static_cast<Group*>(handle);
    return collective(group, "barrier", [&] {
        c10d::BarrierOptions options;
        options.timeout = group->timeout;
        return group->gloo->barrier(options);
    });
}

}  // extern "C"
