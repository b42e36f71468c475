//! Files the reader must refuse, naming every key it cannot place.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::mirror;
use lora::format::{self, ModuleNames, ReadOptions};
use lora::{Component, Error, LoraState, ModuleLora, Scaling};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

/// A file written for one test, in a folder of its own that is removed when the test drops it.
struct Written {
    dir: PathBuf,
    path: PathBuf,
}

impl AsRef<Path> for Written {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(name: &str, tensors: &[(&str, Tensor)]) -> Written {
    let dir = std::env::temp_dir().join(format!("lora-bad-files-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    Tensor::write_safetensors(tensors, &path).unwrap();
    Written { dir, path }
}

fn zeros(shape: &[i64]) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, Device::Cpu))
}

#[test]
fn diffusers_reader_names_every_key_it_cannot_place() {
    let q = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q";
    let path = write(
        "diffusers.safetensors",
        &[
            (&format!("{q}.lora.down.weight"), zeros(&[2, 8])),
            (&format!("{q}.lora.up.weight"), zeros(&[8, 2])),
            ("unet.down_blocks.0.lonely.lora.down.weight", zeros(&[2, 8])),
            ("vae.decoder.conv.lora.up.weight", zeros(&[8, 2])),
            ("unet.mid_block.x.lora.down.weight", zeros(&[2, 8])),
            ("unet.mid_block.x.lora.up.weight", zeros(&[8, 3])),
            ("unet.mid_block.y.hada_w1_a", zeros(&[2, 8])),
        ],
    );
    let error = format::read(&path, ReadOptions::default()).unwrap_err();
    let Error::UnplacedKeys { keys, .. } = &error else {
        panic!("{error}")
    };
    assert_eq!(keys.len(), 4, "{error}");
    let message = error.to_string();
    for culprit in [
        "unet.down_blocks.0.lonely",
        "vae.decoder.conv.lora.up.weight",
        "unet.mid_block.x",
        "unet.mid_block.y.hada_w1_a",
    ] {
        assert!(
            message.contains(culprit),
            "{culprit} missing from: {message}"
        );
    }
    assert!(!message.contains("to_q"), "{message}");
}

#[test]
fn kohya_reader_needs_module_names_and_names_unknown_modules() {
    let (mut trees, _) = mirror();
    let path = write(
        "kohya.safetensors",
        &[
            (
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight",
                zeros(&[2, 8]),
            ),
            (
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight",
                zeros(&[8, 2]),
            ),
            (
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.alpha",
                Tensor::from(1.0f32),
            ),
            (
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                zeros(&[2, 8]),
            ),
            (
                "lora_te2_text_model_encoder_layers_7_mlp_fc1.lora_up.weight",
                zeros(&[8, 2]),
            ),
        ],
    );
    let error = format::read(&path, ReadOptions::default()).unwrap_err();
    assert!(
        error.to_string().contains("needs the model's module names"),
        "{error}"
    );
    let mut names = ModuleNames::new();
    for (component, tree) in trees.iter_mut() {
        names.add_model(*component, tree);
    }
    // Without the SGM table, the SGM-named module cannot be placed either.
    let error = format::read(
        &path,
        ReadOptions::default()
            .with_module_names(Some(&names))
            .with_block_renames(None),
    )
    .unwrap_err();
    let Error::UnplacedKeys { keys, .. } = &error else {
        panic!("{error}")
    };
    assert_eq!(keys.len(), 2, "{error}");
    assert!(
        keys[0].starts_with("lora_te2_text_model_encoder_layers_7_mlp_fc1.lora_up.weight"),
        "{keys:?}"
    );
    assert!(
        keys[1].starts_with("lora_unet_input_blocks_4_1"),
        "{keys:?}"
    );
}

#[test]
fn unknown_layouts_and_missing_modules_are_refused() {
    let path = write("other.safetensors", &[("model.weight", zeros(&[2, 2]))]);
    assert!(matches!(
        format::read(&path, ReadOptions::default()),
        Err(Error::UnknownFormat { .. })
    ));
    let missing = std::env::temp_dir().join("lora-no-such-file.safetensors");
    assert!(matches!(
        format::read(&missing, ReadOptions::default()),
        Err(Error::Io { .. })
    ));

    let (mut trees, _) = mirror();
    let mut state = LoraState::new();
    for module in [
        "not.a.layer",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_q",
        "also.missing",
    ] {
        let lora = ModuleLora {
            down: zeros(&[1, 8]),
            up: zeros(&[8, 1]),
            alpha: 1.0,
            scaling: Scaling::Standard,
            magnitude: None,
        };
        state
            .modules
            .insert((Component::Unet, module.to_owned()), lora);
    }
    let unet = trees.get_mut(&Component::Unet).unwrap();
    let error = state.apply(unet, Component::Unet, "x", false).unwrap_err();
    let Error::ModulesNotInModel { modules } = &error else {
        panic!("{error}")
    };
    assert_eq!(modules.len(), 2, "{modules:?}");
    assert!(
        modules[0].starts_with("unet.also.missing (")
            && modules[1].starts_with("unet.not.a.layer ("),
        "{modules:?}"
    );
    assert!(
        unet.layers.iter().all(|(_, l)| l.adapters().is_empty()),
        "nothing may be attached on failure"
    );
}

#[test]
fn non_finite_values_are_refused_naming_file_and_tensor() {
    let q = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q";
    let (down, up) = (
        format!("{q}.lora.down.weight"),
        format!("{q}.lora.up.weight"),
    );
    for (name, value) in [
        ("nan.safetensors", f64::NAN),
        ("inf.safetensors", f64::INFINITY),
        ("neg-inf.safetensors", f64::NEG_INFINITY),
    ] {
        let poisoned = zeros(&[8, 2]).to_kind(Kind::Half);
        let _ = poisoned.get(3).get(1).fill_(value);
        let path = write(name, &[(&down, zeros(&[2, 8])), (&up, poisoned)]);
        for error in [
            format::read(&path, ReadOptions::default()).unwrap_err(),
            format::summary(&path).unwrap_err(),
        ] {
            let Error::NonFiniteTensor { key, count, .. } = &error else {
                panic!("{error}");
            };
            assert_eq!((key.as_str(), *count), (up.as_str(), 1));
            let message = error.to_string();
            assert!(
                message.contains(name) && message.contains(&format!("tensor `{up}`")),
                "{message}"
            );
        }
    }
    // The same file with finite values reads.
    let path = write(
        "finite.safetensors",
        &[(&down, zeros(&[2, 8])), (&up, zeros(&[8, 2]))],
    );
    format::read(&path, ReadOptions::default()).unwrap();
}
