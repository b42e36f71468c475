//! Training from a single-file SGM checkpoint (`--pretrained_model_name_or_path model.safetensors`,
//! as community SDXL checkpoints ship; found by [`crate::model_files::resolve_model`]), and reading every
//! component of the base model — diffusers folder or single file — through one set of methods on
//! [`ModelFolder`].
//!
//! The file carries no configs: SDXL base's are used, as
//! diffusers infers `xl_base` for such a file, unless `--single_file_config` names a diffusers folder or
//! hub repository whose `config.json` files describe the components (diffusers' `config=`); the
//! scheduler config is that folder's, else SDXL's.
//!
//! Community v-prediction checkpoints carry a `v_pred` key, and zero-terminal-SNR ones a `ztsnr` key
//! (read by ComfyUI's `SDXL.model_type`); [`apply_markers`] trains them as such unless the flags say
//! otherwise. docs/TRAINING.md ("Training from a single file") has the sources.

use sha2::{Digest, Sha256};
use tch::nn::VarStore;
use tch::{Device, Kind};

use sdxl_model::pipeline::Pipeline;
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::prompt::PromptEncoder;
use sdxl_model::schedulers::SchedulerConfig;
use sdxl_model::single_file::{SdxlConfigs, SingleFileCheckpoint};
use sdxl_model::unet::UNet2DConditionModel;
use sdxl_model::vae::single_file::VAE_PREFIX;
use sdxl_model::vae::{AutoencoderKL, Upcast};

use crate::config::TrainConfig;
use crate::model_files::ModelFolder;
use crate::{Error, Result};

/// The guidance rescale of validation and class images with `--zero_terminal_snr` when
/// `--validation_guidance_rescale` is unset: the zero-terminal-SNR paper's 0.7.
pub const ZTSNR_GUIDANCE_RESCALE: f64 = 0.7;

impl ModelFolder {
    /// The single file with its configs, when the model is one.
    ///
    /// # Errors
    /// File and config errors naming the file.
    pub fn checkpoint(&self) -> Result<Option<SingleFileCheckpoint>> {
        let Some(single) = &self.single_file else {
            return Ok(None);
        };
        let configs = match &single.config_folder {
            Some(folder) => SdxlConfigs::from_diffusers_folder(folder)?,
            None => SdxlConfigs::sdxl_base(),
        };
        Ok(Some(SingleFileCheckpoint::open(&single.path, configs)?))
    }

    /// The frozen UNet's weights in `kind` on `device` (each tensor converted on its own).
    ///
    /// # Errors
    /// Loading errors naming the file and keys.
    pub fn load_unet(
        &self,
        device: Device,
        kind: Kind,
    ) -> Result<(VarStore, UNet2DConditionModel)> {
        if let Some(checkpoint) = self.checkpoint()? {
            return Ok(checkpoint.load_unet(device, kind)?);
        }
        let unet = UNet2DConditionModel::from_pretrained(&self.root, &self.options(device, kind))?;
        Ok((unet.store, unet.model))
    }

    /// Both text encoders in `kind` on `device`.
    ///
    /// # Errors
    /// Loading errors naming the file and keys.
    pub fn prompt_encoder(
        &self,
        device: Device,
        kind: Kind,
    ) -> Result<(PromptEncoder, [VarStore; 2])> {
        Ok(match self.checkpoint()? {
            Some(checkpoint) => checkpoint.load_prompt_encoder(device, kind)?,
            None => {
                let loaded =
                    PromptEncoder::from_pretrained(&self.root, &self.options(device, kind))?;
                (loaded.model, loaded.store)
            }
        })
    }

    /// The VAE, its weights' kind chosen from `kind` and `upcast`.
    ///
    /// # Errors
    /// Loading errors naming the file and keys.
    pub fn vae(
        &self,
        device: Device,
        kind: Kind,
        upcast: Upcast,
    ) -> Result<(AutoencoderKL, VarStore)> {
        Ok(match self.checkpoint()? {
            Some(checkpoint) => checkpoint.load_vae(device, kind, upcast)?,
            None => {
                let options = self.options(device, kind).vae_upcast(upcast);
                let loaded = AutoencoderKL::from_pretrained(&self.root, &options)?;
                (loaded.model, loaded.store)
            }
        })
    }

    /// The whole text-to-image pipeline.
    ///
    /// # Errors
    /// Loading errors naming the file and keys.
    pub fn pipeline(&self, device: Device, kind: Kind, upcast: Upcast) -> Result<Pipeline> {
        let mut options = self.options(device, kind).vae_upcast(upcast);
        let path = match &self.single_file {
            Some(single) => {
                if let Some(folder) = &single.config_folder {
                    options = options.single_file_config(folder);
                }
                &single.path
            }
            None => &self.root,
        };
        Ok(Pipeline::from_pretrained(path, &options)?.model)
    }

    /// The load options of this model's diffusers folder: its variant, on `device` in `kind`.
    fn options(&self, device: Device, kind: Kind) -> LoadOptions {
        let options = LoadOptions::default().device(device).kind(kind);
        match &self.variant {
            Some(variant) => options.variant(variant),
            None => options,
        }
    }

    /// The model's scheduler config: the folder's (or `--single_file_config`'s)
    /// `scheduler/scheduler_config.json`, else SDXL's.
    ///
    /// # Errors
    /// Config-file errors.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        if let Some(checkpoint) = self.checkpoint()? {
            return Ok(checkpoint.configs().scheduler.clone());
        }
        let file = self.root.join("scheduler").join("scheduler_config.json");
        Ok(if file.is_file() {
            SchedulerConfig::from_file(&file)?
        } else {
            SchedulerConfig::sdxl()
        })
    }

    /// An identity of the VAE's weights for cached latents: with `content`, a SHA-256 over the
    /// weights (the folder's files, or a single file's VAE tensors) so that disk caches follow the
    /// weights, not the path; else the path and variant.
    ///
    /// # Errors
    /// File errors naming the file.
    pub fn vae_identity(&self, content: bool) -> Result<String> {
        let vae_folder = self.root.join("vae");
        let checkpoint = self.checkpoint()?;
        Ok(match (&checkpoint, content) {
            (Some(checkpoint), true) => hash_vae_tensors(checkpoint)?,
            (Some(checkpoint), false) => checkpoint.path().display().to_string(),
            (None, true) => crate::prepare::hash_folder(&vae_folder)?,
            (None, false) => format!("{}|{:?}", vae_folder.display(), self.variant),
        })
    }

    /// What the model is, for the log.
    pub fn describe(&self) -> String {
        match &self.single_file {
            Some(single) => format!(
                "single file {} (configs: {})",
                single.path.display(),
                single
                    .config_folder
                    .as_ref()
                    .map_or_else(|| "SDXL base's".to_owned(), |f| f.display().to_string())
            ),
            None => format!("{} (variant {:?})", self.root.display(), self.variant),
        }
    }
}

/// SHA-256 over the keys, kinds, shapes and values of a single file's VAE tensors.
fn hash_vae_tensors(checkpoint: &SingleFileCheckpoint) -> Result<String> {
    let file = checkpoint.tensors();
    let mut hasher = Sha256::new();
    for key in file.keys()?.iter().filter(|k| k.starts_with(VAE_PREFIX)) {
        let tensor = file.tensor(key, Device::Cpu, None)?.contiguous();
        hasher.update(format!("{key}|{:?}|{:?}|", tensor.kind(), tensor.size()).as_bytes());
        let mut bytes = vec![0u8; tensor.numel() * tensor.kind().elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut bytes, tensor.numel())?;
        hasher.update(&bytes);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Logs what a single file holds (tensors per component, keys of no component) and applies its
/// `v_pred` / `ztsnr` markers: a `v_pred` file trains with v-prediction unless `--prediction_type`
/// was given, and a `ztsnr` file (with v-prediction) with `--zero_terminal_snr`, as ComfyUI samples
/// such files. Returns the lines to log.
///
/// # Errors
/// File errors naming the file.
pub fn apply_markers(config: &mut TrainConfig, folder: &ModelFolder) -> Result<Vec<String>> {
    let Some(checkpoint) = folder.checkpoint()? else {
        return Ok(Vec::new());
    };
    let counts = checkpoint.component_keys()?;
    let other = checkpoint.other_keys()?;
    let mut lines = vec![format!(
        "single file {}: {}; {} key(s) of no component, not loaded{}",
        checkpoint.path().display(),
        counts
            .iter()
            .map(|(name, n)| format!("{name} {n} tensors"))
            .collect::<Vec<_>>()
            .join(", "),
        other.len(),
        if other.is_empty() {
            String::new()
        } else {
            format!(": {}", shown(&other))
        }
    )];
    let markers = checkpoint.markers()?;
    if markers.v_pred {
        match config.prediction_type.as_deref() {
            None => {
                config.prediction_type = Some("v_prediction".into());
                lines.push("the file has a `v_pred` key: training with --prediction_type v_prediction".into());
            }
            Some("v_prediction") => {}
            Some(other) => lines.push(format!(
                "warning: the file has a `v_pred` key (a v-prediction model) but --prediction_type is {other}"
            )),
        }
    }
    if markers.ztsnr && !config.zero_terminal_snr {
        if config.prediction_type.as_deref() == Some("v_prediction") {
            config.zero_terminal_snr = true;
            lines.push("the file has a `ztsnr` key: training with --zero_terminal_snr".into());
        } else {
            lines.push("warning: the file has a `ztsnr` key but trains without v-prediction, so without --zero_terminal_snr".into());
        }
    }
    Ok(lines)
}

fn shown(keys: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut text = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        text.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    text
}

/// The scheduler config a run trains and samples with: the model's, with `--prediction_type`, and
/// with `--zero_terminal_snr` the rescaled betas (diffusers' `rescale_betas_zero_snr`) and "trailing"
/// timesteps for sampling, as diffusers recommends for such models.
///
/// # Errors
/// [`Error::InvalidOption`] for `--zero_terminal_snr` without v-prediction; config-file errors.
pub fn training_scheduler_config(
    config: &TrainConfig,
    folder: &ModelFolder,
) -> Result<SchedulerConfig> {
    let mut scheduler_config = folder.scheduler_config()?;
    if let Some(prediction) = &config.prediction_type {
        scheduler_config.prediction_type = Some(prediction.clone());
    }
    if config.zero_terminal_snr {
        if scheduler_config.prediction_type.as_deref() != Some("v_prediction") {
            return Err(Error::InvalidOption {
                option: "--zero_terminal_snr",
                problem: format!(
                    "needs --prediction_type v_prediction (the model's scheduler config says {:?}): the last timestep has ᾱ = 0 (pure noise), where ε-prediction is undefined",
                    scheduler_config
                        .prediction_type
                        .as_deref()
                        .unwrap_or("epsilon")
                ),
            });
        }
        scheduler_config.rescale_betas_zero_snr = Some(true);
        scheduler_config.timestep_spacing = Some("trailing".into());
    }
    Ok(scheduler_config)
}

/// The guidance rescale of validation and class images: `--validation_guidance_rescale`, else
/// [`ZTSNR_GUIDANCE_RESCALE`] with `--zero_terminal_snr`, else 0.
pub fn guidance_rescale(config: &TrainConfig) -> f64 {
    config
        .validation_guidance_rescale
        .unwrap_or(if config.zero_terminal_snr {
            ZTSNR_GUIDANCE_RESCALE
        } else {
            0.0
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn zero_terminal_snr_needs_v_prediction() {
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl");
        let folder = crate::model_files::resolve(tiny.to_str().unwrap(), "main", None).unwrap();
        let mut config = TrainConfig {
            zero_terminal_snr: true,
            ..TrainConfig::default()
        };
        let error = training_scheduler_config(&config, &folder)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--zero_terminal_snr") && error.contains("v_prediction"),
            "{error}"
        );
        config.prediction_type = Some("v_prediction".into());
        let scheduler = training_scheduler_config(&config, &folder).unwrap();
        assert_eq!(scheduler.rescale_betas_zero_snr, Some(true));
        assert_eq!(scheduler.timestep_spacing.as_deref(), Some("trailing"));
        assert_eq!(guidance_rescale(&config), ZTSNR_GUIDANCE_RESCALE);
        config.prediction_type = Some("epsilon".into());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--zero_terminal_snr")
        );
    }
}
