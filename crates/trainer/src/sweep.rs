//! Sweeps (`--sweep FILE.toml`): K variants of one run trained in one process on one frozen base
//! model, loaded once (docs/SWEEPS.md): the UNet for the whole sweep, the text encoders and the VAE
//! while every variant prepares its conditioning.
//!
//! Each variant is a [`Trainer`] of its own settings ([`SweepFile::variant_configs`]) whose LoRA is
//! injected into the shared UNet ([`SharedUnet`]) and put on it before each of its steps
//! ([`crate::model::TrainModel::activate`]): it has its own generator, data plan, prepared
//! conditioning, optimizer, schedule, logs, checkpoints and outputs in `OUTPUT_DIR/<name>/`, so it
//! trains exactly as the run of its own settings would, step for step. The variants take their
//! optimizer steps in turn; at every `--checkpointing_steps` the sweep records which variants are
//! still training in `OUTPUT_DIR/checkpoint-N/sweep.json` (each variant's state is its own
//! `checkpoint-N`), which `--resume_from_checkpoint` continues. A variant that diverges (too many
//! non-finite steps, every step skipped, a non-finite LoRA) stops there and the others go on.
//!
//! With `--sweep_execution batched` ([`SweepExecution::Batched`]) the variants' micro-steps whose
//! inputs share a shape run in one UNet call, each variant's LoRA on its own rows of the batch
//! (`lora::attach_rows`); the rest of each step (optimizer, logs, checkpoints) stays each
//! variant's own, and what cannot share a call runs on its own (docs/SWEEPS.md).
//!
//! At the end: `sweep_loss.png` (every variant's loss curve), `sweep_validation.png` (with a
//! validation prompt: the base model's row, then each variant's, on `[base]`'s seed) and
//! `sweep_summary.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{io_error, write_atomic};
use crate::config::{SweepExecution, SweepFile, TrainConfig};
use crate::logs::plot::loss_curves_png;
use crate::logs::say;
use crate::model::SharedUnet;
use crate::model_files::resolve_model;
use crate::output_dir::OutputLock;
use crate::prepare::FrozenModels;
use crate::run::{GRAPH_WARMUP_STEPS, RunProgress, RunSummary, SweepGraphs, Trainer};
use crate::{Error, Result};

/// The file in `OUTPUT_DIR/checkpoint-N/` that records the sweep's state at step N.
pub const SWEEP_CHECKPOINT_FILE: &str = "sweep.json";
/// The loss curves of every variant.
pub const SWEEP_LOSS_FILE: &str = "sweep_loss.png";
/// The validation grid: the base model's row, then one row per variant.
pub const SWEEP_VALIDATION_FILE: &str = "sweep_validation.png";
/// What became of each variant.
pub const SWEEP_SUMMARY_FILE: &str = "sweep_summary.json";

/// Where a variant stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum VariantStatus {
    /// Still training (in a checkpoint's record).
    Training,
    /// Trained to `--max_train_steps`, outputs written.
    Finished,
    /// Stopped after optimizer step `step` for `error` (non-finite losses or LoRA).
    Diverged {
        /// The optimizer step after which it stopped.
        step: u64,
        /// Why, as the run of its own would have failed.
        error: String,
    },
}

/// One variant's line of `sweep_summary.json` (and of a checkpoint's `sweep.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VariantReport {
    /// The variant's name (its folder under the sweep's `--output_dir`).
    pub name: String,
    /// Where it stands.
    #[serde(flatten)]
    pub status: VariantStatus,
    /// Its last logged loss, if any.
    pub final_loss: Option<f64>,
    /// Its diffusers-format LoRA, when it finished.
    pub lora_file: Option<PathBuf>,
}

/// What a sweep leaves behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SweepSummary {
    /// The optimizer steps of every variant (`--max_train_steps`).
    pub max_train_steps: u64,
    /// Each variant, in the sweep file's order.
    pub variants: Vec<VariantReport>,
}

/// One variant under way.
struct Variant {
    name: String,
    /// `None` once it stopped (or when a resumed sweep's record says it had).
    trainer: Option<Trainer>,
    progress: Option<RunProgress>,
    status: VariantStatus,
    loss_history: Vec<(u64, f64)>,
    lora_file: Option<PathBuf>,
}

/// A sweep set up and ready to [`Sweep::run`]: the base model loaded once, every variant's
/// trainer on it.
pub struct Sweep {
    base: TrainConfig,
    variants: Vec<Variant>,
    start_step: u64,
    execution: SweepExecution,
    /// What was said about variants running on their own under batched execution (said once).
    told: BTreeSet<String>,
    /// `--cuda_graph` under batched execution: the sweep's graphs (its micro-steps' and each
    /// variant's optimizer step).
    graphs: Option<SweepGraphs>,
    /// The device the variants train on (`--profile_step` synchronizes it).
    device: tch::Device,
    _lock: OutputLock,
}

impl std::fmt::Debug for Sweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweep")
            .field("output_dir", &self.base.output_dir)
            .field("variants", &self.variants.len())
            .field("start_step", &self.start_step)
            .finish()
    }
}

impl Sweep {
    /// Takes `base.output_dir` (its lock), resolves `--resume_from_checkpoint` against the
    /// sweep's checkpoint records, loads the UNet once and sets up a [`Trainer`] per variant of
    /// `file` (each on its own settings: `base` with the variant's keys).
    ///
    /// # Errors
    /// The file's errors ([`SweepFile::variant_configs`]); a data-parallel launch; the errors of
    /// [`Trainer::new`] for any variant, before training starts.
    pub fn new(base: TrainConfig, file: &SweepFile) -> Result<Self> {
        if crate::distributed::World::from_env()?.world_size > 1 {
            return Err(Error::InvalidOption {
                option: "--sweep",
                problem: "runs in one process: start it without torchrun".into(),
            });
        }
        base.validate_paths()?;
        base.validate()?;
        let configs = file.variant_configs(&base)?;
        let device = crate::device::open(&base)?;
        if base.cuda_graph && !(device.is_cuda() && base.cache_latents) {
            // What each variant's run would say, before anything is written or loaded.
            return Err(Error::InvalidOption {
                option: "--cuda_graph",
                problem: "needs a CUDA device and --cache_latents (latents encoded live are not a \
                          fixed sequence of device work)"
                    .into(),
            });
        }
        let out = base.output_dir.clone();
        std::fs::create_dir_all(&out).map_err(io_error(&out))?;
        let (lock, _) = OutputLock::acquire(&out)?;
        let names: Vec<&str> = configs.iter().map(|(n, _)| n.as_str()).collect();
        let resumed = match &base.resume_from_checkpoint {
            Some(arg) => find_checkpoint(&out, arg, &names)?,
            None => None,
        };
        // The frozen base, once: what every variant's settings share.
        let kind = base.mixed_precision.kind();
        let folder = resolve_model(&base)?;
        let mut unet_config = base.clone();
        crate::single_file::apply_markers(&mut unet_config, &folder)?;
        say(format!(
            "sweep of {} variants on {} ({device:?}, {kind:?}), the UNet loaded once",
            configs.len(),
            folder.describe()
        ));
        let unet = SharedUnet::load(&unet_config, &folder, device, kind)?;
        // The text encoders and the VAE, loaded once to prepare every variant's conditioning.
        let frozen = FrozenModels::default();
        let start_step = resumed.as_ref().map_or(0, |(step, _)| *step);
        let mut variants = Vec::with_capacity(configs.len());
        for (name, mut config) in configs {
            let recorded = resumed.as_ref().and_then(|(_, record)| {
                record
                    .variants
                    .iter()
                    .find(|v| v.name == name)
                    .map(|v| v.status.clone())
            });
            let variant = match recorded {
                Some(status @ VariantStatus::Diverged { .. }) => {
                    say(format!("variant {name}: stopped before the resumed step"));
                    Variant::stopped(name, status)
                }
                _ => {
                    config.resume_from_checkpoint = resumed
                        .as_ref()
                        .map(|(step, _)| format!("checkpoint-{step}"));
                    let _span = tracing::info_span!("variant", name = %name).entered();
                    let trainer = Trainer::on_shared_unet(config, &unet, &frozen)?;
                    Variant::training(name, trainer)
                }
            };
            variants.push(variant);
        }
        drop(frozen);
        crate::device::free_cache(device);
        say("every variant prepared; text encoders and VAE freed");
        let execution = file.execution();
        if execution == SweepExecution::Batched {
            say(
                "--sweep_execution batched: the variants' micro-steps share one UNet call where \
                 their inputs have one shape (each LoRA on its own rows of the batch)",
            );
        }
        let graphs = (execution == SweepExecution::Batched && base.cuda_graph).then(|| {
            say(format!(
                "--cuda_graph: after {GRAPH_WARMUP_STEPS} eager steps each combination of \
                 variants and buckets of a micro-step is captured as a CUDA graph (after one eager \
                 run of it), and each variant's optimizer step as its own"
            ));
            SweepGraphs::new(
                crate::device::index(device),
                start_step + GRAPH_WARMUP_STEPS,
            )
        });
        Ok(Self {
            base,
            variants,
            start_step,
            execution,
            told: BTreeSet::new(),
            graphs,
            device,
            _lock: lock,
        })
    }

    /// The optimizer step the sweep continues from (0 unless resumed).
    pub fn start_step(&self) -> u64 {
        self.start_step
    }

    /// Trains every variant to `--max_train_steps`, in turn step by step, then writes each
    /// variant's outputs and the sweep's (module documentation).
    ///
    /// # Errors
    /// A variant's errors other than divergence (files, devices); [`Error::SweepFailed`] when
    /// every variant diverged.
    pub fn run(&mut self) -> Result<SweepSummary> {
        let estimates: Vec<_> = self
            .variants
            .iter()
            .filter_map(|v| v.trainer.as_ref()?.estimate())
            .collect();
        let total = match self.execution {
            SweepExecution::Sequential => crate::estimate::sweep_estimate(&estimates),
            SweepExecution::Batched => crate::estimate::batched_sweep_estimate(&estimates),
        };
        if let Some(total) = total {
            say(format!(
                "the sweep of {} variants: {total} (each variant's own estimate follows)",
                estimates.len()
            ));
        }
        // One bar per variant, stacked on a terminal.
        let bars = indicatif::MultiProgress::new();
        for variant in &mut self.variants {
            if let Some(trainer) = &mut variant.trainer {
                let _span = tracing::info_span!("variant", name = %variant.name).entered();
                let progress = trainer.begin()?;
                if !progress.bar().is_hidden() {
                    bars.add(progress.bar().clone());
                }
                variant.progress = Some(progress);
            }
        }
        let end = self.base.max_train_steps;
        for step in self.start_step..end {
            match self.execution {
                SweepExecution::Sequential => {
                    for variant in &mut self.variants {
                        variant.advance(step)?;
                    }
                }
                SweepExecution::Batched => {
                    let probe = self.probe(step)?;
                    let eager = self.graphs.as_ref().map(SweepGraphs::eager_launches);
                    self.batched_step(step)?;
                    if let Some(probe) = probe {
                        let replayed = eager.is_some()
                            && eager == self.graphs.as_ref().map(SweepGraphs::eager_launches);
                        say(format!(
                            "the sweep's {}",
                            probe.end(replayed, &self.throughput())?
                        ));
                    }
                }
            }
            let done = step + 1;
            if done.is_multiple_of(self.base.checkpointing_steps) {
                self.save_record(done)?;
            }
        }
        for variant in &mut self.variants {
            variant.finish(end)?;
        }
        let summary = self.summary();
        self.write_outputs(&summary)?;
        if summary
            .variants
            .iter()
            .all(|v| v.status != VariantStatus::Finished)
        {
            return Err(Error::SweepFailed {
                failures: summary
                    .variants
                    .iter()
                    .map(|v| match &v.status {
                        VariantStatus::Diverged { step, error } => {
                            format!("{} (after step {step}): {error}", v.name)
                        }
                        other => format!("{}: {other:?}", v.name),
                    })
                    .collect(),
            });
        }
        Ok(summary)
    }

    /// `--profile_step N` under batched execution: the probe of the sweep's step N (timed between
    /// two device synchronizations) or N+1 (recorded by libtorch's profiler into
    /// `OUTPUT_DIR/profile/step-{N+1}.json`), every variant's work in it; `None` for other steps.
    /// (Under sequential execution each variant's run probes its own step.)
    fn probe(&self, step: u64) -> Result<Option<crate::run::StepProbe>> {
        let Some(k) = self
            .base
            .profile_step
            .and_then(|n| (step + 1).checked_sub(n))
            .filter(|&k| k <= 1)
        else {
            return Ok(None);
        };
        crate::run::StepProbe::begin(self.device, k == 1, &self.base.output_dir, step + 1).map(Some)
    }

    /// The model FLOPs of a batched step: the sum of the variants still training (their UNet
    /// passes share one call, but each is its own work), on the device's peak.
    fn throughput(&self) -> crate::run::Throughput {
        let mut training = self
            .variants
            .iter()
            .filter(|v| v.progress.is_some())
            .filter_map(|v| v.trainer.as_ref())
            .map(Trainer::throughput);
        let Some(first) = training.next() else {
            return crate::run::Throughput {
                flops_per_step: 0.0,
                device: None,
            };
        };
        let mut total = first.clone();
        for other in training {
            total.flops_per_step += other.flops_per_step;
        }
        total
    }

    /// Optimizer step `step` of every variant still training under batched execution: each
    /// micro-step of the variants whose inputs share a shape in one UNet call
    /// ([`crate::run::batched_micro_step`]), the others on their own (the reason said once per
    /// variant); then each variant's optimizer step, logging and checkpoint as its own run's. With
    /// `--cuda_graph` each micro-step's device work and each optimizer step replay their graphs
    /// once captured ([`SweepGraphs`]).
    fn batched_step(&mut self, step: u64) -> Result<()> {
        for variant in &mut self.variants {
            if let (Some(trainer), Some(_)) = (&mut variant.trainer, &variant.progress) {
                trainer.begin_step(step)?;
            }
        }
        let accumulation = u64::from(self.base.gradient_accumulation_steps);
        for micro in 0..accumulation {
            let index = step * accumulation + micro;
            // Who can share a call: grouped by the shape of their inputs in this micro-step.
            let mut groups: BTreeMap<Vec<i64>, Vec<usize>> = BTreeMap::new();
            let mut alone: Vec<(usize, String)> = Vec::new();
            for (i, variant) in self.variants.iter_mut().enumerate() {
                let (Some(trainer), Some(_)) = (&mut variant.trainer, &variant.progress) else {
                    continue;
                };
                if let Some(reason) = trainer.batch_refusal() {
                    alone.push((i, reason.to_owned()));
                    continue;
                }
                let _span = tracing::info_span!("variant", name = %variant.name).entered();
                match trainer.prepare_micro(index)? {
                    Some(key) => groups.entry(key).or_default().push(i),
                    None => alone.push((i, "its inputs are not batchable".to_owned())),
                }
            }
            let mut batched = Vec::new();
            for members in groups.into_values() {
                match members.as_slice() {
                    [only] => alone.push((
                        *only,
                        "its latents or prompt embeddings differ in shape from every other \
                         variant's in this micro-step"
                            .to_owned(),
                    )),
                    _ => batched.push(members),
                }
            }
            for members in batched {
                let names: Vec<String> = members
                    .iter()
                    .map(|&i| self.variants[i].name.clone())
                    .collect();
                let mut trainers: Vec<&mut Trainer> = self
                    .variants
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| members.contains(i))
                    .filter_map(|(_, v)| v.trainer.as_mut())
                    .collect();
                match &mut self.graphs {
                    Some(graphs) => {
                        let names: Vec<&str> = names.iter().map(String::as_str).collect();
                        graphs.batched(step, (&members, &names), &mut trainers, index, micro)?;
                    }
                    None => crate::run::batched_micro_step(&mut trainers, index, micro)?,
                }
            }
            alone.sort();
            for (i, reason) in alone {
                let variant = &mut self.variants[i];
                let told = format!("{}: {reason}", variant.name);
                if self.told.insert(told) {
                    say(format!(
                        "variant {} takes its micro-steps on its own when {reason} (said once)",
                        variant.name
                    ));
                }
                if let Some(trainer) = &mut variant.trainer {
                    let _span = tracing::info_span!("variant", name = %variant.name).entered();
                    match &mut self.graphs {
                        Some(graphs) => {
                            graphs.alone(step, (i, &variant.name), trainer, index, micro)?;
                        }
                        None => trainer.micro_alone(index, micro)?,
                    }
                }
            }
        }
        for (i, variant) in self.variants.iter_mut().enumerate() {
            variant.end_step(step, self.graphs.as_mut().map(|g| (g, i)))?;
        }
        Ok(())
    }

    fn summary(&self) -> SweepSummary {
        SweepSummary {
            max_train_steps: self.base.max_train_steps,
            variants: self.variants.iter().map(Variant::report).collect(),
        }
    }

    /// `OUTPUT_DIR/checkpoint-N/sweep.json`, after every variant saved its `checkpoint-N`; the
    /// records of checkpoints no variant keeps any more are removed.
    fn save_record(&self, step: u64) -> Result<()> {
        let out = &self.base.output_dir;
        let folder = out.join(format!("checkpoint-{step}"));
        std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
        let json = serde_json::to_vec_pretty(&self.summary()).map_err(|e| Error::Checkpoint {
            path: folder.clone(),
            problem: e.to_string(),
        })?;
        write_atomic(&folder.join(SWEEP_CHECKPOINT_FILE), &json)?;
        let kept = |n: u64| {
            self.variants
                .iter()
                .any(|v| out.join(&v.name).join(format!("checkpoint-{n}")).is_dir())
        };
        for (n, path) in records(out)? {
            if !kept(n) {
                std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
            }
        }
        Ok(())
    }

    /// The sweep's loss plot, validation grid and summary.
    fn write_outputs(&mut self, summary: &SweepSummary) -> Result<()> {
        let out = self.base.output_dir.clone();
        let curves: Vec<(String, Vec<(u64, f64)>)> = self
            .variants
            .iter()
            .map(|v| (v.name.clone(), v.loss_history.clone()))
            .collect();
        if curves
            .iter()
            .any(|(_, points)| points.iter().any(|(_, l)| l.is_finite()))
        {
            loss_curves_png(
                &out.join(SWEEP_LOSS_FILE),
                &curves,
                "training loss by variant",
            )?;
        }
        if self.base.validation_prompt.is_some() {
            self.write_validation_grid(&out.join(SWEEP_VALIDATION_FILE))?;
        }
        let json = serde_json::to_vec_pretty(summary).map_err(|e| Error::Checkpoint {
            path: out.join(SWEEP_SUMMARY_FILE),
            problem: e.to_string(),
        })?;
        write_atomic(&out.join(SWEEP_SUMMARY_FILE), &json)?;
        for report in &summary.variants {
            say(format!("variant {}: {}", report.name, describe(report)));
        }
        Ok(())
    }

    /// The base model's images, then each finished variant's, on `[base]`'s seed.
    fn write_validation_grid(&mut self, path: &Path) -> Result<()> {
        let seed = self.base.seed;
        let mut rows = Vec::new();
        for variant in &mut self.variants {
            let Some(trainer) = &mut variant.trainer else {
                continue;
            };
            if variant.status != VariantStatus::Finished {
                continue;
            }
            if rows.is_empty()
                && let Some(row) = trainer.validation_row(seed, false)?
            {
                rows.push(row);
            }
            rows.extend(trainer.validation_row(seed, true)?);
        }
        if rows.is_empty() {
            return Ok(());
        }
        let grid = sdxl_model::pipeline::grid_column(&rows)?;
        // Written beside and renamed: a reader never sees part of it.
        let tmp = path.with_extension("tmp.png");
        let written = sdxl_model::pipeline::save_png(&grid, &tmp)
            .map_err(Error::from)
            .and_then(|()| std::fs::rename(&tmp, path).map_err(io_error(path)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

impl Variant {
    fn training(name: String, trainer: Trainer) -> Self {
        Self {
            name,
            trainer: Some(trainer),
            progress: None,
            status: VariantStatus::Training,
            loss_history: Vec::new(),
            lora_file: None,
        }
    }

    fn stopped(name: String, status: VariantStatus) -> Self {
        Self {
            name,
            trainer: None,
            progress: None,
            status,
            loss_history: Vec::new(),
            lora_file: None,
        }
    }

    /// Optimizer step `step` of this variant, if it is still training.
    fn advance(&mut self, step: u64) -> Result<()> {
        self.settle(step, |trainer, progress| {
            trainer
                .activate()
                .and_then(|()| trainer.advance(progress, step))
        })
    }

    /// The end of optimizer step `step` under batched execution (its micro-steps done): its
    /// optimizer step and what follows, a divergence stopping only this variant.
    /// With `--cuda_graph`, `graphs` holds its optimizer step's graph (this variant's index in them).
    fn end_step(&mut self, step: u64, graphs: Option<(&mut SweepGraphs, usize)>) -> Result<()> {
        self.settle(step, |trainer, progress| {
            trainer.end_step(progress, step, graphs)
        })
    }

    /// Runs `work` for step `step` if this variant is still training, then keeps its loss history;
    /// a divergence stops only this variant, any other error ends the sweep.
    fn settle(
        &mut self,
        step: u64,
        work: impl FnOnce(&mut Trainer, &mut RunProgress) -> Result<()>,
    ) -> Result<()> {
        let (Some(trainer), Some(progress)) = (&mut self.trainer, &mut self.progress) else {
            return Ok(());
        };
        let _span = tracing::info_span!("variant", name = %self.name).entered();
        let result = work(trainer, progress);
        self.loss_history = trainer.loss_history().to_vec();
        match result {
            Ok(()) => Ok(()),
            Err(error) if is_divergence(&error) => {
                self.stop(step + 1, &error);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// The end of a variant still training: its outputs.
    fn finish(&mut self, end: u64) -> Result<()> {
        let (Some(trainer), Some(progress)) = (&mut self.trainer, self.progress.take()) else {
            return Ok(());
        };
        let _span = tracing::info_span!("variant", name = %self.name).entered();
        let result = trainer.activate().and_then(|()| trainer.finish(progress));
        match result {
            Ok(RunSummary {
                loss_history,
                lora_file,
                ..
            }) => {
                self.loss_history = loss_history;
                self.lora_file = Some(lora_file);
                self.status = VariantStatus::Finished;
                Ok(())
            }
            Err(error) if is_divergence(&error) => {
                self.stop(end, &error);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Stops the variant after step `step` for `error`; the others go on.
    fn stop(&mut self, step: u64, error: &Error) {
        say(format!(
            "variant {} diverged after step {step} and stops; the others go on: {error}",
            self.name
        ));
        self.status = VariantStatus::Diverged {
            step,
            error: error.to_string(),
        };
        self.progress = None;
        // Its trainer stays (its LoRA parked on the shared UNet) until the sweep ends, but trains
        // no more.
    }

    fn report(&self) -> VariantReport {
        VariantReport {
            name: self.name.clone(),
            status: self.status.clone(),
            final_loss: self.loss_history.last().map(|&(_, loss)| loss),
            lora_file: self.lora_file.clone(),
        }
    }
}

fn describe(report: &VariantReport) -> String {
    match &report.status {
        VariantStatus::Finished => format!(
            "finished, final loss {}, LoRA {}",
            report
                .final_loss
                .map_or_else(|| "n/a".into(), |l| format!("{l:.4}")),
            report
                .lora_file
                .as_deref()
                .map_or_else(|| "none".into(), |p| p.display().to_string())
        ),
        VariantStatus::Diverged { step, error } => {
            format!("diverged after step {step}: {error}")
        }
        VariantStatus::Training => "still training".into(),
    }
}

/// Whether `error` ends one variant (its numbers went non-finite) rather than the sweep.
fn is_divergence(error: &Error) -> bool {
    matches!(
        error,
        Error::TooManyNonFinite { .. }
            | Error::EveryStepSkipped { .. }
            | Error::NonFiniteLora { .. }
    )
}

/// The sweep's checkpoint records in `out`: `(step, folder)`.
fn records(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(out).map_err(io_error(out))? {
        let path = entry.map_err(io_error(out))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step
            && path.join(SWEEP_CHECKPOINT_FILE).is_file()
        {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The checkpoint `arg` (`latest` or `checkpoint-N`) names among the sweep's records in `out`:
/// the latest (or named) record whose variants still training all kept their `checkpoint-N`.
/// `None` (a fresh start) when `latest` finds none.
fn find_checkpoint(out: &Path, arg: &str, names: &[&str]) -> Result<Option<(u64, SweepSummary)>> {
    let wanted = match arg {
        "latest" => None,
        other => Some(
            other
                .strip_prefix("checkpoint-")
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| Error::InvalidOption {
                    option: "--resume_from_checkpoint",
                    problem: format!(
                        "a sweep resumes from `latest` or `checkpoint-N` of its --output_dir, not `{other}`"
                    ),
                })?,
        ),
    };
    for (step, folder) in records(out)?.into_iter().rev() {
        if wanted.is_some_and(|w| w != step) {
            continue;
        }
        let path = folder.join(SWEEP_CHECKPOINT_FILE);
        let bytes = std::fs::read(&path).map_err(io_error(&path))?;
        let record: SweepSummary =
            serde_json::from_slice(&bytes).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                problem: e.to_string(),
            })?;
        let complete = record.variants.iter().all(|v| {
            !matches!(v.status, VariantStatus::Training)
                || out
                    .join(&v.name)
                    .join(format!("checkpoint-{step}"))
                    .is_dir()
        });
        let same_variants = names.len() == record.variants.len()
            && names
                .iter()
                .all(|n| record.variants.iter().any(|v| v.name == *n));
        if !same_variants {
            return Err(Error::ResumeFromCheckpoint {
                path,
                problem: format!(
                    "records the variants {}, the sweep file has {}",
                    record
                        .variants
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    names.join(", ")
                ),
            });
        }
        if complete {
            say(format!("resuming the sweep from step {step}"));
            return Ok(Some((step, record)));
        }
    }
    match wanted {
        Some(step) => Err(Error::ResumeFromCheckpoint {
            path: out.join(format!("checkpoint-{step}")),
            problem: "is not a complete checkpoint of this sweep".into(),
        }),
        None => {
            say(format!(
                "--resume_from_checkpoint latest: no checkpoint of the sweep in {}; starting fresh",
                out.display()
            ));
            Ok(None)
        }
    }
}
