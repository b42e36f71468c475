//! tch computes what PyTorch computes: single operations checked against outputs that the pinned
//! PyTorch wrote (`tools/fixtures/generate.py`, generator `ops`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::collections::BTreeMap;

use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};

fn fixture() -> BTreeMap<String, Tensor> {
    let path = common::fixture("torch_ops.safetensors");
    TensorFile::open(&path)
        .and_then(|f| f.load_all(Device::Cpu, None))
        .unwrap()
}

fn check(name: &str, actual: &Tensor, t: &BTreeMap<String, Tensor>, tol: f64) {
    let err = common::max_rel_error(actual, &t[name]);
    assert!(err <= tol, "{name}: max relative error {err:e} > {tol:e}");
}

#[test]
fn convolution_norm_and_activations_match_pytorch() {
    let t = fixture();
    let conv = t["x"].conv2d(&t["conv_w"], Some(&t["conv_b"]), [1, 1], [1, 1], [1, 1], 1);
    check("conv2d", &conv, &t, 1e-6);
    check(
        "group_norm",
        &conv.group_norm(4, Some(&t["gn_w"]), Some(&t["gn_b"]), 1e-5, false),
        &t,
        1e-6,
    );
    check("silu", &conv.silu(), &t, 1e-6);
    check("gelu_erf", &conv.gelu("none"), &t, 1e-6);
    check("gelu_tanh", &conv.gelu("tanh"), &t, 1e-6);
    check("softmax", &conv.softmax(-1, Kind::Float), &t, 1e-6);
    check(
        "upsample_nearest2x",
        &conv.upsample_nearest2d([12, 12], Some(2.0), Some(2.0)),
        &t,
        0.0,
    );
}

#[test]
fn matmul_and_attention_match_pytorch() {
    let t = fixture();
    check("matmul", &t["a"].matmul(&t["m"]), &t, 1e-6);
    let bf16 = t["a"]
        .to_kind(Kind::BFloat16)
        .matmul(&t["m"].to_kind(Kind::BFloat16));
    check("matmul_bf16", &bf16.to_kind(Kind::Float), &t, 0.0);
    let sdpa = Tensor::scaled_dot_product_attention(
        &t["q"],
        &t["k"],
        &t["v"],
        None::<&Tensor>,
        0.0,
        false,
        None,
        false,
    );
    check("sdpa", &sdpa, &t, 1e-6);
}

#[test]
fn libtorch_cuda_backend_is_linked() {
    // `--as-needed` would drop libtorch_cuda.so (nothing references it by symbol) and CUDA would
    // then be reported unavailable on a GPU machine. With a CUDA build of libtorch, the library
    // must be mapped into this process, found through the recorded run path.
    let lib_dir = std::path::Path::new(env!("TORCH_LINK_LIB_DIR"));
    if !lib_dir.join("libtorch_cuda.so").exists() {
        eprintln!(
            "libtorch in {} is a CPU build: nothing to check",
            lib_dir.display()
        );
        return;
    }
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu)); // make sure libtorch is initialised
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        maps.contains("libtorch_cuda.so"),
        "libtorch_cuda.so is not loaded into the test process"
    );
    assert!(
        maps.contains("libc10_cuda.so"),
        "libc10_cuda.so is not loaded into the test process"
    );
}
