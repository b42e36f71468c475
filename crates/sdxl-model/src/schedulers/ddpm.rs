//! The DDPM forward process used for training (Ho et al. 2020): noising latents to a timestep, the
//! v-prediction target and the signal-to-noise ratio for min-SNR-γ loss weighting. Follows diffusers'
//! `schedulers/scheduling_ddpm.py` (`DDPMScheduler.add_noise`, `get_velocity`) and
//! `training_utils.compute_snr`, with the weighting of `train_text_to_image_lora_sdxl.py`.
//!
//! Everything here runs on the device with gathers by a timestep tensor: no host reads and no
//! data-dependent shapes, so a training step that uses it can be captured in a CUDA graph.

use tch::{Device, Kind, Tensor};

use super::config::{BetaConfig, PredictionType, SchedulerConfig};
use super::schedule;
use crate::{Error, Result};

/// The settings of [`DdpmSchedule`]: the training betas and what the model predicts.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DdpmConfig {
    /// The training noise schedule.
    pub betas: BetaConfig,
    /// What the model is trained to predict.
    pub prediction_type: PredictionType,
}

impl DdpmConfig {
    /// SDXL's training schedule (ε-prediction).
    pub fn sdxl() -> Self {
        Self {
            betas: BetaConfig::sdxl(),
            prediction_type: PredictionType::Epsilon,
        }
    }

    /// Reads a diffusers config (the training scripts load `DDPMScheduler` from the model's
    /// `scheduler/` folder); absent keys take `DDPMScheduler`'s defaults.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            betas: config.betas()?,
            prediction_type: config.prediction()?,
        })
    }
}

/// ᾱ_t on the training device, and the operations of the forward process.
#[derive(Debug)]
pub struct DdpmSchedule {
    config: DdpmConfig,
    /// ᾱ_t, float32, `[num_train_timesteps]`.
    alphas_cumprod: Tensor,
}

impl DdpmSchedule {
    /// Computes ᾱ on the CPU as diffusers does and moves it to `device`.
    pub fn new(config: DdpmConfig, device: Device) -> Result<Self> {
        let alphas_cumprod =
            schedule::alphas_cumprod(&schedule::betas(&config.betas)?)?.f_to_device(device)?;
        Ok(Self {
            config,
            alphas_cumprod,
        })
    }

    /// The config it was built with.
    pub fn config(&self) -> &DdpmConfig {
        &self.config
    }

    /// The number of training timesteps: sample `t` uniformly in `0..num_train_timesteps()`.
    pub fn num_train_timesteps(&self) -> usize {
        self.config.betas.num_train_timesteps
    }

    /// ᾱ_t for every training timestep (float32, on the schedule's device).
    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// (√ᾱ_t, √(1−ᾱ_t)) gathered at `timesteps`, in `kind`, shaped to broadcast over `like`.
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> Result<(Tensor, Tensor)> {
        check_batch(timesteps, like)?;
        let mut shape = vec![-1i64];
        shape.resize(like.dim(), 1);
        // Gather first and take roots after, in the sample's kind: diffusers' order of operations.
        let alphas = self
            .alphas_cumprod
            .f_to_kind(like.kind())?
            .f_index_select(0, &timesteps.f_to_device(self.alphas_cumprod.device())?)?;
        let sqrt_alpha = alphas.f_sqrt()?.f_view(shape.as_slice())?;
        let sqrt_one_minus_alpha = alphas
            .f_rsub_scalar(1.0)?
            .f_sqrt()?
            .f_view(shape.as_slice())?;
        Ok((sqrt_alpha, sqrt_one_minus_alpha))
    }

    /// x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (diffusers' `add_noise`).
    ///
    /// # Shapes
    /// `original`, `noise`: `[batch, ...]`; `timesteps`: `[batch]`, int64; result: `[batch, ...]` in
    /// the kind of `original`.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor> {
        check_same(noise, original, "noise")?;
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(timesteps, original)?;
        Ok(sqrt_alpha
            .f_mul(original)?
            .f_add(&sqrt_one_minus_alpha.f_mul(noise)?)?)
    }

    /// v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀: the v-prediction target (diffusers' `get_velocity`).
    ///
    /// # Shapes
    /// As [`DdpmSchedule::add_noise`].
    pub fn get_velocity(
        &self,
        sample: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor> {
        check_same(noise, sample, "noise")?;
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(timesteps, sample)?;
        Ok(sqrt_alpha
            .f_mul(noise)?
            .f_sub(&sqrt_one_minus_alpha.f_mul(sample)?)?)
    }

    /// What the model should output for these latents and noise: ε, v, or x₀ by prediction type.
    ///
    /// # Shapes
    /// As [`DdpmSchedule::add_noise`].
    pub fn target(&self, latents: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        match self.config.prediction_type {
            PredictionType::Epsilon => {
                check_same(noise, latents, "noise")?;
                Ok(noise.shallow_clone())
            }
            PredictionType::VPrediction => self.get_velocity(latents, noise, timesteps),
            PredictionType::Sample => {
                check_same(noise, latents, "noise")?;
                Ok(latents.shallow_clone())
            }
        }
    }

    /// SNR_t = ᾱ_t/(1−ᾱ_t), as diffusers' `compute_snr` forms it ((√ᾱ/√(1−ᾱ))²), float32.
    ///
    /// # Shapes
    /// `timesteps`: `[batch]`, int64; result: `[batch]`.
    pub fn snr(&self, timesteps: &Tensor) -> Result<Tensor> {
        let sqrt_alpha = self.alphas_cumprod.f_sqrt()?;
        let sqrt_one_minus_alpha = self.alphas_cumprod.f_rsub_scalar(1.0)?.f_sqrt()?;
        let timesteps = timesteps.f_to_device(self.alphas_cumprod.device())?;
        let alpha = sqrt_alpha.f_index_select(0, &timesteps)?;
        let sigma = sqrt_one_minus_alpha.f_index_select(0, &timesteps)?;
        Ok(alpha.f_div(&sigma)?.f_square()?)
    }

    /// Min-SNR-γ loss weights (Hang et al. 2023) as the SDXL LoRA training script computes them:
    /// min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction, min(SNR, γ) for x₀.
    ///
    /// # Shapes
    /// `timesteps`: `[batch]`, int64; result: `[batch]`, float32.
    pub fn min_snr_weights(&self, timesteps: &Tensor, gamma: f64) -> Result<Tensor> {
        let snr = self.snr(timesteps)?;
        let clipped = snr.f_clamp_max(gamma)?;
        Ok(match self.config.prediction_type {
            PredictionType::Epsilon => clipped.f_div(&snr)?,
            PredictionType::VPrediction => clipped.f_div(&snr.f_add_scalar(1.0)?)?,
            PredictionType::Sample => clipped,
        })
    }
}

/// `timesteps` must be a 1-D int64 tensor with one entry per sample of `like`.
fn check_batch(timesteps: &Tensor, like: &Tensor) -> Result<()> {
    let batch = like.size().first().copied().unwrap_or(0);
    if timesteps.size() != [batch] {
        return Err(Error::SchedulerShape {
            what: "timesteps",
            expected: vec![batch],
            actual: timesteps.size(),
        });
    }
    if timesteps.kind() != Kind::Int64 {
        return Err(Error::SchedulerConfig {
            key: "timesteps",
            value: format!("{:?}", timesteps.kind()),
            expected: "an Int64 tensor of training timesteps".into(),
        });
    }
    Ok(())
}

fn check_same(tensor: &Tensor, like: &Tensor, what: &'static str) -> Result<()> {
    if tensor.size() != like.size() {
        return Err(Error::SchedulerShape {
            what,
            expected: like.size(),
            actual: tensor.size(),
        });
    }
    Ok(())
}
