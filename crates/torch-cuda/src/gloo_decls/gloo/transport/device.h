// Declarations only, for compiling torch/csrc/distributed/c10d/ProcessGroupGloo.hpp: the PyTorch
// wheel ships c10d's headers but not Gloo's (third_party/gloo), and that header names Gloo's types
// only through pointers (std::shared_ptr / std::unique_ptr members, which do not depend on the
// pointee), except gloo::rendezvous::Store, the base of ProcessGroupGloo::GlooStore, which the shim
// never instantiates. Nothing here is defined or called: the code is Gloo's, inside libtorch_cpu.so.
// See src/dist.cpp.
#pragma once

namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
}  // namespace gloo
