//! Links libtorch as the main workspace does (see the `torch-link` crate).

fn main() {
    torch_link::configure();
}
