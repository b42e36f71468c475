//! A whole SDXL model from one SGM single file (fixture `tiny_sdxl_single_file`: the tiny-sdxl folder
//! written by diffusers' own `convert_diffusers_to_original_sdxl.py`): every component equals the
//! folder's, weight for weight; a missing key is an error naming the file and the key; a bf16 or fp16
//! copy loads (each tensor converted to the model's kind) to the folder's values rounded the same way;
//! the `v_pred` / `ztsnr` markers and other keys outside the components are reported.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::fixture;
use sdxl_model::pipeline::Pipeline;
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::prompt::PromptEncoder;
use sdxl_model::single_file::{Markers, SdxlConfigs, SingleFileCheckpoint};
use sdxl_model::unet::UNet2DConditionModel;
use sdxl_model::vae::{AutoencoderKL, Upcast};
use sdxl_model::weights::TensorFile;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn checkpoint(path: &Path) -> SingleFileCheckpoint {
    let configs = SdxlConfigs::from_diffusers_folder(fixture("tiny-sdxl")).unwrap();
    SingleFileCheckpoint::open(path, configs).unwrap()
}

fn folder_unet(kind: Kind) -> VarStore {
    let options = LoadOptions::default().kind(kind);
    UNet2DConditionModel::from_pretrained(fixture("tiny-sdxl"), &options)
        .unwrap()
        .store
}

/// Every variable of `a` equals `b`'s of the same name, after `round` (a cast to a kind and back).
fn assert_same(what: &str, a: &VarStore, b: &VarStore, round: Option<Kind>) {
    let (a, b) = (a.variables(), b.variables());
    assert_eq!(a.len(), b.len(), "{what}");
    for (name, value) in &a {
        let expected = &b[name];
        let expected = match round {
            Some(kind) => expected.to_kind(kind).to_kind(expected.kind()),
            None => expected.shallow_clone(),
        };
        assert_eq!(value.kind(), expected.kind(), "{what} {name}");
        assert!(value.equal(&expected), "{what}: `{name}` differs");
    }
}

/// A copy of the fixture in `dir` with `edit` applied to its tensors.
fn edited_copy(
    dir: &Path,
    name: &str,
    edit: impl Fn(Vec<(String, Tensor)>) -> Vec<(String, Tensor)>,
) -> PathBuf {
    let file = TensorFile::open(fixture("tiny-sdxl-single-file.safetensors")).unwrap();
    let tensors: Vec<(String, Tensor)> = file
        .load_all(Device::Cpu, None)
        .unwrap()
        .into_iter()
        .collect();
    let path = dir.join(name);
    Tensor::write_safetensors(&edit(tensors), &path).unwrap();
    path
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdxl-single-file-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_component_equals_the_diffusers_folder() {
    let single = checkpoint(&fixture("tiny-sdxl-single-file.safetensors"));
    assert_eq!(single.markers().unwrap(), Markers::default());
    assert!(single.other_keys().unwrap().is_empty());
    let (unet_store, _unet) = single.load_unet(Device::Cpu, Kind::Float).unwrap();
    assert_same("unet", &unet_store, &folder_unet(Kind::Float), None);

    let (_, [te1, te2]) = single
        .load_prompt_encoder(Device::Cpu, Kind::Float)
        .unwrap();
    let [folder_te1, folder_te2] =
        PromptEncoder::from_pretrained(fixture("tiny-sdxl"), &LoadOptions::default())
            .unwrap()
            .store;
    assert_same("text_encoder", &te1, &folder_te1, None);
    assert_same("text_encoder_2", &te2, &folder_te2, None);
    // In bf16 (built in bf16, each tensor converted on its own): the folder's encoders cast to bf16.
    let (_, [te1, te2]) = single
        .load_prompt_encoder(Device::Cpu, Kind::BFloat16)
        .unwrap();
    let bf16 = LoadOptions::default().kind(Kind::BFloat16);
    let [folder_te1, folder_te2] = PromptEncoder::from_pretrained(fixture("tiny-sdxl"), &bf16)
        .unwrap()
        .store;
    assert_same("text_encoder bf16", &te1, &folder_te1, None);
    assert_same("text_encoder_2 bf16", &te2, &folder_te2, None);

    let (_, vae) = single
        .load_vae(Device::Cpu, Kind::Float, Upcast::Never)
        .unwrap();
    let never = LoadOptions::default().vae_upcast(Upcast::Never);
    let folder_vae = AutoencoderKL::from_pretrained(fixture("tiny-sdxl").join("vae"), &never)
        .unwrap()
        .store;
    assert_same("vae", &vae, &folder_vae, None);

    // The whole pipeline loads from the file too, with the config folder's scheduler (SDXL's here).
    let pipeline = Pipeline::from_pretrained(
        single.path(),
        &never.clone().single_file_config(fixture("tiny-sdxl")),
    )
    .unwrap();
    assert_eq!(pipeline.model.scheduler_config, single.configs().scheduler);
    assert_eq!(
        pipeline.report.loaded,
        pipeline
            .store
            .iter()
            .map(|s| s.variables().len())
            .sum::<usize>()
    );
    let [.., pipeline_vae] = &pipeline.store;
    assert_same("pipeline vae", pipeline_vae, &folder_vae, None);
}

#[test]
fn a_missing_key_is_named_with_the_file() {
    let dir = scratch("missing");
    let removed = "model.diffusion_model.out.2.bias";
    let path = edited_copy(&dir, "missing.safetensors", |mut tensors| {
        tensors.retain(|(k, _)| k != removed);
        tensors
    });
    let single = checkpoint(&path);
    let error = single
        .load_unet(Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("missing.safetensors") && error.contains(removed),
        "{error}"
    );
    // A stray key under a component's prefix is named too (a checkpoint of another shape).
    let stray = "first_stage_model.decoder.up.9.block.0.conv1.bias";
    let path = edited_copy(&dir, "stray.safetensors", |mut tensors| {
        tensors.push((stray.into(), Tensor::zeros([4], (Kind::Float, Device::Cpu))));
        tensors
    });
    let error = checkpoint(&path)
        .load_vae(Device::Cpu, Kind::Float, Upcast::Never)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("stray.safetensors") && error.contains(stray),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn half_precision_files_load_to_the_rounded_folder_weights() {
    let dir = scratch("half");
    for (kind, name) in [(Kind::BFloat16, "bf16"), (Kind::Half, "fp16")] {
        let path = edited_copy(&dir, &format!("{name}.safetensors"), |tensors| {
            tensors
                .into_iter()
                .map(|(k, t)| (k, t.to_kind(kind)))
                .collect()
        });
        let single = checkpoint(&path);
        // Loaded into fp32: the file's values exactly, i.e. the folder's rounded to the file's kind.
        let (store, _) = single.load_unet(Device::Cpu, Kind::Float).unwrap();
        assert_same(name, &store, &folder_unet(Kind::Float), Some(kind));
        // Loaded into bf16 (the training kind under mixed precision): each tensor converted on its own.
        let (store, _) = single.load_unet(Device::Cpu, Kind::BFloat16).unwrap();
        let expected = folder_unet(Kind::Float);
        for (key, value) in store.variables() {
            assert_eq!(value.kind(), Kind::BFloat16);
            let want = expected.variables()[&key]
                .to_kind(kind)
                .to_kind(Kind::BFloat16);
            assert!(value.equal(&want), "{name} → bf16: `{key}` differs");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn v_prediction_markers_and_other_keys_are_reported() {
    let dir = scratch("markers");
    let path = edited_copy(&dir, "vpred.safetensors", |mut tensors| {
        for key in ["v_pred", "ztsnr"] {
            tensors.push((key.into(), Tensor::zeros([0], (Kind::Float, Device::Cpu))));
        }
        tensors.push((
            "model_ema.decay".into(),
            Tensor::from(0.9999f32).reshape([1]),
        ));
        tensors
    });
    let single = checkpoint(&path);
    let markers = single.markers().unwrap();
    assert!(markers.v_pred && markers.ztsnr, "{markers:?}");
    assert_eq!(
        single.other_keys().unwrap(),
        ["model_ema.decay", "v_pred", "ztsnr"]
    );
    // The components load: the markers belong to none of them.
    single.load_unet(Device::Cpu, Kind::Float).unwrap();
    let counts = single.component_keys().unwrap();
    assert!(counts.iter().all(|(_, n)| *n > 0), "{counts:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
