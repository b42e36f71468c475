//! Denoising Diffusion Implicit Models (Song et al. 2021): a step predicts x̂₀ and ε̂ and re-noises x̂₀
//! to the previous timestep's ᾱ, deterministically for η = 0. Follows diffusers'
//! `schedulers/scheduling_ddim.py` (`DDIMScheduler`).

use tch::Tensor;

use super::config::{BetaConfig, PredictionType, SchedulerConfig, TimestepSpacing, invalid};
use super::{Scheduler, check_step, check_step_count, schedule, step_noise};
use crate::Result;

/// The settings of [`DdimScheduler`] (dynamic thresholding is not implemented).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DdimConfig {
    /// The training noise schedule.
    pub betas: BetaConfig,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// How the inference timesteps are placed.
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (1 for SDXL).
    pub steps_offset: i64,
    /// Clamps x̂₀ to ±`clip_sample_range` (off for SDXL: latents are not bounded).
    pub clip_sample: bool,
    /// The bound of `clip_sample`.
    pub clip_sample_range: f64,
    /// ᾱ after the last step: 1 when set, else ᾱ of timestep 0 (SDXL: not set).
    pub set_alpha_to_one: bool,
    /// The η of the DDIM paper: 0 is deterministic, 1 is DDPM-like. A `step` argument in diffusers.
    pub eta: f64,
}

impl DdimConfig {
    /// SDXL's schedule with its legacy DDIM keys (`clip_sample` and `set_alpha_to_one` false), η = 0.
    pub fn sdxl() -> Self {
        Self {
            betas: BetaConfig::sdxl(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: false,
            eta: 0.0,
        }
    }

    /// Reads a diffusers config; absent keys take `DDIMScheduler`'s defaults. η starts at 0.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        config.refuse_flag("thresholding", config.thresholding)?;
        let clip_sample_range = config.clip_sample_range.unwrap_or(1.0);
        if clip_sample_range.is_nan() || clip_sample_range <= 0.0 {
            return Err(invalid(
                "clip_sample_range",
                clip_sample_range,
                "a positive number",
            ));
        }
        Ok(Self {
            betas: config.betas()?,
            prediction_type: config.prediction()?,
            timestep_spacing: config.spacing(TimestepSpacing::Leading)?,
            steps_offset: config.steps_offset.unwrap_or(0),
            clip_sample: config.clip_sample.unwrap_or(true),
            clip_sample_range,
            set_alpha_to_one: config.set_alpha_to_one.unwrap_or(true),
            eta: 0.0,
        })
    }
}

/// The DDIM sampler.
#[derive(Debug)]
pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    step_index: usize,
}

impl DdimScheduler {
    /// Builds the training schedule; [`Scheduler::set_timesteps`] must come before the first step.
    pub fn new(config: DdimConfig) -> Result<Self> {
        if !(0.0..=1.0).contains(&config.eta) {
            return Err(invalid("eta", config.eta, "a number in [0, 1]"));
        }
        let alphas_cumprod =
            schedule::to_vec(&schedule::alphas_cumprod(&schedule::betas(&config.betas)?)?)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            step_index: 0,
        })
    }

    /// The config it was built with.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let train = config.betas.num_train_timesteps;
        check_step_count(num_inference_steps, train)?;
        let n = num_inference_steps;
        let timesteps: Vec<i64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => schedule::linspace(0.0, (train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = (train / n) as i64;
                (0..n as i64)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                schedule::arange(train as f64, 0.0, -(train as f64 / n as f64))
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        // A timestep outside the training range has no ᾱ: "leading" with a large `steps_offset`, or
        // "trailing" where numpy's float `arange` makes one value too many and the last is −1 (61, 103,
        // 121, 122 steps…); diffusers would index ᾱ from the end there.
        if let Some(&bad) = timesteps.iter().find(|&&t| t < 0 || t >= train as i64) {
            return Err(invalid(
                "num_inference_steps",
                n,
                format!(
                    "a step count whose {:?} timesteps stay within 0..{train} (this one gives timestep \
                     {bad} with steps_offset {})",
                    config.timestep_spacing, config.steps_offset
                ),
            ));
        }
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = n;
        self.step_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    fn step_index(&self) -> usize {
        self.step_index
    }

    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        Ok(sample.shallow_clone())
    }

    fn is_stochastic(&self) -> bool {
        self.config.eta > 0.0
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        check_step(
            self.step_index,
            self.timesteps.len(),
            model_output,
            sample,
            noise,
        )?;
        let config = &self.config;
        // diffusers steps back by num_train_timesteps / steps whatever the spacing.
        let timestep = self.timesteps[self.step_index] as usize;
        let stride = config.betas.num_train_timesteps / self.num_inference_steps;
        let alpha_prod = self.alphas_cumprod[timestep];
        let alpha_prod_prev = match timestep.checked_sub(stride) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta_prod = 1.0 - alpha_prod;
        let (sqrt_alpha, sqrt_beta) = (f64::from(alpha_prod.sqrt()), f64::from(beta_prod.sqrt()));

        let (pred_original, pred_epsilon) = match config.prediction_type {
            PredictionType::Epsilon => (
                sample
                    .f_sub(&model_output.f_mul_scalar(sqrt_beta)?)?
                    .f_div_scalar(sqrt_alpha)?,
                model_output.shallow_clone(),
            ),
            PredictionType::Sample => (
                model_output.shallow_clone(),
                sample
                    .f_sub(&model_output.f_mul_scalar(sqrt_alpha)?)?
                    .f_div_scalar(sqrt_beta)?,
            ),
            PredictionType::VPrediction => (
                sample
                    .f_mul_scalar(sqrt_alpha)?
                    .f_sub(&model_output.f_mul_scalar(sqrt_beta)?)?,
                model_output
                    .f_mul_scalar(sqrt_alpha)?
                    .f_add(&sample.f_mul_scalar(sqrt_beta)?)?,
            ),
        };
        let pred_original = if config.clip_sample {
            pred_original.f_clamp(-config.clip_sample_range, config.clip_sample_range)?
        } else {
            pred_original
        };

        // σ_t of the DDIM paper (eq. 16), in float32 like diffusers' 0-d tensors.
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        let variance = beta_prod_prev / beta_prod * (1.0 - alpha_prod / alpha_prod_prev);
        let std_dev = config.eta as f32 * variance.sqrt();
        let direction_scale = (1.0 - alpha_prod_prev - std_dev * std_dev).sqrt();
        let direction = pred_epsilon.f_mul_scalar(f64::from(direction_scale))?;
        let prev_sample = pred_original
            .f_mul_scalar(f64::from(alpha_prod_prev.sqrt()))?
            .f_add(&direction)?;
        let prev_sample = if config.eta > 0.0 {
            let noise = step_noise(noise, model_output)?;
            prev_sample.f_add(&noise.f_mul_scalar(f64::from(std_dev))?)?
        } else {
            prev_sample
        };
        self.step_index += 1;
        Ok(prev_sample)
    }
}
