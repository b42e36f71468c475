//! The text encoders with their LoRA (`--train_text_encoder`), as diffusers'
//! `train_dreambooth_lora_sdxl.py` trains them: both encoders stay on the device in the training
//! precision, each gets the script's `text_lora_config` (the same rank, alpha and gaussian init as
//! the UNet's, on `q_proj`, `k_proj`, `v_proj`, `out_proj`), and every micro-step encodes its
//! prompts from token ids (the script's `encode_prompt` with `text_input_ids_list`): the penultimate
//! hidden state of both encoders, concatenated, and the second encoder's projected pooled embedding.
//!
//! The first encoder's last layer feeds nothing SDXL reads (its pooled output is discarded), so its
//! adapters never receive a gradient: in the script PyTorch's AdamW and clipping skip them (their
//! `.grad` stays `None`) and they keep their initial values; here they are left out of the
//! optimizer, and written to the LoRA files as they started.

use std::sync::Arc;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use lora::{Component, LoraConfig, LoraState};
use sdxl_model::clip::CheckpointedTextForward;
use sdxl_model::prompt::{PromptEmbeds, PromptEncoder};
use torch_cuda::rng::Generator;

use super::ADAPTER;
use crate::config::TrainConfig;
use crate::logs::say as log;
use crate::model_files::ModelFolder;
use crate::rng::RunRng;
use crate::{Error, Result};

/// The components in encoder order.
const COMPONENTS: [Component; 2] = [Component::TextEncoder, Component::TextEncoder2];

/// Both text encoders with their trainable LoRA.
pub struct TextEncoders {
    encoder: PromptEncoder,
    stores: [VarStore; 2],
    _lora_stores: [VarStore; 2],
    /// Every LoRA parameter of each encoder, named `<component>.<module>.<adapter>.lora_{A,B}`.
    params: [Vec<(String, Tensor)>; 2],
    /// The parameters of each encoder that receive gradients (the optimizer's groups).
    trained: [Vec<Tensor>; 2],
    copies: [Option<lora::ComputeCopies>; 2],
    /// The generator the adapters' dropout draws from, when not libtorch's default one (replayed
    /// by gradient checkpointing).
    generator: Option<Arc<Generator>>,
}

impl std::fmt::Debug for TextEncoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoders")
            .field("parameters", &(self.params[0].len(), self.params[1].len()))
            .finish()
    }
}

/// The two encoders' checkpointed forwards (`--gradient_checkpointing`).
pub struct CheckpointedText<'a> {
    forwards: [CheckpointedTextForward<'a>; 2],
    /// The embeddings the UNet conditions on (no autograd graph).
    pub embeds: PromptEmbeds,
}

impl CheckpointedText<'_> {
    /// Back-propagates the gradients of the loss w.r.t. the context and the pooled embedding
    /// through both encoders, recomputing each layer.
    ///
    /// # Errors
    /// Shape and libtorch errors.
    pub fn backward(&self, context_grad: &Tensor, pooled_grad: Option<&Tensor>) -> Result<()> {
        let width = self.forwards[0].hidden()?.size()[2];
        let total = context_grad.size()[2];
        self.forwards[0].backward(&context_grad.f_narrow(2, 0, width)?, None)?;
        self.forwards[1].backward(
            &context_grad.f_narrow(2, width, total - width)?,
            pooled_grad,
        )?;
        Ok(())
    }
}

impl TextEncoders {
    /// Loads both encoders of `folder` frozen in `kind` on `device` and injects the LoRA of
    /// `--rank` / `--lora_alpha` (drawn from libtorch's generator as it stands: after the UNet's,
    /// as the script adds the encoders' adapters after the UNet's).
    ///
    /// # Errors
    /// Loading and injection errors naming the file or module; [`Error::InvalidOption`] for an
    /// encoder of fewer than two layers.
    pub fn load(
        config: &TrainConfig,
        folder: &ModelFolder,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        Self::load_with(config, folder, (device, kind), None)
    }

    /// [`Self::load`] drawing the adapters' initial values and dropout masks from the run's
    /// generator (after the UNet's adapters' values, as the script draws them).
    pub(crate) fn load_drawing_from(
        config: &TrainConfig,
        folder: &ModelFolder,
        (device, kind): (Device, Kind),
        rng: &Arc<RunRng>,
    ) -> Result<Self> {
        Self::load_with(config, folder, (device, kind), Some(rng))
    }

    fn load_with(
        config: &TrainConfig,
        folder: &ModelFolder,
        (device, kind): (Device, Kind),
        rng: Option<&Arc<RunRng>>,
    ) -> Result<Self> {
        let (mut encoder, mut stores) = folder.prompt_encoder(device, kind)?;
        for store in &mut stores {
            store.freeze();
        }
        // The script's text_lora_config: the UNet's rank, alpha, dropout and DoRA choice (rsLoRA too).
        let unet_lora = config.lora_config()?;
        let mut lora_config = LoraConfig::text_encoder_attention(i64::from(config.rank));
        lora_config.alpha = config.lora_alpha.unwrap_or(f64::from(config.rank));
        lora_config.dropout = unet_lora.dropout;
        lora_config.use_dora = unet_lora.use_dora;
        lora_config.use_rslora = unet_lora.use_rslora;
        let lora_stores = [VarStore::new(device), VarStore::new(device)];
        let (te1, te2) = encoder.text_encoders_mut();
        let mut params: [Vec<(String, Tensor)>; 2] = [Vec::new(), Vec::new()];
        let mut copies = [None, None];
        let mut adapted = 0;
        for (i, model) in [te1, te2].into_iter().enumerate() {
            let root = lora_stores[i].root();
            let report = match rng {
                Some(rng) => lora::inject_with(model, &root, ADAPTER, &lora_config, rng.as_ref())?,
                None => lora::inject(model, &root, ADAPTER, &lora_config)?,
            };
            adapted += report.adapted.len();
            // Adapter dropout on while training, as the UNet's.
            lora::set_training(model, true);
            if let Some(rng) = rng {
                lora::set_randomness(model, Some(Arc::clone(rng) as Arc<dyn lora::Randomness>));
            }
            copies[i] = super::compute_copies(model, kind)?;
            params[i] = lora::trainable_variables(model)
                .into_iter()
                .map(|(name, t)| (format!("{}.{name}", COMPONENTS[i]), t))
                .collect();
        }
        let layers = encoder.text_encoders().0.config().num_hidden_layers;
        if layers < 2 || encoder.text_encoders().1.config().num_hidden_layers < 2 {
            return Err(Error::InvalidOption {
                option: "--train_text_encoder",
                problem: "the text encoders need at least two layers (SDXL reads the penultimate hidden state)".into(),
            });
        }
        let unread = format!("text_encoder.text_model.encoder.layers.{}.", layers - 1);
        let trained = [
            params[0]
                .iter()
                .filter(|(name, _)| !name.starts_with(&unread))
                .map(|(_, t)| t.shallow_clone())
                .collect(),
            params[1].iter().map(|(_, t)| t.shallow_clone()).collect(),
        ];
        let this = Self {
            encoder,
            stores,
            _lora_stores: lora_stores,
            params,
            trained,
            copies,
            generator: rng.and_then(|rng| rng.generator().cloned()),
        };
        log(format!(
            "text encoders: LoRA rank {} on {adapted} layers, {} trainable parameters (resident in {kind:?})",
            config.rank,
            this.parameter_count()
        ));
        Ok(this)
    }

    /// The encoders with their tokenizers.
    pub fn encoder(&self) -> &PromptEncoder {
        &self.encoder
    }

    /// Every LoRA parameter of both encoders by name (`text_encoder.…`, `text_encoder_2.…`).
    pub fn params(&self) -> impl Iterator<Item = &(String, Tensor)> {
        self.params.iter().flatten()
    }

    /// The parameters of each encoder that the optimizer updates (the script's two text groups).
    pub fn trained(&self) -> &[Vec<Tensor>; 2] {
        &self.trained
    }

    /// Trainable elements that the optimizer updates.
    pub fn parameter_count(&self) -> i64 {
        self.trained
            .iter()
            .flatten()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// The frozen encoders' (elements, bytes).
    pub fn base_size(&self) -> (i64, i64) {
        let variables = self.stores.iter().flat_map(|s| s.variables().into_values());
        variables.fold((0, 0), |(n, bytes), v| {
            let numel = v.numel() as i64;
            (
                n + numel,
                bytes + numel * v.kind().elt_size_in_bytes() as i64,
            )
        })
    }

    /// The compute copies of each encoder under mixed precision.
    pub fn copies(&self) -> impl Iterator<Item = &lora::ComputeCopies> {
        self.copies.iter().flatten()
    }

    /// Encodes token ids with autograd (diffusers' `encode_prompt` on `text_input_ids_list`).
    ///
    /// # Errors
    /// Model errors.
    pub fn encode(&self, ids: &Tensor, ids_2: &Tensor) -> Result<PromptEmbeds> {
        Ok(self.encoder.encode_ids(ids, ids_2, None)?)
    }

    /// As [`Self::encode`], with gradient checkpointing (`--gradient_checkpointing`).
    ///
    /// # Errors
    /// Model errors.
    pub fn encode_checkpointed(
        &self,
        ids: &Tensor,
        ids_2: &Tensor,
    ) -> Result<CheckpointedText<'_>> {
        let (te1, te2) = self.encoder.text_encoders();
        let forwards = [
            te1.forward_checkpointed_drawing_from(ids, false, self.generator.clone())?,
            te2.forward_checkpointed_drawing_from(ids_2, true, self.generator.clone())?,
        ];
        let second = forwards[1].hidden()?;
        let context = Tensor::f_cat(
            &[forwards[0].hidden()?.f_to_kind(second.kind())?, second],
            -1,
        )?;
        let pooled = forwards[1].text_embeds()?.ok_or(Error::InvalidOption {
            option: "--train_text_encoder",
            problem: "text_encoder_2 has no text_projection".into(),
        })?;
        Ok(CheckpointedText {
            forwards,
            embeds: PromptEmbeds { context, pooled },
        })
    }

    /// Turns the LoRA of both encoders on or off.
    ///
    /// # Errors
    /// Adapter errors.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        let (te1, te2) = self.encoder.text_encoders_mut();
        lora::set_enabled(te1, ADAPTER, enabled)?;
        lora::set_enabled(te2, ADAPTER, enabled)?;
        Ok(())
    }

    /// Training mode (adapter dropout on) or evaluation mode for both encoders.
    pub fn set_training(&mut self, training: bool) {
        let (te1, te2) = self.encoder.text_encoders_mut();
        lora::set_training(te1, training);
        lora::set_training(te2, training);
    }

    /// Adds both encoders' LoRA to `state` (`text_encoder.` and `text_encoder_2.` modules).
    ///
    /// # Errors
    /// Adapter errors.
    pub fn extract(&mut self, state: &mut LoraState) -> Result<()> {
        let (te1, te2) = self.encoder.text_encoders_mut();
        state.extract(te1, COMPONENTS[0], ADAPTER)?;
        state.extract(te2, COMPONENTS[1], ADAPTER)?;
        Ok(())
    }
}
