//! The acceptance harness of the LoRA files ComfyUI and A1111 load (issue 17), on the tiny SDXL
//! models. The fixtures (`gen_comfyui_lora` in tools/fixtures/lora_files.py) hold, for every file
//! variant the trainer writes, adapters made by peft with seeded random weights in two layouts:
//!
//! - `comfyui-<variant>-peft.safetensors`: peft's layout with its `LoraConfig` (the adapters);
//! - `comfyui-<variant>-kohya.safetensors`: the kohya layout kohya's SDXL trainer writes (diffusers'
//!   `convert_state_dict_to_kohya` names, UNet blocks renamed to SGM by ComfyUI's own table), which
//!   ComfyUI's own loader (`comfy/lora.py` `model_lora_keys_unet` / `model_lora_keys_clip` /
//!   `load_lora`, run from its pinned source on stand-ins named as ComfyUI names SDXL's UNet and
//!   CLIP) loads with 0 keys left unloaded, and whose weights ComfyUI computes as peft merges them
//!   (but DoRA's: see docs/FORMATS.md);
//! - `comfyui-<variant>-io.safetensors`: diffusers' UNet and text-encoder outputs after
//!   `pipe.load_lora_weights(kohya file)` (DoRA: the peft file, since diffusers drops kohya's
//!   `dora_scale`), checked against peft's in-place outputs, and ComfyUI's counts.
//!
//! Here: (a) our reader and our application of each reference file give diffusers' outputs, and
//! (b) our kohya writer, given the adapters of the peft file, writes exactly the reference kohya
//! file — every key, shape and value — so ComfyUI loads all of ours too.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::collections::BTreeMap;

use common::tiny_lora::{Models, bound};
use common::{fixture, max_rel_error};
use lora::format::{self, BlockRenames, Format, ModuleNames, ReadOptions, WriteOptions};
use sdxl_model::unet::{UNetConfig, sgm_unet_table};
use tch::Tensor;
use test_support::check;

/// (variant, whether diffusers' golden came from the kohya file rather than the peft one).
const VARIANTS: [(&str, bool); 5] = [
    ("attention", true),
    ("kohya_default", true),
    ("text_encoders", true),
    ("dora", false),
    ("locon", true),
];

fn renames() -> BlockRenames {
    BlockRenames::new(sgm_unet_table(&UNetConfig::tiny_sdxl()))
}

fn read(file: &str, names: &ModuleNames, renames: &BlockRenames) -> format::LoraFile {
    format::read(
        fixture(format!("lora/{file}.safetensors")),
        ReadOptions::default()
            .with_module_names(Some(names))
            .with_block_renames(Some(renames)),
    )
    .unwrap()
}

fn tensors(path: &std::path::Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// What the generator recorded of ComfyUI's loader for `variant`.
fn comfyui_check(variant: &str) -> serde_json::Value {
    let path = fixture(format!("lora/comfyui-{variant}-io.safetensors"));
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&header.metadata().as_ref().unwrap()["check"]).unwrap()
}

#[test]
fn every_reference_file_gives_diffusers_outputs_through_our_reader() {
    let names = Models::load().module_names();
    let renames = renames();
    for (variant, from_kohya) in VARIANTS {
        let check_record = comfyui_check(variant);
        assert_eq!(check_record["unloaded_keys"], 0, "{variant}");
        let layout = if from_kohya { "kohya" } else { "peft" };
        let file = read(&format!("comfyui-{variant}-{layout}"), &names, &renames);
        let mut models = Models::load();
        let base = models.outputs();
        models.apply(&file.state);
        let golden = tensors(&fixture(format!("lora/comfyui-{variant}-io.safetensors")));
        let mut changed = 0;
        for (key, actual) in models.outputs() {
            check(
                &format!("{variant} ({layout} file): {key} vs diffusers"),
                max_rel_error(&actual, &golden[key]),
                bound(&models, key),
            );
            changed += usize::from(max_rel_error(&base[key], &golden[key]) > 1e-3);
        }
        assert!(changed > 0, "{variant}: the LoRA changes no output");
    }
}

#[test]
fn our_kohya_writer_writes_each_reference_file_key_for_key() {
    let names = Models::load().module_names();
    let renames = renames();
    for (variant, _) in VARIANTS {
        let adapters = read(&format!("comfyui-{variant}-peft"), &names, &renames);
        assert_eq!(adapters.format, Format::Peft);
        let path = std::env::temp_dir().join(format!(
            "comfyui-{variant}-{}.safetensors",
            std::process::id()
        ));
        let options = WriteOptions::default().with_block_renames(Some(&renames));
        format::write(&path, &adapters.state, Format::Kohya, &options).unwrap();
        let ours = tensors(&path);
        std::fs::remove_file(&path).unwrap();
        let reference = tensors(&fixture(format!(
            "lora/comfyui-{variant}-kohya.safetensors"
        )));
        let missing: Vec<&String> = reference
            .keys()
            .filter(|k| !ours.contains_key(*k))
            .collect();
        let extra: Vec<&String> = ours
            .keys()
            .filter(|k| !reference.contains_key(*k))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{variant}: keys we do not write {missing:?}, keys ComfyUI would leave unloaded {extra:?}"
        );
        assert_eq!(
            reference.len(),
            comfyui_check(variant)["kohya_keys"].as_u64().unwrap() as usize
        );
        for (key, expected) in &reference {
            let actual = &ours[key];
            assert_eq!(actual.size(), expected.size(), "{variant}: {key} shape");
            assert_eq!(actual.kind(), expected.kind(), "{variant}: {key} type");
            assert!(actual.equal(expected), "{variant}: {key} values");
        }
    }
}
