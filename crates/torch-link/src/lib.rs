//! Build-script helper shared by every package of the workspace that links libtorch.
//!
//! tch's `torch-sys` links `libtorch_cuda.so`, but Rust passes `--as-needed` to the linker, and since
//! no symbol of that library is referenced directly the linker drops it: a binary built that way
//! reports `tch::Cuda::is_available() == false` on a GPU machine. Calling [`configure`] from a
//! package's `build.rs` makes that package's tests, examples, benches and binaries
//!
//! * link `torch_cuda` and `c10_cuda` inside `--no-as-needed`, so the CUDA backend is always
//!   loaded where libtorch has one, and
//! * carry libtorch's library folder as their run-time search path (`RUNPATH`), so they start
//!   without `LD_LIBRARY_PATH`.
//!
//! Linker arguments do not travel to other packages (the `as-needed` link modifier that would make
//! them is unstable), so a crate that builds its own binaries on top of this workspace adds
//! `torch-link` as a build-dependency and calls [`configure`] too. The folder is also given to the
//! package's code as the compile-time variable `TORCH_LINK_LIB_DIR`.
//!
//! libtorch is found the way `torch-sys` finds it: with `LIBTORCH_USE_PYTORCH` set, the `torch`
//! package of the active Python (whatever `LIBTORCH` says); else `LIBTORCH_LIB` or `LIBTORCH` (its
//! `lib/` folder); else `/usr/lib`.
//! `LD_LIBRARY_PATH` still takes precedence over the recorded path, which is how a binary built
//! here runs against another machine's torch (see `docs/GPU.md`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Libraries of a CUDA build of libtorch that must stay linked even though no symbol of theirs is
/// referenced directly (they register the CUDA backend when loaded).
const CUDA_LIBRARIES: [&str; 2] = ["torch_cuda", "c10_cuda"];

/// Emits the `cargo:` instructions described in the crate documentation (the linker arguments on
/// Linux only).
///
/// Prints a `cargo:warning` and emits nothing when libtorch cannot be located; `torch-sys` then
/// reports the missing installation with its own message.
pub fn configure() {
    for var in [
        "LIBTORCH",
        "LIBTORCH_LIB",
        "LIBTORCH_USE_PYTORCH",
        "VIRTUAL_ENV",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Some(lib_dir) = libtorch_lib_dir() else {
        println!(
            "cargo:warning=torch-link: libtorch not found; set LIBTORCH_USE_PYTORCH=1 (see README)"
        );
        return;
    };
    println!("cargo:rustc-env=TORCH_LINK_LIB_DIR={}", lib_dir.display());
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
    let cuda: Vec<&str> = CUDA_LIBRARIES
        .into_iter()
        .filter(|lib| has_shared_library(&lib_dir, lib))
        .collect();
    if !cuda.is_empty() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        for lib in cuda {
            println!("cargo:rustc-link-arg=-l{lib}");
        }
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
}

/// The folder holding `libtorch*.so`, located as `torch-sys` does, if any.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    if env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = if env::var_os("VIRTUAL_ENV").is_some() {
            "python"
        } else {
            "python3"
        };
        let output = Command::new(python)
            .args([
                "-c",
                "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
            ])
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let dir = String::from_utf8(output.stdout).ok()?;
        return Some(PathBuf::from(dir.trim()));
    }
    if let Ok(lib) = env::var("LIBTORCH_LIB") {
        return Some(PathBuf::from(lib).join("lib"));
    }
    if let Ok(root) = env::var("LIBTORCH") {
        return Some(PathBuf::from(root).join("lib"));
    }
    let system = Path::new("/usr/lib");
    system
        .join("libtorch.so")
        .exists()
        .then(|| system.to_path_buf())
}

fn has_shared_library(dir: &Path, name: &str) -> bool {
    dir.join(format!("lib{name}.so")).exists()
}
