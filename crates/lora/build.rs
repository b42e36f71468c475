//! Links libtorch's CUDA backend and records its library folder (see the `torch-link` crate).

fn main() {
    torch_link::configure();
}
