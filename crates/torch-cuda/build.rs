//! Compiles the C++ shim over libtorch's CUDA caching allocator when torch's and CUDA's headers are
//! present (the pinned PyTorch wheel plus `nvidia-cuda-crt`, see scripts/bootstrap-libtorch.sh);
//! otherwise the crate builds without it and its functions report that statistics are unavailable.

use std::path::Path;

fn main() {
    torch_link::configure();
    println!("cargo:rustc-check-cfg=cfg(torch_cuda_shim)");
    println!("cargo:rerun-if-changed=src/shim.cpp");
    let Some(lib_dir) = torch_link::libtorch_lib_dir() else {
        return;
    };
    // The PyTorch wheel layout: torch/lib, torch/include, and nvidia/cu13/include beside torch/.
    let Some(torch_dir) = lib_dir.parent() else {
        return;
    };
    let torch_include = torch_dir.join("include");
    let cuda_include = torch_dir.join("../nvidia/cu13/include");
    let present = |p: &Path| p.exists();
    if !(present(&torch_include.join("c10/cuda/CUDACachingAllocator.h"))
        && present(&cuda_include.join("crt/host_defines.h"))
        && present(&lib_dir.join("libc10_cuda.so")))
    {
        println!(
            "cargo:warning=torch-cuda: CUDA headers not found; memory statistics will be unavailable"
        );
        return;
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&torch_include)
        .include(&cuda_include)
        .file("src/shim.cpp")
        .compile("torch_cuda_shim");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=torch_cuda_shim");
}
