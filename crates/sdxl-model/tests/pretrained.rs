//! One way to load each model (`from_pretrained(name, &LoadOptions)` returning the load report) and
//! the pipeline's component check when it is built, on the tiny SDXL fixtures. Loading by hub id is
//! tested against a stand-in hub in `crates/trainer/tests/hub_model.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use common::fixture;

use sdxl_model::Error;
use sdxl_model::clip::{ClipTextConfig, ClipTextModel};
use sdxl_model::pipeline::Pipeline;
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::prompt::PromptEncoder;
use sdxl_model::schedulers::SchedulerConfig;
use sdxl_model::unet::loading::{UNetWeights, load_unet};
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig};
use sdxl_model::vae::{AutoencoderKL, AutoencoderKLConfig, Upcast};
use tch::nn::VarStore;
use tch::{Device, Kind};

fn assert_same_variables(a: &VarStore, b: &VarStore) {
    let (va, vb) = (a.variables(), b.variables());
    assert_eq!(va.len(), vb.len());
    for (name, tensor) in &va {
        assert!(tensor.equal(&vb[name]), "{name} differs");
    }
}

#[test]
fn unet_loads_from_its_folder_the_model_folder_and_a_single_file() {
    let tiny = fixture("tiny-sdxl");
    let config = UNetConfig::from_file(tiny.join("unet/config.json")).unwrap();
    let weights = UNetWeights::Diffusers {
        folder: tiny.join("unet"),
        variant: None,
    };
    let (reference, _) = load_unet(&config, &weights, Device::Cpu, Kind::Float).unwrap();
    let options = LoadOptions::default();
    for path in [tiny.join("unet"), tiny.clone()] {
        let loaded = UNet2DConditionModel::from_pretrained(&path, &options).unwrap();
        assert_same_variables(&loaded.store, &reference);
        assert_eq!(loaded.report.loaded, reference.variables().len());
        assert!(loaded.report.is_complete(), "{}", loaded.report);
        assert_eq!(loaded.model.config(), &config);
    }

    let single = fixture("tiny-sdxl-unet-single-file.safetensors");
    let (from_single, _) = load_unet(
        &config,
        &UNetWeights::SingleFile(single.clone()),
        Device::Cpu,
        Kind::BFloat16,
    )
    .unwrap();
    let options = LoadOptions::default()
        .kind(Kind::BFloat16)
        .single_file_config(&tiny);
    let loaded = UNet2DConditionModel::from_pretrained(&single, &options).unwrap();
    assert_same_variables(&loaded.store, &from_single);
    assert!(
        loaded
            .store
            .variables()
            .values()
            .all(|t| t.kind() == Kind::BFloat16)
    );
}

#[test]
fn unet_paths_that_are_no_model_are_named() {
    let empty = std::env::temp_dir().join(format!("unet-pretrained-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let msg = UNet2DConditionModel::from_pretrained(&empty, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unet-pretrained") && msg.contains("unet/config.json"),
        "{msg}"
    );
    std::fs::remove_dir_all(&empty).unwrap();
    // A variant the folder lacks names the file it looked for.
    let options = LoadOptions::default().variant("fp16");
    let msg = UNet2DConditionModel::from_pretrained(fixture("tiny-sdxl"), &options)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("diffusion_pytorch_model.fp16.safetensors"),
        "{msg}"
    );
}

/// The tiny pipeline's parts, with `edit_1`/`edit_2`/`edit_vae` applied to the configs of freshly
/// built (randomly initialised) text encoders and VAE: the check reads configs, not weights.
fn build(
    edit_1: impl FnOnce(&mut ClipTextConfig),
    edit_2: impl FnOnce(&mut ClipTextConfig),
    edit_vae: impl FnOnce(&mut AutoencoderKLConfig),
) -> Result<Pipeline, Error> {
    let tiny = fixture("tiny-sdxl");
    let store = VarStore::new(Device::Cpu);
    let mut config_1 = ClipTextConfig::from_file(tiny.join("text_encoder/config.json")).unwrap();
    let mut config_2 = ClipTextConfig::from_file(tiny.join("text_encoder_2/config.json")).unwrap();
    let mut vae_config = AutoencoderKLConfig::from_file(tiny.join("vae/config.json")).unwrap();
    edit_1(&mut config_1);
    edit_2(&mut config_2);
    edit_vae(&mut vae_config);
    let text_encoder = ClipTextModel::new(&(store.root() / "te1"), &config_1, false).unwrap();
    let text_encoder_2 = ClipTextModel::new(&(store.root() / "te2"), &config_2, true).unwrap();
    let vae = AutoencoderKL::new(&(store.root() / "vae"), &vae_config).unwrap();
    let unet = UNet2DConditionModel::from_pretrained(&tiny, &LoadOptions::default())
        .unwrap()
        .model;
    Pipeline::new(
        PromptEncoder::new(text_encoder, text_encoder_2).unwrap(),
        unet,
        vae,
        SchedulerConfig::sdxl(),
        Device::Cpu,
        Kind::Float,
    )
}

fn refusal(result: Result<Pipeline, Error>) -> String {
    match result {
        Err(e @ Error::Incompatible { .. }) => e.to_string(),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a mismatched pipeline was built"),
    }
}

#[test]
fn mismatched_components_are_refused_when_the_pipeline_is_built() {
    build(|_| {}, |_| {}, |_| {}).expect("the tiny pipeline's own parts fit");
    assert!(
        Pipeline::from_pretrained(
            fixture("tiny-sdxl"),
            &LoadOptions::default().vae_upcast(Upcast::Never)
        )
        .is_ok()
    );

    let msg = refusal(build(|c| c.hidden_size = 8, |_| {}, |_| {}));
    assert!(
        msg.contains("cross_attention_dim") && msg.contains("expected 32, got 8 + 16 = 24"),
        "{msg}"
    );
    let msg = refusal(build(|_| {}, |c| c.projection_dim = 24, |_| {}));
    assert!(
        msg.contains("projection_class_embeddings_input_dim")
            && msg.contains("expected 80, got 24 + 6 × 8 = 72"),
        "{msg}"
    );
    let msg = refusal(build(|_| {}, |_| {}, |c| c.latent_channels = 8));
    assert!(
        msg.contains("unet `in_channels` vs vae `latent_channels`")
            && msg.contains("expected 4, got 8"),
        "{msg}"
    );
}

#[test]
fn every_model_loads_with_its_report() {
    let tiny = fixture("tiny-sdxl");
    let options = LoadOptions::default();
    let vae = AutoencoderKL::from_pretrained(&tiny, &options).unwrap();
    assert!(vae.report.is_complete(), "{}", vae.report);
    assert_eq!(vae.report.loaded, vae.store.variables().len());
    // The VAE's own folder, and the model folder with the subfolder named, load the same weights.
    let own = AutoencoderKL::from_pretrained(tiny.join("vae"), &options).unwrap();
    assert_same_variables(&own.store, &vae.store);

    let text_encoder_2 =
        ClipTextModel::from_pretrained(&tiny, &options.clone().subfolder("text_encoder_2"))
            .unwrap();
    assert!(text_encoder_2.model.has_projection());
    assert_eq!(
        text_encoder_2.report.loaded,
        text_encoder_2.store.variables().len()
    );
    // Two encoders in one SDXL folder: the subfolder must be named.
    let msg = ClipTextModel::from_pretrained(&tiny, &options)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("subfolder"), "{msg}");

    let prompt = PromptEncoder::from_pretrained(&tiny, &options).unwrap();
    let [_, store_2] = &prompt.store;
    assert_same_variables(store_2, &text_encoder_2.store);
    assert!(
        prompt
            .report
            .missing
            .iter()
            .chain(&prompt.report.unused)
            .all(|k| k.starts_with("text_encoder")),
        "{}",
        prompt.report
    );

    let pipeline = Pipeline::from_pretrained(&tiny, &options).unwrap();
    let stores: usize = pipeline.store.iter().map(|s| s.variables().len()).sum();
    assert_eq!(pipeline.report.loaded, stores);
    assert!(pipeline.report.is_complete(), "{}", pipeline.report);
    let [_, _, unet_store, vae_store] = &pipeline.store;
    assert_same_variables(vae_store, &vae.store);
    let unet = UNet2DConditionModel::from_pretrained(&tiny, &options).unwrap();
    assert_same_variables(unet_store, &unet.store);
}

#[test]
fn a_local_path_that_does_not_exist_is_no_such_folder() {
    let missing = std::env::temp_dir()
        .join(format!("sdxl-no-such-model-{}", std::process::id()))
        .join("stable-diffusion-xl-base-1.0");
    let expected = format!("no such folder: {}", missing.display());
    let options = LoadOptions::default();
    let errors = [
        UNet2DConditionModel::from_pretrained(&missing, &options).map(|_| ()),
        AutoencoderKL::from_pretrained(&missing, &options).map(|_| ()),
        ClipTextModel::from_pretrained(&missing, &options).map(|_| ()),
        PromptEncoder::from_pretrained(&missing, &options).map(|_| ()),
        Pipeline::from_pretrained(&missing, &options).map(|_| ()),
        Pipeline::from_pretrained("./relative/model", &options).map(|_| ()),
        // The configs of a single file, named by a path that does not exist.
        UNet2DConditionModel::from_pretrained(
            fixture("tiny-sdxl-unet-single-file.safetensors"),
            &options.clone().single_file_config(&missing),
        )
        .map(|_| ()),
    ];
    for (i, result) in errors.into_iter().enumerate() {
        match result {
            Err(error @ Error::NoSuchFolder { .. }) => {
                let message = error.to_string();
                assert!(
                    message == expected || (i == 5 && message.contains("./relative/model")),
                    "{i}: {message}"
                );
            }
            Err(other) => panic!("{i}: another error: {other}"),
            Ok(()) => panic!("{i}: loaded from a path that does not exist"),
        }
    }
}
