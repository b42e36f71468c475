//! fp8 UNet weights in the pipeline (the `generate --fp8` path) on the tiny SDXL fixture, CPU fp32:
//! every linear layer and convolution goes to fp8, the latents stay within fp8's rounding of the
//! full-precision run's, and a LoRA still applies on top.

#![allow(clippy::unwrap_used)] // test code: failing loudly is the point

mod common;

use common::tiny_pipeline as pipeline;
use sdxl_model::pipeline::GenerateOptions;
use tch::{Kind, Tensor};

fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    (actual - expected).norm().double_value(&[]) / expected.norm().double_value(&[])
}

/// A 3-step 64 px generation of one prompt, seeded.
fn options() -> GenerateOptions {
    GenerateOptions::default()
        .with_prompts(vec!["a cat".into()])
        .with_steps(3)
        .with_height(64)
        .with_width(64)
        .with_seed(3)
}

#[test]
fn fp8_unet_weights_keep_the_latents_close_and_take_a_lora() {
    let full = pipeline().latents(&options()).unwrap();
    let mut pipe = pipeline();
    let [linears, convs] = pipe.quantize_unet_fp8().unwrap();
    // The tiny UNet's counts (tests/fp8_unet.rs counts them from the model).
    assert_eq!((linears.quantized, convs.quantized), (213, 50));
    assert!(linears.bytes_after * 3 < linears.bytes_before);
    let mut kinds = Vec::new();
    lora::HasLinears::for_each_linear(pipe.unet_mut(), &mut |_, linear| {
        kinds.push(linear.weight().kind())
    });
    assert!(kinds.iter().all(|&k| k == Kind::Float8e4m3fn));
    let fp8 = pipe.latents(&options()).unwrap();
    assert_eq!(fp8.kind(), Kind::Float);
    // 3 mantissa bits per weight through the tiny UNet's narrow layers (tests/fp8_unet.rs: under
    // 25 % for one UNet call, all weights fp8); the sampler damps it, the noise is shared.
    let error = relative_error(&fp8, &full);
    println!("tiny pipeline, fp8 UNet weights vs fp32: latents relative error {error:.3e}");
    assert!(error > 1e-4 && error < 0.25, "{error}");

    // A LoRA on the fp8 base changes the latents, and at scale 0 gives the fp8 base's exactly.
    let file = lora::format::read(
        test_support::fixture("lora/tiny-sdxl-diffusers.safetensors"),
        lora::format::ReadOptions::default(),
    )
    .unwrap();
    assert!(pipe.load_lora(&file.state, "style").unwrap() > 0);
    let with_lora = pipe.latents(&options()).unwrap();
    assert!(!with_lora.equal(&fp8));
    pipe.set_lora_multiplier("style", 0.0).unwrap();
    assert!(pipe.latents(&options()).unwrap().equal(&fp8));
}

/// `set_fp8_products(Scaled)` (`generate --fp8 --fp8_compute`) on the tiny pipeline in bf16: the
/// linear layers multiply in fp8, which moves the latents from the widened fp8 run's by about the
/// weights' own rounding (each input of a product rounded to 3 mantissa bits, as each weight is),
/// torch-cuda's product (`unet::fp8_products`) gives the same latents — and is refused for an fp32
/// pipeline.
#[test]
fn fp8_products_run_in_bf16_stay_near_the_widened_run_and_are_refused_in_fp32() {
    let load = sdxl_model::pretrained::LoadOptions::default()
        .kind(Kind::BFloat16)
        .vae_upcast(sdxl_model::vae::Upcast::Never);
    let mut pipe =
        sdxl_model::pipeline::Pipeline::from_pretrained(test_support::fixture("tiny-sdxl"), &load)
            .unwrap()
            .model;
    let bf16 = pipe.latents(&options()).unwrap().to_kind(Kind::Float);
    let [linears, _] = pipe.quantize_unet_fp8().unwrap();
    let widened = pipe.latents(&options()).unwrap().to_kind(Kind::Float);
    let layers = pipe.set_fp8_products(lora::Fp8Products::Scaled).unwrap();
    assert_eq!(layers, linears.quantized);
    let scaled = pipe.latents(&options()).unwrap().to_kind(Kind::Float);
    let (weights_only, products) = (
        relative_error(&widened, &bf16),
        relative_error(&scaled, &widened),
    );
    println!(
        "tiny pipeline bf16: fp8 weights vs bf16 {weights_only:.3e}, fp8 products vs widened {products:.3e}"
    );
    // The products did run, and their inputs' rounding is of the weights' rounding's size.
    assert!(products > 0.0, "the fp8 products did not run");
    assert!(
        products < 2.0 * weights_only.max(1e-2),
        "{products} vs {weights_only}"
    );
    // What `generate --fp8_compute` sets: this build's product (torch-cuda's, where it has the
    // shim), the same latents.
    pipe.set_fp8_products(sdxl_model::unet::fp8_products(
        torch_cuda::fp8::Backward::Widened,
    ))
    .unwrap();
    let build = pipe.latents(&options()).unwrap().to_kind(Kind::Float);
    assert!(
        build.equal(&scaled),
        "the build's fp8 product computed other latents"
    );

    let mut fp32 = pipeline();
    fp32.quantize_unet_fp8().unwrap();
    let message = fp32
        .set_fp8_products(lora::Fp8Products::Scaled)
        .unwrap_err()
        .to_string();
    assert!(message.contains("bf16 or fp16"), "{message}");
    assert_eq!(
        fp32.set_fp8_products(lora::Fp8Products::Widened).unwrap(),
        213
    );
}
