//! Gradient checkpointing of a text encoder with LoRA dropout: the checkpointed pass draws the same
//! dropout masks as the plain pass (its unread last layer included), its recomputation replays them,
//! so the LoRA gradients equal the plain backward's and the random stream afterwards is where the
//! plain pass leaves it (else the next step's masks would differ).
//!
//! The adapters draw from a generator of their own (as a trainer's do), which the checkpointed pass
//! saves and sets back around each recomputed layer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::sync::Arc;

use common::Seeded;
use sdxl_model::clip::{Activation, ClipTextConfig, ClipTextModel};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use torch_cuda::rng::Generator;

fn tiny(with_projection: bool) -> (VarStore, ClipTextModel) {
    // A non-exhaustive config: CLIP-L's, every field then set.
    let mut config = ClipTextConfig::clip_l();
    config.vocab_size = 50;
    config.hidden_size = 8;
    config.intermediate_size = 12;
    config.num_hidden_layers = 3;
    config.num_attention_heads = 2;
    config.max_position_embeddings = 6;
    config.hidden_act = Activation::Gelu;
    config.layer_norm_eps = 1e-5;
    config.projection_dim = 5;
    config.eos_token_id = 2;
    let mut vs = VarStore::new(Device::Cpu);
    let model = ClipTextModel::new(&vs.root(), &config, with_projection).unwrap();
    vs.double();
    (vs, model)
}

/// The LoRA gradients of one pass with dropout 0.3, plain or checkpointed, from the same seed, and
/// four draws of the generator after the backward.
fn gradients(
    model: &mut ClipTextModel,
    generator: &Arc<Generator>,
    checkpointed: bool,
    with_projection: bool,
) -> (Vec<Option<Tensor>>, Tensor) {
    let params: Vec<Tensor> = lora::trainable_variables(model).into_values().collect();
    for p in &params {
        if p.grad().defined() {
            let _ = p.grad().zero_();
        }
    }
    let ids = Tensor::from_slice(&[3i64, 7, 49, 1, 1, 1, 4, 49, 2, 2, 2, 2]).view([2, 6]);
    let hidden_weight = Tensor::ones([2, 6, 8], (Kind::Double, Device::Cpu)) * 0.5;
    let pooled_weight = Tensor::ones([2, 5], (Kind::Double, Device::Cpu)) * -0.25;
    generator.manual_seed(5).unwrap();
    if checkpointed {
        let forward = model
            .forward_checkpointed_drawing_from(&ids, with_projection, Some(generator.clone()))
            .unwrap();
        forward
            .backward(&hidden_weight, with_projection.then_some(&pooled_weight))
            .unwrap();
    } else {
        let out = model.forward(&ids).unwrap();
        let penultimate = &out.hidden_states[out.hidden_states.len() - 2];
        let mut loss = (penultimate * &hidden_weight).sum(Kind::Double);
        if with_projection {
            loss += (out.text_embeds.unwrap() * &pooled_weight).sum(Kind::Double);
        }
        loss.backward();
    }
    let after = generator.uniform(&[4], 0.0, 1.0, Kind::Double).unwrap();
    let grads = params
        .iter()
        .map(|p| p.grad().defined().then(|| p.grad().copy()))
        .collect();
    (grads, after)
}

#[test]
fn checkpointed_text_encoder_replays_dropout_and_leaves_the_stream_where_plain_does() {
    for with_projection in [false, true] {
        let (_vs, mut model) = tiny(with_projection);
        let generator = Arc::new(Generator::new(11).unwrap());
        let randomness = Arc::new(Seeded(generator.clone()));
        let adapters = VarStore::new(Device::Cpu);
        let mut config = lora::LoraConfig::text_encoder_attention(2);
        config.dropout = 0.3;
        lora::inject_with(
            &mut model,
            &adapters.root(),
            "default",
            &config,
            &*randomness,
        )
        .unwrap();
        lora::set_training(&mut model, true);
        lora::set_randomness(&mut model, Some(randomness));
        for (_, mut v) in lora::trainable_variables(&mut model) {
            let drawn = generator.randn_on_device(&v.size(), v.kind()).unwrap();
            tch::no_grad(|| v.copy_(&(drawn * 0.3)));
        }
        let (plain, plain_after) = gradients(&mut model, &generator, false, with_projection);
        let (checkpointed, checkpointed_after) =
            gradients(&mut model, &generator, true, with_projection);
        assert!(
            plain_after.equal(&checkpointed_after),
            "the random stream moved differently (with_projection {with_projection})"
        );
        let mut checked = 0;
        for (got, want) in checkpointed.iter().zip(&plain) {
            match (got, want) {
                (Some(got), Some(want)) => {
                    // fp64, the same operations summed in another order: equal to rounding.
                    assert!(
                        got.allclose(want, 1e-10, 1e-12, false),
                        "{got:?} vs {want:?}"
                    );
                    checked += 1;
                }
                (None, None) => {}
                _ => panic!("a gradient reached one pass's layer and not the other's"),
            }
        }
        // Three layers of four adapters (A, B): the last layer's only with the pooled output.
        assert_eq!(checked, if with_projection { 24 } else { 16 });
        // Dropout acted: without it the gradients differ.
        lora::set_training(&mut model, false);
        let (no_dropout, _) = gradients(&mut model, &generator, false, with_projection);
        assert!(no_dropout.iter().zip(&plain).any(
            |(a, b)| matches!((a, b), (Some(a), Some(b)) if !a.allclose(b, 1e-6, 1e-9, false))
        ));
    }
}
