//! Links libtorch's CUDA backend and records its library folder, as every binary on `tch` should
//! (see the `torch-link` crate).

fn main() {
    torch_link::configure();
}
