//! The tiny SDXL UNet and both text encoders with LoRA files applied, and their outputs on the
//! inputs of the `tiny-sdxl-*-io` fixtures: what the LoRA-file tests compare with diffusers'.

use std::collections::BTreeMap;

use super::fixture;
use super::sdxl_depth::{clip_depth, unet_shape};
use lora::format::ModuleNames;
use lora::{Component, HasLinears, LoraState};
use sdxl_model::clip::ClipTextModel;
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};
use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};
use test_support::{f32_bound, unet_depth};

/// The tiny SDXL pipeline's UNet and text encoders, in fp32 on the CPU.
pub struct Models {
    /// The UNet.
    pub unet: UNet2DConditionModel,
    /// CLIP-L stand-in.
    pub text_encoder: ClipTextModel,
    /// bigG stand-in.
    pub text_encoder_2: ClipTextModel,
}
impl Models {
    /// Loads the tiny SDXL models from `tests/fixtures/tiny-sdxl`.
    pub fn load() -> Self {
        let tiny = fixture("tiny-sdxl");
        let options = LoadOptions::default();
        let unet = UNet2DConditionModel::from_pretrained(&tiny, &options)
            .unwrap()
            .model;
        assert_eq!(unet.config(), &UNetConfig::tiny_sdxl());
        let text_encoder = ClipTextModel::from_pretrained(tiny.join("text_encoder"), &options)
            .unwrap()
            .model;
        let text_encoder_2 = ClipTextModel::from_pretrained(tiny.join("text_encoder_2"), &options)
            .unwrap()
            .model;
        Self {
            unet,
            text_encoder,
            text_encoder_2,
        }
    }

    pub fn each(&mut self) -> [(Component, &mut dyn HasLinears); 3] {
        [
            (Component::Unet, &mut self.unet),
            (Component::TextEncoder, &mut self.text_encoder),
            (Component::TextEncoder2, &mut self.text_encoder_2),
        ]
    }

    pub fn module_names(&mut self) -> ModuleNames {
        let mut names = ModuleNames::new();
        for (component, model) in self.each() {
            names.add_model(component, model);
        }
        names
    }

    /// Applies every module of `state`; each component the state has must take all its modules.
    pub fn apply(&mut self, state: &LoraState) {
        for (component, model) in self.each() {
            let expected = state.component(component).count();
            let applied = state.apply(model, component, "default", false).unwrap();
            assert_eq!(applied, expected, "modules applied to {component}");
        }
    }

    pub fn outputs(&self) -> BTreeMap<&'static str, Tensor> {
        let unet_io = TensorFile::open(fixture("tiny-sdxl-unet-io.safetensors")).unwrap();
        let get = |key: &str| unet_io.tensor(key, Device::Cpu, Some(Kind::Float)).unwrap();
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
        let te_io = TensorFile::open(fixture("tiny-sdxl-text-encoder-io.safetensors")).unwrap();
        let input_ids = te_io
            .tensor("input_ids", Device::Cpu, Some(Kind::Int64))
            .unwrap();
        tch::no_grad(|| {
            let te2 = self.text_encoder_2.forward(&input_ids).unwrap();
            BTreeMap::from([
                ("unet", self.unet.forward(&inputs).unwrap()),
                (
                    "text_encoder",
                    self.text_encoder
                        .forward(&input_ids)
                        .unwrap()
                        .last_hidden_state,
                ),
                ("text_encoder_2", te2.last_hidden_state),
                ("text_encoder_2.text_embeds", te2.text_embeds.unwrap()),
            ])
        })
    }
}

/// The bound for an output (docs/NUMERICS.md): the model's depth on the fixture's inputs, doubled
/// because a LoRA at most doubles the depth of each layer it adapts (a down-projection over the
/// same inputs, an up-projection, the scale and the sum).
pub fn bound(models: &Models, key: &str) -> f64 {
    let depth = if key == "unet" {
        let io = TensorFile::open(fixture("tiny-sdxl-unet-io.safetensors")).unwrap();
        let get = |k: &str| io.tensor(k, Device::Cpu, None).unwrap();
        unet_depth(&unet_shape(
            models.unet.config(),
            &get("sample"),
            &get("encoder_hidden_states"),
        ))
    } else if key == "text_encoder" {
        clip_depth(models.text_encoder.config(), 77)
    } else {
        clip_depth(models.text_encoder_2.config(), 77)
    };
    f32_bound(2.0 * depth)
}
