//! Ancestral Euler sampling (k-diffusion's `sample_euler_ancestral`, η = 1): each step goes down to
//! σ_down with Euler's method and adds fresh noise of size σ_up, where σ_down² + σ_up² = σ_next².
//! Follows diffusers' `schedulers/scheduling_euler_ancestral_discrete.py`
//! (`EulerAncestralDiscreteScheduler`).

use tch::{Kind, Tensor};

use super::config::{BetaConfig, PredictionType, SchedulerConfig, TimestepSpacing, invalid};
use super::euler_discrete::{
    SigmaSchedule, euler_init_noise_sigma, euler_pred_original, euler_timesteps,
};
use super::{Scheduler, check_step, check_step_count, schedule, step_noise};
use crate::Result;

/// The settings of [`EulerAncestralDiscreteScheduler`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EulerAncestralDiscreteConfig {
    /// The training noise schedule.
    pub betas: BetaConfig,
    /// What the model predicts: ε or v (diffusers does not implement "sample" here either).
    pub prediction_type: PredictionType,
    /// How the inference timesteps are placed.
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (1 for SDXL).
    pub steps_offset: i64,
}

impl EulerAncestralDiscreteConfig {
    /// SDXL's schedule ("leading" spacing, `steps_offset` 1, ε-prediction).
    pub fn sdxl() -> Self {
        Self {
            betas: BetaConfig::sdxl(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
        }
    }

    /// Reads a diffusers config; absent keys take `EulerAncestralDiscreteScheduler`'s defaults.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let prediction_type = config.prediction()?;
        if prediction_type == PredictionType::Sample {
            return Err(invalid(
                "prediction_type",
                "sample",
                "\"epsilon\" or \"v_prediction\" for EulerAncestralDiscreteScheduler",
            ));
        }
        Ok(Self {
            betas: config.betas()?,
            prediction_type,
            timestep_spacing: config.spacing(TimestepSpacing::Linspace)?,
            steps_offset: config.steps_offset.unwrap_or(0),
        })
    }
}

/// The ancestral Euler sampler.
#[derive(Debug)]
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralDiscreteConfig,
    state: SigmaSchedule,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the training schedule; until [`Scheduler::set_timesteps`] the inference schedule is all
    /// training timesteps, as in diffusers.
    pub fn new(config: EulerAncestralDiscreteConfig) -> Result<Self> {
        Ok(Self {
            state: SigmaSchedule::new(&config.betas)?,
            config,
        })
    }

    /// The config it was built with.
    pub fn config(&self) -> &EulerAncestralDiscreteConfig {
        &self.config
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let train = config.betas.num_train_timesteps;
        check_step_count(num_inference_steps, train)?;
        let timesteps: Vec<f64> = euler_timesteps(
            config.timestep_spacing,
            num_inference_steps,
            train,
            config.steps_offset,
        )
        .into_iter()
        .map(f64::from)
        .collect();
        let sigmas = schedule::interp(&timesteps, &self.state.train_sigmas);
        self.state.set(timesteps, sigmas, 0.0);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.state.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        euler_init_noise_sigma(&self.state.sigmas, self.config.timestep_spacing)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.state.sigmas)
    }

    fn step_index(&self) -> usize {
        self.state.step_index
    }

    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        self.state.scale_model_input(sample)
    }

    fn is_stochastic(&self) -> bool {
        true
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let index = self.state.step_index;
        check_step(
            index,
            self.state.timesteps.len(),
            model_output,
            sample,
            noise,
        )?;
        let sample = sample.f_to_kind(Kind::Float)?;
        let (sigma_from, sigma_to) = (self.state.sigmas[index], self.state.sigmas[index + 1]);
        let pred_original = euler_pred_original(
            self.config.prediction_type,
            model_output,
            &sample,
            sigma_from,
        )?;
        // Split the next noise level into a deterministic part σ_down and fresh noise σ_up.
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = sample
            .f_sub(&pred_original)?
            .f_div_scalar(f64::from(sigma_from))?;
        let dt = sigma_down - sigma_from;
        let prev_sample = sample.f_add(&derivative.f_mul_scalar(f64::from(dt))?)?;
        let noise = step_noise(noise, model_output)?;
        let prev_sample = prev_sample.f_add(&noise.f_mul_scalar(f64::from(sigma_up))?)?;
        self.state.step_index += 1;
        Ok(prev_sample.f_to_kind(model_output.kind())?)
    }
}
