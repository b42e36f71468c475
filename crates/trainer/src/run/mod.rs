//! The training run: the stages composed (plan, prepare, model, step), then the loop — learning
//! rate, micro-steps (eager or replayed CUDA graphs), logging, checkpoints, validation images — and
//! the outputs at the end.
//!
//! The loop is diffusers' `train_dreambooth_lora_sdxl.py` restructured for exact resume and for
//! CUDA graphs: before every micro-step libtorch's generator is re-seeded from `(seed, micro-step)`,
//! and the batch of a micro-step is a pure function of `(seed, micro-step)` (the [`Plan`]), so a run
//! resumed from `checkpoint-N` draws exactly what an uninterrupted run draws after step N; the LoRA
//! parameters and the optimizer state are restored bit for bit.

mod batched;
mod logging;
mod probe;
mod resume;
mod resume_check;
mod setup;

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use tch::Device;

pub use crate::outputs::{KOHYA_FILE, LORA_FILE};
pub use crate::throughput::Throughput;
pub use resume::TrainerState;

pub(crate) use batched::{SweepGraphs, batched_micro_step};
pub(crate) use probe::StepProbe;

use crate::checkpoint::{CheckpointStore, io_error};
use crate::config::TrainConfig;
use crate::device;
use crate::distributed::{Collective, World, join, on_main_process};
use crate::estimate::{Estimate, OptimizerTable};
use crate::logs::{say, say_above, set_quiet};
use crate::model::{SharedUnet, TrainModel};
use crate::output_dir::OutputLock;
use crate::outputs::{self, RunStats};
use crate::plan::{MicroStep, Plan};
use crate::prepare::{FrozenModels, Latents, TextConditioning, prepare_latents, prepare_text};
use crate::step::{StepGraphs, Stepper, broadcast_lora};
use crate::throughput::{dense_bf16_peak_tflops, step_flops};
use crate::validation::Validator;
use crate::{Error, Result};
use logging::RunLogs;
use probe::timed_launch;
use setup::{open_output_dir, open_plan, processes, run_estimate};

/// Eager optimizer steps before the step is captured (kernel selection, gradient buffers).
pub(crate) const GRAPH_WARMUP_STEPS: u64 = 2;

/// A training run, set up and ready to [`Trainer::run`].
pub struct Trainer {
    config: TrainConfig,
    device: Device,
    plan: Plan,
    text: TextConditioning,
    latents: Latents,
    model: TrainModel,
    stepper: Stepper,
    store: CheckpointStore,
    validator: Option<Validator>,
    start_step: u64,
    loss_history: Vec<(u64, f64)>,
    estimate: Option<(Estimate, OptimizerTable)>,
    /// When this process started training, and whether the model predicts v: for the LoRA files'
    /// metadata.
    started_at: SystemTime,
    v_prediction: bool,
    /// This process's place in a data-parallel run, and the collectives over its processes.
    world: World,
    group: Rc<dyn Collective>,
    /// The model FLOPs of a step of this process, and the GPU (for MFU).
    throughput: Throughput,
    /// `output_dir`'s lock (rank 0), released when the trainer goes.
    _output_lock: Option<OutputLock>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("output_dir", &self.config.output_dir)
            .field("start_step", &self.start_step)
            .finish()
    }
}

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunSummary {
    /// Optimizer steps run in this process.
    pub steps_run: u64,
    /// Steps skipped for non-finite values (whole run).
    pub skipped_steps: u64,
    /// (step, mean loss) at every logging step.
    pub loss_history: Vec<(u64, f64)>,
    /// The diffusers-format LoRA.
    pub lora_file: PathBuf,
    /// The kohya-format LoRA.
    pub kohya_file: PathBuf,
    /// Seconds per optimizer step in this process (wall clock, including logging).
    pub seconds_per_step: f64,
    /// Peak allocated device memory, GiB (CUDA only).
    pub peak_memory_gib: Option<f64>,
    /// Model FLOPs of one optimizer step of this process and the GPU's peak (see [`Throughput`]).
    pub throughput: Throughput,
    /// Whether this process wrote the outputs (rank 0 of a data-parallel run, or the only one).
    pub main_process: bool,
    /// The rows left out under `--skip_bad_images`, each as its error names it.
    pub skipped_rows: Vec<String>,
}

/// A run under way: its logs, its captured graphs and its counters of skipped steps.
pub(crate) struct RunProgress {
    logs: RunLogs,
    graphs: Option<StepGraphs>,
    /// Steps skipped before this process's run (a resumed checkpoint's), and so far.
    skipped_before: u64,
    skipped: u64,
    started: Instant,
}

impl RunProgress {
    /// The run's progress bar.
    pub(crate) fn bar(&self) -> &indicatif::ProgressBar {
        &self.logs.progress
    }
}

impl Trainer {
    /// Plans the data, prepares the conditioning (text, latents), loads the model with its LoRA,
    /// sets up the step and, with `--resume_from_checkpoint`, restores the run. Under torchrun (or
    /// `--nproc_per_node`'s launcher) this process joins the others first ([`join`]): NCCL on
    /// CUDA, Gloo on the CPU, each collective waiting at most `--ddp_timeout`.
    ///
    /// # Errors
    /// Anything wrong with the config, the model, the data or the checkpoint, naming the culprit;
    /// torchrun variables that are missing or wrong; a rendezvous that fails.
    pub fn new(config: TrainConfig) -> Result<Self> {
        let world = World::from_env()?;
        let timeout = Duration::from_secs_f64(config.ddp_timeout.clamp(1e-3, 1e6) * 60.0);
        let group = Rc::from(join(&world, timeout)?);
        Self::with_group(config, world, group)
    }

    /// [`Trainer::new`] as process `world` of a data-parallel run whose collectives `group`
    /// performs (a [`crate::distributed::SingleProcess`] for one process).
    ///
    /// # Errors
    /// As [`Trainer::new`]; `--nproc_per_node` above 1 in a world of one process.
    pub fn with_group(
        config: TrainConfig,
        world: World,
        group: Rc<dyn Collective>,
    ) -> Result<Self> {
        Self::build(config, world, group, None)
    }

    /// [`Trainer::new`] in one process, its LoRA trained on `base` (a sweep's shared UNet) instead
    /// of a UNet of its own. The caller checks that `config` loads the UNet `base` holds.
    /// Its conditioning is prepared with `frozen`'s text encoders and VAE (loaded by the first
    /// variant that needs them).
    pub(crate) fn on_shared_unet(
        config: TrainConfig,
        base: &SharedUnet,
        frozen: &FrozenModels,
    ) -> Result<Self> {
        Self::build(
            config,
            World::SINGLE,
            Rc::new(crate::distributed::SingleProcess),
            Some((base, frozen)),
        )
    }

    fn build(
        config: TrainConfig,
        world: World,
        group: Rc<dyn Collective>,
        shared: Option<(&SharedUnet, &FrozenModels)>,
    ) -> Result<Self> {
        set_quiet(!world.is_main_process());
        if let Some(line) = group.describe() {
            say(line);
        }
        config.validate_paths()?;
        let (mut config, kohya) = config.resolve_dataset_config()?;
        config.validate()?;
        config.nproc_per_node = processes(&config, &world)?;
        let device = device::for_rank(device::open(&config)?, &world)?;
        if config.cuda_graph && !(device.is_cuda() && config.cache_latents) {
            return Err(Error::InvalidOption {
                option: "--cuda_graph",
                problem: "needs a CUDA device and --cache_latents (latents encoded live are not a fixed sequence of device work)".into(),
            });
        }
        device::check_precision(config.mixed_precision, device)?;
        let kind = config.mixed_precision.kind();
        let (store, output_lock) = open_output_dir(&config, &*group)?;
        let folder = crate::model_files::resolve_model(&config)?;
        say(format!(
            "model {} on {device:?} in {kind:?}",
            folder.describe()
        ));
        for line in crate::single_file::apply_markers(&mut config, &folder)? {
            say(line);
        }
        config.validate()?;
        let plan = open_plan(
            &config,
            kohya.as_ref(),
            &folder,
            (device, kind),
            (&world, &*group),
        )?;
        let dataset = plan.dataset();
        let micro_steps = config.max_train_steps * u64::from(config.gradient_accumulation_steps);
        let planned = plan.micro_steps(0..micro_steps)?;
        let (base, frozen) = shared.unzip();
        let (text, validation_prompt) =
            prepare_text(&config, &folder, &planned, device, kind, &*group, frozen)?;
        let (latents, vae_config) =
            prepare_latents(&config, &folder, dataset, device, &*group, frozen)?;
        let model = match base {
            Some(base) => TrainModel::load_on(base, &config, &folder, (device, kind))?,
            None => TrainModel::load(&config, &folder, device, kind)?,
        };
        let throughput = Throughput {
            flops_per_step: step_flops(
                &model.unet().config().clone(),
                &model.unet_adapter_ranks(),
                dataset.config().buckets.sizes(),
                &planned,
                config.max_train_steps,
            ) / world.world_size.max(1) as f64,
            device: match device {
                Device::Cuda(index) => torch_cuda::device_name(index).map(|name| {
                    let peak = dense_bf16_peak_tflops(&name);
                    (name, peak)
                }),
                _ => None,
            },
        };
        if group.world_size() > 1 {
            // Every process starts from rank 0's LoRA.
            broadcast_lora(&*group, &model)?;
        }
        // Samples per micro-step and process: twice --train_batch_size with prior preservation.
        let batch = plan.batch_size(&config);
        let groups = batch / config.train_batch_size.max(1) as usize;
        let scheduler_config = crate::single_file::training_scheduler_config(&config, &folder)?;
        let v_prediction = scheduler_config.prediction_type.as_deref() == Some("v_prediction");
        let stepper = Stepper::new(
            &config,
            &model,
            &vae_config,
            &scheduler_config,
            (device, kind, batch),
            (world, Rc::clone(&group), groups),
        )?;
        let estimate = device
            .is_cuda()
            .then(|| run_estimate(&config, &model, &stepper, &vae_config, (kind, batch)));
        let validator = validation_prompt.map(|prompt| {
            let context = (device, kind);
            Validator::new(
                prompt,
                &config,
                &folder,
                scheduler_config,
                vae_config,
                context,
            )
        });
        let mut trainer = Self {
            config,
            device,
            plan,
            text,
            latents,
            model,
            stepper,
            store,
            validator,
            start_step: 0,
            loss_history: Vec::new(),
            estimate,
            started_at: SystemTime::now(),
            v_prediction,
            world,
            group,
            throughput,
            _output_lock: output_lock,
        };
        trainer.resume()?;
        trainer.upload_plan(&planned)?;
        Ok(trainer)
    }

    /// Each remaining micro-step's rows (and loss weights) of this process, on the device.
    fn upload_plan(&mut self, planned: &[MicroStep]) -> Result<()> {
        let first = self.start_step * u64::from(self.config.gradient_accumulation_steps);
        let remaining = planned.get(first as usize..).unwrap_or_default();
        let shared: Vec<MicroStep>;
        let remaining = if self.world.world_size > 1 {
            shared = remaining
                .iter()
                .map(|step| self.plan.share(step, &self.world))
                .collect();
            &shared[..]
        } else {
            remaining
        };
        let (text, latents, plan) = (&self.text, &self.latents, &self.plan);
        let weight = self.config.prior_loss_weight;
        let weights = |step: &MicroStep| plan.loss_weights(step, weight);
        self.stepper
            .upload_plan(first, remaining, text, latents, weights)
    }

    /// One row of validation images on `seed` (with `--validation_prompt`): the LoRA as the run's
    /// outputs hold it (the `--use_ema` average, if any), or the base model (`lora` false).
    pub(crate) fn validation_row(
        &mut self,
        seed: u64,
        lora: bool,
    ) -> Result<Option<image::RgbImage>> {
        let Some(validator) = &self.validator else {
            return Ok(None);
        };
        self.model.activate()?;
        let vae = self.latents.live_vae();
        self.model
            .with_ema_weights(self.stepper.ema_mut(), |model| {
                validator.row(model, vae, (seed, lora))
            })
            .map(Some)
    }

    /// (step, mean loss) at every logging step so far.
    pub fn loss_history(&self) -> &[(u64, f64)] {
        &self.loss_history
    }

    /// Puts this run's LoRA on the UNet it shares with a sweep's other variants.
    pub(crate) fn activate(&self) -> Result<()> {
        self.model.activate()
    }

    /// The UNet's model FLOPs per optimizer step of this run and the device's peak
    /// (`--profile_step`'s MFU; a batched sweep's step sums its variants').
    pub(crate) fn throughput(&self) -> &Throughput {
        &self.throughput
    }

    /// The memory and time estimate (CUDA runs only).
    pub fn estimate(&self) -> Option<Estimate> {
        self.estimate.as_ref().map(|(estimate, _)| *estimate)
    }

    /// The optimizer step the run continues from (0 unless resumed).
    pub fn start_step(&self) -> u64 {
        self.start_step
    }

    /// The LoRA parameters by name (fp32, on the training device).
    pub fn lora_parameters(&self) -> &[(String, tch::Tensor)] {
        self.model.params()
    }

    /// Restores checkpoint `arg` (as `--resume_from_checkpoint` names one: `latest`, `checkpoint-N`
    /// of this run's `output_dir`, or a folder's path) into this trainer, checking its `config.toml`
    /// against this run's settings as a resumed run does. Returns its step, `None` when there is no
    /// such checkpoint. (What a run does at its start; the fuzz target of checkpoint folders calls it.)
    ///
    /// # Errors
    /// As a resumed [`Trainer::new`]: [`Error::ResumeFromCheckpoint`], [`Error::Checkpoint`] and the
    /// readers' errors, naming the file.
    pub fn resume_from(&mut self, arg: &str) -> Result<Option<u64>> {
        let Some((step, path)) = self.store.resolve(arg)? else {
            return Ok(None);
        };
        resume_check::check_resume_settings(&path, step, &self.config)?;
        self.restore(step, &path)?;
        Ok(Some(step))
    }

    /// `--resume_from_checkpoint`: restores the named (or latest) checkpoint, if there is one.
    fn resume(&mut self) -> Result<()> {
        let Some(arg) = self.config.resume_from_checkpoint.clone() else {
            return Ok(());
        };
        match self.store.resolve(&arg)? {
            Some((step, path)) => self.restore(step, &path),
            None => {
                say(format!(
                    "--resume_from_checkpoint {arg}: no checkpoint in {}; starting fresh",
                    self.config.output_dir.display()
                ));
                Ok(())
            }
        }
    }

    /// Trains from the start (or resumed) step to `--max_train_steps`, then writes the outputs.
    ///
    /// # Errors
    /// Step, checkpoint and output errors; [`Error::TooManyNonFinite`] when too many steps were skipped.
    pub fn run(&mut self) -> Result<RunSummary> {
        let mut progress = self.begin()?;
        for step in self.start_step..self.config.max_train_steps {
            self.advance(&mut progress, step)?;
        }
        self.finish(progress)
    }

    /// The run's logs and counters before its first step (what [`Trainer::run`] starts with).
    pub(crate) fn begin(&mut self) -> Result<RunProgress> {
        if let Some((estimate, optimizers)) = &self.estimate {
            say(estimate.to_string());
            say(optimizers.to_string());
        }
        let logs = RunLogs::open(&self.config, self.start_step, self.world.is_main_process())?;
        if self.device.is_cuda() {
            torch_cuda::reset_peak_memory_stats(device::index(self.device));
        }
        // Steps skipped before this run (a resumed checkpoint's), read once before the loop.
        let skipped_before = self.stepper.acc.skipped.f_double_value(&[])? as u64;
        Ok(RunProgress {
            logs,
            graphs: None,
            skipped_before,
            skipped: skipped_before,
            started: Instant::now(),
        })
    }

    /// Optimizer step `step` (0-based) and what follows it: logging, checkpoint, validation.
    pub(crate) fn advance(&mut self, progress: &mut RunProgress, step: u64) -> Result<()> {
        self.train_step(step, &mut progress.graphs, &progress.logs.progress)?;
        progress.logs.progress.inc(1);
        if let Some(skipped) = self.after_step(step + 1, &mut progress.logs)? {
            progress.skipped = skipped;
        }
        Ok(())
    }

    /// After the last step: the checks of the whole run, then the outputs.
    pub(crate) fn finish(&mut self, progress: RunProgress) -> Result<RunSummary> {
        let RunProgress {
            mut logs,
            skipped_before,
            skipped,
            started,
            ..
        } = progress;
        let (start, end) = (self.start_step, self.config.max_train_steps);
        let steps_run = end.saturating_sub(start);
        if steps_run > 0 && skipped.saturating_sub(skipped_before) >= steps_run {
            logs.progress.abandon();
            logs.flush()?;
            return Err(Error::EveryStepSkipped { steps: steps_run });
        }
        logs.progress.finish();
        let seconds_per_step = started.elapsed().as_secs_f64() / steps_run.max(1) as f64;
        let peak_memory_gib = device::peak_memory_gib(self.device);
        if steps_run > 0 {
            say(format!(
                "throughput over the run's wall clock ({seconds_per_step:.3} s/step, graph captures and \
                 logging included): {}",
                self.throughput.describe(seconds_per_step)
            ));
        }
        logs.flush()?;
        let stats = RunStats {
            seconds_per_step,
            peak_memory_gib,
            skipped,
            loss_history: &self.loss_history,
        };
        let facts = self.run_facts(end);
        // With --use_ema the comparison grid and the LoRA files hold the average. Rank 0 writes them.
        let (validator, vae, config) = (&self.validator, self.latents.live_vae(), &self.config);
        let (model, ema) = (&mut self.model, self.stepper.ema_mut());
        let written = on_main_process(&*self.group, || {
            model.with_ema_weights(ema, |model| {
                let grid = match validator {
                    Some(validator) => Some(validator.compare(model, vae)?),
                    None => None,
                };
                outputs::write(config, model, &stats, &facts, grid.as_ref())
            })
        })?;
        // The final comparison grid (base model above, LoRA below) in TensorBoard too.
        let grid = self.config.output_dir.join(outputs::COMPARISON_FILE);
        if written.is_some() && self.validator.is_some() && grid.is_file() {
            logs.add_image_file("validation/base_vs_lora", end, &grid)?;
            logs.flush()?;
        }
        let (lora_file, kohya_file) = written.unwrap_or_else(|| {
            let out = &self.config.output_dir;
            (out.join(LORA_FILE), out.join(KOHYA_FILE))
        });
        let skipped_rows = self.plan.skipped_rows();
        if !skipped_rows.is_empty() {
            say(format!(
                "{} row(s) were left out (--skip_bad_images):",
                skipped_rows.len()
            ));
            for row in &skipped_rows {
                say(format!("  {row}"));
            }
        }
        Ok(RunSummary {
            steps_run,
            skipped_steps: skipped,
            loss_history: self.loss_history.clone(),
            lora_file,
            kohya_file,
            seconds_per_step,
            peak_memory_gib,
            throughput: self.throughput.clone(),
            main_process: self.world.is_main_process(),
            skipped_rows,
        })
    }

    /// One optimizer step: its learning rate, its micro-steps and the optimizer step, eagerly or
    /// as replayed graphs (captured after the warm-up steps with `--cuda_graph`).
    fn train_step(
        &mut self,
        step: u64,
        graphs: &mut Option<StepGraphs>,
        progress: &indicatif::ProgressBar,
    ) -> Result<()> {
        // `--profile_step N`: step N (0-based N-1) timed, step N+1 recorded by the profiler.
        let profiling = self
            .config
            .profile_step
            .and_then(|n| (step + 1).checked_sub(n))
            .filter(|&k| k <= 1);
        let mut probe = match profiling {
            Some(k) => Some(StepProbe::begin(
                self.device,
                k == 1,
                &self.config.output_dir,
                step + 1,
            )?),
            None => None,
        };
        self.stepper.set_learning_rate(step)?;
        if self.config.cuda_graph
            && graphs.is_none()
            && step >= self.start_step + GRAPH_WARMUP_STEPS
        {
            let device = device::index(self.device);
            let sizes = self.plan.dataset().config().buckets.sizes().to_vec();
            let (model, text, latents) = (&self.model, &self.text, &self.latents);
            let captured = self
                .stepper
                .capture(model, text, latents, (device, &sizes))?;
            let memory: Vec<String> = captured
                .memory
                .iter()
                .map(|&(bucket, micro, allocated, reserved)| {
                    let (w, h) = sizes.get(bucket).copied().unwrap_or_default();
                    format!("{w}x{h}#{micro} {allocated:.2}/{reserved:.2}")
                })
                .collect();
            say_above(
                progress,
                format!(
                    "captured the micro-steps (per bucket) and the optimizer step as CUDA graphs; \
                     GiB allocated/reserved after each: {}",
                    memory.join(", ")
                ),
            );
            *graphs = Some(captured);
        }
        let accumulation = u64::from(self.config.gradient_accumulation_steps);
        for micro in 0..accumulation {
            let index = step * accumulation + micro;
            let bucket = self.stepper.prepare(&self.plan, &self.latents, index)?;
            match graphs
                .as_ref()
                .and_then(|g| g.micro_steps.get(&(bucket, micro)))
            {
                Some(graph) => timed_launch(&mut probe, || graph.replay())?,
                None => {
                    let (model, text, latents) = (&self.model, &self.text, &self.latents);
                    self.stepper.micro_step(model, text, latents, micro)?;
                }
            }
        }
        match graphs {
            Some(graphs) => timed_launch(&mut probe, || graphs.optimizer_step.replay())?,
            None => self.stepper.optimizer_step(&self.model)?,
        }
        if let Some(probe) = probe {
            say_above(progress, probe.end(graphs.is_some(), &self.throughput)?);
        }
        Ok(())
    }

    /// After optimizer step `done` (1-based): the logging window, checkpoints and validation images
    /// when due. Returns the run's skipped steps when the window was read.
    fn after_step(&mut self, done: u64, logs: &mut RunLogs) -> Result<Option<u64>> {
        let config = &self.config;
        let mut skipped = None;
        if done.is_multiple_of(config.logging_steps) || done == config.max_train_steps {
            let lr = self.stepper.learning_rate(done - 1);
            let memory = device::peak_memory_gib(self.device);
            let window = logs.window(&mut self.stepper.acc, done, lr, memory)?;
            if let Some(loss) = window.loss {
                self.loss_history.push((done, loss));
            }
            if window.skipped > config.max_nonfinite_steps {
                logs.progress.abandon();
                return Err(Error::TooManyNonFinite {
                    step: done,
                    skipped: window.skipped,
                    limit: config.max_nonfinite_steps,
                });
            }
            skipped = Some(window.skipped);
        }
        // Rank 0 writes; every process meets it at a barrier after. The events logged so far go
        // to disk first: a run resumed from this checkpoint continues their file.
        let group = Rc::clone(&self.group);
        if done.is_multiple_of(config.checkpointing_steps) {
            logs.flush()?;
            if let Some(path) = on_main_process(&*group, || self.save_checkpoint(done))? {
                say_above(&logs.progress, format!("saved {}", path.display()));
            }
        }
        if done.is_multiple_of(self.config.validation_steps)
            && done < self.config.max_train_steps
            && let Some(Some(path)) = on_main_process(&*group, || self.validate(done))?
        {
            logs.add_image_file("validation", done, &path)?;
        }
        Ok(skipped)
    }

    /// Validation images of step `step` in `output_dir/validation/`; the file written, if any.
    fn validate(&mut self, step: u64) -> Result<Option<PathBuf>> {
        let Some(validator) = &self.validator else {
            return Ok(None);
        };
        let folder = self.config.output_dir.join("validation");
        std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
        let path = folder.join(format!("step-{step:06}.png"));
        // Images without adapter dropout, with the --use_ema average if any.
        let vae = self.latents.live_vae();
        self.model
            .with_ema_weights(self.stepper.ema_mut(), |model| {
                model.set_training(false);
                let saved = validator.save_images(model, vae, &path);
                model.set_training(true);
                saved
            })?;
        Ok(path.is_file().then_some(path))
    }
}
