//! The prior-preservation loss (`trainer::step::{LossWeights, Objective::weighted_loss}`) against
//! the reference code that defines it.
//!
//! The fixture (`prior-loss.safetensors`, `gen_prior_loss` in tools/fixtures/generate.py) holds a
//! batch of 4 (latents, ε, a prediction, timesteps 37, 811, 60, 700 under the SDXL DDPM schedule)
//! and, for prior-loss weights 1 and 0.5 with and without min-SNR-5, the loss and its gradient
//! w.r.t. the prediction (torch autograd) as computed by the loss lines of diffusers'
//! `train_dreambooth_lora_sdxl.py` (2 instance then 2 class samples; the advanced script's lines
//! with min-SNR-γ, where the canonical ones fail) and of kohya's `train_network.py`
//! `process_batch` (is_reg = the metadata's `is_reg`), both run from their pinned source.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use common::{fixture, max_rel_error};
use sdxl_model::schedulers::{DdpmConfig, DdpmSchedule};
use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};
use test_support::{check, depth, f32_bound};
use trainer::step::{Draws, LossWeights, Objective, StepSettings};

struct Case {
    name: String,
    formulation: String,
    prior_loss_weight: f64,
    snr_gamma: Option<f64>,
}

fn metadata(file: &std::path::Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(file).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    header.metadata().clone().unwrap()
}

fn cases(metadata: &std::collections::HashMap<String, String>) -> Vec<Case> {
    let cases: Vec<serde_json::Value> = serde_json::from_str(&metadata["cases"]).unwrap();
    cases
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_owned(),
            formulation: c["formulation"].as_str().unwrap().to_owned(),
            prior_loss_weight: c["prior_loss_weight"].as_f64().unwrap(),
            snr_gamma: c["snr_gamma"].as_f64(),
        })
        .collect()
}

fn settings(snr_gamma: Option<f64>) -> StepSettings {
    StepSettings {
        kind: Kind::Float,
        scaling_factor: 1.0,
        shift_factor: 0.0,
        noise_offset: 0.0,
        snr_gamma,
        accumulation: 1,
        gradient_checkpointing: false,
        max_grad_norm: 1.0,
    }
}

/// The objective of the fixture's batch (ε-prediction: the target is the noise).
fn objective(get: &impl Fn(&str) -> Tensor, snr_gamma: Option<f64>) -> Objective {
    let schedule = DdpmSchedule::new(DdpmConfig::sdxl(), Device::Cpu).unwrap();
    let draws = Draws {
        noise: get("noise"),
        offset_noise: None,
        timesteps: get("timesteps"),
    };
    Objective::new(&schedule, &get("latents"), &draws, &settings(snr_gamma)).unwrap()
}

/// The loss and the gradient w.r.t. the prediction.
fn loss_and_grad(
    objective: &Objective,
    prediction: &Tensor,
    weights: &LossWeights,
) -> (Tensor, Tensor) {
    let prediction = prediction.detach().set_requires_grad(true);
    let (coefficients, snr_mask) = weights.tensors(Device::Cpu).unwrap();
    let loss = objective
        .weighted_loss(&prediction, &coefficients, &snr_mask)
        .unwrap();
    loss.backward();
    (loss.detach(), prediction.grad())
}

/// Bounds: the loss sums squared differences (2 roundings each) over at most the whole batch, then
/// weighs and sums the samples; a weight is at most 10 roundings (the SNR from ᾱ, its clip and
/// division, the mask's three operations, the coefficient). The gradient is elementwise: the
/// difference, the factor 2 and the division by the sample's size, and the weight.
fn bounds(prediction: &Tensor) -> (f64, f64) {
    let batch = prediction.size()[0];
    let loss_depth = 2.0 + depth::sum(prediction.numel() as i64) + 10.0 + depth::sum(batch);
    (f32_bound(loss_depth), f32_bound(3.0 + 10.0))
}

#[test]
fn weighted_loss_matches_diffusers_dreambooth_and_kohya() {
    let path = fixture("prior-loss.safetensors");
    let golden = TensorFile::open(&path).unwrap();
    let get = |key: &str| golden.tensor(key, Device::Cpu, None).unwrap();
    let metadata = metadata(&path);
    let instances: usize = metadata["instances"].parse().unwrap();
    let is_reg: Vec<bool> = serde_json::from_str(&metadata["is_reg"]).unwrap();
    let prediction = get("model_pred");
    let (loss_bound, grad_bound) = bounds(&prediction);
    let cases = cases(&metadata);
    assert_eq!(cases.len(), 8);
    let mut losses = Vec::new();
    for case in &cases {
        let weights = match case.formulation.as_str() {
            "diffusers" => LossWeights::dreambooth_prior(instances, case.prior_loss_weight),
            "kohya" => LossWeights::kohya(&is_reg, case.prior_loss_weight),
            other => panic!("unexpected formulation {other}"),
        };
        let objective = objective(&get, case.snr_gamma);
        let (loss, grad) = loss_and_grad(&objective, &prediction, &weights);
        let expected = get(&format!("{}/loss", case.name));
        println!(
            "{}: loss {:.7} (reference {:.7})",
            case.name,
            loss.double_value(&[]),
            expected.double_value(&[0])
        );
        check(
            &format!("prior loss {}", case.name),
            max_rel_error(&loss.reshape([1]), &expected),
            loss_bound,
        );
        check(
            &format!("prior loss {} gradient", case.name),
            max_rel_error(&grad, &get(&format!("{}/grad", case.name))),
            grad_bound,
        );
        losses.push(loss.double_value(&[]));
    }
    // Every case differs from every other, so a case that ignored its weight or γ would fail above.
    for (i, a) in losses.iter().enumerate() {
        for b in &losses[i + 1..] {
            assert!((a - b).abs() > 1e-3, "{losses:?}");
        }
    }
}

#[test]
fn mean_weights_are_the_plain_loss_and_bad_lengths_are_refused() {
    let golden = TensorFile::open(fixture("prior-loss.safetensors")).unwrap();
    let get = |key: &str| golden.tensor(key, Device::Cpu, None).unwrap();
    let prediction = get("model_pred");
    let (loss_bound, _) = bounds(&prediction);
    for gamma in [None, Some(5.0)] {
        let objective = objective(&get, gamma);
        let (weighted, _) = loss_and_grad(&objective, &prediction, &LossWeights::mean(4));
        let plain = objective.loss(&prediction).unwrap();
        check(
            &format!("mean weights vs Objective::loss (snr_gamma {gamma:?})"),
            max_rel_error(&weighted.reshape([1]), &plain.reshape([1])),
            loss_bound,
        );
        let (c, m) = LossWeights::mean(3).tensors(Device::Cpu).unwrap();
        let err = objective.weighted_loss(&prediction, &c, &m).unwrap_err();
        assert!(err.to_string().contains("loss coefficients"), "{err}");
    }
    let weights = LossWeights::dreambooth_prior(2, 0.5);
    assert_eq!(weights.coefficients, [0.5, 0.5, 0.25, 0.25]);
    assert_eq!(weights.snr_mask, [1.0, 1.0, 0.0, 0.0]);
    let weights = LossWeights::kohya(&[false, true], 0.5);
    assert_eq!(weights.coefficients, [0.5, 0.25]);
    assert_eq!(weights.snr_mask, [1.0, 1.0]);
}
