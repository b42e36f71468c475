//! Compiles the C++ shim over libtorch's CUDA facilities (see the crate documentation) when torch's
//! and CUDA's headers are present (the pinned PyTorch wheel plus `nvidia-cuda-crt`, see
//! scripts/bootstrap-libtorch.sh, or a libtorch with a CUDA toolkit of its CUDA version at
//! `CUDA_HOME`); otherwise the crate builds without it and its functions report that they are
//! unavailable.

use std::path::PathBuf;

fn main() {
    torch_link::configure();
    println!("cargo:rustc-check-cfg=cfg(torch_cuda_shim)");
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-changed=src/rng.cpp");
    println!("cargo:rerun-if-changed=src/dist.cpp");
    println!("cargo:rerun-if-changed=src/dist_nccl.cpp");
    println!("cargo:rerun-if-changed=src/group_norm.cpp");
    println!("cargo:rerun-if-changed=src/group_norm_nhwc.cu");
    println!("cargo:rerun-if-changed=src/nvrtc_kernels.cpp");
    println!("cargo:rerun-if-changed=src/nvrtc_kernels.h");
    println!("cargo:rerun-if-changed=src/geglu.cpp");
    println!("cargo:rerun-if-changed=src/geglu.cu");
    println!("cargo:rerun-if-changed=src/fp8.cpp");
    println!("cargo:rerun-if-changed=src/fp8_quantize.cu");
    println!("cargo:rerun-if-changed=src/sdp.cpp");
    println!("cargo:rerun-if-changed=src/store_types.cuh");
    println!("cargo:rustc-check-cfg=cfg(torch_dist_nccl)");
    println!("cargo:rerun-if-changed=src/gloo_decls");
    println!("cargo:rustc-check-cfg=cfg(torch_dist_shim)");
    println!("cargo:rustc-check-cfg=cfg(torch_rng_shim, torch_rng_shim_cuda)");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let Some(lib_dir) = torch_link::libtorch_lib_dir() else {
        return;
    };
    // The PyTorch wheel layout: torch/lib, torch/include, and nvidia/cu13/include beside torch/ (a
    // libtorch folder has lib/ and include/ too); else a CUDA toolkit's include/ at CUDA_HOME.
    let Some(torch_dir) = lib_dir.parent() else {
        return;
    };
    let torch_include = torch_dir.join("include");
    let cuda_include = [
        Some(torch_dir.join("../nvidia/cu13/include")),
        std::env::var_os("CUDA_HOME").map(|home| PathBuf::from(home).join("include")),
    ]
    .into_iter()
    .flatten()
    .find(|dir| dir.join("crt/host_defines.h").exists());
    let torch_has_cuda = torch_include
        .join("c10/cuda/CUDACachingAllocator.h")
        .exists()
        && lib_dir.join("libc10_cuda.so").exists();
    let cuda_include = cuda_include.filter(|_| torch_has_cuda);
    compile_rng_shim(&torch_include, cuda_include.as_deref());
    let nccl_include = torch_dir.join("../nvidia/nccl/include");
    let nccl_include = cuda_include
        .as_ref()
        .filter(|cuda| cuda.join("nv/target").exists() && nccl_include.join("nccl.h").exists())
        .map(|cuda| (cuda.clone(), nccl_include));
    compile_dist_shim(&torch_include, nccl_include);
    let Some(cuda_include) = cuda_include else {
        println!(
            "cargo:warning=torch-cuda: CUDA headers not found (nvidia/cu13/include beside torch/, or CUDA_HOME); CUDA graphs, the profiler and memory statistics will be unavailable"
        );
        return;
    };
    let kernel_header = embed_kernel_source();
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .include(&cuda_include)
        .include(&kernel_header)
        // No debug information for the C++ (Rust's backtraces keep theirs): it took 40 % of the
        // compile time (fp8.cpp at -O1: 25.9 s with -g, 15.0 s without).
        .debug(false)
        .file(unity_source(
            "torch_cuda_shim",
            &[
                "src/shim.cpp",
                "src/nvrtc_kernels.cpp",
                "src/group_norm.cpp",
                "src/geglu.cpp",
                "src/fp8.cpp",
                "src/sdp.cpp",
            ],
        ))
        .compile("torch_cuda_shim");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=torch_cuda_shim");
}

/// One translation unit that includes `files` (paths relative to this crate), written to OUT_DIR:
/// every source includes libtorch's headers, whose parsing is most of a file's compile time, so one
/// unit compiles in about a third of the time of separate ones (measured: 19.5 s against 71.5 s for
/// the six CUDA sources at -O1). The sources keep their helpers in anonymous namespaces under names
/// that do not collide. The build script runs again for `cargo clippy` and for a program outside the
/// workspace (`make library-user`), so CI pays this three times.
fn unity_source(name: &str, files: &[&str]) -> PathBuf {
    or_stop((|| -> Result<PathBuf, String> {
        let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
        let here = std::env::current_dir().map_err(|e| format!("the crate's folder: {e}"))?;
        let mut text = String::new();
        for file in files {
            text.push_str(&format!("#include \"{}\"\n", here.join(file).display()));
        }
        let path = out.join(format!("{name}_all.cpp"));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(path)
    })())
}

/// The value, or the build stopped with the reason as a warning (build scripts have no other way to
/// say why).
fn or_stop<T>(result: Result<T, String>) -> T {
    result.unwrap_or_else(|reason| {
        println!("cargo:warning=torch-cuda: {reason}");
        std::process::exit(1)
    })
}

/// Writes each CUDA source that the shim hands to NVRTC at run time into OUT_DIR as a C++ string:
/// `src/group_norm_nhwc.cu` as `kGroupNormSource` in `group_norm_nhwc_src.h` (for
/// `src/group_norm.cpp`), `src/geglu.cu` as `kGegluSource` in `geglu_src.h` (for `src/geglu.cpp`),
/// `src/fp8_quantize.cu` as `kFp8QuantizeSource` in `fp8_quantize_src.h` (for `src/fp8.cpp`), and
/// `src/store_types.cuh`, the header they all include, as `kStoreTypesSource` in `store_types_src.h`
/// (for `src/nvrtc_kernels.cpp`, which hands it to NVRTC).
/// Returns the folder; a checkout without a file (or an unwritable OUT_DIR) stops the build with the
/// reason.
fn embed_kernel_source() -> PathBuf {
    const SOURCES: [(&str, &str, &str); 4] = [
        (
            "src/store_types.cuh",
            "store_types_src.h",
            "kStoreTypesSource",
        ),
        (
            "src/group_norm_nhwc.cu",
            "group_norm_nhwc_src.h",
            "kGroupNormSource",
        ),
        ("src/geglu.cu", "geglu_src.h", "kGegluSource"),
        (
            "src/fp8_quantize.cu",
            "fp8_quantize_src.h",
            "kFp8QuantizeSource",
        ),
    ];
    or_stop((|| -> Result<PathBuf, String> {
        let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
        for (file, header, name) in SOURCES {
            let source =
                std::fs::read_to_string(file).map_err(|e| format!("reading {file}: {e}"))?;
            if source.contains(")CUDA\"") {
                return Err(format!("{file} contains the raw-string delimiter )CUDA\""));
            }
            std::fs::write(
                out.join(header),
                format!("static const char* const {name} = R\"CUDA({source})CUDA\";\n"),
            )
            .map_err(|e| format!("writing {header}: {e}"))?;
        }
        Ok(out)
    })())
}

fn compile_rng_shim(torch_include: &std::path::Path, cuda_include: Option<&std::path::Path>) {
    if !torch_include.join("ATen/CPUGeneratorImpl.h").exists() {
        println!(
            "cargo:warning=torch-cuda: torch's headers not found; random-state snapshots (gradient checkpointing with dropout) will be unavailable"
        );
        return;
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(torch_include)
        .debug(false)
        .file("src/rng.cpp");
    if let Some(cuda_include) = cuda_include {
        build.include(cuda_include).define("RNG_SHIM_CUDA", "1");
        println!("cargo:rustc-cfg=torch_rng_shim_cuda");
    }
    build.compile("torch_rng_shim");
    println!("cargo:rustc-cfg=torch_rng_shim");
}

/// The c10d process group (`src/dist.cpp`: TCPStore and Gloo, both in libtorch_cpu) needs only
/// torch's headers, plus the declarations in `src/gloo_decls` for the Gloo names they mention. Its
/// NCCL backend (`src/dist_nccl.cpp`, ProcessGroupNCCL in libtorch_cuda) needs CUDA's and NCCL's
/// headers too (`nccl_include`: CUDA's include folder, with CCCL's `nv/target` that `nccl.h`'s
/// `cuda_fp16.h` includes, from the nvidia-cuda-cccl wheel; and the nvidia-nccl wheel's).
fn compile_dist_shim(torch_include: &std::path::Path, nccl_include: Option<(PathBuf, PathBuf)>) {
    let c10d = torch_include.join("torch/csrc/distributed/c10d");
    if !c10d.join("ProcessGroupGloo.hpp").exists() || !c10d.join("TCPStore.hpp").exists() {
        println!(
            "cargo:warning=torch-cuda: torch's c10d headers not found; process groups (torch_cuda::dist) will be unavailable"
        );
        return;
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", "1")
        .include(torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .include("src/gloo_decls")
        .debug(false);
    let mut files = vec!["src/dist.cpp"];
    if let Some((cuda_include, nccl_include)) = nccl_include {
        build
            .include(cuda_include)
            .include(nccl_include)
            .define("DIST_NCCL", "1");
        files.push("src/dist_nccl.cpp");
        println!("cargo:rustc-cfg=torch_dist_nccl");
    } else {
        println!(
            "cargo:warning=torch-cuda: CUDA's or NCCL's headers not found; process groups will have no NCCL backend (CPU tensors only)"
        );
    }
    build.file(unity_source("torch_dist_shim", &files));
    build.compile("torch_dist_shim");
    println!("cargo:rustc-cfg=torch_dist_shim");
}
