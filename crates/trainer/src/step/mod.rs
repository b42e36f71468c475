//! One training step as a fixed sequence of device operations on persistent tensors.
//!
//! A micro-step follows diffusers' SDXL LoRA scripts (`train_dreambooth_lora_sdxl.py`, and
//! `train_text_to_image_lora_sdxl.py` for offset noise, v-prediction and min-SNR-γ): draw a latent
//! sample from each image's cached posterior and scale it, draw noise (plus offset noise) and uniform
//! timesteps ([`Draws`]), noise the latents with the DDPM schedule ([`Objective`]), predict with the
//! UNet (with SDXL's pooled text and time-id conditioning; with `--train_text_encoder` the text
//! encoders encode the batch's token ids first, inside the step), take the MSE against ε or v in fp32
//! (min-SNR weighted if asked), and back-propagate
//! `loss / accumulation` into the fp32 LoRA parameters (times the loss scale under fp16). The
//! optimizer step unscales the gradients (fp16), clips the gradient norm, then applies the optimizer only
//! if the loss and the norm are finite (and the loss scaler found no overflow) — decided by a
//! device tensor, so a bad step is skipped and counted without the host ever waiting for the
//! device.
//!
//! Nothing here reads a tensor value on the host or depends on one for a shape: the only per-step
//! host inputs are copied into persistent tensors ([`StepInputs`]) before the step runs, the random
//! draws come from libtorch's generator on the device, and the learning rate is written into the
//! optimizer's device tensor. That keeps the whole step capturable as a CUDA graph.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use optim8bit::{GradScaler, Optimizer, clip_grad_norm};
use sdxl_model::schedulers::DdpmSchedule;
use sdxl_model::unet::{UNet2DConditionModel, UNetInputs};

mod objective;
mod share;
mod stepper;
mod sync;
mod text;

pub use objective::{Draws, LossWeights, Objective};
pub use share::RowShare;
pub use stepper::{StepGraphs, Stepper};
pub(crate) use sync::broadcast_lora;

use crate::model::{CheckpointedText, TextEncoders};
use crate::prepare::TextConditioning;
use crate::rng::RunRng;
use crate::{Error, Result};
use text::conditioning;

/// Where a micro-step's clean latents come from.
#[derive(Debug)]
pub enum LatentBatch<'a> {
    /// Gathered from a bucket's cached posteriors by [`StepInputs::latent_rows`]: `mean + std·ε`,
    /// fp32, unscaled.
    Cached {
        /// Posterior means `[rows, 4, h, w]`.
        mean: &'a Tensor,
        /// Posterior standard deviations `[rows, 4, h, w]`.
        std: &'a Tensor,
        /// Time ids `[rows, 6]`.
        time_ids: &'a Tensor,
    },
    /// Encoded this step (random crops): a posterior sample and its time ids.
    Fresh {
        /// Unscaled latents `[batch, 4, h, w]`.
        latents: &'a Tensor,
        /// Time ids `[batch, 6]`.
        time_ids: &'a Tensor,
    },
}

/// The rows one micro-step gathers: for each sample of the batch, its row in the cached latents
/// of its bucket and its row in the prompt table.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRows {
    /// The bucket of the batch.
    pub bucket: usize,
    /// Rows of the bucket's cached latents, `[batch]` (zeros when latents are encoded live).
    pub latents: Vec<i64>,
    /// Rows of the prompt table, `[batch]`.
    pub prompts: Vec<i64>,
    /// How the loss weighs each sample (`None`: the plain mean).
    pub weights: Option<LossWeights>,
}

/// The per-step host inputs, in persistent device tensors.
#[derive(Debug)]
pub struct StepInputs {
    /// Row of each sample in its bucket's cached latents, `[batch]` int64.
    pub latent_rows: Tensor,
    /// Row of each sample's prompt in the prompt table, `[batch]` int64.
    pub prompt_rows: Tensor,
    /// Each sample's loss coefficient and min-SNR mask, `[batch]` f32 each, when the plan weighs
    /// samples ([`Objective::weighted_loss`]).
    pub loss_weights: Option<(Tensor, Tensor)>,
    /// Which rows of each global batch this process trains on (data parallelism): its draws of
    /// posterior samples, noise and timesteps are those rows of the global batch's draws.
    pub share: RowShare,
    /// The run's generator, which every draw of the step comes from.
    pub(crate) rng: Arc<RunRng>,
    /// The rows of every planned micro-step, `[micro-steps, 2, batch]` int64 on the device, their
    /// weights `[micro-steps, 2, batch]` f32 if any, their buckets, and the first one's index.
    plan: Option<Plan>,
}

#[derive(Debug)]
struct Plan {
    first: u64,
    rows: Tensor,
    weights: Option<Tensor>,
    buckets: Vec<usize>,
}

impl StepInputs {
    /// Inputs for batches of `batch` on `device`, drawing from the run's generator `rng`.
    pub(crate) fn new(batch: i64, device: Device, rng: Arc<RunRng>) -> Self {
        Self {
            latent_rows: Tensor::zeros([batch], (Kind::Int64, device)),
            prompt_rows: Tensor::zeros([batch], (Kind::Int64, device)),
            loss_weights: None,
            share: RowShare::whole(batch),
            rng,
            plan: None,
        }
    }

    /// Uploads the rows of the micro-steps `first, first + 1, …` in one copy.
    ///
    /// # Errors
    /// libtorch errors (rows of another batch size).
    pub fn set_plan(&mut self, first: u64, steps: &[PlannedRows]) -> Result<()> {
        let batch = self.latent_rows.size()[0];
        let device = self.latent_rows.device();
        let flat: Vec<i64> = steps
            .iter()
            .flat_map(|s| s.latents.iter().chain(&s.prompts).copied())
            .collect();
        let rows = Tensor::f_from_slice(&flat)?
            .f_view([steps.len() as i64, 2, batch])?
            .f_to_device(device)?;
        let weights = if steps.iter().any(|s| s.weights.is_some()) {
            let mut flat: Vec<f32> = Vec::with_capacity(steps.len() * 2 * batch as usize);
            for step in steps {
                let weights = step
                    .weights
                    .clone()
                    .unwrap_or_else(|| LossWeights::mean(batch as usize));
                flat.extend(weights.coefficients.iter().chain(&weights.snr_mask));
            }
            let zeros = || Tensor::zeros([batch], (Kind::Float, device));
            self.loss_weights = Some((zeros(), zeros()));
            Some(
                Tensor::f_from_slice(&flat)?
                    .f_view([steps.len() as i64, 2, batch])?
                    .f_to_device(device)?,
            )
        } else {
            None
        };
        let buckets = steps.iter().map(|s| s.bucket).collect();
        self.plan = Some(Plan {
            first,
            rows,
            weights,
            buckets,
        });
        Ok(())
    }

    /// Copies micro-step `index`'s rows (and weights) of the plan into the persistent inputs
    /// (device to device) and returns its bucket.
    ///
    /// # Errors
    /// [`crate::Error::InvalidOption`] when `index` is outside the plan; libtorch errors.
    pub fn select(&mut self, index: u64) -> Result<usize> {
        let outside = || crate::Error::InvalidOption {
            option: "--max_train_steps",
            problem: format!("micro-step {index} is outside the batch plan"),
        };
        let plan = self.plan.as_ref().ok_or_else(outside)?;
        let row = index
            .checked_sub(plan.first)
            .filter(|&r| (r as usize) < plan.buckets.len())
            .ok_or_else(outside)?;
        let rows = plan.rows.f_get(row as i64)?;
        self.latent_rows.f_copy_(&rows.f_get(0)?)?;
        self.prompt_rows.f_copy_(&rows.f_get(1)?)?;
        if let (Some(weights), Some((coefficients, mask))) = (&plan.weights, &mut self.loss_weights)
        {
            let weights = weights.f_get(row as i64)?;
            coefficients.f_copy_(&weights.f_get(0)?)?;
            mask.f_copy_(&weights.f_get(1)?)?;
        }
        Ok(plan.buckets[row as usize])
    }

    /// The buckets the uploaded plan uses, each once, ascending.
    pub fn buckets(&self) -> Vec<usize> {
        let mut buckets = self
            .plan
            .as_ref()
            .map(|p| p.buckets.clone())
            .unwrap_or_default();
        buckets.sort_unstable();
        buckets.dedup();
        buckets
    }
}

/// The fixed settings of the step.
#[derive(Debug, Clone)]
pub struct StepSettings {
    /// The UNet's element type (fp32, bf16 or fp16).
    pub kind: Kind,
    /// The VAE's `scaling_factor` (0.13025 for SDXL).
    pub scaling_factor: f64,
    /// The VAE's `shift_factor`, if any.
    pub shift_factor: f64,
    /// Offset-noise strength (0: off).
    pub noise_offset: f64,
    /// Min-SNR-γ weighting.
    pub snr_gamma: Option<f64>,
    /// Micro-steps per optimizer step (the loss is divided by it).
    pub accumulation: i64,
    /// Recompute activations in the backward pass.
    pub gradient_checkpointing: bool,
    /// Gradient-norm clipping threshold.
    pub max_grad_norm: f64,
}

/// Device-side running sums that the host reads only every `--logging_steps`.
#[derive(Debug)]
pub struct Accumulators {
    /// Sum over micro-steps of this optimizer step's loss / accumulation.
    pub step_loss: Tensor,
    /// Sum of the losses of applied optimizer steps since the last read.
    pub window_loss: Tensor,
    /// Applied optimizer steps since the last read.
    pub window_steps: Tensor,
    /// Optimizer steps skipped for non-finite values, over the whole run.
    pub skipped: Tensor,
    /// The gradient norm before clipping of the last optimizer step.
    pub grad_norm: Tensor,
    /// Optimizer steps the fp16 loss scaler skipped for overflowing gradients of a finite loss,
    /// over the whole run (not counted in `skipped`: early in a run they are how the scale finds
    /// its level).
    pub overflows: Tensor,
    /// `--mixed_precision fp16`'s dynamic loss scaling: the loss is scaled before each backward
    /// pass, the gradients unscaled before clipping, the step gated and the scale updated.
    pub scaler: Option<GradScaler>,
}

impl Accumulators {
    /// Zeros on `device` (fp64 sums so long windows lose nothing).
    pub fn new(device: Device) -> Self {
        let zero = || Tensor::zeros([], (Kind::Double, device));
        Self {
            step_loss: zero(),
            window_loss: zero(),
            window_steps: zero(),
            skipped: zero(),
            grad_norm: zero(),
            overflows: zero(),
            scaler: None,
        }
    }
}

/// A micro-step's UNet inputs and objective, drawn exactly as its run draws them: the first part
/// of [`micro_step`], which a batched sweep micro-step ([`crate::sweep`]) runs for each variant
/// before one UNet call over all of them.
pub(crate) struct Prepared<'m> {
    /// The noised latents, their target and weights.
    pub(crate) objective: Objective,
    /// The drawn timesteps, `[batch]`.
    pub(crate) timesteps: Tensor,
    /// The prompt embeddings, pooled embeddings and time ids, in the UNet's type.
    pub(crate) context: Tensor,
    pub(crate) pooled: Tensor,
    pub(crate) time_ids: Tensor,
    /// With trained, checkpointed text encoders: their forward, to back-propagate through.
    pub(crate) checkpointed: Option<CheckpointedText<'m>>,
}

impl Prepared<'_> {
    /// The UNet's inputs.
    pub(crate) fn unet_inputs(&self) -> UNetInputs<'_> {
        UNetInputs {
            sample: &self.objective.noisy,
            timesteps: &self.timesteps,
            encoder_hidden_states: &self.context,
            text_embeds: Some(&self.pooled),
            time_ids: Some(&self.time_ids),
        }
    }
}

/// Steps 1 to 3 of a micro-step: the clean latents, the draws and objective, the conditioning.
///
/// # Errors
/// Generator and model errors.
pub(crate) fn prepare_micro<'m>(
    encoders: Option<&'m TextEncoders>,
    schedule: &DdpmSchedule,
    text: &TextConditioning,
    latents: &LatentBatch<'_>,
    inputs: &StepInputs,
    settings: &StepSettings,
) -> Result<Prepared<'m>> {
    // 1. Clean latents: a posterior sample, scaled as the UNet was trained on.
    let (clean, time_ids) = match latents {
        LatentBatch::Cached {
            mean,
            std,
            time_ids,
        } => {
            let mean = mean.index_select(0, &inputs.latent_rows);
            let std = std.index_select(0, &inputs.latent_rows);
            (
                &mean + std * inputs.share.randn_like(&mean, &inputs.rng)?,
                time_ids.index_select(0, &inputs.latent_rows),
            )
        }
        LatentBatch::Fresh { latents, time_ids } => {
            (latents.to_kind(Kind::Float), time_ids.shallow_clone())
        }
    };
    let clean = ((clean - settings.shift_factor) * settings.scaling_factor).to_kind(settings.kind);
    // 2. Noise, offset noise, timesteps; the objective they define.
    let draws = Draws::sample_share(
        &clean,
        &inputs.share,
        settings,
        schedule.num_train_timesteps(),
        &inputs.rng,
    )?;
    let objective = Objective::new(schedule, &clean, &draws, settings)?;
    // 3. Conditioning rows of this batch's prompts (encoded now when the text encoders train).
    let (conditioning, checkpointed) = conditioning(encoders, text, inputs, settings)?;
    Ok(Prepared {
        objective,
        timesteps: draws.timesteps,
        context: conditioning.context.to_kind(settings.kind),
        pooled: conditioning.pooled.to_kind(settings.kind),
        time_ids: time_ids.to_kind(settings.kind),
        checkpointed,
    })
}

/// One micro-step: forward, loss, backward into the LoRA gradients; adds `loss / accumulation` to
/// `acc.step_loss`.
///
/// # Errors
/// Model errors (shapes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn micro_step(
    unet: &UNet2DConditionModel,
    encoders: Option<&TextEncoders>,
    schedule: &DdpmSchedule,
    text: &TextConditioning,
    latents: &LatentBatch<'_>,
    inputs: &StepInputs,
    settings: &StepSettings,
    acc: &mut Accumulators,
) -> Result<()> {
    let prepared = prepare_micro(encoders, schedule, text, latents, inputs, settings)?;
    let objective = &prepared.objective;
    let unet_inputs = prepared.unet_inputs();
    // 4. Forward and backward.
    let loss = if settings.gradient_checkpointing {
        let forward =
            unet.forward_checkpointed_drawing_from(&unet_inputs, inputs.rng.generator().cloned())?;
        // The loss's gradient w.r.t. the prediction, by autograd on a detached copy; the UNet's own
        // backward then recomputes block by block.
        let prediction = forward.output().detach().set_requires_grad(true);
        let loss = step_loss(objective, &prediction, inputs)?;
        backward_scaled(&loss, settings, acc)?;
        let grads = forward.backward(&prediction.grad())?;
        if let Some(text_forward) = &prepared.checkpointed {
            // The UNet's input gradients continue through the text encoders, layer by layer.
            let context_grad = grads.encoder_hidden_states.ok_or(Error::InvalidOption {
                option: "--train_text_encoder",
                problem: "no gradient reached the UNet's encoder_hidden_states".into(),
            })?;
            text_forward.backward(&context_grad, grads.text_embeds.as_ref())?;
        }
        loss
    } else {
        let loss = step_loss(objective, &unet.forward(&unet_inputs)?, inputs)?;
        backward_scaled(&loss, settings, acc)?;
        loss
    };
    add_step_loss(&loss, settings, acc);
    Ok(())
}

/// Adds `loss / accumulation` to `acc.step_loss` (no gradient).
pub(crate) fn add_step_loss(loss: &Tensor, settings: &StepSettings, acc: &mut Accumulators) {
    tch::no_grad(|| {
        let _ = acc
            .step_loss
            .g_add_(&(loss.detach().to_kind(Kind::Double) / settings.accumulation as f64));
    });
}

/// Back-propagates `loss / accumulation`, times the loss scale under fp16 (accelerate's
/// `backward`: divide by the accumulation, then `scaler.scale(loss).backward()`).
fn backward_scaled(loss: &Tensor, settings: &StepSettings, acc: &Accumulators) -> Result<()> {
    scaled_for_backward(loss, settings, acc)?.backward();
    Ok(())
}

/// `loss / accumulation`, times the loss scale under fp16: what [`backward_scaled`]
/// back-propagates.
pub(crate) fn scaled_for_backward(
    loss: &Tensor,
    settings: &StepSettings,
    acc: &Accumulators,
) -> Result<Tensor> {
    let loss = loss / settings.accumulation as f64;
    Ok(match &acc.scaler {
        Some(scaler) => scaler.scale(&loss)?,
        None => loss,
    })
}

/// The plain mean loss, or the per-sample weighted one when the plan weighs samples.
pub(crate) fn step_loss(
    objective: &Objective,
    prediction: &Tensor,
    inputs: &StepInputs,
) -> Result<Tensor> {
    match &inputs.loss_weights {
        Some((coefficients, mask)) => objective.weighted_loss(prediction, coefficients, mask),
        None => objective.loss(prediction),
    }
}

/// The optimizer step after `accumulation` micro-steps: unscale (fp16), clip, then the optimizer if
/// everything is finite (else a counted skip), then zero the gradients and fold the step's loss
/// into the window.
///
/// Under fp16 the gradients are unscaled once, before clipping (accelerate's `clip_grad_norm_`
/// calls `scaler.unscale_` first), the step is applied only if the scaler found no inf or NaN
/// too, and the scale is updated. A step whose loss is finite but whose scaled gradients
/// overflowed is counted in `acc.overflows`, not in `acc.skipped` (the `--max_nonfinite_steps`
/// count): that is the scaler doing its work.
///
/// # Errors
/// Optimizer errors.
///
/// `zero_grads` false leaves the gradients as they are: a captured first micro-step overwrites them.
pub(crate) fn optimizer_step(
    optimizer: &mut Optimizer,
    params: &[Tensor],
    settings: &StepSettings,
    acc: &mut Accumulators,
    zero_grads: bool,
) -> Result<()> {
    if let Some(scaler) = &mut acc.scaler {
        scaler.unscale(params)?;
    }
    let norm = clip_grad_norm(params, settings.max_grad_norm)?;
    tch::no_grad(|| -> Result<()> {
        let (finite, overflow) = step_gate(&norm, acc)?;
        optimizer.step_if(&finite)?;
        if let Some(scaler) = &mut acc.scaler {
            scaler.update()?;
        }
        let applied = finite.to_kind(Kind::Double);
        let overflow = overflow.to_kind(Kind::Double);
        let _ = acc.overflows.g_add_(&overflow);
        let _ = acc
            .skipped
            .g_add_(&(applied.neg().g_add_scalar(1.0) - &overflow));
        let _ = acc.window_steps.g_add_(&applied);
        // where(), not multiplication: 0 · NaN would poison the window.
        let _ = acc.window_loss.g_add_(
            &acc.step_loss
                .where_self(&finite, &acc.step_loss.zeros_like()),
        );
        acc.grad_norm.copy_(&norm.to_kind(Kind::Double));
        let _ = acc.step_loss.zero_();
        Ok(())
    })?;
    if zero_grads {
        optimizer.zero_grad()?;
    }
    Ok(())
}

/// Whether the step applies (loss, norm and, under fp16, the scaler's check all finite) and
/// whether it is a scaler overflow (a finite loss whose gradients overflowed), as 0-dim bools.
fn step_gate(norm: &Tensor, acc: &Accumulators) -> Result<(Tensor, Tensor)> {
    let loss_finite = acc.step_loss.isfinite();
    let finite = norm.isfinite().logical_and(&loss_finite);
    Ok(match &acc.scaler {
        Some(scaler) => {
            let unscaled_finite = scaler.finite()?;
            (
                finite.logical_and(&unscaled_finite),
                loss_finite.logical_and(&unscaled_finite.logical_not()),
            )
        }
        None => (finite, loss_finite.zeros_like()),
    })
}

#[cfg(test)]
mod fp16_tests;
#[cfg(test)]
mod tests {
    use super::*;
    use optim8bit::{AdamWConfig, OptimizerConfig, ParamGroup};

    fn setup() -> (Tensor, Optimizer, StepSettings, Accumulators) {
        setup_in(Kind::Float)
    }

    /// One fp32 parameter under fp32 AdamW, the step's settings in compute type `kind`, fresh sums
    /// (also the fp16 tests' start).
    pub(super) fn setup_in(kind: Kind) -> (Tensor, Optimizer, StepSettings, Accumulators) {
        let param = Tensor::from_slice(&[0.5f32, -0.25, 1.0]).set_requires_grad(true);
        let optimizer = OptimizerConfig::AdamW(AdamWConfig::fp32())
            .build(vec![ParamGroup::new(vec![param.shallow_clone()], 0.1, 0.0)])
            .unwrap();
        let settings = StepSettings {
            kind,
            scaling_factor: 1.0,
            shift_factor: 0.0,
            noise_offset: 0.0,
            snr_gamma: None,
            accumulation: 1,
            gradient_checkpointing: false,
            max_grad_norm: 1.0,
        };
        (param, optimizer, settings, Accumulators::new(Device::Cpu))
    }

    pub(super) fn backward(param: &Tensor, scale: f64) {
        (param * scale).sum(Kind::Float).backward();
    }

    #[test]
    fn a_non_finite_loss_skips_the_step_on_the_device_and_counts_it() {
        let (param, mut optimizer, settings, mut acc) = setup();
        let before = param.detach().copy();
        backward(&param, 1.0);
        let _ = acc.step_loss.fill_(f64::NAN);
        optimizer_step(
            &mut optimizer,
            &[param.shallow_clone()],
            &settings,
            &mut acc,
            true,
        )
        .unwrap();
        assert!(
            param.detach().equal(&before),
            "a skipped step moved the parameters"
        );
        assert_eq!(acc.skipped.double_value(&[]), 1.0);
        assert_eq!(
            (
                acc.window_loss.double_value(&[]),
                acc.window_steps.double_value(&[])
            ),
            (0.0, 0.0)
        );
        assert_eq!(
            param.grad().abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "gradients are zeroed after a skip too"
        );

        // A finite step afterwards applies and enters the window.
        backward(&param, 1.0);
        let _ = acc.step_loss.fill_(0.75);
        optimizer_step(
            &mut optimizer,
            &[param.shallow_clone()],
            &settings,
            &mut acc,
            true,
        )
        .unwrap();
        assert!(!param.detach().equal(&before));
        assert_eq!(acc.skipped.double_value(&[]), 1.0);
        assert_eq!(
            (
                acc.window_loss.double_value(&[]),
                acc.window_steps.double_value(&[])
            ),
            (0.75, 1.0)
        );
        assert_eq!(acc.step_loss.double_value(&[]), 0.0);
    }

    #[test]
    fn an_infinite_gradient_skips_the_step_and_clipping_reports_the_norm() {
        let (param, mut optimizer, settings, mut acc) = setup();
        let before = param.detach().copy();
        backward(&param, f64::INFINITY);
        optimizer_step(
            &mut optimizer,
            &[param.shallow_clone()],
            &settings,
            &mut acc,
            true,
        )
        .unwrap();
        assert!(param.detach().equal(&before));
        assert_eq!(acc.skipped.double_value(&[]), 1.0);
        assert!(acc.grad_norm.double_value(&[]).is_infinite());

        backward(&param, 4.0); // norm 4·√3 > 1: clipped, applied
        optimizer_step(
            &mut optimizer,
            &[param.shallow_clone()],
            &settings,
            &mut acc,
            true,
        )
        .unwrap();
        assert!((acc.grad_norm.double_value(&[]) - 4.0 * 3f64.sqrt()).abs() < 1e-5);
        assert!(!param.detach().equal(&before));
    }
}
