//! UNet loaders against the fixture layouts written by `tools/fixtures/generate.py` (`unet_layouts`)
//! from the same tiny weights: diffusers folder, SGM single file, sharded `.fp16` variant; and our
//! diffusers ↔ SGM table against the names that upstream converters gave the single files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use common::fixture;

use std::collections::{BTreeMap, BTreeSet};

use lora::format::BlockRenames;
use sdxl_model::unet::loading::{UNetWeights, load_unet};
use sdxl_model::unet::{
    SGM_UNET_PREFIX, UNet2DConditionModel, UNetConfig, UNetInputs, sgm_unet_table, to_sgm,
};
use sdxl_model::weights::TensorFile;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn folder(name: &str) -> UNetWeights {
    UNetWeights::Diffusers {
        folder: fixture(name),
        variant: None,
    }
}

fn run(unet: &UNet2DConditionModel, io: &str) -> Tensor {
    let io = TensorFile::open(fixture(io)).unwrap();
    let get = |key: &str| io.tensor(key, Device::Cpu, Some(Kind::Float)).unwrap();
    let (sample, t, ctx, text, ids) = (
        get("sample"),
        get("timesteps"),
        get("encoder_hidden_states"),
        get("text_embeds"),
        get("time_ids"),
    );
    let inputs = UNetInputs {
        sample: &sample,
        timesteps: &t,
        encoder_hidden_states: &ctx,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    tch::no_grad(|| unet.forward(&inputs)).unwrap()
}

/// Rounds every variable to fp16 and back: the fixtures in other layouts hold fp16 weights.
fn round_to_half(vs: &VarStore) {
    tch::no_grad(|| {
        for (_, mut var) in vs.variables() {
            let rounded = var.to_kind(Kind::Half).to_kind(Kind::Float);
            var.copy_(&rounded);
        }
    });
}

fn assert_same_model(a: &VarStore, b: &VarStore) {
    let (va, vb) = (a.variables(), b.variables());
    assert_eq!(va.len(), vb.len());
    for (name, t) in &va {
        assert!(t.equal(&vb[name]), "{name} differs");
    }
}

#[test]
fn single_file_and_diffusers_folder_load_to_identical_outputs() {
    for (config, name, io) in [
        (
            UNetConfig::tiny_sdxl(),
            "tiny-sdxl/unet",
            "tiny-sdxl-unet-io.safetensors",
        ),
        (
            UNetConfig::tiny_b(),
            "unet-tiny-b",
            "unet-tiny-b-io.safetensors",
        ),
    ] {
        let (vs_folder, from_folder) =
            load_unet(&config, &folder(name), Device::Cpu, Kind::Float).unwrap();
        round_to_half(&vs_folder);
        let single = fixture(format!(
            "{}-single-file.safetensors",
            name.replace("/unet", "-unet")
        ));
        let (vs_single, from_single) = load_unet(
            &config,
            &UNetWeights::SingleFile(single),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap();
        assert_same_model(&vs_folder, &vs_single);
        assert!(
            run(&from_folder, io).equal(&run(&from_single, io)),
            "{name}: outputs differ"
        );
    }
}

/// The `sgm_names` metadata of a single-file fixture: each diffusers key and the SGM key that upstream
/// converters gave its tensor (diffusers' SDXL script and ComfyUI's `unet_to_diffusers`, checked by
/// diffusers' `convert_ldm_unet_checkpoint`; see tools/fixtures/README.md, `unet_layouts`).
fn upstream_sgm_names(file: &str) -> BTreeMap<String, String> {
    let path = fixture(file);
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let golden = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("sgm_names"))
        .unwrap_or_else(|| panic!("{} has no `sgm_names` metadata", path.display()));
    let golden: serde_json::Value = serde_json::from_str(golden).unwrap();
    serde_json::from_value(golden["diffusers_to_sgm"].clone()).unwrap()
}

#[test]
fn sgm_table_names_every_key_as_the_upstream_converters_do() {
    for (config, name, file) in [
        (
            UNetConfig::tiny_sdxl(),
            "tiny-sdxl/unet",
            "tiny-sdxl-unet-single-file.safetensors",
        ),
        (
            UNetConfig::tiny_b(),
            "unet-tiny-b",
            "unet-tiny-b-single-file.safetensors",
        ),
    ] {
        let golden = upstream_sgm_names(file);
        let (vs, _) = load_unet(&config, &folder(name), Device::Cpu, Kind::Float).unwrap();
        let variables: BTreeSet<String> = vs.variables().into_keys().collect();
        assert_eq!(
            golden.keys().cloned().collect::<BTreeSet<_>>(),
            variables,
            "{file} names exactly the model's variables"
        );
        let table = sgm_unet_table(&config);
        // The loader renames with `to_sgm`; kohya LoRA files are written with `rename` and read back
        // with `to_diffusers`: the table is used in both directions.
        let renames = BlockRenames::new(table.clone());
        for (diffusers, sgm) in &golden {
            let sgm = sgm.strip_prefix(SGM_UNET_PREFIX).unwrap();
            assert_eq!(
                to_sgm(&table, diffusers).as_deref(),
                Some(sgm),
                "{file}: {diffusers}"
            );
            assert_eq!(
                renames.rename(diffusers).as_deref(),
                Some(sgm),
                "{file}: {diffusers}"
            );
            assert_eq!(
                renames.to_diffusers(sgm).as_deref(),
                Some(diffusers.as_str()),
                "{file}: {sgm}"
            );
        }
    }
}

#[test]
fn sharded_fp16_variant_loads_like_the_folder() {
    let config = UNetConfig::tiny_b();
    let (vs_folder, from_folder) =
        load_unet(&config, &folder("unet-tiny-b"), Device::Cpu, Kind::Float).unwrap();
    round_to_half(&vs_folder);
    let sharded = UNetWeights::Diffusers {
        folder: fixture("unet-tiny-b-sharded"),
        variant: Some("fp16".into()),
    };
    let (vs_sharded, from_sharded) =
        load_unet(&config, &sharded, Device::Cpu, Kind::Float).unwrap();
    assert_same_model(&vs_folder, &vs_sharded);
    assert!(
        run(&from_folder, "unet-tiny-b-io.safetensors")
            .equal(&run(&from_sharded, "unet-tiny-b-io.safetensors"))
    );
    // Loading straight into bf16: every variable is created and kept in bf16.
    let (vs_bf16, _) = load_unet(&config, &sharded, Device::Cpu, Kind::BFloat16).unwrap();
    for (name, var) in vs_bf16.variables() {
        assert_eq!(var.kind(), Kind::BFloat16, "{name}");
        assert!(
            var.equal(&vs_folder.variables()[&name].to_kind(Kind::BFloat16)),
            "{name}"
        );
    }
    // Without the variant the folder has no weights, and says which names it looked for.
    let plain = UNetWeights::Diffusers {
        folder: fixture("unet-tiny-b-sharded"),
        variant: None,
    };
    let msg = load_unet(&config, &plain, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors.index.json"),
        "{msg}"
    );
}

#[test]
fn mismatched_checkpoints_fail_naming_keys() {
    // unet-tiny-b's weights given as the tiny-sdxl UNet.
    let msg = load_unet(
        &UNetConfig::tiny_sdxl(),
        &folder("unet-tiny-b"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap_err()
    .to_string();
    for needle in [
        "unet-tiny-b",
        "missing: `down_blocks.0.resnets.1.conv1.bias`",
        "unused: `down_blocks.0.attentions.0.norm.bias`",
        "mis-shaped: `add_embedding.linear_1.weight` (model [64, 80], file [64, 40])",
    ] {
        assert!(msg.contains(needle), "{needle} not in: {msg}");
    }
    // The same in single-file layout: keys are named with their SGM spelling.
    let single = fixture("unet-tiny-b-single-file.safetensors");
    let msg = load_unet(
        &UNetConfig::tiny_sdxl(),
        &UNetWeights::SingleFile(single),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap_err()
    .to_string();
    for needle in [
        "unet-tiny-b-single-file.safetensors",
        "missing: `model.diffusion_model.input_blocks.",
        "unused: `model.diffusion_model.input_blocks.1.1.",
    ] {
        assert!(msg.contains(needle), "{needle} not in: {msg}");
    }
    assert!(
        !msg.contains("first_stage_model"),
        "non-UNet tensors are not the UNet's unused keys: {msg}"
    );
}
