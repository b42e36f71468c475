//! The adapter weights of a model, independent of any file layout.
//!
//! A [`LoraState`] maps `(component, module path)` to the adapter tensors of that module and is what
//! every file format reads into and writes from: the paths are diffusers / transformers module paths
//! (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`,
//! `text_model.encoder.layers.0.self_attn.q_proj`), the components are the pipeline parts a LoRA
//! file distinguishes by key prefix.

use std::collections::{BTreeMap, BTreeSet};

use tch::Tensor;

use crate::adapter::{Adapter, Scaling};
use crate::format::kohya::resolve_in;
use crate::layer::for_each_layer;
use crate::linear::HasLinears;
use crate::{Error, Result};

/// The part of a pipeline a LoRA module belongs to, as LoRA files name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The denoising UNet (`unet.` / `lora_unet_`).
    Unet,
    /// The first text encoder, CLIP-L (`text_encoder.` / `lora_te1_`; SD1's `lora_te_` reads as this).
    TextEncoder,
    /// The second text encoder, OpenCLIP bigG (`text_encoder_2.` / `lora_te2_`).
    TextEncoder2,
}

impl Component {
    /// Every component, in file order.
    pub const ALL: [Component; 3] = [
        Component::Unet,
        Component::TextEncoder,
        Component::TextEncoder2,
    ];

    /// The key prefix of diffusers and peft files (without the dot).
    pub fn diffusers_prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The module-name prefix of kohya files (without the trailing underscore).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet",
            Component::TextEncoder => "lora_te1",
            Component::TextEncoder2 => "lora_te2",
        }
    }

    /// The component of a diffusers / peft key (`unet.…`), with the rest of the key.
    pub fn split_diffusers_key(key: &str) -> Option<(Component, &str)> {
        // Longest prefix first: `text_encoder_2.` also starts with `text_encoder`.
        [
            Component::TextEncoder2,
            Component::TextEncoder,
            Component::Unet,
        ]
        .into_iter()
        .find_map(|c| {
            key.strip_prefix(c.diffusers_prefix())
                .and_then(|r| r.strip_prefix('.'))
                .map(|r| (c, r))
        })
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.diffusers_prefix())
    }
}

/// The adapter of one module.
#[derive(Debug)]
pub struct ModuleLora {
    /// `A` / `lora_down`, `[r, in]` (a convolution's: `[r, in, kh, kw]`).
    pub down: Tensor,
    /// `B` / `lora_up`, `[out, r]` (a convolution's: `[out, r, 1, 1]`).
    pub up: Tensor,
    /// Alpha (files without one mean alpha = r).
    pub alpha: f64,
    /// `alpha / r` or rsLoRA's `alpha / √r`.
    pub scaling: Scaling,
    /// DoRA's magnitude vector `[out]`.
    pub magnitude: Option<Tensor>,
}

impl ModuleLora {
    /// The rank `r`.
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    /// Whether this is a convolution's adapter (4-D kernels).
    pub fn is_conv(&self) -> bool {
        self.down.dim() == 4
    }

    /// Checks that `down` is `[r, in]`, `up` `[out, r]` and the magnitude `[out]`, or for a
    /// convolution `down` `[r, in, kh, kw]` and `up` `[out, r, 1, 1]` without a magnitude.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming `module`.
    pub fn check_shapes(&self, module: &str) -> Result<()> {
        let (down, up) = (self.down.size(), self.up.size());
        let conv = down.len() == 4 && up.len() == 4;
        let reason = if !conv && (down.len() != 2 || up.len() != 2) {
            Some(format!(
                "down {down:?} and up {up:?} must both be matrices, or both 4-D kernels"
            ))
        } else if conv && up[2..] != [1, 1] {
            Some(format!("up {up:?} of a convolution must be a 1×1 kernel"))
        } else if conv && self.magnitude.is_some() {
            Some("DoRA on convolutions is not supported".to_owned())
        } else if down[0] != up[1] {
            Some(format!(
                "down {down:?} has rank {} but up {up:?} has rank {}",
                down[0], up[1]
            ))
        } else {
            match &self.magnitude {
                Some(m) if m.size() != [up[0]] => {
                    Some(format!("magnitude {:?} is not [{}]", m.size(), up[0]))
                }
                _ => None,
            }
        };
        reason.map_or(Ok(()), |reason| {
            Err(Error::ShapeMismatch {
                module: module.to_owned(),
                reason,
            })
        })
    }
}

/// The LoRA of a model (one adapter's weights on each adapted module), plus what was recorded about
/// how it was trained.
#[derive(Debug, Default)]
pub struct LoraState {
    /// The adapters by component and module path.
    pub modules: BTreeMap<(Component, String), ModuleLora>,
    /// The training configuration (any JSON), stored as `training_config` in the file header.
    pub training_config: Option<serde_json::Value>,
}

impl LoraState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Copies adapter `adapter_name` of every layer of `model` that has it, as modules of
    /// `component`. Tensors are copied (detached), so later training does not change the state.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when no layer has that adapter.
    pub fn extract(
        &mut self,
        model: &mut dyn HasLinears,
        component: Component,
        adapter_name: &str,
    ) -> Result<usize> {
        let mut count = 0;
        for_each_layer(model, &mut |module, layer| {
            if let Some(adapter) = layer.adapter(adapter_name) {
                count += 1;
                self.modules.insert(
                    (component, module.to_owned()),
                    ModuleLora {
                        down: adapter.down.detach().copy(),
                        up: adapter.up.detach().copy(),
                        alpha: adapter.alpha,
                        scaling: adapter.scaling,
                        magnitude: adapter.magnitude.as_ref().map(|m| m.detach().copy()),
                    },
                );
            }
        });
        if count == 0 {
            return Err(Error::UnknownAdapter {
                module: String::new(),
                adapter: adapter_name.to_owned(),
            });
        }
        Ok(count)
    }

    /// Attaches this state's modules of `component` to `model` as adapter `adapter_name` (copies on
    /// the layer's device, in the adapter tensors' own type; `trainable` sets `requires_grad`).
    /// Returns how many layers got an adapter.
    ///
    /// A module's path may also be a dotted suffix of exactly one layer's path (transformers 5 writes
    /// `CLIPTextModel` LoRAs without the `text_model.` level).
    ///
    /// # Errors
    /// [`Error::ModulesNotInModel`] naming every module the model lacks (nothing is attached then),
    /// [`Error::ShapeMismatch`] / [`Error::DuplicateAdapter`] from the first layer that refuses.
    pub fn apply(
        &self,
        model: &mut dyn HasLinears,
        component: Component,
        adapter_name: &str,
        trainable: bool,
    ) -> Result<usize> {
        let mut model_paths = BTreeSet::new();
        for_each_layer(model, &mut |module, _| {
            model_paths.insert(module.to_owned());
        });
        // File path → model path: equal, else the only model path ending with `.<file path>`.
        let mut placed: BTreeMap<String, &ModuleLora> = BTreeMap::new();
        let mut missing = Vec::new();
        for (path, lora) in self.component(component) {
            match resolve_in(model_paths.iter().map(String::as_str), path) {
                Ok(model_path) if !placed.contains_key(&model_path) => {
                    placed.insert(model_path, lora);
                }
                Ok(_) => missing.push(format!(
                    "{component}.{path} (a second LoRA for the same layer)"
                )),
                Err(reason) => missing.push(format!("{component}.{path} ({reason})")),
            }
        }
        if !missing.is_empty() {
            return Err(Error::ModulesNotInModel { modules: missing });
        }
        let mut failure = None;
        let mut count = 0;
        for_each_layer(model, &mut |module, layer| {
            let Some(lora) = placed.get(module) else {
                return;
            };
            if failure.is_some() {
                return;
            }
            let device = layer.device();
            let fresh = |t: &Tensor| {
                t.to_device(device)
                    .detach()
                    .copy()
                    .set_requires_grad(trainable)
            };
            let mut adapter =
                Adapter::new(adapter_name, fresh(&lora.down), fresh(&lora.up), lora.alpha);
            adapter.scaling = lora.scaling;
            adapter.magnitude = lora.magnitude.as_ref().map(fresh);
            match layer.add_adapter(module, adapter) {
                Ok(()) => count += 1,
                Err(error) => failure = Some(error),
            }
        });
        failure.map_or(Ok(count), Err)
    }

    /// The modules of one component, by path.
    pub fn component(&self, component: Component) -> impl Iterator<Item = (&str, &ModuleLora)> {
        self.modules
            .iter()
            .filter(move |((c, _), _)| *c == component)
            .map(|((_, m), lora)| (m.as_str(), lora))
    }

    /// The components that have at least one module.
    pub fn components(&self) -> Vec<Component> {
        let set: BTreeSet<Component> = self.modules.keys().map(|(c, _)| *c).collect();
        set.into_iter().collect()
    }
}
