//! Gradient checkpointing of a CLIP text encoder, for training LoRA on it (transformers'
//! `gradient_checkpointing_enable()`, which diffusers' `train_dreambooth_lora_sdxl.py` calls on both
//! encoders with `--gradient_checkpointing --train_text_encoder`): each encoder layer is one segment
//! of a [`Tape`], recomputed in the backward pass, as transformers checkpoints each `CLIPEncoderLayer`.
//!
//! The forward returns what SDXL conditions on: the penultimate hidden state and, when asked, the
//! projected pooled embedding. With the pooled embedding the last segment (the last layer, the final
//! layer norm, pooling and projection) returns both, packed in one flat tensor, so that the tape's
//! single output carries the gradients of both; without it the tape ends at the penultimate state
//! and the last layer is not run at all (nothing of SDXL reads it).

use std::sync::Arc;

use tch::Tensor;
use torch_cuda::rng::Generator;

use super::ClipTextModel;
use crate::unet::checkpoint::{Tape, Value};
use crate::{Error, Result};

/// The result of [`ClipTextModel::forward_checkpointed`]: the outputs without an autograd graph,
/// and what is needed to back-propagate through them by recomputation.
pub struct CheckpointedTextForward<'a> {
    tape: Tape<'a>,
    output: Value,
    hidden_shape: Vec<i64>,
    pooled_shape: Option<Vec<i64>>,
}

impl std::fmt::Debug for CheckpointedTextForward<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointedTextForward")
            .field("hidden_shape", &self.hidden_shape)
            .field("pooled_shape", &self.pooled_shape)
            .finish()
    }
}

impl CheckpointedTextForward<'_> {
    fn hidden_len(&self) -> i64 {
        self.hidden_shape.iter().product()
    }

    /// The penultimate hidden state `[batch, tokens, hidden]` (SDXL's per-token context).
    ///
    /// # Errors
    /// libtorch errors.
    pub fn hidden(&self) -> Result<Tensor> {
        let out = self.tape.get(self.output);
        if self.pooled_shape.is_none() {
            return Ok(out.shallow_clone());
        }
        Ok(out
            .f_narrow(0, 0, self.hidden_len())?
            .f_view(self.hidden_shape.as_slice())?)
    }

    /// The projected pooled embedding `[batch, projection_dim]` (the pooled one without a
    /// projection), when the forward was asked for it.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn text_embeds(&self) -> Result<Option<Tensor>> {
        let Some(shape) = &self.pooled_shape else {
            return Ok(None);
        };
        let out = self.tape.get(self.output);
        let len: i64 = shape.iter().product();
        Ok(Some(
            out.f_narrow(0, self.hidden_len(), len)?
                .f_view(shape.as_slice())?,
        ))
    }

    /// Back-propagates the gradients of the loss w.r.t. [`Self::hidden`] and [`Self::text_embeds`]
    /// (`None`: zero) by recomputing each layer with autograd, accumulating into the parameters'
    /// `.grad()` (the LoRA's) as a plain backward would.
    ///
    /// # Errors
    /// [`Error::Shape`] for a gradient of another shape; libtorch errors.
    pub fn backward(&self, hidden_grad: &Tensor, text_embeds_grad: Option<&Tensor>) -> Result<()> {
        if hidden_grad.size() != self.hidden_shape {
            return Err(Error::Shape {
                what: "gradient of the text encoder's hidden state".into(),
                expected: format!("{:?}", self.hidden_shape),
                actual: format!("{:?}", hidden_grad.size()),
            });
        }
        let kind = self.tape.get(self.output).kind();
        let grad = match &self.pooled_shape {
            None => hidden_grad.f_to_kind(kind)?,
            Some(shape) => {
                let pooled_grad = match text_embeds_grad {
                    Some(grad) if grad.size() == *shape => grad.f_to_kind(kind)?,
                    Some(grad) => {
                        return Err(Error::Shape {
                            what: "gradient of the text encoder's pooled embedding".into(),
                            expected: format!("{shape:?}"),
                            actual: format!("{:?}", grad.size()),
                        });
                    }
                    None => Tensor::f_zeros(shape.as_slice(), (kind, hidden_grad.device()))?,
                };
                Tensor::f_cat(
                    &[
                        hidden_grad.f_to_kind(kind)?.f_reshape([-1])?,
                        pooled_grad.f_reshape([-1])?,
                    ],
                    0,
                )?
            }
        };
        self.tape.backward(self.output, &grad, &[])?;
        Ok(())
    }
}

impl ClipTextModel {
    /// The penultimate hidden state (and, with `pooled`, the projected pooled embedding) with
    /// gradient checkpointing: the embeddings are computed without autograd (they are frozen), every
    /// layer runs without keeping activations, and the returned value's
    /// [`CheckpointedTextForward::backward`] recomputes them one at a time. Device work only.
    ///
    /// # Shapes
    /// `input_ids` `[batch, tokens]` int64 → hidden `[batch, tokens, hidden]`, text embeds
    /// `[batch, projection_dim]`.
    ///
    /// # Errors
    /// As [`Self::forward`]; [`Error::InvalidSetting`] for a model of fewer than two layers.
    pub fn forward_checkpointed(
        &self,
        input_ids: &Tensor,
        pooled: bool,
    ) -> Result<CheckpointedTextForward<'_>> {
        self.forward_checkpointed_drawing_from(input_ids, pooled, None)
    }

    /// [`Self::forward_checkpointed`] for a model whose adapters draw their dropout masks from
    /// `generator` (see `lora::set_randomness`) rather than the device's default generator: the
    /// recomputation replays that generator's draws.
    ///
    /// # Errors
    /// As [`Self::forward_checkpointed`].
    pub fn forward_checkpointed_drawing_from(
        &self,
        input_ids: &Tensor,
        pooled: bool,
        generator: Option<Arc<Generator>>,
    ) -> Result<CheckpointedTextForward<'_>> {
        let Some((last, earlier)) = self.layers.split_last().filter(|(_, e)| !e.is_empty()) else {
            return Err(Error::InvalidSetting {
                setting: "num_hidden_layers",
                value: self.layers.len().to_string(),
                expected: "at least 2 (SDXL reads the penultimate hidden state)",
            });
        };
        let embedded = tch::no_grad(|| self.embed(input_ids))?;
        let mut tape = Tape::new(true).drawing_from(generator);
        let mut hidden = tape.input(&embedded);
        for layer in earlier {
            hidden = tape.run(&[hidden], move |x| Ok(layer.forward(&x[0])))?;
        }
        let hidden_shape = tape.get(hidden).size();
        if !pooled {
            // Nothing reads the last layer, but a plain forward (transformers' too) runs it, drawing
            // its adapters' dropout masks: run it as well (without autograd, never recomputed) so
            // the random stream after this pass is the plain pass's.
            let _unread = tch::no_grad(|| last.forward(tape.get(hidden)));
            return Ok(CheckpointedTextForward {
                tape,
                output: hidden,
                hidden_shape,
                pooled_shape: None,
            });
        }
        let ids = input_ids.shallow_clone();
        let output = tape.run(&[hidden], move |x| {
            let penultimate = &x[0];
            let last_hidden_state = last.forward(penultimate).apply(&self.final_layer_norm);
            let pooled = self.pool(&last_hidden_state, &ids);
            let embeds = match &self.text_projection {
                Some(projection) => pooled.apply(projection),
                None => pooled,
            };
            Ok(Tensor::f_cat(
                &[penultimate.f_reshape([-1])?, embeds.f_reshape([-1])?],
                0,
            )?)
        })?;
        let batch = hidden_shape[0];
        let width = self
            .text_projection
            .as_ref()
            .map_or(self.config.hidden_size, |p| p.out_features());
        Ok(CheckpointedTextForward {
            tape,
            output,
            hidden_shape,
            pooled_shape: Some(vec![batch, width]),
        })
    }
}

#[cfg(test)]
mod tests {
    use tch::nn::VarStore;
    use tch::{Device, Kind, Tensor};

    use super::super::{Activation, ClipTextConfig, ClipTextModel};

    fn tiny(with_projection: bool) -> (VarStore, ClipTextModel) {
        let config = ClipTextConfig {
            vocab_size: 50,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            max_position_embeddings: 6,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: 5,
            eos_token_id: 2,
        };
        let mut vs = VarStore::new(Device::Cpu);
        let model = ClipTextModel::new(&vs.root(), &config, with_projection).unwrap();
        vs.double();
        (vs, model)
    }

    /// Checkpointed gradients of the LoRA equal a plain backward's (fp64: the same operations in
    /// another order of accumulation, so equal to rounding).
    #[test]
    fn checkpointed_gradients_equal_plain_ones() {
        for with_projection in [false, true] {
            tch::manual_seed(11);
            let (_vs, mut model) = tiny(with_projection);
            let adapters = VarStore::new(Device::Cpu);
            let config = lora::LoraConfig::text_encoder_attention(2);
            lora::inject(&mut model, &adapters.root(), "default", &config).unwrap();
            for (_, mut v) in lora::trainable_variables(&mut model) {
                tch::no_grad(|| v.copy_(&(v.randn_like() * 0.3)));
            }
            let params: Vec<Tensor> = lora::trainable_variables(&mut model)
                .into_values()
                .collect();
            let ids = Tensor::from_slice(&[3i64, 7, 49, 1, 1, 1, 4, 49, 2, 2, 2, 2]).view([2, 6]);
            let hidden_weight = Tensor::randn([2, 6, 8], (Kind::Double, Device::Cpu));
            let pooled_weight = Tensor::randn([2, 5], (Kind::Double, Device::Cpu));

            let out = model.forward(&ids).unwrap();
            let penultimate = &out.hidden_states[out.hidden_states.len() - 2];
            let mut loss = (penultimate * &hidden_weight).sum(Kind::Double);
            if let Some(embeds) = &out.text_embeds {
                loss += (embeds * &pooled_weight).sum(Kind::Double);
            }
            loss.backward();
            // Without the pooled output nothing reads the last layer: its LoRA gets no gradient.
            let plain: Vec<Option<Tensor>> = params
                .iter()
                .map(|p| p.grad().defined().then(|| p.grad().copy()))
                .collect();
            for p in &params {
                if p.grad().defined() {
                    let _ = p.grad().zero_();
                }
            }

            let forward = model.forward_checkpointed(&ids, with_projection).unwrap();
            assert!(!forward.hidden().unwrap().requires_grad());
            assert!(
                forward
                    .hidden()
                    .unwrap()
                    .allclose(penultimate, 1e-12, 1e-12, false)
            );
            if let Some(embeds) = &out.text_embeds {
                let got = forward.text_embeds().unwrap().unwrap();
                assert!(got.allclose(embeds, 1e-12, 1e-12, false));
            }
            let pooled_grad = with_projection.then_some(&pooled_weight);
            forward.backward(&hidden_weight, pooled_grad).unwrap();
            let mut checked = 0;
            for (p, want) in params.iter().zip(&plain) {
                let got = p.grad();
                match want {
                    Some(want) => {
                        assert!(
                            got.allclose(want, 1e-10, 1e-12, false),
                            "{got:?} vs {want:?}"
                        );
                        checked += 1;
                    }
                    None => assert!(!got.defined(), "a gradient reached an unread layer"),
                }
            }
            // Three layers of four adapters (A, B): the last layer's only with the pooled output.
            assert_eq!(checked, if with_projection { 24 } else { 16 });
        }
    }
}
