//! The trainer's objective against diffusers' SDXL LoRA script with peft, on the tiny SDXL UNet.
//!
//! The fixture (`tiny-sdxl-objective.safetensors`, `gen_training_objective` in
//! tools/fixtures/generate.py) holds fixed latents, noise, offset noise, timesteps and
//! conditioning, the values of a rank-4 peft LoRA on `to_q`, `to_k`, `to_v`, `to_out.0`, and for
//! each case (ε / v-prediction, min-SNR-γ, offset noise) the loss that
//! `train_text_to_image_lora_sdxl.py`'s micro-step computes and the LoRA gradients of one backward.
//! Here the same inputs go through `trainer::step::{Draws, Objective}` and our UNet with the LoRA the
//! trainer injects.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::collections::BTreeMap;

use common::sdxl_depth::unet_shape;
use common::{fixture, max_rel_error};
use lora::LoraConfig;
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::schedulers::{DdpmConfig, DdpmSchedule, PredictionType};
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};
use sdxl_model::weights::TensorFile;
use tch::nn::VarStore;
use tch::{Device, Kind};
use test_support::{check, depth, f32_bound, unet_depth};
use trainer::step::{Draws, Objective, StepSettings};

struct Case {
    name: String,
    prediction_type: PredictionType,
    snr_gamma: Option<f64>,
    noise_offset: f64,
}

fn cases(file: &std::path::Path) -> Vec<Case> {
    let bytes = std::fs::read(file).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["cases"]).unwrap();
    cases
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_owned(),
            prediction_type: match c["prediction_type"].as_str().unwrap() {
                "epsilon" => PredictionType::Epsilon,
                "v_prediction" => PredictionType::VPrediction,
                other => panic!("unexpected prediction type {other}"),
            },
            snr_gamma: c["snr_gamma"].as_f64(),
            noise_offset: c["noise_offset"].as_f64().unwrap(),
        })
        .collect()
}

fn settings(case: &Case) -> StepSettings {
    StepSettings {
        kind: Kind::Float,
        scaling_factor: 1.0,
        shift_factor: 0.0,
        noise_offset: case.noise_offset,
        snr_gamma: case.snr_gamma,
        accumulation: 1,
        gradient_checkpointing: false,
        max_grad_norm: 1.0,
    }
}

#[test]
fn loss_and_lora_gradients_match_diffusers_and_peft() {
    let path = fixture("tiny-sdxl-objective.safetensors");
    let golden = TensorFile::open(&path).unwrap();
    let get = |key: &str| golden.tensor(key, Device::Cpu, None).unwrap();

    // The UNet and the LoRA as the trainer sets them up, with the fixture's A and B.
    let mut unet =
        UNet2DConditionModel::from_pretrained(fixture("tiny-sdxl/unet"), &LoadOptions::default())
            .unwrap()
            .model;
    assert_eq!(unet.config(), &UNetConfig::tiny_sdxl());
    let store = VarStore::new(Device::Cpu);
    let report = lora::inject(
        &mut unet,
        &store.root(),
        "default",
        &LoraConfig::unet_attention(4),
    )
    .unwrap();
    assert!(!report.adapted.is_empty());
    let mut params = lora::trainable_variables(&mut unet);
    // peft's `<module>.lora_A.default.weight` is our `<module>.default.lora_A`.
    let peft_key = |ours: &str| {
        let (module, part) = ours.rsplit_once(".default.").unwrap();
        format!("{module}.{part}.default.weight")
    };
    tch::no_grad(|| {
        for (name, param) in params.iter_mut() {
            param.copy_(&get(&format!("lora.{}", peft_key(name))));
        }
    });
    let lora_in_fixture = golden
        .keys()
        .unwrap()
        .iter()
        .filter(|k| k.starts_with("lora."))
        .count();
    assert_eq!(
        params.len(),
        lora_in_fixture,
        "every peft LoRA tensor has its twin"
    );

    let clean = get("latents");
    let time_ids = get("time_ids");
    let (context, pooled) = (get("encoder_hidden_states"), get("text_embeds"));
    // The loss: noising (3 operations), the UNet, the squared error summed over every element
    // (docs/NUMERICS.md). A gradient: the forward depth, then the backward pass through the UNet
    // and the LoRA's products (as deep again).
    let loss_depth = 3.0
        + unet_depth(&unet_shape(unet.config(), &clean, &context))
        + 2.0
        + depth::sum(clean.numel() as i64);
    let (loss_bound, grad_bound) = (f32_bound(loss_depth), f32_bound(2.0 * loss_depth));
    let mut losses = BTreeMap::new();
    for case in cases(&path) {
        let schedule = DdpmSchedule::new(
            {
                let mut config = DdpmConfig::sdxl();
                config.prediction_type = case.prediction_type;
                config
            },
            Device::Cpu,
        )
        .unwrap();
        let settings = settings(&case);
        let draws = Draws {
            noise: get("noise"),
            offset_noise: (case.noise_offset > 0.0).then(|| get("offset_noise")),
            timesteps: get("timesteps"),
        };
        let objective = Objective::new(&schedule, &clean, &draws, &settings).unwrap();
        let prediction = unet
            .forward(&UNetInputs {
                sample: &objective.noisy,
                timesteps: &draws.timesteps,
                encoder_hidden_states: &context,
                text_embeds: Some(&pooled),
                time_ids: Some(&time_ids),
            })
            .unwrap();
        for param in params.values_mut() {
            param.zero_grad();
        }
        let loss = objective.loss(&prediction).unwrap();
        loss.backward();

        let expected = get(&format!("{}/loss", case.name));
        let loss_error = max_rel_error(&loss.reshape([1]), &expected);
        let grad_error = params
            .iter()
            .map(|(name, param)| {
                let key = format!("{}/grad.{}", case.name, peft_key(name));
                max_rel_error(&param.grad(), &get(&key))
            })
            .fold(0f64, f64::max);
        println!(
            "{}: loss {:.6} (diffusers {:.6})",
            case.name,
            loss.double_value(&[]),
            expected.double_value(&[0])
        );
        check(
            &format!("objective {} loss vs diffusers", case.name),
            loss_error,
            loss_bound,
        );
        check(
            &format!("objective {} worst LoRA gradient vs peft", case.name),
            grad_error,
            grad_bound,
        );
        losses.insert(case.name, loss.double_value(&[]));
    }
    // Each switch changes the loss, so a case that ignored its switch would fail above.
    assert_eq!(losses.len(), 6);
}
