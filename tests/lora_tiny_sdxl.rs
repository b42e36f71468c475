//! A LoRA written by diffusers (`save_lora_weights`, as `train_dreambooth_lora_sdxl.py` saves it) and
//! diffusers' kohya export of it load into our tiny SDXL UNet and text encoders and give diffusers'
//! outputs after `load_lora_weights` (fixtures: `gen_lora_tiny_sdxl` in tools/fixtures/generate.py).
//! Our own kohya file with SGM block names, made with sdxl-model's diffusers↔SGM table, loads back
//! to the same outputs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::collections::BTreeMap;

use common::tiny_lora::{Models, bound};
use common::{fixture, max_rel_error};
use lora::Component;
use lora::format::{self, BlockRenames, Format, ReadOptions, WriteOptions};
use sdxl_model::unet::{UNetConfig, sgm_unet_table};
use tch::{Device, Tensor};
use test_support::check;

fn golden() -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(fixture("lora/tiny-sdxl-lora-io.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_matches_diffusers(models: &Models, what: &str) {
    let golden = golden();
    for (key, actual) in models.outputs() {
        check(
            &format!("{what}: {key} vs diffusers"),
            max_rel_error(&actual, &golden[key]),
            bound(models, key),
        );
    }
}

#[test]
fn diffusers_and_kohya_files_give_diffusers_outputs_on_the_tiny_pipeline() {
    let mut models = Models::load();
    let names = models.module_names();
    let base = models.outputs();
    for (file, format) in [
        ("tiny-sdxl-diffusers", Format::Diffusers),
        ("tiny-sdxl-kohya-by-diffusers", Format::Kohya),
    ] {
        let mut models = Models::load();
        let read = format::read(
            fixture(format!("lora/{file}.safetensors")),
            ReadOptions::default()
                .with_module_names(Some(&names))
                .with_block_renames(None),
        )
        .unwrap();
        assert_eq!(read.format, format);
        models.apply(&read.state);
        assert_matches_diffusers(&models, file);
    }
    // The LoRA matters: the base outputs are far from diffusers' LoRA outputs.
    assert!(max_rel_error(&base["unet"], &golden()["unet"]) > 1e-3);
}

#[test]
fn our_sgm_named_kohya_file_loads_back_to_the_same_outputs() {
    let mut models = Models::load();
    let names = models.module_names();
    let renames = BlockRenames::new(sgm_unet_table(&UNetConfig::tiny_sdxl()));
    let state = format::read(
        fixture("lora/tiny-sdxl-diffusers.safetensors"),
        ReadOptions::default(),
    )
    .unwrap()
    .state;
    let path = std::env::temp_dir().join(format!(
        "tiny-sdxl-sgm-kohya-{}.safetensors",
        std::process::id()
    ));
    format::write(
        &path,
        &state,
        Format::Kohya,
        &WriteOptions::default().with_block_renames(Some(&renames)),
    )
    .unwrap();
    let keys: Vec<String> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        keys.iter()
            .any(|k| k.starts_with("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.")),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.starts_with("lora_unet_middle_block_1_")),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.starts_with("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.")),
        "{keys:?}"
    );
    let back = format::read(
        &path,
        ReadOptions::default()
            .with_module_names(Some(&names))
            .with_block_renames(Some(&renames)),
    )
    .unwrap();
    std::fs::remove_file(&path).unwrap();
    models.apply(&back.state);
    assert_matches_diffusers(&models, "our SGM kohya file");
}

#[test]
fn default_targets_inject_into_the_unet_and_both_text_encoders_like_diffusers_scripts() {
    let mut models = Models::load();
    let names = models.module_names();
    let base = models.outputs();
    // The modules diffusers' script adapted, on our models' paths.
    let file = format::read(
        fixture("lora/tiny-sdxl-diffusers.safetensors"),
        ReadOptions::default()
            .with_module_names(Some(&names))
            .with_block_renames(None),
    )
    .unwrap();
    let adapters = tch::nn::VarStore::new(Device::Cpu);
    let mut total = 0;
    for (component, model) in models.each() {
        let config = match component {
            Component::Unet => lora::LoraConfig::unet_attention(4),
            _ => lora::LoraConfig::text_encoder_attention(4),
        };
        let root = adapters.root() / component.diffusers_prefix();
        let report = lora::inject(model, &root, "default", &config).unwrap();
        let ours: Vec<&str> = report
            .adapted
            .iter()
            .map(|(path, _, _)| path.as_str())
            .collect();
        let theirs: Vec<&str> = file
            .state
            .component(component)
            .map(|(path, _)| path)
            .collect();
        let mut ours_sorted = ours.clone();
        ours_sorted.sort_unstable();
        assert_eq!(
            ours_sorted, theirs,
            "{component}: adapted modules differ from diffusers' script"
        );
        assert!(report.unmatched_targets.is_empty());
        let trainable = lora::trainable_variables(model);
        assert_eq!(trainable.len(), 2 * ours.len());
        assert!(trainable.values().all(Tensor::requires_grad));
        model.for_each_linear(&mut |path, linear| {
            assert!(!linear.weight().requires_grad(), "{path} not frozen")
        });
        total += ours.len();
    }
    assert_eq!(adapters.trainable_variables().len(), 2 * total);
    // B starts at zero: the adapted pipeline computes the base pipeline.
    for (key, value) in models.outputs() {
        assert!(
            max_rel_error(&value, &base[key]) == 0.0,
            "{key} changed at injection"
        );
    }
}
