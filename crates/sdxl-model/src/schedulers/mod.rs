//! Samplers that turn noise into latents, and the DDPM noise schedule used for training, following
//! diffusers' `schedulers/` package with SDXL's configuration.
//!
//! | here | diffusers |
//! |---|---|
//! | [`EulerDiscreteScheduler`] (SDXL's default) | `scheduling_euler_discrete.py` |
//! | [`EulerAncestralDiscreteScheduler`] | `scheduling_euler_ancestral_discrete.py` |
//! | [`DdimScheduler`] | `scheduling_ddim.py` |
//! | [`DpmSolverMultistepScheduler`] (DPM-Solver++ 2M, optionally with Karras sigmas) | `scheduling_dpmsolver_multistep.py` |
//! | [`DdpmSchedule`] (training: `add_noise`, `get_velocity`, SNR) | `scheduling_ddpm.py`, `training_utils.compute_snr` |
//!
//! Every inference scheduler implements [`Scheduler`], so a pipeline can choose one at run time
//! ([`SchedulerKind`], [`build`]). The schedules (timesteps, sigmas, ᾱ) are computed once on the host in
//! `set_timesteps`; a step is then a handful of tensor operations with host scalars, never reading a
//! tensor back, so a sampling loop can run on the GPU without synchronising.
//!
//! ```
//! use sdxl_model::schedulers::{build, Scheduler, SchedulerConfig, SchedulerKind};
//! use tch::{Device, Kind, Tensor};
//!
//! let mut scheduler = build(SchedulerKind::EulerDiscrete, &SchedulerConfig::sdxl())?;
//! scheduler.set_timesteps(4)?;
//! assert_eq!(scheduler.timesteps(), &[751.0, 501.0, 251.0, 1.0][..]);
//! let mut latents = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu))
//!     * scheduler.init_noise_sigma();
//! for _ in 0..scheduler.timesteps().len() {
//!     let model_input = scheduler.scale_model_input(&latents)?;
//!     let noise_prediction = model_input.zeros_like(); // a UNet call in a real pipeline
//!     latents = scheduler.step(&noise_prediction, &latents, None)?;
//! }
//! # Ok::<(), sdxl_model::Error>(())
//! ```

mod config;
mod ddim;
mod ddpm;
mod dpmsolver_multistep;
mod euler_ancestral_discrete;
mod euler_discrete;
mod schedule;

pub use config::{
    BetaConfig, BetaSchedule, FinalSigma, MAX_TRAIN_TIMESTEPS, PredictionType, SchedulerConfig,
    TimestepSpacing,
};
pub use ddim::{DdimConfig, DdimScheduler};
pub use ddpm::{DdpmConfig, DdpmSchedule};
pub use dpmsolver_multistep::{DpmSolverMultistepConfig, DpmSolverMultistepScheduler, SolverType};
pub use euler_ancestral_discrete::{EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler};
pub use euler_discrete::{EulerDiscreteConfig, EulerDiscreteScheduler};

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// What a sampling loop needs from a scheduler, as in diffusers' pipelines:
/// `set_timesteps`, then for each of `timesteps()`: `scale_model_input`, the model, `step`.
///
/// The scheduler counts its own steps (diffusers' `step_index`): `scale_model_input` and `step` act on
/// the current step, and `step` moves to the next one.
pub trait Scheduler: Send {
    /// Lays out `num_inference_steps` steps and rewinds to the first; `Err` for zero steps or more
    /// steps than the model was trained with.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timesteps to give the model, one per step, in sampling order (Euler's may be fractional).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise: the pipeline multiplies unit Gaussian latents by it.
    fn init_noise_sigma(&self) -> f64;

    /// The noise level σ of each step followed by the final one (`timesteps().len() + 1` values), for
    /// the schedulers that work in σ (Euler, DPM-Solver); `None` for DDIM, which works in ᾱ.
    fn sigmas(&self) -> Option<&[f32]>;

    /// The step `scale_model_input` and `step` act on next (0 after `set_timesteps`).
    fn step_index(&self) -> usize;

    /// Scales the latents into what the model expects at the current step (a no-op for DDIM and
    /// DPM-Solver, `x/√(σ²+1)` for the Euler samplers).
    ///
    /// # Shapes
    /// `sample`: any; the result has the same shape and kind.
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor>;

    /// Whether `step` adds fresh noise (ancestral sampling, DDIM with η > 0).
    fn is_stochastic(&self) -> bool;

    /// One denoising step from the current timestep to the next: returns the new latents.
    ///
    /// `noise` is used by stochastic schedulers; when it is `None` they draw it with `Tensor::randn` from
    /// libtorch's default generator of the sample's device (seed it with `tch::manual_seed` to
    /// reproduce diffusers' `torch.Generator().manual_seed` on the CPU). Deterministic schedulers ignore it.
    ///
    /// # Shapes
    /// `model_output`, `sample` and `noise`: the same shape, e.g. `[batch, 4, height/8, width/8]`;
    /// the result has that shape and the kind of `model_output`.
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;
}

/// The schedulers a pipeline can choose from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// [`EulerDiscreteScheduler`].
    EulerDiscrete,
    /// [`EulerAncestralDiscreteScheduler`].
    EulerAncestralDiscrete,
    /// [`DdimScheduler`].
    Ddim,
    /// [`DpmSolverMultistepScheduler`].
    DpmSolverMultistep,
    /// [`DpmSolverMultistepScheduler`] with `use_karras_sigmas` on, whatever the config says: "DPM++ 2M
    /// Karras", the community's default sampler (A1111's name).
    DpmSolverMultistepKarras,
}

impl SchedulerKind {
    /// Every kind, in the order of the table above.
    pub const ALL: [SchedulerKind; 5] = [
        Self::EulerDiscrete,
        Self::EulerAncestralDiscrete,
        Self::Ddim,
        Self::DpmSolverMultistep,
        Self::DpmSolverMultistepKarras,
    ];

    /// The diffusers class name, as in `_class_name` of a `scheduler_config.json`.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::EulerDiscrete => "EulerDiscreteScheduler",
            Self::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::DpmSolverMultistep | Self::DpmSolverMultistepKarras => {
                "DPMSolverMultistepScheduler"
            }
        }
    }

    /// A short name for command lines.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::EulerDiscrete => "euler",
            Self::EulerAncestralDiscrete => "euler_a",
            Self::Ddim => "ddim",
            Self::DpmSolverMultistep => "dpm++2m",
            Self::DpmSolverMultistepKarras => "dpm++2m_karras",
        }
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;

    /// Accepts the diffusers class name or the short name.
    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.class_name() == name || kind.short_name() == name)
            .ok_or_else(|| {
                config::invalid(
                    "_class_name",
                    name,
                    "one of EulerDiscreteScheduler (euler), EulerAncestralDiscreteScheduler (euler_a), \
                     DDIMScheduler (ddim), DPMSolverMultistepScheduler (dpm++2m), dpm++2m_karras",
                )
            })
    }
}

/// Builds a scheduler of `kind` from a diffusers config, keys it lacks taking that class's defaults
/// (what diffusers' `Class.from_config(pipeline.scheduler.config)` does).
pub fn build(kind: SchedulerKind, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::EulerDiscrete => Box::new(EulerDiscreteScheduler::new(
            EulerDiscreteConfig::from_config(config)?,
        )?),
        SchedulerKind::EulerAncestralDiscrete => Box::new(EulerAncestralDiscreteScheduler::new(
            EulerAncestralDiscreteConfig::from_config(config)?,
        )?),
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(DdimConfig::from_config(config)?)?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistepScheduler::new(
            DpmSolverMultistepConfig::from_config(config)?,
        )?),
        SchedulerKind::DpmSolverMultistepKarras => {
            let config = DpmSolverMultistepConfig {
                use_karras_sigmas: true,
                ..DpmSolverMultistepConfig::from_config(config)?
            };
            Box::new(DpmSolverMultistepScheduler::new(config)?)
        }
    })
}

/// Checks `num_inference_steps` against the training schedule.
fn check_step_count(num_inference_steps: usize, num_train_timesteps: usize) -> Result<()> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        return Err(config::invalid(
            "num_inference_steps",
            num_inference_steps,
            format!("between 1 and num_train_timesteps = {num_train_timesteps}"),
        ));
    }
    Ok(())
}

/// Checks that a step has a step left and that the model output matches the sample.
fn check_step(
    step_index: usize,
    steps: usize,
    model_output: &Tensor,
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> Result<()> {
    if step_index >= steps {
        return Err(Error::SchedulerExhausted { step_index, steps });
    }
    for (what, other) in [("model_output", Some(model_output)), ("noise", noise)] {
        if let Some(other) = other
            && other.size() != sample.size()
        {
            return Err(Error::SchedulerShape {
                what,
                expected: sample.size(),
                actual: other.size(),
            });
        }
    }
    Ok(())
}

/// The noise of a stochastic step: the caller's, or a fresh draw like diffusers' `randn_tensor`
/// (float32 on the CPU as [`torch_cuda::portable::randn`] draws it, the same on every CPU).
fn step_noise(noise: Option<&Tensor>, model_output: &Tensor) -> Result<Tensor> {
    match noise {
        Some(noise) => Ok(noise.shallow_clone()),
        None if model_output.device() == Device::Cpu && model_output.kind() == Kind::Float => {
            Ok(torch_cuda::portable::randn(&model_output.size())?)
        }
        None => Ok(Tensor::f_randn(
            model_output.size(),
            (model_output.kind(), model_output.device()),
        )?),
    }
}
