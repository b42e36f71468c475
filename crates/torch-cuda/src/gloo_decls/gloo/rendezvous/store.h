// Declarations only, for compiling torch/csrc/distributed/c10d/ProcessGroupGloo.hpp: the PyTorch
// wheel ships c10d's headers but not Gloo's (third_party/gloo), and that header names Gloo's types
// only through pointers (std::shared_ptr / std::unique_ptr members, which do not depend on the
// pointee), except gloo::rendezvous::Store, the base of ProcessGroupGloo::GlooStore, which the shim
// never instantiates. Nothing here is defined or called: the code is Gloo's, inside libtorch_cpu.so.
// See src/dist.cpp.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {
namespace rendezvous {
// The virtual functions ProcessGroupGloo::GlooStore overrides (gloo/rendezvous/store.h upstream,
// without GLOO_STORE_HAS_STORE_V2).
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous
}  // namespace gloo
