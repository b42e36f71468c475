//! The step's state and its device work: the optimizer and its schedule, the DDPM schedule, the
//! persistent inputs and the device-side sums, driven micro-step by micro-step (eagerly, or captured
//! once as CUDA graphs and replayed).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use optim8bit::{EMAModel, GradScaler, GradScalerConfig, Optimizer, ParamGroup};
use sdxl_model::prompt::add_time_ids_tensor;
use sdxl_model::schedulers::{DdpmConfig, DdpmSchedule, SchedulerConfig};
use sdxl_model::vae::AutoencoderKLConfig;
use torch_cuda::rng::Generator;
use torch_cuda::{CaptureMode, CudaGraph};

use super::sync::GradSync;
use super::{
    Accumulators, LatentBatch, LossWeights, Objective, PlannedRows, Prepared, RowShare, StepInputs,
    StepSettings, add_step_loss, micro_step, optimizer_step, prepare_micro, scaled_for_backward,
    step_loss,
};
use crate::config::{MixedPrecision, TrainConfig};
use crate::distributed::{Collective, World};
use crate::lr_scheduler::LrSchedule;
use crate::model::TrainModel;
use crate::plan::{MicroStep, Plan};
use crate::prepare::{CachedLatents, Latents, TextConditioning, time_ids_of};
use crate::{Error, Result};

/// The captured step: one graph per bucket and micro-step of an accumulation, and one for the
/// optimizer step, all in one memory pool.
pub struct StepGraphs {
    /// One capture per (bucket, accumulation index): the first micro-step of an accumulation writes
    /// the gradients, the others add to them. Each index has its own graph also because relaunching
    /// one graph before its previous launch has finished can hold the host until it has.
    pub micro_steps: BTreeMap<(usize, u64), CudaGraph>,
    /// The optimizer step.
    pub optimizer_step: CudaGraph,
    /// The device memory after each capture, for the log: `(bucket, micro-step, allocated GiB,
    /// reserved GiB)`.
    pub memory: Vec<(usize, u64, f64, f64)>,
}

/// Everything a step reads and writes besides the model and the prepared conditioning.
pub struct Stepper {
    optimizer: Optimizer,
    /// `--use_ema`: the average of the optimizer's parameters, stepped after each optimizer step.
    ema: Option<EMAModel>,
    /// The text encoders' groups' initial learning rate (the schedule multiplies it as the UNet's).
    text_encoder_lr: f64,
    schedule: LrSchedule,
    ddpm: DdpmSchedule,
    settings: StepSettings,
    inputs: StepInputs,
    /// The device-side sums the loop reads at logging steps.
    pub acc: Accumulators,
    /// The batch of the current micro-step when latents are encoded live.
    live_batch: Option<data::Batch>,
    /// The bucket of the current micro-step.
    bucket: usize,
    /// This process's place in a data-parallel run.
    world: World,
    /// The gradient (and loss) averaging over the processes, when there are several or NCCL is
    /// in the loop (`torchrun --nproc-per-node 1`); `None` for a run of one process.
    sync: Option<GradSync>,
    /// Whether the optimizer step holds NCCL collectives (captured in thread-local mode).
    nccl: bool,
}

impl Stepper {
    /// The optimizer `--optimizer` chooses over `model`'s LoRA, the learning-rate schedule, the
    /// DDPM schedule of `scheduler_config` and the step's settings; `batch` samples per micro-step
    /// of this process, whose rows of each global batch `world` tells, with gradients averaged
    /// over `group`.
    ///
    /// # Errors
    /// Optimizer and schedule errors naming the flag.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &TrainConfig,
        model: &TrainModel,
        vae_config: &AutoencoderKLConfig,
        scheduler_config: &SchedulerConfig,
        (device, kind, batch): (Device, Kind, usize),
        (world, group, groups): (World, Rc<dyn Collective>, usize),
    ) -> Result<Self> {
        let setup = config.optimizer_setup()?;
        for note in config.optimizer_notes() {
            crate::logs::say(note);
        }
        let base_lr = setup.unet_lr;
        // The script's groups: the UNet's LoRA, then each text encoder's at --text_encoder_lr.
        let param_groups = model
            .param_groups()
            .into_iter()
            .enumerate()
            .map(|(i, params)| match i {
                0 => ParamGroup::new(params, base_lr, config.adam_weight_decay),
                _ => ParamGroup::new(
                    params,
                    setup.text_encoder_lr,
                    config.adam_weight_decay_text_encoder,
                ),
            })
            .collect();
        let schedule = LrSchedule::from_script_flags(
            config.lr_scheduler,
            base_lr,
            config.lr_warmup_steps,
            config.max_train_steps,
            config.lr_num_cycles,
            config.lr_power,
        )?;
        let settings = StepSettings {
            kind,
            scaling_factor: vae_config.scaling_factor,
            shift_factor: vae_config.shift_factor.unwrap_or(0.0),
            noise_offset: config.noise_offset,
            snr_gamma: config.snr_gamma,
            accumulation: i64::from(config.gradient_accumulation_steps),
            gradient_checkpointing: config.gradient_checkpointing,
            max_grad_norm: config.max_grad_norm,
        };
        let ema = match config.ema_config()? {
            Some(settings) => Some(EMAModel::new(model.param_tensors(), settings)?),
            None => None,
        };
        let mut inputs = StepInputs::new(batch as i64, device, Arc::clone(model.rng()));
        inputs.share = RowShare::for_rank(batch / groups.max(1), groups.max(1), &world);
        let nccl = group.uses_nccl();
        let sync = (group.world_size() > 1 || nccl).then(|| GradSync::new(group, model));
        Ok(Self {
            optimizer: setup.config.build(param_groups)?,
            ema,
            text_encoder_lr: setup.text_encoder_lr,
            schedule,
            ddpm: DdpmSchedule::new(DdpmConfig::from_config(scheduler_config)?, device)?,
            settings,
            inputs,
            acc: Accumulators {
                scaler: match config.mixed_precision {
                    MixedPrecision::Fp16 => {
                        Some(GradScaler::new(GradScalerConfig::default(), device)?)
                    }
                    _ => None,
                },
                ..Accumulators::new(device)
            },
            live_batch: None,
            bucket: 0,
            world,
            sync,
            nccl,
        })
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The optimizer, to restore its state.
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    /// The `--use_ema` average, if any.
    pub fn ema(&self) -> Option<&EMAModel> {
        self.ema.as_ref()
    }

    /// The `--use_ema` average, to swap it into the model or restore its state.
    pub fn ema_mut(&mut self) -> Option<&mut EMAModel> {
        self.ema.as_mut()
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn learning_rate(&self, step: u64) -> f64 {
        self.schedule.lr_at(step)
    }

    /// Sets the learning rate of optimizer step `step` and returns it.
    ///
    /// # Errors
    /// Optimizer errors.
    pub fn set_learning_rate(&mut self, step: u64) -> Result<f64> {
        let lr = self.schedule.lr_at(step);
        self.optimizer.set_learning_rate(0, lr)?;
        // diffusers' LambdaLR: every group's initial rate times the same factor.
        for group in 1..self.optimizer.group_count() {
            let text_lr = self.schedule.lr_from(self.text_encoder_lr, step);
            self.optimizer.set_learning_rate(group, text_lr)?;
        }
        Ok(lr)
    }

    /// Uploads the rows of the micro-steps `steps` (the first being `first`) at once: each
    /// micro-step's inputs are then a device-to-device row copy, outside any captured graph.
    ///
    /// # Errors
    /// A prompt or image the preparation did not encode; libtorch errors.
    pub fn upload_plan(
        &mut self,
        first: u64,
        steps: &[MicroStep],
        text: &TextConditioning,
        latents: &Latents,
        weights: impl Fn(&MicroStep) -> Option<LossWeights>,
    ) -> Result<()> {
        let missing = |what: String| Error::InvalidOption {
            option: "--dataset_name",
            problem: format!("{what} was not prepared"),
        };
        let mut rows = Vec::with_capacity(steps.len());
        for step in steps {
            let mut planned = PlannedRows {
                bucket: step.bucket,
                latents: Vec::new(),
                prompts: Vec::new(),
                weights: weights(step),
            };
            for ((key, &flipped), prompt) in step.keys.iter().zip(&step.flips).zip(&step.prompts) {
                let row = text
                    .row(prompt)
                    .ok_or_else(|| missing(format!("the prompt `{prompt}`")))?;
                planned.prompts.push(row);
                planned.latents.push(match latents {
                    Latents::Cached(cached) => {
                        let (_, row) = cached.row(key.item, flipped).ok_or_else(|| {
                            missing(format!(
                                "the latent of item {} (mirrored: {flipped})",
                                key.item
                            ))
                        })?;
                        row
                    }
                    Latents::Live { .. } => 0,
                });
            }
            rows.push(planned);
        }
        self.inputs.set_plan(first, &rows)
    }

    /// What micro-step `index` needs before its device work: the generator re-seeded from
    /// `(seed, micro-step)`, the batch's rows in the persistent input tensors (and, with latents
    /// encoded live, the batch itself). Returns the micro-step's bucket.
    ///
    /// # Errors
    /// Loading errors naming the row; an index outside the uploaded plan.
    pub fn prepare(&mut self, plan: &Plan, latents: &Latents, index: u64) -> Result<usize> {
        self.inputs.rng.seed(plan.generator_seed(index) as u64)?;
        self.bucket = self.inputs.select(index)?;
        if let Latents::Live { .. } = latents {
            self.live_batch = Some(plan.batch_share(index, &self.world)?);
        }
        Ok(self.bucket)
    }

    /// The generator re-seeded for micro-step `index`, as [`Stepper::prepare`] seeds it.
    ///
    /// # Errors
    /// Generator errors.
    pub(crate) fn reseed(&self, plan: &Plan, index: u64) -> Result<()> {
        self.inputs.rng.seed(plan.generator_seed(index) as u64)
    }

    /// The device work of micro-step `micro` of an accumulation (captured as a graph with
    /// `--cuda_graph`): forward, loss, backward, and the gradients handed to the fp32 masters.
    ///
    /// # Errors
    /// Model errors.
    pub fn micro_step(
        &mut self,
        model: &TrainModel,
        text: &TextConditioning,
        latents: &Latents,
        micro: u64,
    ) -> Result<()> {
        self.forward_backward(model, text, latents)?;
        self.after_backward(model, micro)
    }

    /// After the backward pass of micro-step `micro` of an accumulation: the generator's check,
    /// and the gradients handed to the fp32 masters.
    ///
    /// # Errors
    /// The generator's failure; copy errors.
    pub(crate) fn after_backward(&mut self, model: &TrainModel, micro: u64) -> Result<()> {
        self.inputs.rng.check()?;
        for copies in model.all_copies() {
            // Into the masters' gradients (written by the first micro-step, added by the others);
            // the copies' own gradients are dropped, so the next backward hands its products over
            // instead of adding them to zeros.
            copies.collect_grads(micro > 0)?;
            if self.inputs.latent_rows.device().is_cuda() && torch_cuda::shim_compiled() {
                torch_cuda::foreach::clear_grads(copies.leaves()).map_err(Error::CudaGraph)?;
            } else {
                copies.zero_leaf_grads()?;
            }
        }
        Ok(())
    }

    /// The shape key of the current micro-step's UNet inputs, for a batched sweep micro-step:
    /// `[latent height, latent width, context length, context width, pooled width]`; `None` when
    /// the latents are encoded live (not batched).
    pub(crate) fn batch_key(&self, text: &TextConditioning, latents: &Latents) -> Option<Vec<i64>> {
        let Latents::Cached(cached) = latents else {
            return None;
        };
        let bucket = cached.buckets.get(&self.bucket)?;
        let mut key = bucket.mean.size().get(2..)?.to_vec();
        match &text.table {
            crate::prepare::PromptTable::Embeddings { context, pooled } => {
                key.extend(context.size().get(1..)?);
                key.extend(pooled.size().get(1..)?);
            }
            crate::prepare::PromptTable::TokenIds { .. } => return None,
        }
        Some(key)
    }

    /// The current micro-step's UNet inputs and objective (cached latents only), drawn as
    /// [`Stepper::micro_step`] draws them: what a batched sweep micro-step concatenates.
    ///
    /// # Errors
    /// Generator errors; latents encoded live (not batched).
    pub(crate) fn prepare_inputs<'m>(
        &self,
        model: &'m TrainModel,
        text: &TextConditioning,
        latents: &Latents,
    ) -> Result<Prepared<'m>> {
        let Latents::Cached(cached) = latents else {
            return Err(Error::InvalidOption {
                option: "--sweep_execution",
                problem: "batched micro-steps need cached latents (--cache_latents)".into(),
            });
        };
        let batch = self.cached_batch(cached)?;
        prepare_micro(
            model.text_encoders(),
            &self.ddpm,
            text,
            &batch,
            &self.inputs,
            &self.settings,
        )
    }

    /// The current bucket's cached posteriors and time ids.
    fn cached_batch<'c>(&self, cached: &'c CachedLatents) -> Result<LatentBatch<'c>> {
        let bucket = cached
            .buckets
            .get(&self.bucket)
            .ok_or_else(|| Error::InvalidOption {
                option: "--dataset_name",
                problem: format!("bucket {} has no cached latents", self.bucket),
            })?;
        Ok(LatentBatch::Cached {
            mean: &bucket.mean,
            std: &bucket.std,
            time_ids: &bucket.time_ids,
        })
    }

    /// This micro-step's loss of `prediction` (its own rows of a batched call), with its own
    /// weighting.
    ///
    /// # Errors
    /// libtorch errors.
    pub(crate) fn loss(&self, objective: &Objective, prediction: &Tensor) -> Result<Tensor> {
        step_loss(objective, prediction, &self.inputs)
    }

    /// `loss / accumulation` (times the fp16 loss scale): this micro-step's share of a batched
    /// backward pass.
    ///
    /// # Errors
    /// libtorch errors.
    pub(crate) fn scaled_loss(&self, loss: &Tensor) -> Result<Tensor> {
        scaled_for_backward(loss, &self.settings, &self.acc)
    }

    /// Adds `loss / accumulation` to this optimizer step's loss.
    pub(crate) fn add_loss(&mut self, loss: &Tensor) {
        add_step_loss(loss, &self.settings, &mut self.acc);
    }

    /// Whether the step recomputes activations in the backward pass.
    pub(crate) fn gradient_checkpointing(&self) -> bool {
        self.settings.gradient_checkpointing
    }

    fn forward_backward(
        &mut self,
        model: &TrainModel,
        text: &TextConditioning,
        latents: &Latents,
    ) -> Result<()> {
        let run = |batch: &LatentBatch<'_>, this: &mut Self| {
            micro_step(
                &model.unet(),
                model.text_encoders(),
                &this.ddpm,
                text,
                batch,
                &this.inputs,
                &this.settings,
                &mut this.acc,
            )
        };
        match latents {
            Latents::Cached(cached) => {
                let batch = self.cached_batch(cached)?;
                run(&batch, self)
            }
            Latents::Live { vae, .. } => {
                let batch = self.live_batch.take().ok_or_else(|| Error::InvalidOption {
                    option: "--cache_latents",
                    problem: "no batch was loaded for this micro-step".into(),
                })?;
                let device = self.inputs.latent_rows.device();
                let pixels = batch.pixels.to_device(device);
                // This process's rows of the global batch's posterior draws.
                let posterior = tch::no_grad(|| vae.encode(&pixels))?;
                let noise = self
                    .inputs
                    .share
                    .randn_like(&posterior.mean, &self.inputs.rng)?;
                let latents = posterior.sample_with(&noise)?;
                let rows: Vec<[f64; 6]> = batch.samples.iter().map(time_ids_of).collect();
                let time_ids = add_time_ids_tensor(&rows, Kind::Float, device);
                let live = LatentBatch::Fresh {
                    latents: &latents,
                    time_ids: &time_ids,
                };
                run(&live, self)
            }
        }
    }

    /// The device work of an optimizer step (captured as a graph with `--cuda_graph`), with the
    /// `--use_ema` average's step after it.
    ///
    /// # Errors
    /// Optimizer errors.
    pub fn optimizer_step(&mut self, model: &TrainModel) -> Result<()> {
        // Data parallelism: every process's gradients and loss become their means first.
        if let Some(sync) = &self.sync {
            sync.all_reduce(&self.acc.step_loss)?;
        }
        // With copies the first micro-step overwrites the gradients: nothing to zero.
        optimizer_step(
            &mut self.optimizer,
            &model.param_tensors(),
            &self.settings,
            &mut self.acc,
            !model.has_copies(),
        )?;
        // diffusers' scripts step the EMA on every optimizer step, whether or not the optimizer
        // skipped it (fp16's GradScaler there, a non-finite loss here): the weights it reads are then
        // the unchanged ones.
        if let Some(ema) = &mut self.ema {
            ema.step()?;
        }
        for copies in model.all_copies() {
            copies.refresh()?;
        }
        Ok(())
    }

    /// Records each micro-step of an accumulation and the optimizer step as CUDA graphs (one memory
    /// pool), after the eager warm-up steps have created every gradient buffer and chosen every
    /// kernel. Capturing runs nothing: the replays do the work, on the same persistent tensors.
    ///
    /// # Errors
    /// [`Error::CudaGraph`], and the step's own errors.
    pub fn capture(
        &mut self,
        model: &TrainModel,
        text: &TextConditioning,
        latents: &Latents,
        (device, sizes): (usize, &[(u32, u32)]),
    ) -> Result<StepGraphs> {
        // Every graph adds into the gradients the eager warm-up created (the first micro-step of an
        // accumulation of any bucket alike), and the optimizer graph zeroes them after its update.
        // With compute copies the first micro-step overwrites the masters' gradients instead.
        let mut captured: Vec<((usize, u64), CudaGraph)> = Vec::new();
        // The largest bucket first: the smaller ones' blocks then fit in what it leaves in the pool.
        let mut buckets = self.inputs.buckets();
        let area = |b: &usize| {
            sizes
                .get(*b)
                .map_or(0, |(w, h)| u64::from(*w) * u64::from(*h))
        };
        buckets.sort_by_key(|b| std::cmp::Reverse(area(b)));
        let mut memory = Vec::new();
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        for bucket in buckets {
            self.bucket = bucket;
            for micro in 0..self.settings.accumulation as u64 {
                // All graphs share the first one's memory pool: they never run concurrently, and what one
                // graph leaves for later (gradients, sums) lives in persistent tensors.
                let pool = captured.first().map(|(_, graph)| graph);
                let graph = self.capture_micro_step(model, text, latents, (device, pool), micro)?;
                captured.push(((bucket, micro), graph));
                if let Some(stats) = torch_cuda::memory_stats(device) {
                    memory.push((bucket, micro, gib(stats.allocated), gib(stats.reserved)));
                }
            }
        }
        let pool = captured.first().map(|(_, graph)| graph);
        let optimizer_step = self.capture_optimizer_step(model, (device, pool))?;
        let micro_steps = captured.into_iter().collect();
        Ok(StepGraphs {
            micro_steps,
            optimizer_step,
            memory,
        })
    }

    /// Records the device work of micro-step `micro` of an accumulation ([`Stepper::micro_step`]) on
    /// the current bucket as a CUDA graph on `device`, in the memory pool of `pool` (a graph never
    /// replayed concurrently with this one) or a new one, with the run's own generator registered:
    /// each replay draws from its seed and offset at that time. The rows of a micro-step are
    /// selected, and the generator re-seeded, outside the graph ([`Stepper::prepare`]).
    ///
    /// # Errors
    /// [`Error::CudaGraph`], and the step's own errors.
    pub(crate) fn capture_micro_step(
        &mut self,
        model: &TrainModel,
        text: &TextConditioning,
        latents: &Latents,
        (device, pool): (usize, Option<&CudaGraph>),
        micro: u64,
    ) -> Result<CudaGraph> {
        let rng = Arc::clone(&self.inputs.rng);
        let generators: Vec<&Generator> = rng.generator().map(|g| &**g).into_iter().collect();
        let (graph, recorded) =
            CudaGraph::capture_with(device, pool, CaptureMode::Global, &generators, || {
                self.micro_step(model, text, latents, micro)
            })
            .map_err(Error::CudaGraph)?;
        recorded?;
        Ok(graph)
    }

    /// Records the optimizer step ([`Stepper::optimizer_step`]) as a CUDA graph on `device`, in the
    /// memory pool of `pool` or a new one.
    ///
    /// # Errors
    /// [`Error::CudaGraph`], and the optimizer's errors.
    pub(crate) fn capture_optimizer_step(
        &mut self,
        model: &TrainModel,
        (device, pool): (usize, Option<&CudaGraph>),
    ) -> Result<CudaGraph> {
        // NCCL's watchdog thread queries events while the all-reduce is captured.
        let mode = if self.nccl {
            CaptureMode::ThreadLocal
        } else {
            CaptureMode::Global
        };
        let (graph, recorded) =
            CudaGraph::capture(device, pool, mode, || self.optimizer_step(model))
                .map_err(Error::CudaGraph)?;
        recorded?;
        Ok(graph)
    }

    /// The run's own generator, which a graph of its draws registers (`None` when the run draws from
    /// the device's default generator).
    pub(crate) fn own_generator(&self) -> Option<Arc<Generator>> {
        self.inputs.rng.generator().cloned()
    }

    /// The bucket of the current micro-step (the last [`Stepper::prepare`]'s).
    pub(crate) fn bucket(&self) -> usize {
        self.bucket
    }
}
