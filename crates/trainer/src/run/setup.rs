//! The run's setup steps outside [`super::Trainer`]: the output folder, the data plan (with the
//! class images), the number of processes and the memory and time estimate.

use tch::{Device, Kind};

use sdxl_model::vae::AutoencoderKLConfig;

use crate::checkpoint::{CheckpointStore, io_error};
use crate::class_images::ensure_class_images;
use crate::config::kohya::KohyaDatasetConfig;
use crate::config::{OptimizerKind, TrainConfig};
use crate::distributed::{Collective, World, on_main_process};
use crate::estimate::{
    Estimate, EstimateInput, OptimizerTable, estimate, optimizer_seconds_per_tensor,
    text_encoder_activation_bytes,
};
use crate::logs::say;
use crate::model::TrainModel;
use crate::model_files::ModelFolder;
use crate::output_dir::{OutputLock, PreviousRun, clean_leftovers, move_aside};
use crate::plan::Plan;
use crate::step::Stepper;
use crate::{Error, Result};

use super::resume_check::check_resume_settings;

/// Makes the missing class images (`--with_prior_preservation`), opens the data plan and says what
/// it holds.
pub(super) fn open_plan(
    config: &TrainConfig,
    kohya: Option<&KohyaDatasetConfig>,
    folder: &ModelFolder,
    (device, kind): (Device, Kind),
    (world, group): (&World, &dyn Collective),
) -> Result<Plan> {
    if config.with_prior_preservation {
        // Rank 0 makes the missing class images; the others wait for them.
        if let Some(class) =
            on_main_process(group, || ensure_class_images(config, folder, device, kind))?
        {
            say(format!(
                "{} class images in {} ({} generated)",
                class.paths.len(),
                class.folder.display(),
                class.generated
            ));
        }
    }
    let plan = Plan::open_for_world(config, kohya, world.world_size)?;
    say(Plan::describe_prompts(config));
    for skipped in plan.skipped_rows() {
        say(format!("skipped a row: {skipped}"));
    }
    say(format!(
        "{} images, {} batches of {} per epoch; bucket(s) {}",
        plan.dataset().len(),
        plan.steps_per_epoch(),
        config.train_batch_size as usize * world.world_size,
        plan.describe_buckets()
    ));
    if world.world_size > 1 {
        say(format!(
            "data parallel: {} processes, each training on --train_batch_size {} of every batch",
            world.world_size, config.train_batch_size
        ));
    }
    Ok(plan)
}

/// Takes `output_dir` for this run (rank 0 alone, the others waiting): creates it, takes its lock
/// ([`OutputLock`]), refuses a folder holding another run unless `--resume_from_checkpoint`
/// continues it or `--overwrite_output_dir` moves it aside, removes what interrupted runs left
/// half-written, checks that a resume keeps what a step means, and prunes a checkpoint too many (a
/// run killed between a save and its prune). Rank 0 returns the lock, held for the run.
pub(super) fn open_output_dir(
    config: &TrainConfig,
    group: &dyn Collective,
) -> Result<(CheckpointStore, Option<OutputLock>)> {
    let store = CheckpointStore::new(&config.output_dir);
    let lock = on_main_process(group, || claim_output_dir(config, &store))?;
    Ok((store, lock))
}

fn claim_output_dir(config: &TrainConfig, store: &CheckpointStore) -> Result<OutputLock> {
    let dir = &config.output_dir;
    if config.overwrite_output_dir && config.resume_from_checkpoint.is_some() {
        return Err(Error::InvalidOption {
            option: "--overwrite_output_dir",
            problem: "and --resume_from_checkpoint exclude each other: one moves the run in \
                      --output_dir aside, the other continues it"
                .into(),
        });
    }
    if dir.exists() && !dir.is_dir() {
        return Err(Error::OutputDir {
            path: dir.clone(),
            problem: "is a file, not a folder".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let (lock, stale) = OutputLock::acquire(dir)?;
    if let Some(holder) = stale {
        say(format!(
            "took over {}: the run that held it ({}) is no longer running",
            lock.path().display(),
            holder.describe()
        ));
    }
    let previous = PreviousRun::find(store)?;
    if config.resume_from_checkpoint.is_none() && !previous.is_empty() {
        if !config.overwrite_output_dir {
            return Err(Error::OutputDir {
                path: dir.clone(),
                problem: format!(
                    "holds another run ({}): continue it with --resume_from_checkpoint latest, \
                     move it aside with --overwrite_output_dir, or choose another --output_dir",
                    previous.describe()
                ),
            });
        }
        clean_leftovers(store)?;
        let aside = move_aside(dir)?;
        say(format!(
            "--overwrite_output_dir: moved the earlier run ({}) to {}",
            previous.describe(),
            aside.display()
        ));
    }
    for stale in clean_leftovers(store)? {
        say(format!(
            "removed {} left by an interrupted run",
            stale.display()
        ));
    }
    if let Some(arg) = &config.resume_from_checkpoint {
        let resumed = match arg.as_str() {
            "latest" => store.latest()?,
            path => store.resolve(path)?,
        };
        match resumed {
            Some((step, path)) => check_resume_settings(&path, step, config)?,
            None if !previous.finished.is_empty() => {
                return Err(Error::OutputDir {
                    path: dir.clone(),
                    problem: format!(
                        "holds a finished run ({}) and no checkpoint to continue it from \
                         (--resume_from_checkpoint {arg}): move it aside with \
                         --overwrite_output_dir, or choose another --output_dir",
                        previous.describe()
                    ),
                });
            }
            None => {}
        }
    }
    if let Some(limit) = config.checkpoints_total_limit {
        store.prune(limit as usize)?;
    }
    Ok(lock)
}

/// The processes of the run, which `--scale_lr` and the checkpoints' config record in
/// `--nproc_per_node`: the world's size. A `--nproc_per_node` above 1 in a world of one process
/// means nothing started the others.
pub(super) fn processes(config: &TrainConfig, world: &World) -> Result<u32> {
    if world.world_size == 1 && config.nproc_per_node > 1 {
        return Err(Error::InvalidOption {
            option: "--nproc_per_node",
            problem: format!(
                "{} processes, but this one was not started as one of them (no torchrun \
                 variables): the train_naruto example's --nproc_per_node, torchrun or \
                 trainer::distributed::launch start them",
                config.nproc_per_node
            ),
        });
    }
    u32::try_from(world.world_size).map_err(|_| Error::Environment {
        variable: "WORLD_SIZE",
        problem: format!("{} is too large", world.world_size),
    })
}

pub(super) fn run_estimate(
    config: &TrainConfig,
    model: &TrainModel,
    stepper: &Stepper,
    vae_config: &AutoencoderKLConfig,
    (kind, batch): (Kind, usize),
) -> (Estimate, OptimizerTable) {
    let latent = i64::from(config.resolution) / vae_config.downscale_factor();
    let (unet_params, stored_weight_bytes) = model.base_size();
    let weight_bytes = if kind == Kind::Float { 4 } else { 2 };
    let (text_encoder_weight_bytes, text_encoder_activation_bytes) = match model.text_encoders() {
        Some(text) => {
            let (te1, te2) = text.encoder().text_encoders();
            let shape = |c: &sdxl_model::clip::ClipTextConfig| {
                (c.hidden_size, c.intermediate_size, c.num_hidden_layers)
            };
            let shapes = [shape(te1.config()), shape(te2.config())];
            let checkpointing = config.gradient_checkpointing;
            let activations =
                text_encoder_activation_bytes(&shapes, batch as i64, weight_bytes, checkpointing);
            (text.base_size().1, activations)
        }
        None => (0, 0),
    };
    // Every choice's state and step time for this LoRA, from the shapes (what each would allocate).
    let shapes: Vec<Vec<i64>> = model.param_tensors().iter().map(|p| p.size()).collect();
    let tensors = shapes.len() as f64;
    let extra_seconds = |kind| optimizer_seconds_per_tensor(kind) * tensors;
    let input = EstimateInput {
        text_encoder_weight_bytes,
        text_encoder_activation_bytes,
        unet_params,
        weight_bytes,
        stored_weight_bytes,
        lora_params: model.lora_parameter_count(),
        optimizer_state_bytes: stepper.optimizer().state_bytes(),
        ema_bytes: stepper.ema().map_or(0, optim8bit::EMAModel::state_bytes),
        optimizer_extra_seconds: config.optimizer_kind().map_or(0.0, extra_seconds),
        batch: batch as i64,
        latent_pixels: latent * latent,
        accumulation: i64::from(config.gradient_accumulation_steps),
        steps: config.max_train_steps,
        checkpointing: config.gradient_checkpointing,
        cuda_graph: config.cuda_graph,
        fp8_products: config.fp8_compute,
    };
    let chosen = config.optimizer_setup().ok();
    let choices: Vec<_> = OptimizerKind::ALL
        .into_iter()
        .map(|kind| {
            // The chosen one as the run has it (--optimizer_args included).
            let optimizer = match chosen {
                Some(setup) if setup.kind == kind => setup.config,
                _ => config.optimizer_setup_for(kind).config,
            };
            let bytes = shapes.iter().map(|s| optimizer.state_bytes(s)).sum();
            let chosen = chosen.is_some_and(|s| s.kind == kind);
            (kind.name(), bytes, extra_seconds(kind), chosen)
        })
        .collect();
    (estimate(&input), OptimizerTable::new(&input, &choices))
}
