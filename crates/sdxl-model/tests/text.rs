//! Tokenizers, text encoders and prompt encoding against open_clip / transformers / diffusers
//! golden outputs on the tiny fixtures (fp32, CPU).

// Helpers outside #[test] functions unwrap too: a fixture that fails to load should fail the test.
#![allow(clippy::unwrap_used)]

mod common;

use common::depth::{clip_depth, text_encoders_depth};
use common::{fixture, get, golden, rel};
use std::collections::HashMap;
use test_support::{check, f32_bound};

use lora::HasLinears;
use sdxl_model::Error;
use sdxl_model::clip::single_file::{load_clip_l, load_open_clip_big_g};
use sdxl_model::clip::{ClipTextConfig, ClipTextModel};
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::prompt::{PromptEncoder, add_time_ids, add_time_ids_tensor};
use sdxl_model::tokenizer::ClipTokenizer;
use tch::{Device, Kind, Tensor};

fn metadata(name: &str) -> HashMap<String, String> {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

fn strings(meta: &HashMap<String, String>, key: &str) -> Vec<String> {
    serde_json::from_str(&meta[key]).unwrap()
}

fn encoder(name: &str) -> ClipTextModel {
    ClipTextModel::from_pretrained(
        fixture(format!("tiny-sdxl/{name}")),
        &LoadOptions::default(),
    )
    .unwrap()
    .model
}

#[test]
fn clip_l_matches_transformers() {
    let io = golden("tiny-sdxl-text-encoder-io.safetensors");
    let model = encoder("text_encoder");
    assert!(!model.has_projection());
    let out = tch::no_grad(|| model.forward(&get(&io, "input_ids"))).unwrap();
    let errors = [
        rel(
            &out.hidden_states[out.hidden_states.len() - 2],
            &get(&io, "penultimate"),
        ),
        rel(&out.last_hidden_state, &get(&io, "last")),
        rel(&out.pooled, &get(&io, "pooled")),
    ];
    // float32 roundings through the encoder's layers (docs/NUMERICS.md).
    let bound = f32_bound(clip_depth(model.config(), 77));
    for (what, error) in ["penultimate", "last", "pooled"].iter().zip(errors) {
        check(&format!("CLIP-L {what} vs transformers"), error, bound);
    }
}

#[test]
fn big_g_matches_transformers() {
    let io = golden("tiny-sdxl-text-encoder-2-io.safetensors");
    let model = encoder("text_encoder_2");
    let out = tch::no_grad(|| model.forward(&get(&io, "input_ids"))).unwrap();
    let errors = [
        rel(
            &out.hidden_states[out.hidden_states.len() - 2],
            &get(&io, "penultimate"),
        ),
        rel(&out.last_hidden_state, &get(&io, "last")),
        rel(out.text_embeds.as_ref().unwrap(), &get(&io, "text_embeds")),
    ];
    let bound = f32_bound(clip_depth(model.config(), 77));
    for (what, error) in ["penultimate", "last", "projected pooled"]
        .iter()
        .zip(errors)
    {
        check(&format!("bigG {what} vs transformers"), error, bound);
    }
}

#[test]
fn single_file_layout_gives_the_same_outputs() {
    let file = golden("tiny-sdxl-text-encoders-single-file.safetensors");
    let root = fixture("tiny-sdxl");
    let config_1 = ClipTextConfig::from_file(root.join("text_encoder/config.json")).unwrap();
    let config_2 = ClipTextConfig::from_file(root.join("text_encoder_2/config.json")).unwrap();
    let (single_1, _vs1) = load_clip_l(&file, &config_1, Device::Cpu, Kind::Float).unwrap();
    let (single_2, _vs2) =
        load_open_clip_big_g(&file, &config_2, Device::Cpu, Kind::Float).unwrap();
    let ids = get(
        &golden("tiny-sdxl-text-encoder-2-io.safetensors"),
        "input_ids",
    );
    let (from_file, _stores) =
        PromptEncoder::from_single_file(&file, [&config_1, &config_2], Device::Cpu, Kind::Float)
            .unwrap();
    let from_folders = PromptEncoder::from_pretrained(&root, &LoadOptions::default())
        .unwrap()
        .model;
    tch::no_grad(|| {
        let (a, b) = (
            from_folders.encode(&["a red fox"], None, None).unwrap(),
            from_file.encode(&["a red fox"], None, None).unwrap(),
        );
        assert!(a.context.equal(&b.context) && a.pooled.equal(&b.pooled));
    });
    tch::no_grad(|| {
        let (a, b) = (
            encoder("text_encoder").forward(&ids).unwrap(),
            single_1.forward(&ids).unwrap(),
        );
        assert!(a.last_hidden_state.equal(&b.last_hidden_state) && a.pooled.equal(&b.pooled));
        let (a, b) = (
            encoder("text_encoder_2").forward(&ids).unwrap(),
            single_2.forward(&ids).unwrap(),
        );
        assert!(a.last_hidden_state.equal(&b.last_hidden_state));
        assert!(a.text_embeds.unwrap().equal(&b.text_embeds.unwrap()));
    });

    // The wrong config names the mis-shaped open_clip key.
    let err = load_open_clip_big_g(&file, &config_1, Device::Cpu, Kind::Float)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Load { .. })
            && msg
                .contains("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"),
        "{msg}"
    );
}

#[test]
fn tokenizers_match_open_clip_and_transformers() {
    let file = golden("clip-tokenizer-ids.safetensors");
    let prompts = strings(&metadata("clip-tokenizer-ids.safetensors"), "prompts");
    let open_clip = get(&file, "open_clip_ids");
    let transformers = get(&file, "transformers_ids");
    let first = ClipTokenizer::sdxl_first().unwrap();
    let second = ClipTokenizer::sdxl_second().unwrap();
    let (mut same_as_transformers, mut same_as_open_clip, mut references_differ) =
        (0, 0, Vec::new());
    for (i, prompt) in prompts.iter().enumerate() {
        let row = |t: &Tensor| Vec::<i64>::try_from(t.get(i as i64)).unwrap();
        let ours_1: Vec<i64> = first
            .encode(prompt)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        let ours_2: Vec<i64> = second
            .encode(prompt)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(
            ours_1,
            row(&transformers),
            "transformers' CLIPTokenizer on {prompt:?}"
        );
        same_as_transformers += 1;
        // Where open_clip's ftfy clean-up changes the text, the two references disagree with each
        // other; everywhere else the second tokenizer must equal open_clip id for id, padding included.
        let ends = |ids: &[i64]| {
            ids.iter()
                .position(|&id| id == 49407)
                .map(|p| ids[..=p].to_vec())
        };
        if ends(&row(&open_clip)) == ends(&row(&transformers)) {
            assert_eq!(ours_2, row(&open_clip), "open_clip on {prompt:?}");
            same_as_open_clip += 1;
        } else {
            references_differ.push(prompt.clone());
        }
    }
    println!(
        "{same_as_transformers} prompts equal to transformers, {same_as_open_clip} to open_clip; references differ on {references_differ:?}"
    );
    assert!(same_as_transformers >= 30 && same_as_open_clip >= 30);
    assert!(references_differ.len() <= 4, "{references_differ:?}");
}

#[test]
fn encode_prompt_matches_diffusers() {
    let io = golden("tiny-sdxl-encode-prompt-io.safetensors");
    let inputs: serde_json::Value =
        serde_json::from_str(&metadata("tiny-sdxl-encode-prompt-io.safetensors")["inputs"])
            .unwrap();
    let list = |key: &str| -> Vec<String> { serde_json::from_value(inputs[key].clone()).unwrap() };
    let (prompts, negatives) = (list("prompts"), list("negative_prompts"));
    let encoder = PromptEncoder::from_pretrained(fixture("tiny-sdxl"), &LoadOptions::default())
        .unwrap()
        .model;
    tch::no_grad(|| {
        let (positive, zero) = encoder.encode_with_negative(&prompts, None).unwrap();
        let (_, negative) = encoder
            .encode_with_negative(&prompts, Some(&negatives))
            .unwrap();
        let skipped = encoder.encode(&prompts, None, Some(1)).unwrap();
        let errors = [
            rel(&positive.context, &get(&io, "prompt_embeds")),
            rel(&positive.pooled, &get(&io, "pooled_prompt_embeds")),
            rel(&negative.context, &get(&io, "negative_embeds")),
            rel(&negative.pooled, &get(&io, "negative_pooled")),
            rel(&skipped.context, &get(&io, "clip_skip_1_embeds")),
        ];
        // The deeper of the two encoders bounds both halves of the context.
        let root = fixture("tiny-sdxl");
        let bound = f32_bound(text_encoders_depth(&root, 77));
        let names = [
            "context",
            "pooled",
            "negative context",
            "negative pooled",
            "clip_skip 1 context",
        ];
        for (what, error) in names.iter().zip(errors) {
            check(&format!("encode_prompt {what} vs diffusers"), error, bound);
        }
        assert!(zero.context.equal(&get(&io, "negative_zero_embeds")));
        assert!(zero.pooled.equal(&get(&io, "negative_zero_pooled")));
        assert_eq!(positive.context.size(), [3, 77, 32]);
        assert!(matches!(
            encoder.encode(&prompts, None, Some(9)),
            Err(Error::InvalidSetting {
                setting: "clip_skip",
                ..
            })
        ));
        assert!(matches!(
            encoder.encode_with_negative(&prompts, Some(&negatives[..1])),
            Err(Error::Shape { .. })
        ));
    });
    let time_ids = add_time_ids_tensor(
        &[add_time_ids((768, 1024), (16, 32), (1024, 1024))],
        Kind::Float,
        Device::Cpu,
    );
    assert!(time_ids.equal(&get(&io, "time_ids")));
}

#[test]
fn linear_layers_are_visible_by_transformers_path() {
    let mut model = encoder("text_encoder_2");
    let mut paths = Vec::new();
    model.for_each_linear(&mut |path, linear| {
        paths.push((path.to_owned(), linear.in_features(), linear.out_features()))
    });
    assert_eq!(paths.len(), 4 * 6 + 1);
    assert_eq!(
        paths[0],
        (
            "text_model.encoder.layers.0.self_attn.q_proj".to_owned(),
            16,
            16
        )
    );
    assert_eq!(
        paths[5],
        ("text_model.encoder.layers.0.mlp.fc2".to_owned(), 40, 16)
    );
    assert_eq!(paths[24], ("text_projection".to_owned(), 16, 32));
}

#[test]
fn bad_ids_are_an_error() {
    let model = encoder("text_encoder");
    let too_long = Tensor::zeros([1, 78], (Kind::Int64, Device::Cpu));
    let msg = model.forward(&too_long).err().unwrap().to_string();
    assert!(msg.contains("input_ids") && msg.contains("78"), "{msg}");
    assert!(
        model
            .forward(&Tensor::zeros([1, 5], (Kind::Float, Device::Cpu)))
            .is_err()
    );
    let out_of_vocabulary = Tensor::from_slice(&[49406i64, 49408, 49407]).view([1, 3]);
    assert!(matches!(
        model.forward(&out_of_vocabulary),
        Err(Error::Torch(_))
    ));
}
