//! Configuration files: a model's `config.json`s (UNet, VAE, text encoder, scheduler), our
//! `--config` TOML and kohya's `--dataset_config` TOML, each read by the library's reader.

use std::path::{Path, PathBuf};

use super::{Outcome, Runner, put, text};
use sdxl_model::clip::ClipTextConfig;
use sdxl_model::schedulers::{
    DdimConfig, DdimScheduler, DdpmConfig, DdpmSchedule, DpmSolverMultistepConfig,
    DpmSolverMultistepScheduler, EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler,
    EulerDiscreteConfig, EulerDiscreteScheduler, SchedulerConfig,
};
use sdxl_model::unet::{UNetConfig, sgm_unet_table};
use sdxl_model::vae::AutoencoderKLConfig;
use tch::Device;
use trainer::TrainConfig;
use trainer::config::kohya::KohyaDatasetConfig;

/// One input as every `config.json` of a diffusers folder: `unet/`, `vae/`, `text_encoder/` and
/// `scheduler/scheduler_config.json` (the input is read by each reader; errors of one do not stop
/// the others). An accepted UNet config also gives the SGM name table (kohya's block names) and an
/// accepted scheduler config every sampler built from it.
pub(super) fn model_config(work: &Path) -> Runner {
    let work = work.to_owned();
    Box::new(move |data: &[u8]| -> Outcome {
        let path = put(&work, "config.json", data)?;
        let unet = UNetConfig::from_file(&path).map(|config| sgm_unet_table(&config).len());
        let vae = AutoencoderKLConfig::from_file(&path).map(|_| ());
        let clip = ClipTextConfig::from_file(&path).map(|_| ());
        let scheduler = schedulers(&path);
        let errors: Vec<String> = [unet.map(|_| ()), vae, clip, scheduler]
            .into_iter()
            .filter_map(|r| r.err().map(text))
            .collect();
        // Accepted when some reader took it (a UNet config is no VAE config).
        if errors.len() < 4 {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    })
}

/// `scheduler_config.json`: the training schedule and every sampler `generate` offers.
fn schedulers(path: &Path) -> sdxl_model::Result<()> {
    let config = SchedulerConfig::from_file(path)?;
    DdpmSchedule::new(DdpmConfig::from_config(&config)?, Device::Cpu)?;
    DdimScheduler::new(DdimConfig::from_config(&config)?)?;
    DpmSolverMultistepScheduler::new(DpmSolverMultistepConfig::from_config(&config)?)?;
    EulerDiscreteScheduler::new(EulerDiscreteConfig::from_config(&config)?)?;
    EulerAncestralDiscreteScheduler::new(EulerAncestralDiscreteConfig::from_config(&config)?)?;
    Ok(())
}

/// `train_naruto --config FILE`: the TOML read over the defaults, then every setting checked
/// ([`TrainConfig::validate`]), as the trainer does before it loads anything.
pub(super) fn train_config(work: &Path) -> Runner {
    let work = work.to_owned();
    Box::new(move |data: &[u8]| -> Outcome {
        let path = put(&work, "config.toml", data)?;
        let args = ["--config".to_owned(), path.display().to_string()];
        let config = TrainConfig::from_args(args).map_err(text)?;
        config.validate().map_err(text)?;
        config.to_toml().map_err(text)?;
        Ok(())
    })
}

/// `train_naruto --dataset_config FILE`: kohya's dataset TOML resolved, then taken into the
/// training settings as the trainer does ([`TrainConfig::resolve_dataset_config`]).
pub(super) fn kohya_dataset(work: &Path) -> Runner {
    let work = work.to_owned();
    Box::new(move |data: &[u8]| -> Outcome {
        let path: PathBuf = put(&work, "dataset.toml", data)?;
        KohyaDatasetConfig::from_file(&path).map_err(text)?;
        let args = ["--dataset_config".to_owned(), path.display().to_string()];
        let config = TrainConfig::from_args(args).map_err(text)?;
        let (config, _) = config.resolve_dataset_config().map_err(text)?;
        config.validate().map_err(text)?;
        Ok(())
    })
}
