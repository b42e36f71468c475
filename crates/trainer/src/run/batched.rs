//! A sweep's batched execution (`--sweep_execution batched`, docs/SWEEPS.md): the micro-steps of
//! several variants computed in one UNet call, each variant's adapters on its own rows of the
//! batch ([`lora::attach_rows`]), and the parts of a step each variant still takes on its own.

use std::ops::Range;

use tch::{Kind, Tensor};

use super::{RunProgress, Trainer};
use crate::Result;
use crate::model::TrainModel;
use crate::step::Prepared;

impl Trainer {
    /// Why this run's micro-steps can never join a batched call, if they cannot: what the
    /// batched micro-step does not cover (docs/SWEEPS.md, "Batched execution").
    pub(crate) fn batch_refusal(&self) -> Option<&'static str> {
        let config = &self.config;
        if config.train_text_encoder {
            Some("--train_text_encoder (its text encoders are its own)")
        } else if config.use_dora {
            Some("--use_dora (row adapters are plain LoRA)")
        } else if config.lora_dropout > 0.0 {
            Some("--lora_dropout (its masks come from its own generator)")
        } else if !matches!(self.latents, crate::prepare::Latents::Cached(_)) {
            Some("latents encoded live (without --cache_latents)")
        } else {
            None
        }
    }

    /// The start of optimizer step `step` in a batched sweep: its learning rate.
    pub(crate) fn begin_step(&mut self, step: u64) -> Result<()> {
        self.stepper.set_learning_rate(step)?;
        Ok(())
    }

    /// Micro-step `index`'s rows and generator (as its run prepares them); the shape key of its
    /// UNet inputs when it can join a batched call.
    pub(crate) fn prepare_micro(&mut self, index: u64) -> Result<Option<Vec<i64>>> {
        self.stepper.prepare(&self.plan, &self.latents, index)?;
        Ok(self.stepper.batch_key(&self.text, &self.latents))
    }

    /// Micro-step `micro` of the current optimizer step on its own (this run's adapters on the
    /// shared UNet), exactly as its run computes it.
    pub(crate) fn micro_alone(&mut self, index: u64, micro: u64) -> Result<()> {
        self.model.activate()?;
        self.stepper.prepare(&self.plan, &self.latents, index)?;
        let (model, text, latents) = (&self.model, &self.text, &self.latents);
        self.stepper.micro_step(model, text, latents, micro)
    }

    /// The end of optimizer step `step` in a batched sweep: the optimizer step, then what follows
    /// it as in [`Trainer::advance`].
    pub(crate) fn end_step(&mut self, progress: &mut RunProgress, step: u64) -> Result<()> {
        // Its LoRA on the UNet, for what reads it there (checkpoints, validation).
        self.model.activate()?;
        self.stepper.optimizer_step(&self.model)?;
        progress.logs.progress.inc(1);
        if let Some(skipped) = self.after_step(step + 1, &mut progress.logs)? {
            progress.skipped = skipped;
        }
        Ok(())
    }
}

/// Micro-step `index` (the `micro`-th of its accumulation) of every run of `group` in one UNet
/// call: each run's inputs drawn as its own run draws them (its generator re-seeded for the
/// micro-step, then its draws), concatenated along the batch; each run's adapters on its own rows;
/// one forward (checkpointed if the runs are); each run's loss on its own rows with its own
/// weighting; one backward pass of the sum of the runs' scaled losses; then each run's gradients
/// handed over as after its own micro-step. The runs share one UNet (a sweep's) and their inputs'
/// shapes (the caller groups them by [`Trainer::prepare_micro`]'s key).
///
/// # Errors
/// Model and generator errors.
pub(crate) fn batched_micro_step(group: &mut [&mut Trainer], index: u64, micro: u64) -> Result<()> {
    let Some(first) = group.first() else {
        return Ok(());
    };
    let checkpointing = first.stepper.gradient_checkpointing();
    // Each run's inputs, drawn one run after another (its generator re-seeded first: with the
    // device's default generator the runs share one).
    let mut prepared: Vec<Prepared<'_>> = Vec::with_capacity(group.len());
    let mut rows: Vec<Range<i64>> = Vec::with_capacity(group.len());
    for trainer in group.iter_mut() {
        trainer
            .stepper
            .prepare(&trainer.plan, &trainer.latents, index)?;
    }
    let mut start = 0;
    for trainer in group.iter() {
        // Re-seeded again right before its draws (the loop above selected every run's rows).
        trainer.stepper.reseed(&trainer.plan, index)?;
        let inputs =
            trainer
                .stepper
                .prepare_inputs(&trainer.model, &trainer.text, &trainer.latents)?;
        let batch = inputs.objective.noisy.size()[0];
        rows.push(start..start + batch);
        start += batch;
        prepared.push(inputs);
    }
    fn cat<'a>(parts: impl Iterator<Item = &'a Tensor>) -> Tensor {
        Tensor::cat(&parts.collect::<Vec<_>>(), 0)
    }
    let sample = cat(prepared.iter().map(|p| &p.objective.noisy));
    let timesteps = cat(prepared.iter().map(|p| &p.timesteps));
    let context = cat(prepared.iter().map(|p| &p.context));
    let pooled = cat(prepared.iter().map(|p| &p.pooled));
    let time_ids = cat(prepared.iter().map(|p| &p.time_ids));
    let unet_inputs = sdxl_model::unet::UNetInputs {
        sample: &sample,
        timesteps: &timesteps,
        encoder_hidden_states: &context,
        text_embeds: Some(&pooled),
        time_ids: Some(&time_ids),
    };
    let models: Vec<&TrainModel> = group.iter().map(|t| &t.model).collect();
    let losses = TrainModel::with_rows(&models, &rows, |unet| {
        let losses_of = |prediction: &Tensor| -> Result<(Vec<Tensor>, Tensor)> {
            let mut losses = Vec::with_capacity(group.len());
            let mut total: Option<Tensor> = None;
            for ((trainer, inputs), range) in group.iter().zip(&prepared).zip(&rows) {
                let own = prediction.narrow(0, range.start, range.end - range.start);
                let loss = trainer.stepper.loss(&inputs.objective, &own)?;
                let scaled = trainer.stepper.scaled_loss(&loss)?;
                total = Some(match total {
                    Some(sum) => sum + scaled,
                    None => scaled,
                });
                losses.push(loss);
            }
            let total = total.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, sample.device())));
            Ok((losses, total))
        };
        if checkpointing {
            let forward = unet.forward_checkpointed_drawing_from(&unet_inputs, None)?;
            let prediction = forward.output().detach().set_requires_grad(true);
            let (losses, total) = losses_of(&prediction)?;
            total.backward();
            forward.backward(&prediction.grad())?;
            Ok(losses)
        } else {
            let (losses, total) = losses_of(&unet.forward(&unet_inputs)?)?;
            total.backward();
            Ok(losses)
        }
    })?;
    drop(prepared);
    for (trainer, loss) in group.iter_mut().zip(&losses) {
        trainer.stepper.add_loss(loss);
        trainer.stepper.after_backward(&trainer.model, micro)?;
    }
    Ok(())
}
