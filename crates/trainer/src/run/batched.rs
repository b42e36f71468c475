//! A sweep's batched execution (`--sweep_execution batched`, docs/SWEEPS.md): the micro-steps of
//! several variants computed in one UNet call, each variant's adapters on its own rows of the
//! batch ([`lora::attach_rows`]), and the parts of a step each variant still takes on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use tch::{Kind, Tensor};
use torch_cuda::rng::Generator;
use torch_cuda::{CaptureMode, CudaGraph};

use super::{RunProgress, Trainer};
use crate::logs::say;
use crate::model::TrainModel;
use crate::step::Prepared;
use crate::{Error, Result};

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
        self.prepare_alone(index)?;
        self.micro_prepared(micro)
    }

    /// What micro-step `index` needs before it runs on its own: this run's adapters on the shared
    /// UNet, its generator re-seeded and its rows selected ([`crate::step::Stepper::prepare`]).
    /// Returns its bucket.
    fn prepare_alone(&mut self, index: u64) -> Result<usize> {
        self.model.activate()?;
        self.stepper.prepare(&self.plan, &self.latents, index)
    }

    /// The device work of micro-step `micro` on its own, after [`Trainer::prepare_alone`].
    fn micro_prepared(&mut self, micro: u64) -> Result<()> {
        let (model, text, latents) = (&self.model, &self.text, &self.latents);
        self.stepper.micro_step(model, text, latents, micro)
    }

    /// Its generator re-seeded for micro-step `index` (before a replay: a capture leaves it where
    /// it was).
    fn reseed(&self, index: u64) -> Result<()> {
        self.stepper.reseed(&self.plan, index)
    }

    /// The bucket of the micro-step prepared last.
    pub(crate) fn micro_bucket(&self) -> usize {
        self.stepper.bucket()
    }

    /// The end of optimizer step `step` in a batched sweep: the optimizer step (replayed from its
    /// graph with `--cuda_graph`: `graphs`, this variant's index in them), then what follows it as
    /// in [`Trainer::advance`].
    pub(crate) fn end_step(
        &mut self,
        progress: &mut RunProgress,
        step: u64,
        graphs: Option<(&mut SweepGraphs, usize)>,
    ) -> Result<()> {
        // Its LoRA on the UNet, for what reads it there (checkpoints, validation).
        self.model.activate()?;
        match graphs {
            Some((graphs, variant)) => graphs.optimizer_step(step, variant, self)?,
            None => self.stepper.optimizer_step(&self.model)?,
        }
        progress.logs.progress.inc(1);
        if let Some(skipped) = self.after_step(step + 1, &mut progress.logs)? {
            progress.skipped = skipped;
        }
        Ok(())
    }
}

/// Micro-step `index` (the `micro`-th of its accumulation) of every run of `group` in one UNet
/// call: each run's rows selected and its generator re-seeded for the micro-step
/// ([`crate::step::Stepper::prepare`]), then [`batched_device_work`].
///
/// # Errors
/// Model and generator errors.
pub(crate) fn batched_micro_step(group: &mut [&mut Trainer], index: u64, micro: u64) -> Result<()> {
    for trainer in group.iter_mut() {
        trainer
            .stepper
            .prepare(&trainer.plan, &trainer.latents, index)?;
    }
    batched_device_work(group, Some(index), micro)
}

/// The device work of a batched micro-step (what `--cuda_graph` captures): each run's inputs drawn
/// as its own run draws them, concatenated along the batch; each run's adapters on its own rows;
/// one forward (checkpointed if the runs are); each run's loss on its own rows with its own
/// weighting; one backward pass of the sum of the runs' scaled losses; then each run's gradients
/// handed over as after its own micro-step. The runs share one UNet (a sweep's) and their inputs'
/// shapes (the caller groups them by [`Trainer::prepare_micro`]'s key); their rows are selected
/// and their generators seeded for the micro-step already.
///
/// `reseed`: micro-step `index`, whose seed each run's generator takes again right before its
/// draws (eagerly; with the device's default generator the runs share one). `None` inside a
/// capture, where each run draws from a generator of its own (seeded before each replay).
///
/// # Errors
/// Model and generator errors.
fn batched_device_work(group: &mut [&mut Trainer], reseed: Option<u64>, micro: u64) -> Result<()> {
    let Some(first) = group.first() else {
        return Ok(());
    };
    let checkpointing = first.stepper.gradient_checkpointing();
    let mut prepared: Vec<Prepared<'_>> = Vec::with_capacity(group.len());
    let mut rows: Vec<Range<i64>> = Vec::with_capacity(group.len());
    let mut start = 0;
    for trainer in group.iter() {
        if let Some(index) = reseed {
            trainer.reseed(index)?;
        }
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

/// The most micro-step graphs a batched sweep captures (each holds a whole forward and backward
/// pass): beyond them a new combination of variants and buckets runs eagerly (said once).
pub(crate) const MAX_SWEEP_GRAPHS: usize = 64;

/// What a micro-step graph of a batched sweep replays: the variants of one call (their indices in
/// the sweep, in the order of their rows) each with its bucket, and the micro-step's index in the
/// accumulation (the first writes the gradients, the others add to them). A single member is a
/// variant's micro-step on its own, as its run captures it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct GraphKey {
    /// `(variant, bucket)` of each member, in the order of their rows.
    pub(crate) members: Vec<(usize, usize)>,
    /// The micro-step's index in its accumulation.
    pub(crate) micro: u64,
}

/// What a micro-step of a captured batched sweep does ([`SweepGraphs::launch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Launch {
    /// Run eagerly: a warm-up step, a combination not run eagerly before (its first run chooses
    /// its kernels), one that cannot be captured, or one beyond [`MAX_SWEEP_GRAPHS`].
    Eager,
    /// Capture its graph, then replay it.
    Capture,
    /// Replay the graph captured for it.
    Replay,
}

/// Where a micro-step's combination stands in [`SweepGraphs`].
#[derive(Debug, Clone, Copy)]
struct KeyState {
    /// Its graph was captured.
    captured: bool,
    /// It ran eagerly before (its kernels chosen, its shapes seen).
    warmed: bool,
    /// Every member draws from a generator of its own (which a graph registers).
    capturable: bool,
}

/// Why a micro-step past the warm-up stays eager (said once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eager {
    /// [`MAX_SWEEP_GRAPHS`] graphs are captured already.
    Full,
    /// A member draws from the device's default generator, which the runs share.
    DefaultGenerator,
}

/// What a micro-step of optimizer step `step` does, for a sweep that captures from step
/// `from_step` on and holds `graphs` micro-step graphs: replay its graph if captured; else capture
/// it once past the warm-up if it ran eagerly before, can be captured and the limit allows;
/// else run eagerly (with the reason, past the warm-up).
fn decide(step: u64, from_step: u64, state: KeyState, graphs: usize) -> (Launch, Option<Eager>) {
    if state.captured {
        return (Launch::Replay, None);
    }
    if step < from_step || !state.warmed {
        return (Launch::Eager, None);
    }
    if !state.capturable {
        return (Launch::Eager, Some(Eager::DefaultGenerator));
    }
    if graphs >= MAX_SWEEP_GRAPHS {
        return (Launch::Eager, Some(Eager::Full));
    }
    (Launch::Capture, None)
}

/// A batched sweep's CUDA graphs (`--sweep_execution batched --cuda_graph`, docs/SWEEPS.md): one
/// per combination of variants and buckets of a micro-step ([`GraphKey`]), captured after the
/// single run's warm-up steps on first sight of a combination already run eagerly once, and one
/// per variant for its optimizer step; all in one memory pool (they never run concurrently, and
/// what one leaves for another lives in persistent tensors). A combination whose membership
/// changed (a variant stopped, the buckets regrouped) is another key: it never replays a graph
/// captured for other members. Graphs of combinations that do not recur stay until the sweep
/// ends (their memory is the shared pool's).
pub(crate) struct SweepGraphs {
    device: usize,
    /// The first optimizer step that may capture (the sweep's start plus the warm-up steps).
    from_step: u64,
    micro_steps: BTreeMap<GraphKey, CudaGraph>,
    optimizer_steps: BTreeMap<usize, CudaGraph>,
    /// The combinations run eagerly so far.
    warmed: BTreeSet<GraphKey>,
    /// What was said about micro-steps left eager (said once).
    told: BTreeSet<&'static str>,
    /// Micro-steps run eagerly so far (captures included: they run the work once to record it).
    eager_launches: u64,
}

impl SweepGraphs {
    /// No graphs yet, for CUDA device `device`; captures from optimizer step `from_step` on.
    pub(crate) fn new(device: usize, from_step: u64) -> Self {
        Self {
            device,
            from_step,
            micro_steps: BTreeMap::new(),
            optimizer_steps: BTreeMap::new(),
            warmed: BTreeSet::new(),
            told: BTreeSet::new(),
            eager_launches: 0,
        }
    }

    /// How many micro-steps ran eagerly or were captured so far: a step during which this did not
    /// change replayed graphs only (`--profile_step` says which).
    pub(crate) fn eager_launches(&self) -> u64 {
        self.eager_launches
    }

    /// The graphs' shared memory pool: any graph captured so far (`None` before the first).
    fn pool(&self) -> Option<&CudaGraph> {
        self.micro_steps
            .values()
            .next()
            .or_else(|| self.optimizer_steps.values().next())
    }

    /// What micro-step `key` of optimizer step `step` does (capturable: whether every member draws
    /// from a generator of its own); a combination that runs eagerly counts as warmed up.
    pub(crate) fn launch(&mut self, step: u64, key: &GraphKey, capturable: bool) -> Launch {
        let state = KeyState {
            captured: self.micro_steps.contains_key(key),
            warmed: self.warmed.contains(key),
            capturable,
        };
        let (launch, why) = decide(step, self.from_step, state, self.micro_steps.len());
        match why {
            Some(Eager::Full) => self.tell(
                "full",
                format!(
                    "--cuda_graph: {MAX_SWEEP_GRAPHS} micro-step graphs captured; further \
                     combinations of variants and buckets run eagerly (said once)"
                ),
            ),
            Some(Eager::DefaultGenerator) => self.tell(
                "generators",
                "--cuda_graph: micro-steps whose variants draw from the device's default \
                 generator (no generator of their own in this build) run eagerly (said once)",
            ),
            None => {}
        }
        if launch == Launch::Eager {
            self.warmed.insert(key.clone());
        }
        if launch != Launch::Replay {
            self.eager_launches += 1;
        }
        launch
    }

    fn tell(&mut self, what: &'static str, line: impl Into<String>) {
        if self.told.insert(what) {
            say(line.into());
        }
    }

    /// Micro-step `index` (`micro`-th of optimizer step `step`) of the variants `group` (of
    /// indices `members`, named `names`) in one UNet call, their rows selected and generators
    /// seeded ([`Trainer::prepare_micro`]): eagerly ([`batched_micro_step`]), or replayed from its
    /// graph (captured first if due).
    ///
    /// # Errors
    /// [`Error::CudaGraph`]; model and generator errors.
    pub(crate) fn batched(
        &mut self,
        step: u64,
        (members, names): (&[usize], &[&str]),
        group: &mut [&mut Trainer],
        index: u64,
        micro: u64,
    ) -> Result<()> {
        let key = GraphKey {
            members: members
                .iter()
                .zip(group.iter())
                .map(|(&i, t)| (i, t.micro_bucket()))
                .collect(),
            micro,
        };
        let capturable = group.iter().all(|t| t.stepper.own_generator().is_some());
        match self.launch(step, &key, capturable) {
            Launch::Eager => batched_micro_step(group, index, micro),
            Launch::Capture => {
                let generators: Vec<Arc<Generator>> = group
                    .iter()
                    .filter_map(|t| t.stepper.own_generator())
                    .collect();
                let generators: Vec<&Generator> = generators.iter().map(|g| &**g).collect();
                let (graph, recorded) = CudaGraph::capture_with(
                    self.device,
                    self.pool(),
                    CaptureMode::Global,
                    &generators,
                    || batched_device_work(group, None, micro),
                )
                .map_err(Error::CudaGraph)?;
                recorded?;
                self.captured(&key, &names.join(", "));
                self.micro_steps.insert(key.clone(), graph);
                self.replay(&key, group.iter().map(|t| &**t), index)
            }
            Launch::Replay => self.replay(&key, group.iter().map(|t| &**t), index),
        }
    }

    /// Micro-step `index` (`micro`-th of optimizer step `step`) of variant `variant` on its own:
    /// eagerly ([`Trainer::micro_alone`]), or replayed from the graph its run would capture.
    ///
    /// # Errors
    /// [`Error::CudaGraph`]; model and generator errors.
    pub(crate) fn alone(
        &mut self,
        step: u64,
        (variant, name): (usize, &str),
        trainer: &mut Trainer,
        index: u64,
        micro: u64,
    ) -> Result<()> {
        let bucket = trainer.prepare_alone(index)?;
        let key = GraphKey {
            members: vec![(variant, bucket)],
            micro,
        };
        let capturable = trainer.stepper.own_generator().is_some();
        match self.launch(step, &key, capturable) {
            Launch::Eager => trainer.micro_prepared(micro),
            Launch::Capture => {
                let (model, text, latents) = (&trainer.model, &trainer.text, &trainer.latents);
                let graph = trainer.stepper.capture_micro_step(
                    model,
                    text,
                    latents,
                    (self.device, self.pool()),
                    micro,
                )?;
                self.captured(&key, name);
                self.micro_steps.insert(key.clone(), graph);
                self.replay(&key, std::iter::once(&*trainer), index)
            }
            Launch::Replay => self.replay(&key, std::iter::once(&*trainer), index),
        }
    }

    /// The log line of a capture, with the device memory after it.
    fn captured(&self, key: &GraphKey, names: &str) {
        let memory = torch_cuda::memory_stats(self.device)
            .map(|stats| {
                let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
                format!(
                    "; GiB allocated/reserved after: {:.2}/{:.2}",
                    gib(stats.allocated),
                    gib(stats.reserved)
                )
            })
            .unwrap_or_default();
        let buckets: Vec<String> = key.members.iter().map(|(_, b)| b.to_string()).collect();
        let what = match key.members.len() {
            1 => format!(
                "variant {names}'s micro-step on its own (bucket {}",
                buckets.join(", ")
            ),
            _ => format!(
                "the batched micro-step of {names} (buckets {}",
                buckets.join(", ")
            ),
        };
        say(format!(
            "captured {what}; micro-step {}) as a CUDA graph{memory}",
            key.micro
        ));
    }

    /// Replays `key`'s graph after re-seeding each member's generator for micro-step `index`.
    fn replay<'t>(
        &self,
        key: &GraphKey,
        members: impl Iterator<Item = &'t Trainer>,
        index: u64,
    ) -> Result<()> {
        for trainer in members {
            trainer.reseed(index)?;
        }
        let graph = self
            .micro_steps
            .get(key)
            .ok_or_else(|| Error::InvalidOption {
                option: "--cuda_graph",
                problem: format!("no graph was captured for the micro-step of {key:?}"),
            })?;
        graph.replay().map_err(Error::CudaGraph)
    }

    /// The optimizer step of optimizer step `step` of variant `variant` (its LoRA on the UNet):
    /// eagerly during the warm-up, then replayed from its graph (captured at its first replay), as
    /// its run captures it.
    ///
    /// # Errors
    /// [`Error::CudaGraph`]; the optimizer's errors.
    fn optimizer_step(&mut self, step: u64, variant: usize, trainer: &mut Trainer) -> Result<()> {
        if step < self.from_step {
            return trainer.stepper.optimizer_step(&trainer.model);
        }
        if !self.optimizer_steps.contains_key(&variant) {
            let pool = self.pool();
            let graph = trainer
                .stepper
                .capture_optimizer_step(&trainer.model, (self.device, pool))?;
            say("captured its optimizer step as a CUDA graph");
            self.optimizer_steps.insert(variant, graph);
        }
        match self.optimizer_steps.get(&variant) {
            Some(graph) => graph.replay().map_err(Error::CudaGraph),
            None => trainer.stepper.optimizer_step(&trainer.model),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(members: &[(usize, usize)], micro: u64) -> GraphKey {
        GraphKey {
            members: members.to_vec(),
            micro,
        }
    }

    #[test]
    fn combinations_capture_after_the_warm_up_once_run_eagerly_and_never_replay_for_others() {
        let mut graphs = SweepGraphs::new(0, 2);
        let all = key(&[(0, 0), (1, 0), (2, 0)], 0);
        // The warm-up steps run eagerly.
        assert_eq!(graphs.launch(0, &all, true), Launch::Eager);
        assert_eq!(graphs.launch(1, &all, true), Launch::Eager);
        // After them, a combination run eagerly before is captured.
        assert_eq!(graphs.launch(2, &all, true), Launch::Capture);
        // Another micro-step index, another membership or another bucket is another combination:
        // eager on first sight (its warm-up), captured on the next.
        for other in [
            key(&[(0, 0), (1, 0), (2, 0)], 1),
            key(&[(0, 0), (2, 0)], 0),
            key(&[(0, 0), (1, 1), (2, 0)], 0),
            key(&[(1, 0), (0, 0), (2, 0)], 0),
            key(&[(2, 0)], 0),
        ] {
            assert_eq!(graphs.launch(3, &other, true), Launch::Eager, "{other:?}");
            assert_eq!(graphs.launch(4, &other, true), Launch::Capture, "{other:?}");
        }
        // One that cannot be captured (the default generator) stays eager.
        let default = key(&[(3, 0), (4, 0)], 0);
        for step in 0..4 {
            assert_eq!(graphs.launch(step, &default, false), Launch::Eager);
        }
        assert!(graphs.told.contains("generators"));
    }

    #[test]
    fn captured_combinations_replay_and_the_limit_and_default_generators_keep_others_eager() {
        let state = |captured, warmed, capturable| KeyState {
            captured,
            warmed,
            capturable,
        };
        // A captured graph replays, whatever else holds.
        assert_eq!(
            decide(9, 2, state(true, true, true), MAX_SWEEP_GRAPHS),
            (Launch::Replay, None)
        );
        // Warm-up steps and first sights run eagerly, silently.
        assert_eq!(
            decide(1, 2, state(false, true, true), 0),
            (Launch::Eager, None)
        );
        assert_eq!(
            decide(5, 2, state(false, false, true), 0),
            (Launch::Eager, None)
        );
        assert_eq!(
            decide(5, 2, state(false, true, true), 0),
            (Launch::Capture, None)
        );
        assert_eq!(
            decide(5, 2, state(false, true, true), MAX_SWEEP_GRAPHS - 1),
            (Launch::Capture, None)
        );
        assert_eq!(
            decide(5, 2, state(false, true, true), MAX_SWEEP_GRAPHS),
            (Launch::Eager, Some(Eager::Full))
        );
        assert_eq!(
            decide(5, 2, state(false, true, false), 0),
            (Launch::Eager, Some(Eager::DefaultGenerator))
        );
    }
}
