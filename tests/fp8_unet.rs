//! fp8 base weights on the tiny SDXL UNet (`tests/fixtures/tiny-sdxl`, diffusers' golden input):
//! every linear layer and convolution goes to fp8, the variable store frees the full-precision bytes, the output
//! stays within fp8's rounding of the original, LoRA adapters on top train alone, and merging
//! into an fp8 base is refused by name. The same measurement on the full-size architecture is
//! `cargo run --release --example unet_fp8 -- --full`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use common::{fixture, max_rel_error};
use lora::{HasLinears, LoraConfig};
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};
use sdxl_model::weights::TensorFile;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn store_bytes(vs: &VarStore) -> i64 {
    vs.variables()
        .values()
        .map(|v| v.numel() as i64 * v.kind().elt_size_in_bytes() as i64)
        .sum()
}

/// `‖a − b‖ / ‖b‖`.
fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    (actual - expected).norm().double_value(&[]) / expected.norm().double_value(&[])
}

struct Golden {
    io: TensorFile,
}

impl Golden {
    fn open() -> Self {
        Self {
            io: TensorFile::open(fixture("tiny-sdxl-unet-io.safetensors")).unwrap(),
        }
    }

    fn get(&self, key: &str) -> Tensor {
        self.io.tensor(key, Device::Cpu, None).unwrap()
    }

    fn run(&self, unet: &UNet2DConditionModel) -> Tensor {
        let (sample, t, context, text, ids) = (
            self.get("sample"),
            self.get("timesteps"),
            self.get("encoder_hidden_states"),
            self.get("text_embeds"),
            self.get("time_ids"),
        );
        let inputs = UNetInputs {
            sample: &sample,
            timesteps: &t,
            encoder_hidden_states: &context,
            text_embeds: Some(&text),
            time_ids: Some(&ids),
        };
        unet.forward(&inputs).unwrap()
    }
}

fn tiny_unet() -> (VarStore, UNet2DConditionModel) {
    let loaded =
        UNet2DConditionModel::from_pretrained(fixture("tiny-sdxl/unet"), &LoadOptions::default())
            .unwrap();
    assert_eq!(loaded.model.config(), &UNetConfig::tiny_sdxl());
    let mut vs = loaded.store;
    vs.freeze();
    (vs, loaded.model)
}

#[test]
fn every_linear_goes_to_fp8_the_store_shrinks_and_the_output_stays_close() {
    let golden = Golden::open();
    let (vs, mut unet) = tiny_unet();
    let original = tch::no_grad(|| golden.run(&unet));
    let mut linear_elements = 0;
    unet.for_each_linear(&mut |_, linear| linear_elements += linear.weight().numel() as i64);
    let before = store_bytes(&vs);

    let report = lora::quantize_base_fp8(&mut unet).unwrap();
    assert_eq!((report.quantized, report.already_fp8), (213, 0), "{report}");
    assert_eq!(report.bytes_before, 4 * linear_elements);
    assert_eq!(report.bytes_after, linear_elements + 4 * 213);
    // The store holds the same tensors: each linear weight element went from 4 bytes to 1.
    assert_eq!(store_bytes(&vs), before - 3 * linear_elements);
    unet.for_each_linear(&mut |module, linear| {
        assert!(
            linear.is_fp8() && linear.weight().kind() == Kind::Float8e4m3fn,
            "{module}"
        );
        assert_eq!(linear.kind(), Kind::Float, "{module}");
    });

    let quantized = tch::no_grad(|| golden.run(&unet));
    assert_eq!(quantized.kind(), Kind::Float);
    // 3 mantissa bits per weight, compounded through the tiny UNet's layers: ≈ 10 %, several times
    // bf16 weights' error (the example's figures: docs/BENCHMARKS.md, Results, `unet_fp8`).
    let error = relative_error(&quantized, &original);
    println!(
        "tiny-sdxl UNet, fp8 linear weights vs fp32: relative error {error:.3e} (norm), {:.3e} (max)",
        max_rel_error(&quantized, &original)
    );
    assert!(error > 1e-3 && error < 0.2, "{error}");
    // A second call quantizes nothing more.
    let again = lora::quantize_base_fp8(&mut unet).unwrap();
    assert_eq!(
        (
            again.quantized,
            again.already_fp8,
            again.bytes_before,
            again.bytes_after
        ),
        (0, 213, report.bytes_after, report.bytes_after)
    );

    // The convolutions too: every 4-D weight goes from 4 bytes an element to 1.
    let linear_only = store_bytes(&vs);
    let conv_elements: i64 = vs
        .variables()
        .values()
        .filter(|v| v.dim() == 4)
        .map(|v| v.numel() as i64)
        .sum();
    let convs = unet.quantize_convs_fp8().unwrap();
    assert_eq!(convs.quantized, 50, "{convs}");
    assert_eq!(store_bytes(&vs), linear_only - 3 * conv_elements);
    let all_fp8 = tch::no_grad(|| golden.run(&unet));
    let error = relative_error(&all_fp8, &original);
    println!(
        "tiny-sdxl UNet, fp8 linear and convolution weights vs fp32: relative error {error:.3e}"
    );
    // The tiny UNet's few, narrow layers amplify rounding more than SDXL-base's architecture does
    // (the example's figures for both: docs/BENCHMARKS.md, Results, the `unet_fp8` rows).
    assert!(error > 1e-3 && error < 0.25, "{error}");
}

#[test]
fn lora_on_an_fp8_unet_trains_only_the_adapters_and_refuses_to_merge() {
    let golden = Golden::open();
    let (vs, mut unet) = tiny_unet();
    lora::quantize_base_fp8(&mut unet).unwrap();
    tch::manual_seed(3);
    let adapters = VarStore::new(Device::Cpu);
    let report = lora::inject(
        &mut unet,
        &adapters.root(),
        "default",
        &LoraConfig::unet_attention(4),
    )
    .unwrap();
    assert!(!report.adapted.is_empty());
    let params = lora::trainable_variables(&mut unet);
    // Non-zero B, so both A and B receive gradients.
    tch::no_grad(|| {
        for (name, p) in &params {
            if name.ends_with("lora_B") {
                let _ = p.shallow_clone().normal_(0.0, 0.01);
            }
        }
    });
    let out = golden.run(&unet);
    out.square().mean(Kind::Float).backward();
    for (name, p) in &params {
        assert!(
            p.grad().defined() && p.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name} got no gradient"
        );
    }
    for (name, variable) in vs.variables() {
        assert!(
            !variable.requires_grad() && !variable.grad().defined(),
            "base variable {name} is trainable"
        );
    }
    let error = lora::merge(&mut unet, None).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, lora::Error::Fp8BaseWeight { .. }) && message.contains("fp8"),
        "{message}"
    );
    assert!(
        message.contains(&report.adapted[0].0),
        "the error names the first adapted module: {message}"
    );
}
