//! The SDXL UNet: noise prediction conditioned on timestep, text states, pooled text and time ids.
//!
//! Follows diffusers' `models/unets/unet_2d_condition.py` (`UNet2DConditionModel`) for the subset of
//! configurations [`UNetConfig`] accepts. Variables are created under the same attribute paths, so a
//! diffusers `diffusion_pytorch_model.safetensors` loads without renaming.

use std::sync::Arc;

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use lora::{Conv2d, HasLinears, Linear};
use torch_cuda::rng::Generator;

use super::checkpoint::{Tape, Value};
use super::config::UNetConfig;
use super::embeddings::{TimestepEmbedding, timestep_embedding};
use super::resnet::{conv2d, group_norm};
use super::transformer_2d::Transformer2DModel;
use super::unet_2d_blocks::{DownBlock, MidBlock, UpBlock};
use crate::attention::AttentionBackend;
use crate::norm::GroupNorm;
use crate::{Error, Result};

/// The inputs of one UNet call; all device tensors.
#[derive(Debug)]
pub struct UNetInputs<'t> {
    /// The noisy latents `[B, in_channels, H, W]`.
    pub sample: &'t Tensor,
    /// Diffusion timesteps, `[B]` or a scalar `[]` shared by the batch (any numeric kind).
    pub timesteps: &'t Tensor,
    /// Per-token text states `[B, L, cross_attention_dim]`.
    pub encoder_hidden_states: &'t Tensor,
    /// Pooled text embeddings `[B, pooled]` (`text_time` conditioning only).
    pub text_embeds: Option<&'t Tensor>,
    /// Micro-conditioning numbers `[B, n]`, usually n = 6 (`text_time` conditioning only).
    pub time_ids: Option<&'t Tensor>,
}

/// SDXL's extra conditioning modules.
#[derive(Debug)]
struct TextTimeEmbedding {
    time_embed_dim: i64,
    projection_input_dim: i64,
    add_embedding: TimestepEmbedding,
}

/// `UNet2DConditionModel`.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    backend: AttentionBackend,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
    conv_in: Conv2d,
    /// `down_blocks`.
    pub(crate) down_blocks: Vec<DownBlock>,
    /// `mid_block`.
    pub(crate) mid_block: MidBlock,
    /// `up_blocks`.
    pub(crate) up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Whether the feature maps run channels-last ([`UNet2DConditionModel::set_channels_last`]).
    channels_last: bool,
}

/// The result of [`UNet2DConditionModel::forward_checkpointed`]: the prediction without an autograd
/// graph, and what is needed to back-propagate through it by recomputation.
#[derive(Debug)]
pub struct CheckpointedForward<'a> {
    tape: Tape<'a>,
    output: Value,
    inputs: [Value; 5],
}

/// Gradients of the UNet's inputs returned by [`CheckpointedForward::backward`] (`None` where the input
/// does not influence the output or is not floating point).
#[derive(Debug)]
pub struct InputGrads {
    /// w.r.t. `sample`.
    pub sample: Option<Tensor>,
    /// w.r.t. `timesteps`.
    pub timesteps: Option<Tensor>,
    /// w.r.t. `encoder_hidden_states`.
    pub encoder_hidden_states: Option<Tensor>,
    /// w.r.t. `text_embeds`.
    pub text_embeds: Option<Tensor>,
    /// w.r.t. `time_ids`.
    pub time_ids: Option<Tensor>,
}

impl CheckpointedForward<'_> {
    /// The prediction `[B, out_channels, H, W]` (no autograd graph attached).
    pub fn output(&self) -> &Tensor {
        self.tape.get(self.output)
    }

    /// Back-propagates `output_grad` (the gradient of the loss w.r.t. [`Self::output`]) by
    /// recomputing each block with autograd, accumulating into the parameters' `.grad()` exactly as
    /// a plain backward would.
    ///
    /// # Errors
    /// libtorch errors during the recomputation or backward passes.
    pub fn backward(&self, output_grad: &Tensor) -> Result<InputGrads> {
        let grads = self.tape.backward(self.output, output_grad, &self.inputs)?;
        let mut grads = grads.into_iter();
        let mut next = || grads.next().flatten();
        Ok(InputGrads {
            sample: next(),
            timesteps: next(),
            encoder_hidden_states: next(),
            text_embeds: next(),
            time_ids: next(),
        })
    }
}

/// A [`Transformer2DModel`] as tape segments: its input stage, each transformer block, and its output
/// stage, so that checkpointing recomputes one block at a time (as diffusers checkpoints each
/// `BasicTransformerBlock`), not all ten of an SDXL level at once.
fn record_transformer<'a>(
    tape: &mut Tape<'a>,
    transformer: &'a Transformer2DModel,
    h: Value,
    context: Value,
    backend: AttentionBackend,
) -> Result<Value> {
    let mut tokens = tape.run(&[h], move |x| transformer.enter(&x[0]))?;
    for block in &transformer.transformer_blocks {
        tokens = tape.run(&[tokens, context], move |x| {
            block.forward(&x[0], &x[1], backend)
        })?;
    }
    tape.run(&[tokens, h], move |x| transformer.leave(&x[0], &x[1]))
}

fn shape_error(what: &str, expected: String, actual: &Tensor) -> Error {
    Error::Shape {
        what: what.to_owned(),
        expected,
        actual: format!("{:?}", actual.size()),
    }
}

impl UNet2DConditionModel {
    /// Creates the model's variables under `path` (usually a var store's root), in the var store's
    /// kind and device; their values are placeholders until weights are loaded.
    pub fn new(path: &nn::Path, config: &UNetConfig) -> Self {
        let c0 = config.levels[0].channels;
        let time_embed_dim = config.time_embed_dim();
        let levels = config.levels.len();
        Self {
            config: config.clone(),
            backend: AttentionBackend::default(),
            time_embedding: TimestepEmbedding::new(&(path / "time_embedding"), c0, time_embed_dim),
            add_embedding: config.text_time.map(|tt| TextTimeEmbedding {
                time_embed_dim: tt.time_embed_dim,
                projection_input_dim: tt.projection_input_dim,
                add_embedding: TimestepEmbedding::new(
                    &(path / "add_embedding"),
                    tt.projection_input_dim,
                    time_embed_dim,
                ),
            }),
            conv_in: conv2d(&(path / "conv_in"), config.in_channels, c0, 3, 1, 1),
            down_blocks: (0..levels)
                .map(|i| DownBlock::new(&(path / "down_blocks" / i), config, i))
                .collect(),
            mid_block: MidBlock::new(&(path / "mid_block"), config),
            up_blocks: (0..levels)
                .map(|i| UpBlock::new(&(path / "up_blocks" / i), config, i))
                .collect(),
            conv_norm_out: group_norm(
                path / "conv_norm_out",
                config.norm_num_groups,
                c0,
                config.norm_eps,
            ),
            conv_out: conv2d(&(path / "conv_out"), c0, config.out_channels, 3, 1, 1),
            channels_last: false,
        }
    }

    /// Runs the feature maps channels-last (NHWC in memory, PyTorch's `torch.channels_last`), or
    /// back in NCHW: every convolution's base kernel is laid out so in place (the variable store's
    /// tensors follow; values unchanged), the input is laid out so on entry and the output is
    /// returned NCHW. cuDNN then runs its NHWC convolution kernels without transposing every input,
    /// output and kernel as it does for NCHW half-precision maps on recent GPUs, the group norms take
    /// [`torch_cuda::group_norm`]'s NHWC kernels (SiLU fused) on CUDA, and the attention blocks' map ↔
    /// token reshapes become views. The result equals the NCHW model's to the summation order of the
    /// kernels (crate::norm). Off by default; the trainer and the pipeline turn it on for CUDA.
    pub fn set_channels_last(&mut self, channels_last: bool) {
        self.for_each_conv(&mut |_, conv| conv.set_channels_last(channels_last));
        self.channels_last = channels_last;
    }

    /// Whether the feature maps run channels-last ([`Self::set_channels_last`]).
    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The attention backend every attention layer uses.
    pub fn attention_backend(&self) -> AttentionBackend {
        self.backend
    }

    /// Switches every attention layer to `backend`.
    pub fn set_attention_backend(&mut self, backend: AttentionBackend) {
        self.backend = backend;
    }

    /// Stores every convolution's weight in fp8 ([`Conv2d::quantize_fp8`]): with
    /// [`lora::quantize_base_fp8`] for the linear layers, every weight matrix of the UNet is fp8 and
    /// only norms and biases keep their type. The report counts convolutions.
    ///
    /// # Errors
    /// Only libtorch errors, and [`lora::Error::QuantizeMerged`] for a convolution with merged
    /// adapters (convolutions before the failing one stay quantized).
    pub fn quantize_convs_fp8(&mut self) -> Result<lora::Fp8Report> {
        let mut report = lora::Fp8Report::default();
        let mut failure = None;
        self.for_each_conv(&mut |path, conv| {
            if failure.is_some() {
                return;
            }
            let before = conv.base_weight_bytes();
            if conv.is_fp8() {
                report.already_fp8 += 1;
            } else if let Err(error) = conv.quantize_fp8(path, None) {
                failure = Some(error);
                return;
            } else {
                report.quantized += 1;
            }
            report.bytes_before += before;
            report.bytes_after += conv.base_weight_bytes();
        });
        failure.map_or(Ok(report), |error| Err(error.into()))
    }

    /// Predicts the noise of `inputs.sample`.
    ///
    /// # Shapes
    /// `sample` `[B, in, H, W]`, `timesteps` `[B]` or `[]`, `encoder_hidden_states` `[B, L, cross]`,
    /// `text_embeds` `[B, P]`, `time_ids` `[B, n]` with `P + n·addition_time_embed_dim =
    /// projection_class_embeddings_input_dim` → `[B, out, H, W]`.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the input whose shape does not fit the config.
    pub fn forward(&self, inputs: &UNetInputs<'_>) -> Result<Tensor> {
        let mut tape = Tape::new(false);
        let (output, _) = self.record(&mut tape, inputs)?;
        Ok(tape.get(output).shallow_clone())
    }

    /// As [`Self::forward`], with gradient checkpointing: every ResNet block, transformer block (and the
    /// stages around them), sampler and
    /// the embedding, input and output stages run without keeping activations; the returned value's
    /// [`CheckpointedForward::backward`] recomputes them one at a time.
    ///
    /// # Errors
    /// As [`Self::forward`].
    pub fn forward_checkpointed<'a>(
        &'a self,
        inputs: &UNetInputs<'_>,
    ) -> Result<CheckpointedForward<'a>> {
        self.forward_checkpointed_drawing_from(inputs, None)
    }

    /// [`Self::forward_checkpointed`] for a model whose adapters draw their dropout masks from
    /// `generator` (see `lora::set_randomness`) rather than the device's default generator: the
    /// recomputation replays that generator's draws.
    ///
    /// # Errors
    /// As [`Self::forward`].
    pub fn forward_checkpointed_drawing_from<'a>(
        &'a self,
        inputs: &UNetInputs<'_>,
        generator: Option<Arc<Generator>>,
    ) -> Result<CheckpointedForward<'a>> {
        let mut tape = Tape::new(true).drawing_from(generator);
        let (output, inputs) = self.record(&mut tape, inputs)?;
        Ok(CheckpointedForward {
            tape,
            output,
            inputs,
        })
    }

    fn check_inputs(&self, inputs: &UNetInputs<'_>) -> Result<i64> {
        let cfg = &self.config;
        let size = inputs.sample.size();
        if size.len() != 4 || size[1] != cfg.in_channels || size[2] < 1 || size[3] < 1 {
            return Err(shape_error(
                "UNet `sample`",
                format!("[B, {}, H, W]", cfg.in_channels),
                inputs.sample,
            ));
        }
        let batch = size[0];
        let t = inputs.timesteps.size();
        if !(t.is_empty() || t == [batch]) {
            return Err(shape_error(
                "UNet `timesteps`",
                format!("[{batch}] or a scalar"),
                inputs.timesteps,
            ));
        }
        let ctx = inputs.encoder_hidden_states.size();
        if ctx.len() != 3 || ctx[0] != batch || ctx[2] != cfg.cross_attention_dim {
            return Err(shape_error(
                "UNet `encoder_hidden_states`",
                format!("[{batch}, L, {}]", cfg.cross_attention_dim),
                inputs.encoder_hidden_states,
            ));
        }
        if let Some(tt) = &self.add_embedding {
            let (Some(text), Some(ids)) = (inputs.text_embeds, inputs.time_ids) else {
                return Err(Error::Shape {
                    what: "UNet `text_embeds` / `time_ids`".to_owned(),
                    expected: "both, for `text_time` conditioning".to_owned(),
                    actual: "missing".to_owned(),
                });
            };
            let (ts, is) = (text.size(), ids.size());
            let fits = ts.len() == 2
                && is.len() == 2
                && ts[0] == batch
                && is[0] == batch
                && ts[1] + is[1] * tt.time_embed_dim == tt.projection_input_dim;
            if !fits {
                return Err(Error::Shape {
                    what: "UNet `text_embeds` / `time_ids`".to_owned(),
                    expected: format!(
                        "[{batch}, P] and [{batch}, n] with P + n·{} = {}",
                        tt.time_embed_dim, tt.projection_input_dim
                    ),
                    actual: format!("{ts:?} and {is:?}"),
                });
            }
        }
        Ok(batch)
    }

    /// The forward pass as segments on `tape`; returns the output value and the five input values.
    fn record<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        inputs: &UNetInputs<'_>,
    ) -> Result<(Value, [Value; 5])> {
        let batch = self.check_inputs(inputs)?;
        let backend = self.backend;
        let cfg = &self.config;
        let placeholder = Tensor::zeros([batch, 0], (Kind::Float, inputs.sample.device()));
        let sample = tape.input(inputs.sample);
        let timesteps = tape.input(inputs.timesteps);
        let context = tape.input(inputs.encoder_hidden_states);
        let text_embeds = tape.input(inputs.text_embeds.unwrap_or(&placeholder));
        let time_ids = tape.input(inputs.time_ids.unwrap_or(&placeholder));

        // 1. time: sinusoidal timestep embedding through `time_embedding`, plus SDXL's pooled text and
        //    time-id embedding through `add_embedding`.
        let kind = inputs.sample.kind();
        let emb = tape.run(&[timesteps, text_embeds, time_ids], move |x| {
            let t = x[0].expand([batch], false);
            let t_emb = timestep_embedding(
                &t,
                cfg.levels[0].channels,
                cfg.flip_sin_to_cos,
                cfg.freq_shift,
            )
            .to_kind(kind);
            let emb = self.time_embedding.forward(&t_emb);
            let Some(tt) = &self.add_embedding else {
                return Ok(emb);
            };
            let ids = x[2].flatten(0, -1);
            let time_embeds =
                timestep_embedding(&ids, tt.time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
                    .reshape([batch, -1]);
            let add = Tensor::cat(&[x[1].to_kind(Kind::Float), time_embeds], -1).to_kind(kind);
            Ok(emb + tt.add_embedding.forward(&add))
        })?;

        // 2. pre-process.
        let channels_last = self.channels_last;
        let mut h = tape.run(&[sample], move |x| {
            Ok(if channels_last {
                torch_cuda::group_norm::to_channels_last(&x[0]).apply(&self.conv_in)
            } else {
                x[0].apply(&self.conv_in)
            })
        })?;

        // 3. down: every ResNet/transformer output and every downsampled map is a skip connection.
        let mut skips = vec![h];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = tape.run(&[h, emb], move |x| Ok(resnet.forward(&x[0], &x[1])))?;
                if let Some(attention) = block.attentions.get(j) {
                    h = record_transformer(tape, attention, h, context, backend)?;
                }
                skips.push(h);
            }
            if let Some(down) = &block.downsampler {
                h = tape.run(&[h], move |x| Ok(down.forward(&x[0])))?;
                skips.push(h);
            }
        }

        // 4. mid.
        let mid = &self.mid_block;
        h = tape.run(&[h, emb], move |x| Ok(mid.resnets[0].forward(&x[0], &x[1])))?;
        h = record_transformer(tape, &mid.attention, h, context, backend)?;
        h = tape.run(&[h, emb], move |x| Ok(mid.resnets[1].forward(&x[0], &x[1])))?;

        // 5. up: each ResNet block consumes the most recent skip connection, concatenated after `h`.
        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let Some(skip) = skips.pop() else {
                    return Err(Error::Shape {
                        what: "UNet skip connections".to_owned(),
                        expected: "one per up ResNet block".to_owned(),
                        actual: "too few".to_owned(),
                    });
                };
                h = tape.run(&[h, skip, emb], move |x| {
                    Ok(resnet.forward(&Tensor::cat(&[&x[0], &x[1]], 1), &x[2]))
                })?;
                if let Some(attention) = block.attentions.get(j) {
                    h = record_transformer(tape, attention, h, context, backend)?;
                }
            }
            if let (Some(up), Some(&next_skip)) = (&block.upsampler, skips.last()) {
                let target = tape.get(next_skip).size();
                let size = [target[2], target[3]];
                h = tape.run(&[h], move |x| Ok(up.forward(&x[0], size)))?;
            }
        }

        // 6. post-process.
        let out = tape.run(&[h], move |x| {
            let out = self.conv_norm_out.forward_silu(&x[0]).apply(&self.conv_out);
            // The caller gets NCHW whatever the layout inside.
            Ok(if channels_last { out.contiguous() } else { out })
        })?;
        Ok((out, [sample, timesteps, context, text_embeds, time_ids]))
    }
}

impl HasLinears for UNet2DConditionModel {
    fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.time_embedding.for_each_linear("time_embedding", f);
        if let Some(tt) = &mut self.add_embedding {
            tt.add_embedding.for_each_linear("add_embedding", f);
        }
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            block.for_each_linear(&format!("down_blocks.{i}"), f);
        }
        self.mid_block.for_each_linear("mid_block", f);
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            block.for_each_linear(&format!("up_blocks.{i}"), f);
        }
    }

    /// Every convolution (`conv_in`, the blocks' `conv1`/`conv2`/`conv_shortcut`, the samplers'
    /// `conv`, 1×1 projections where the config has them, `conv_out`) with its diffusers path.
    fn for_each_conv(&mut self, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        f("conv_in", &mut self.conv_in);
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            block.for_each_conv(&format!("down_blocks.{i}"), f);
        }
        self.mid_block.for_each_conv("mid_block", f);
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            block.for_each_conv(&format!("up_blocks.{i}"), f);
        }
        f("conv_out", &mut self.conv_out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn every_linear_layer_is_visited_under_its_diffusers_path() {
        let cases = [
            (
                UNetConfig::tiny_sdxl(),
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            (
                UNetConfig::tiny_b(),
                "up_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj",
            ),
        ];
        for (config, example) in cases {
            let vs = nn::VarStore::new(Device::Cpu);
            let mut unet = UNet2DConditionModel::new(&vs.root(), &config);
            let variables = vs.variables();
            let mut visited = Vec::new();
            unet.for_each_linear(&mut |path, linear| {
                let weight = &variables[&format!("{path}.weight")];
                assert!(
                    weight.is_set_to(linear.weight()),
                    "{path}: not the variable of that name"
                );
                visited.push(path.to_owned());
            });
            // The 2-D weights of the store are exactly the linear layers (convolutions are 4-D).
            let mut linear_weights: Vec<String> = variables
                .iter()
                .filter(|(_, v)| v.dim() == 2)
                .map(|(k, _)| k.trim_end_matches(".weight").to_owned())
                .collect();
            linear_weights.sort();
            visited.sort();
            assert_eq!(visited, linear_weights);
            assert!(visited.iter().any(|p| p == example), "{example}");
        }
    }

    #[test]
    fn every_convolution_is_visited_and_goes_to_fp8() {
        for config in [UNetConfig::tiny_sdxl(), UNetConfig::tiny_b()] {
            let vs = nn::VarStore::new(Device::Cpu);
            let mut unet = UNet2DConditionModel::new(&vs.root(), &config);
            let variables = vs.variables();
            let mut visited = Vec::new();
            unet.for_each_conv(&mut |path, conv| {
                assert!(
                    variables[&format!("{path}.weight")].is_set_to(conv.weight()),
                    "{path}: not the variable of that name"
                );
                visited.push(path.to_owned());
            });
            // The 4-D weights of the store are exactly the convolutions.
            let mut conv_weights: Vec<String> = variables
                .iter()
                .filter(|(_, v)| v.dim() == 4)
                .map(|(k, _)| k.trim_end_matches(".weight").to_owned())
                .collect();
            conv_weights.sort();
            visited.sort();
            assert_eq!(visited, conv_weights);
            let elements: i64 = variables
                .values()
                .filter(|v| v.dim() == 4)
                .map(|v| v.numel() as i64)
                .sum();
            let report = unet.quantize_convs_fp8().unwrap();
            assert_eq!(
                (report.quantized, report.bytes_before, report.bytes_after),
                (
                    visited.len(),
                    4 * elements,
                    elements + 4 * visited.len() as i64
                )
            );
            assert!(
                vs.variables()
                    .values()
                    .filter(|v| v.dim() == 4)
                    .all(|v| v.kind() == Kind::Float8e4m3fn)
            );
            assert_eq!(
                unet.quantize_convs_fp8().unwrap().already_fp8,
                visited.len()
            );
        }
    }
}
