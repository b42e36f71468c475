//! Euler's method on the probability-flow ODE in σ-space (Karras et al. 2022, algorithm 2 without
//! churn): SDXL's default sampler. Follows diffusers' `schedulers/scheduling_euler_discrete.py`
//! (`EulerDiscreteScheduler`).
//!
//! With σ_t = √((1−ᾱ_t)/ᾱ_t) the latents are x = x₀ + σ·ε; the model sees x/√(σ²+1); a step moves x along
//! the derivative (x − x̂₀)/σ from σ_i to σ_{i+1}.

use tch::{Kind, Tensor};

use super::config::{
    BetaConfig, FinalSigma, PredictionType, SchedulerConfig, TimestepSpacing, invalid,
};
use super::{Scheduler, check_step, check_step_count, schedule};
use crate::Result;

/// The settings of [`EulerDiscreteScheduler`] (diffusers' constructor arguments, minus the ones not
/// implemented here: exponential and beta sigmas, "log_linear" interpolation, continuous timesteps).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EulerDiscreteConfig {
    /// The training noise schedule.
    pub betas: BetaConfig,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// How the inference timesteps are placed.
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (1 for SDXL).
    pub steps_offset: i64,
    /// Replaces the interpolated sigmas by Karras et al.'s ρ = 7 schedule between the same ends.
    pub use_karras_sigmas: bool,
    /// The smallest Karras sigma; by default the schedule's own.
    pub sigma_min: Option<f64>,
    /// The largest Karras sigma; by default the schedule's own.
    pub sigma_max: Option<f64>,
    /// The sigma after the last step.
    pub final_sigma: FinalSigma,
}

impl EulerDiscreteConfig {
    /// SDXL base's scheduler: what `stabilityai/stable-diffusion-xl-base-1.0/scheduler` configures.
    pub fn sdxl() -> Self {
        Self {
            betas: BetaConfig::sdxl(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            use_karras_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            final_sigma: FinalSigma::Zero,
        }
    }

    /// Reads a diffusers config; absent keys take `EulerDiscreteScheduler`'s defaults.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        match config.interpolation_type.as_deref() {
            None | Some("linear") => {}
            Some(other) => return Err(invalid("interpolation_type", other, "\"linear\"")),
        }
        match config.timestep_type.as_deref() {
            None | Some("discrete") => {}
            Some(other) => return Err(invalid("timestep_type", other, "\"discrete\"")),
        }
        config.refuse_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        config.refuse_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        Ok(Self {
            betas: config.betas()?,
            prediction_type: config.prediction()?,
            timestep_spacing: config.spacing(TimestepSpacing::Linspace)?,
            steps_offset: config.steps_offset.unwrap_or(0),
            use_karras_sigmas: config.use_karras_sigmas.unwrap_or(false),
            sigma_min: config.sigma_min,
            sigma_max: config.sigma_max,
            final_sigma: config.final_sigmas()?,
        })
    }
}

/// The timesteps the Euler samplers place for each spacing, as float32 values like diffusers'.
pub(crate) fn euler_timesteps(
    spacing: TimestepSpacing,
    num_inference_steps: usize,
    num_train_timesteps: usize,
    steps_offset: i64,
) -> Vec<f32> {
    let (n, train) = (num_inference_steps, num_train_timesteps);
    match spacing {
        TimestepSpacing::Linspace => schedule::linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => {
            schedule::arange(train as f64, 0.0, -(train as f64 / n as f64))
                .into_iter()
                .map(|t| t.round_ties_even() as f32 - 1.0)
                .collect()
        }
    }
}

/// `init_noise_sigma` of the Euler samplers: σ_max, or √(σ_max²+1) for "leading" spacing, in float32.
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
        TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
    }
}

/// x̂₀ from the model output at noise level σ (float32 latents), for the Euler samplers.
pub(crate) fn euler_pred_original(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => sample.f_sub(&model_output.f_mul_scalar(f64::from(sigma))?)?,
        PredictionType::VPrediction => {
            let variance = sigma * sigma + 1.0;
            model_output
                .f_mul_scalar(f64::from(-sigma / variance.sqrt()))?
                .f_add(&sample.f_div_scalar(f64::from(variance))?)?
        }
        PredictionType::Sample => model_output.shallow_clone(),
    })
}

/// The σ-space state both Euler samplers keep: the training sigmas, the inference timesteps and
/// sigmas (one per step, then the final σ), and where the sampler is.
#[derive(Debug)]
pub(crate) struct SigmaSchedule {
    /// σ of every training timestep, ascending in t.
    pub(crate) train_sigmas: Vec<f32>,
    pub(crate) timesteps: Vec<f64>,
    /// One per timestep, then the final sigma.
    pub(crate) sigmas: Vec<f32>,
    pub(crate) step_index: usize,
}

impl SigmaSchedule {
    /// The training schedule; until [`SigmaSchedule::set`] the inference schedule is all training
    /// timesteps, as in diffusers.
    pub(crate) fn new(betas: &BetaConfig) -> Result<Self> {
        let alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(betas)?)?;
        if betas.rescale_zero_terminal_snr {
            // diffusers keeps the last σ finite: ᾱ_T = 2⁻²⁴ instead of 0.
            let _ = alphas_cumprod.f_get(-1)?.f_fill_(2f64.powi(-24))?;
        }
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod)?;
        let train = betas.num_train_timesteps;
        Ok(Self {
            timesteps: (0..train).rev().map(|t| t as f64).collect(),
            sigmas: train_sigmas.iter().rev().copied().chain([0.0]).collect(),
            train_sigmas,
            step_index: 0,
        })
    }

    /// A new inference schedule: `sigmas` (one per timestep) followed by `final_sigma`; back to step 0.
    pub(crate) fn set(&mut self, timesteps: Vec<f64>, sigmas: Vec<f64>, final_sigma: f64) {
        self.sigmas = sigmas
            .into_iter()
            .chain([final_sigma])
            .map(|sigma| sigma as f32)
            .collect();
        self.timesteps = timesteps;
        self.step_index = 0;
    }

    /// x / √(σ²+1) at the current step.
    pub(crate) fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        check_step(self.step_index, self.timesteps.len(), sample, sample, None)?;
        let sigma = self.sigmas[self.step_index];
        Ok(sample.f_div_scalar(f64::from((sigma * sigma + 1.0).sqrt()))?)
    }
}

/// The Euler sampler.
#[derive(Debug)]
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteConfig,
    state: SigmaSchedule,
}

impl EulerDiscreteScheduler {
    /// Builds the training schedule; until [`Scheduler::set_timesteps`] the inference schedule is all
    /// training timesteps, as in diffusers.
    pub fn new(config: EulerDiscreteConfig) -> Result<Self> {
        Ok(Self {
            state: SigmaSchedule::new(&config.betas)?,
            config,
        })
    }

    /// The config it was built with.
    pub fn config(&self) -> &EulerDiscreteConfig {
        &self.config
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let train = config.betas.num_train_timesteps;
        check_step_count(num_inference_steps, train)?;
        let mut timesteps: Vec<f64> = euler_timesteps(
            config.timestep_spacing,
            num_inference_steps,
            train,
            config.steps_offset,
        )
        .into_iter()
        .map(f64::from)
        .collect();
        let mut sigmas = schedule::interp(&timesteps, &self.state.train_sigmas);
        if config.use_karras_sigmas {
            let (first, last) = (sigmas.first().copied(), sigmas.last().copied());
            let sigma_min = config.sigma_min.or(last).unwrap_or(0.0);
            let sigma_max = config.sigma_max.or(first).unwrap_or(0.0);
            sigmas = schedule::karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            let log_sigmas = schedule::ln_f32(&self.state.train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&sigma| f64::from(schedule::sigma_to_t(sigma, &log_sigmas) as f32))
                .collect();
        }
        let final_sigma = match config.final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => f64::from(self.state.train_sigmas[0]),
        };
        self.state.set(timesteps, sigmas, final_sigma);
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
        false
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let index = self.state.step_index;
        check_step(
            index,
            self.state.timesteps.len(),
            model_output,
            sample,
            None,
        )?;
        // Upcast: small steps of a bf16 sample would round away.
        let sample = sample.f_to_kind(Kind::Float)?;
        let (sigma, sigma_next) = (self.state.sigmas[index], self.state.sigmas[index + 1]);
        let pred_original =
            euler_pred_original(self.config.prediction_type, model_output, &sample, sigma)?;
        let derivative = sample
            .f_sub(&pred_original)?
            .f_div_scalar(f64::from(sigma))?;
        let dt = sigma_next - sigma;
        let prev_sample = sample.f_add(&derivative.f_mul_scalar(f64::from(dt))?)?;
        self.state.step_index += 1;
        Ok(prev_sample.f_to_kind(model_output.kind())?)
    }
}
