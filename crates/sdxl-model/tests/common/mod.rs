//! Helpers shared by this crate's integration tests (each test binary uses some of them).

#![allow(dead_code, unused_imports)] // each test binary uses some of the helpers

pub mod depth;

pub use test_support::{fixture, fixtures_dir as fixtures, max_rel_error as rel};

use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};

/// The tiny SDXL fixture pipeline (`tiny-sdxl`) on the CPU in float32, its VAE as configured.
pub fn tiny_pipeline() -> sdxl_model::pipeline::Pipeline {
    let options =
        sdxl_model::pretrained::LoadOptions::default().vae_upcast(sdxl_model::vae::Upcast::Never);
    sdxl_model::pipeline::Pipeline::from_pretrained(fixture("tiny-sdxl"), &options)
        .unwrap()
        .model
}

/// A golden-output file of the fixtures folder.
pub fn golden(name: &str) -> TensorFile {
    TensorFile::open(fixture(name)).unwrap()
}

/// One tensor of a golden file, on the CPU in its stored kind.
pub fn get(file: &TensorFile, key: &str) -> Tensor {
    file.tensor(key, Device::Cpu, None).unwrap()
}

/// A generator of its own as adapters' randomness (`lora::inject_with`, `lora::set_randomness`), as a
/// trainer gives them: tests that draw from it need no lock against other test threads.
#[derive(Debug)]
pub struct Seeded(pub std::sync::Arc<torch_cuda::rng::Generator>);

impl lora::Randomness for Seeded {
    fn uniform(
        &self,
        shape: &[i64],
        lo: f64,
        hi: f64,
        kind: Kind,
        _device: Device,
    ) -> lora::Result<Tensor> {
        self.0
            .uniform(shape, lo, hi, kind)
            .map_err(|e| lora::Error::Randomness(e.to_string()))
    }
    fn randn(&self, shape: &[i64], kind: Kind, _device: Device) -> lora::Result<Tensor> {
        self.0
            .randn_on_device(shape, kind)
            .map_err(|e| lora::Error::Randomness(e.to_string()))
    }
    fn dropout(&self, xs: &Tensor, p: f64) -> Tensor {
        self.0.dropout(xs, p).unwrap()
    }
}

/// A golden case's prompts, guidance scale, steps and size (the fixture generator's `case` metadata)
/// as generation options.
pub fn case_options(case: &serde_json::Value) -> sdxl_model::pipeline::GenerateOptions {
    sdxl_model::pipeline::GenerateOptions::default()
        .with_prompts(
            case["prompts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect(),
        )
        .with_guidance_scale(case["guidance_scale"].as_f64().unwrap())
        .with_steps(case["steps"].as_u64().unwrap() as usize)
        .with_height(case["height"].as_i64().unwrap())
        .with_width(case["width"].as_i64().unwrap())
}
