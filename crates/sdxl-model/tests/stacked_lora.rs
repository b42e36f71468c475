//! Two LoRAs stacked on the tiny SDXL pipeline under different adapter names, at multipliers 0.7 and
//! 0.4, give what diffusers gives after `load_lora_weights(..., adapter_name=...)` and
//! `set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])`: the UNet's output on fixed inputs and the
//! latents of a 2-step run (fixture `stacked_lora` of tools/fixtures/generate.py). The two files differ
//! in layout (diffusers' without metadata; peft's with its adapter metadata), rank, alpha, target
//! modules (some shared) and components (text_encoder in one, text_encoder_2 in the other).

// Helpers outside #[test] functions unwrap too: a fixture that fails to load should fail the test.
#![allow(clippy::unwrap_used)]

mod common;

use common::depth::{text_encoders_depth, unet_shape};
use common::{fixture, get, golden, rel};
use test_support::{check, f32_bound, unet_depth};

use sdxl_model::pipeline::Pipeline;
use sdxl_model::schedulers::{SchedulerConfig, SchedulerKind};
use sdxl_model::unet::{UNetConfig, UNetInputs};
use tch::{Device, Kind, Tensor};

/// The tiny pipeline with `stacked-a` as adapter "a" and `stacked-b` as adapter "b".
fn stacked(weights: [f64; 2]) -> Pipeline {
    let mut pipe = common::tiny_pipeline();
    let names = pipe.lora_module_names();
    for (name, weight) in ["a", "b"].into_iter().zip(weights) {
        let file = lora::format::read(
            fixture(format!("lora/stacked-{name}.safetensors")),
            lora::format::ReadOptions::default()
                .with_module_names(Some(&names))
                .with_block_renames(None),
        )
        .unwrap();
        assert!(pipe.load_lora(&file.state, name).unwrap() > 0);
        pipe.set_lora_multiplier(name, weight).unwrap();
    }
    pipe
}

/// The case `gen_stacked_lora` ran, from the fixture's metadata.
fn case() -> serde_json::Value {
    let bytes = std::fs::read(fixture("lora/stacked-lora-io.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&meta.metadata().as_ref().unwrap()["case"]).unwrap()
}

fn weights(case: &serde_json::Value, key: &str) -> [f64; 2] {
    let w = case[key].as_array().unwrap();
    [w[0].as_f64().unwrap(), w[1].as_f64().unwrap()]
}

/// The UNet's output on `tiny-sdxl-unet-io`'s inputs.
fn unet_output(pipe: &Pipeline) -> Tensor {
    let io = golden("tiny-sdxl-unet-io.safetensors");
    let (sample, t, ctx, text, ids) = (
        get(&io, "sample"),
        get(&io, "timesteps"),
        get(&io, "encoder_hidden_states"),
        get(&io, "text_embeds"),
        get(&io, "time_ids"),
    );
    let inputs = UNetInputs {
        sample: &sample,
        timesteps: &t,
        encoder_hidden_states: &ctx,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    tch::no_grad(|| pipe.unet().forward(&inputs).unwrap())
}

/// The UNet's depth on `sample` and `context` (docs/NUMERICS.md), doubled because a LoRA at most
/// doubles the depth of each layer it adapts (a down-projection over the same inputs, an
/// up-projection, the scale and the sum); a second adapter on the same layer adds two more roundings
/// per output (its up-projection's sum is over the rank, far shorter than the base layer's), which
/// the doubling already covers for the ranks of these files.
fn lora_unet_depth(sample: &Tensor, context: &Tensor) -> f64 {
    let config = UNetConfig::from_file(fixture("tiny-sdxl/unet/config.json")).unwrap();
    2.0 * unet_depth(&unet_shape(&config, sample, context))
}

#[test]
fn stacked_loras_give_diffusers_set_adapters_unet_output() {
    let case = case();
    let io = golden("lora/stacked-lora-io.safetensors");
    let unet_io = golden("tiny-sdxl-unet-io.safetensors");
    let bound = f32_bound(lora_unet_depth(
        &get(&unet_io, "sample"),
        &get(&unet_io, "encoder_hidden_states"),
    ));
    for (key, golden_key) in [("weights", "unet"), ("second_off", "second_off.unet")] {
        let output = unet_output(&stacked(weights(&case, key)));
        check(
            &format!(
                "stacked LoRAs at {key} {:?}: UNet vs diffusers",
                weights(&case, key)
            ),
            rel(&output, &get(&io, golden_key)),
            bound,
        );
    }
    // Each weight matters: the second LoRA's 0.4 moves the output far beyond the bound.
    let change = rel(&get(&io, "unet"), &get(&io, "second_off.unet"));
    println!("(0.7, 0.4) vs (0.7, 0): relative change {change:.3e}");
    assert!(change > 1e3 * bound, "{change:e}");
    let first_off = unet_output(&stacked([0.0, weights(&case, "weights")[1]]));
    let change = rel(&first_off, &get(&io, "unet"));
    println!("(0, 0.4) vs (0.7, 0.4): relative change {change:.3e}");
    assert!(change > 1e3 * bound, "{change:e}");
}

#[test]
fn stacked_loras_give_diffusers_set_adapters_latents() {
    let case = case();
    let io = golden("lora/stacked-lora-io.safetensors");
    let options = common::case_options(&case)
        .with_scheduler(SchedulerKind::EulerDiscrete)
        .with_initial_noise(Some(get(&io, "noise")));
    let expected = get(&io, "latents");
    // As the pipeline tests' latents bound (docs/NUMERICS.md), with the LoRA-doubled depths of the
    // text encoders and the UNet: guidance scales a model-output error by up to 2w + 1, and a step
    // moves the latents by up to σ_max times the guided output, compared with the latents' size.
    let text = 2.0 * text_encoders_depth(&fixture("tiny-sdxl"), 77);
    let config = UNetConfig::from_file(fixture("tiny-sdxl/unet/config.json")).unwrap();
    let context = Tensor::zeros(
        [1, 77, config.cross_attention_dim],
        (Kind::Float, Device::Cpu),
    );
    let unet = lora_unet_depth(&expected, &context);
    let mut scheduler =
        sdxl_model::schedulers::build(options.scheduler, &SchedulerConfig::sdxl()).unwrap();
    scheduler.set_timesteps(options.steps).unwrap();
    let latents_max = expected.abs().max().double_value(&[]);
    let gain = (2.0 * options.guidance_scale + 1.0) * scheduler.init_noise_sigma() / latents_max;
    let bound = gain * f32_bound(text + options.steps as f64 * unet);
    let latents = stacked(weights(&case, "weights"))
        .latents(&options)
        .unwrap();
    check(
        "stacked LoRAs (0.7, 0.4): 2-step latents vs diffusers",
        rel(&latents, &expected),
        bound,
    );
    let second_off = stacked(weights(&case, "second_off"))
        .latents(&options)
        .unwrap();
    check(
        "stacked LoRAs (0.7, 0): 2-step latents vs diffusers",
        rel(&second_off, &get(&io, "second_off.latents")),
        bound,
    );
    assert!(rel(&latents, &second_off) > 1e3 * bound);
}
