//! UNet-XL against diffusers: the tiny fixture UNets (random perturbed weights, made by
//! `tools/fixtures/generate.py`) must reproduce diffusers' outputs with every attention backend, and
//! checkpointed gradients must equal plain ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::PathBuf;

use sdxl_model::attention::{AttentionBackend, SliceSize};
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};
use sdxl_model::weights::{load_into, TensorFile};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    std::env::var_os("SDXL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

/// `max |a - b| / max |b|` in f64.
fn max_rel_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size());
    let (a, e) = (actual.to_kind(Kind::Double), expected.to_kind(Kind::Double));
    (&a - &e).abs().max().double_value(&[]) / e.abs().max().double_value(&[])
}

struct Case {
    vs: VarStore,
    unet: UNet2DConditionModel,
    io: TensorFile,
}

fn load(folder: &str, io: &str, config: UNetConfig) -> Case {
    let dir = fixtures().join(folder);
    assert_eq!(UNetConfig::from_file(dir.join("config.json")).unwrap(), config);
    let vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(&vs.root(), &config);
    let file = TensorFile::open(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let report = load_into(&vs, &[file], str::to_owned).unwrap();
    assert!(report.is_complete() && report.loaded > 0);
    Case { vs, unet, io: TensorFile::open(fixtures().join(io)).unwrap() }
}

impl Case {
    fn get(&self, key: &str) -> Tensor {
        self.io.tensor(key, Device::Cpu, None).unwrap()
    }

    fn run(&self) -> Tensor {
        let (sample, t, ctx, text, ids) = (self.get("sample"), self.get("timesteps"), self.get("encoder_hidden_states"), self.get("text_embeds"), self.get("time_ids"));
        let inputs = UNetInputs { sample: &sample, timesteps: &t, encoder_hidden_states: &ctx, text_embeds: Some(&text), time_ids: Some(&ids) };
        tch::no_grad(|| self.unet.forward(&inputs)).unwrap()
    }
}

fn check_parity(mut case: Case, name: &str) {
    let expected = case.get("out");
    for backend in [
        AttentionBackend::Fused,
        AttentionBackend::Plain,
        AttentionBackend::Sliced(SliceSize::Auto),
        AttentionBackend::Sliced(SliceSize::Max),
        AttentionBackend::Sliced(SliceSize::Rows(3)),
    ] {
        case.unet.set_attention_backend(backend);
        let err = max_rel_error(&case.run(), &expected);
        println!("{name} {backend:?}: max rel error {err:.2e}");
        assert!(err <= 1e-5, "{name} {backend:?}: max rel error {err:.2e}");
    }
    let _ = &case.vs;
}

#[test]
fn tiny_sdxl_matches_diffusers_with_every_backend() {
    check_parity(load("tiny-sdxl/unet", "tiny-sdxl-unet-io.safetensors", UNetConfig::tiny_sdxl()), "tiny-sdxl");
}

#[test]
fn unet_tiny_b_matches_diffusers_with_every_backend() {
    check_parity(load("unet-tiny-b", "unet-tiny-b-io.safetensors", UNetConfig::tiny_b()), "unet-tiny-b");
}
