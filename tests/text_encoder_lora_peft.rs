//! The trainer's text-encoder LoRA (`--train_text_encoder`) against peft on the tiny SDXL encoders
//! (fixture: `gen_text_encoder_lora` in tools/fixtures/generate.py): the adapters it injects start as
//! the script's `text_lora_config` makes them; given the fixture's adapter weights, the conditioning
//! it encodes from token ids equals what the script's own `encode_prompt` computes with peft, and the
//! gradients of a fixed loss on it equal peft's for every LoRA parameter of both encoders — plainly
//! and with gradient checkpointing — while exactly the parameters peft leaves without a gradient are
//! the ones the trainer keeps out of the optimizer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use trainer::TrainConfig;
use trainer::config::MixedPrecision;
use trainer::model::TextEncoders;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `(component.module, is A)` of a parameter name, ours (`….q_proj.default.lora_A`) or peft's
/// (`….q_proj.lora_A.weight`, `….q_proj.lora_A.default.weight`), without transformers'
/// `text_model.` level (the tiny CLIP-L file, written by transformers 5, has none).
fn module_of(name: &str) -> (String, bool) {
    let name = name
        .replace("text_model.", "")
        .replace(".default", "")
        .replace(".weight", "");
    let (module, part) = name.rsplit_once(".lora_").unwrap();
    (module.to_owned(), part == "A")
}

fn load() -> TextEncoders {
    let config = TrainConfig::default()
        .with_pretrained_model_name_or_path(fixture("tiny-sdxl").display().to_string())
        .with_variant(None)
        .with_train_text_encoder(true)
        .with_rank(4)
        .with_mixed_precision(MixedPrecision::No);
    let folder =
        trainer::model_files::resolve(&config.pretrained_model_name_or_path, "main", None).unwrap();
    tch::manual_seed(0);
    TextEncoders::load(&config, &folder, Device::Cpu, Kind::Float).unwrap()
}

/// Max |a − b| against a bound relative to the reference's largest magnitude. fp32 on the CPU: the
/// same operations as PyTorch's up to summation order and kernel choice (docs/NUMERICS.md), through
/// a few layers of dot products of at most 77 terms — errors of a few hundred ulps of the largest
/// value, so 1e-5 relative leaves a margin of ten, yet is a thousandth of what the LoRA contributes.
fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.size(), reference.size(), "{what}");
    let scale = reference.abs().max().double_value(&[]).max(1e-3);
    let diff = (ours.to_kind(Kind::Float) - reference)
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff <= 1e-5 * scale,
        "{what}: max diff {diff} (scale {scale})"
    );
}

#[test]
fn text_encoder_lora_matches_peft_outputs_and_gradients() {
    tch::set_num_threads(1);
    let golden: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(fixture("tiny-sdxl-text-encoder-lora.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let encoders = load();

    // 1. As injected: B zero, A drawn from N(0, 1/r²) (peft's "gaussian"), on 4 projections per layer.
    let params: Vec<(String, Tensor)> = encoders
        .params()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    assert_eq!(params.len(), 2 * 4 * (3 + 4));
    let downs: Vec<Tensor> = params
        .iter()
        .filter(|(n, _)| n.ends_with("lora_A"))
        .map(|(_, t)| t.reshape([-1]))
        .collect();
    let downs = Tensor::cat(&downs, 0);
    let std = downs.std(true).double_value(&[]);
    // 1,792 draws: the sample deviation is within 10 % of 1/4 with overwhelming probability.
    assert!((std - 0.25).abs() < 0.025, "A's deviation {std}");
    for (name, t) in params.iter().filter(|(n, _)| n.ends_with("lora_B")) {
        assert_eq!(t.abs().max().double_value(&[]), 0.0, "{name}");
    }

    // 2. The fixture's adapter weights, by module.
    let mut by_module: BTreeMap<(String, bool), &Tensor> = BTreeMap::new();
    for (key, value) in &golden {
        if let Some(name) = key.strip_prefix("lora.") {
            by_module.insert(module_of(name), value);
        }
    }
    assert_eq!(by_module.len(), params.len());
    tch::no_grad(|| {
        for (name, param) in &params {
            let mut param = param.shallow_clone();
            param.copy_(by_module[&module_of(name)]);
        }
    });

    // 3. Outputs and gradients, plain and checkpointed.
    let (ids, ids_2) = (&golden["input_ids"], &golden["input_ids_2"]);
    let (w_context, w_pooled) = (&golden["w_context"], &golden["w_pooled"]);
    let grads_golden: BTreeMap<(String, bool), &Tensor> = golden
        .iter()
        .filter_map(|(k, v)| Some((module_of(k.strip_prefix("grad.")?), v)))
        .collect();
    // peft reaches the same parameters the trainer optimizes, no more and no fewer.
    let trained: usize = encoders.trained().iter().map(Vec::len).sum();
    assert_eq!(grads_golden.len(), trained);
    assert_eq!(
        trained,
        params.len() - 8,
        "the first encoder's last layer is left out"
    );
    for checkpointed in [false, true] {
        for (_, p) in &params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
        if checkpointed {
            let forward = encoders.encode_checkpointed(ids, ids_2).unwrap();
            assert_close(
                "context (checkpointed)",
                &forward.embeds.context,
                &golden["context"],
            );
            assert_close(
                "pooled (checkpointed)",
                &forward.embeds.pooled,
                &golden["pooled"],
            );
            forward.backward(w_context, Some(w_pooled)).unwrap();
        } else {
            let embeds = encoders.encode(ids, ids_2).unwrap();
            assert_close("context", &embeds.context, &golden["context"]);
            assert_close("pooled", &embeds.pooled, &golden["pooled"]);
            let loss = (&embeds.context * w_context).sum(Kind::Float)
                + (&embeds.pooled * w_pooled).sum(Kind::Float);
            loss.backward();
        }
        for (name, param) in &params {
            let grad = param.grad();
            match grads_golden.get(&module_of(name)) {
                Some(reference) => assert_close(
                    &format!("{name} (checkpointed: {checkpointed})"),
                    &grad,
                    reference,
                ),
                None => assert!(
                    !grad.defined() || grad.abs().max().double_value(&[]) == 0.0,
                    "{name} got a gradient peft does not give it"
                ),
            }
        }
    }
}
