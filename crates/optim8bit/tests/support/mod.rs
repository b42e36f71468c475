//! Helpers shared by this crate's integration tests and benches.

#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)] // test code: failing loudly is the point

pub mod bnb;
pub mod extra;

pub use test_support::{fixtures_dir, max_rel_error};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Kind, Tensor};

/// The path of a fixture, which must exist: a missing one fails the test naming it and `how` to
/// regenerate it.
pub fn fixture(name: impl AsRef<Path>, how: &str) -> PathBuf {
    let path = fixtures_dir().join(name);
    assert!(
        path.exists(),
        "missing fixture {}: {how} (see tools/fixtures/README.md)",
        path.display()
    );
    path
}

/// A fixture of several reference runs over the same parameters (`extra-optimizers.safetensors`,
/// `ema.safetensors`): its tensors, parameter names, runs (name → settings) and step count, from
/// its `reference` metadata.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub params: Vec<String>,
    pub runs: HashMap<String, Value>,
    pub steps: i64,
}

/// Reads the runs fixture `file`, which must exist (`generator`: its `gen_*` name, for the message).
pub fn read_runs(file: &str, generator: &str) -> Reference {
    let path = fixture(
        file,
        &format!("regenerate it with `tools/fixtures/regenerate.sh --only {generator}`"),
    );
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info: Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["reference"]).unwrap();
    let params = info["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap().to_owned())
        .collect();
    let runs = info["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_owned(), r[1].clone()))
        .collect();
    Reference {
        tensors: Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect(),
        params,
        runs,
        steps: info["steps"].as_i64().unwrap(),
    }
}

/// Makes `grad` the gradient of `param` exactly: backpropagates `sum(param * grad)` into a zeroed
/// gradient (0 + 1·g = g, and NaN or ±inf stay what they are).
pub fn set_grad(param: &Tensor, grad: &Tensor) {
    let mut existing = param.grad();
    if existing.defined() {
        let _ = existing.zero_();
    }
    (param * grad.to_device(param.device()).to_kind(Kind::Float))
        .sum(Kind::Float)
        .backward();
}

/// A fresh path under the system's temporary folder, unique per test and process.
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("optim8bit-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The shapes of the seed's LoRA parameters: rank 4 on `to_q`, `to_k`, `to_v`, `to_out.0` of every
/// attention of the SDXL UNet (140 attentions, 560 modules, 1,120 tensors, 5,806,080 elements).
///
/// SDXL has transformer blocks of width 640 (2 × 2 in down_blocks.1, 3 × 2 in up_blocks.1) and
/// 1280 (2 × 10 in down_blocks.2, 1 × 10 in the mid block, 3 × 10 in up_blocks.0); each has a
/// self-attention (`attn1`) and a cross-attention (`attn2`) whose `to_k`/`to_v` read the 2048-wide
/// text context. Each LoRA module has `lora_A` `[r, in]` and `lora_B` `[out, r]`.
pub fn seed_lora_shapes() -> Vec<Vec<i64>> {
    const RANK: i64 = 4;
    const CONTEXT: i64 = 2048;
    let mut shapes = Vec::new();
    for (width, blocks) in [(640i64, 10), (1280i64, 60)] {
        for _ in 0..blocks {
            // attn1: q, k, v, out all width → width; attn2: k and v read the context.
            for input in [width, width, width, width, width, CONTEXT, CONTEXT, width] {
                shapes.push(vec![RANK, input]);
                shapes.push(vec![width, RANK]);
            }
        }
    }
    shapes
}
