//! tch computes what PyTorch computes: single operations checked against outputs that the pinned
//! PyTorch wrote (`tools/fixtures/generate.py`, generator `ops`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::collections::BTreeMap;

use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};
use test_support::{depth, f32_bound};

fn fixture() -> BTreeMap<String, Tensor> {
    let path = common::fixture("torch_ops.safetensors");
    TensorFile::open(&path)
        .and_then(|f| f.load_all(Device::Cpu, None))
        .unwrap()
}

/// Compares with PyTorch's result; `depth` counts the roundings (docs/NUMERICS.md).
fn check(name: &str, actual: &Tensor, t: &BTreeMap<String, Tensor>, depth: f64) {
    check_within(name, actual, t, f32_bound(depth));
}

fn check_within(name: &str, actual: &Tensor, t: &BTreeMap<String, Tensor>, bound: f64) {
    let error = common::max_rel_error(actual, &t[name]);
    test_support::check(&format!("op {name} vs PyTorch"), error, bound);
}

#[test]
fn convolution_norm_and_activations_match_pytorch() {
    let t = fixture();
    let conv = t["x"].conv2d(&t["conv_w"], Some(&t["conv_b"]), [1, 1], [1, 1], [1, 1], 1);
    // 8 channels, 3×3 kernel; the norm's groups hold 4 channels of 6×6; softmax over 6 values.
    let conv_depth = depth::conv(8, 3);
    check("conv2d", &conv, &t, conv_depth);
    check(
        "group_norm",
        &conv.group_norm(4, Some(&t["gn_w"]), Some(&t["gn_b"]), 1e-5, false),
        &t,
        conv_depth + depth::norm(4 * 36),
    );
    let activation = conv_depth + depth::ACTIVATION;
    check("silu", &conv.silu(), &t, activation);
    check("gelu_erf", &conv.gelu("none"), &t, activation);
    check("gelu_tanh", &conv.gelu("tanh"), &t, activation);
    check(
        "softmax",
        &conv.softmax(-1, Kind::Float),
        &t,
        activation + depth::sum(6) + 1.0,
    );
    // Copies of the convolution's values: exact copies, so the convolution's own error and no more
    // (its last bits differ from PyTorch's with the CPU's kernels, as this machine's showed).
    check(
        "upsample_nearest2x",
        &conv.upsample_nearest2d([12, 12], Some(2.0), Some(2.0)),
        &t,
        conv_depth,
    );
    assert!(
        conv.upsample_nearest2d([12, 12], Some(2.0), Some(2.0))
            .equal(
                &conv
                    .repeat_interleave_self_int(2, Some(2), None)
                    .repeat_interleave_self_int(2, Some(3), None)
            ),
        "nearest 2× upsampling copies each value into a 2×2 block"
    );
}

#[test]
fn matmul_and_attention_match_pytorch() {
    let t = fixture();
    check("matmul", &t["a"].matmul(&t["m"]), &t, depth::sum(7));
    let bf16 = t["a"]
        .to_kind(Kind::BFloat16)
        .matmul(&t["m"].to_kind(Kind::BFloat16));
    // Products of bf16 values are exact in fp32; the fp32 sums of 7 terms may round differently in
    // another order, and the one rounding to bf16 then lands on either side of a boundary: one bf16
    // step (2⁻⁸ relative) at most.
    check_within(
        "matmul_bf16",
        &bf16.to_kind(Kind::Float),
        &t,
        2f64.powi(-8) + f32_bound(depth::sum(7)),
    );
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
    check("sdpa", &sdpa, &t, depth::attention(8, 11));
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
