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

#[test]
fn fp8_unet_weights_keep_the_latents_close_and_take_a_lora() {
    let options = || {
        GenerateOptions::default()
            .with_prompts(vec!["a cat".into()])
            .with_steps(3)
            .with_height(64)
            .with_width(64)
            .with_seed(3)
    };
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
