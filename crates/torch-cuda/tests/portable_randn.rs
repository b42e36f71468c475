//! `portable::randn` draws what PyTorch's `torch.randn` draws on the CPU with AVX2 (fixture
//! `tests/fixtures/torch-randn.safetensors`, `gen_noise` in tools/fixtures/generate.py), bit for
//! bit, whichever kernels libtorch runs here (`ATEN_CPU_CAPABILITY`), and leaves the generator
//! where PyTorch does.
//!
//! The only test of this binary: the default generator is process-wide, so another test drawing
//! random numbers in parallel would change the sequence.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};
use torch_cuda::portable;

#[test]
fn randn_equals_pytorch_bit_for_bit_and_keeps_the_generator_in_step() {
    let path = test_support::fixture("torch-randn.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cases: Vec<(i64, Vec<i64>)> =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["cases"]).unwrap();
    assert_eq!(cases.len(), 5);
    let golden: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    for (seed, shape) in cases {
        tch::manual_seed(seed);
        let drawn = portable::randn(&shape).unwrap();
        let expected = &golden[&format!("seed{seed}/randn")];
        let differing = drawn.ne_tensor(expected).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(
            differing,
            0,
            "seed {seed}, shape {shape:?}: {differing} of {} values differ from PyTorch's",
            expected.numel()
        );
        let then = Tensor::rand([4], (Kind::Float, Device::Cpu));
        assert!(
            then.equal(&golden[&format!("seed{seed}/then_rand")]),
            "seed {seed}: the generator is not where PyTorch leaves it"
        );
        println!("seed {seed}, shape {shape:?}: equal to PyTorch's AVX2 draws");
    }
}
