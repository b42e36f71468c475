//! Scheduler configuration in two layers: [`SchedulerConfig`], whose fields are the keys of diffusers'
//! `scheduler_config.json`, and the validated pieces every scheduler shares ([`BetaConfig`],
//! [`TimestepSpacing`], [`PredictionType`]).
//!
//! diffusers fills a key that a file lacks with the default of the class that reads it
//! (`SchedulerMixin.from_config`), so the same file gives, say, `timestep_spacing` "leading" to DDIM but
//! "linspace" to Euler when the key is absent. Each scheduler's typed config therefore takes its own
//! defaults when it reads a [`SchedulerConfig`].

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The keys of a diffusers `scheduler_config.json`, as written; absent keys are `None`.
///
/// Keys of other schedulers are accepted and ignored, as diffusers does, so SDXL's file (written for
/// `EulerDiscreteScheduler`, with legacy DDIM/PNDM keys) configures every scheduler here.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
#[allow(missing_docs)] // the fields are diffusers' keys; each scheduler's config documents their meaning
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<i64>,
    // Euler and DPM-Solver.
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    // DDIM / DDPM.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub set_alpha_to_one: Option<bool>,
    pub thresholding: Option<bool>,
    // DPM-Solver.
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
}

impl SchedulerConfig {
    /// `stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json`: scaled-linear betas
    /// 0.00085–0.012 over 1000 steps, ε-prediction, "leading" spacing with `steps_offset` 1.
    pub fn sdxl() -> Self {
        Self {
            class_name: Some("EulerDiscreteScheduler".into()),
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            prediction_type: Some("epsilon".into()),
            timestep_spacing: Some("leading".into()),
            steps_offset: Some(1),
            interpolation_type: Some("linear".into()),
            use_karras_sigmas: Some(false),
            clip_sample: Some(false),
            set_alpha_to_one: Some(false),
            ..Self::default()
        }
    }

    /// Parses the text of a `scheduler_config.json`.
    ///
    /// Python's `json` writes an infinite `lambda_min_clipped` as the bare word `-Infinity`, which is not
    /// JSON; it is read as "not set", which means the same thing.
    pub fn from_json(text: &str) -> std::result::Result<Self, serde_json::Error> {
        let text = text.replace("-Infinity", "null");
        serde_json::from_str(&text)
    }

    /// Reads a `scheduler_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|source| Error::SchedulerConfigFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The beta schedule, with diffusers' class defaults (1000 steps, linear 0.0001–0.02).
    pub fn betas(&self) -> Result<BetaConfig> {
        let num_train_timesteps = self.num_train_timesteps.unwrap_or(1000);
        let schedule = match (&self.trained_betas, self.beta_schedule.as_deref()) {
            (Some(betas), _) => BetaSchedule::Trained(betas.clone()),
            (None, None | Some("linear")) => BetaSchedule::Linear,
            (None, Some("scaled_linear")) => BetaSchedule::ScaledLinear,
            (None, Some("squaredcos_cap_v2")) => BetaSchedule::SquaredCosCapV2,
            (None, Some(other)) => {
                return Err(invalid(
                    "beta_schedule",
                    other,
                    "one of \"linear\", \"scaled_linear\", \"squaredcos_cap_v2\"",
                ));
            }
        };
        let config = BetaConfig {
            num_train_timesteps,
            beta_start: self.beta_start.unwrap_or(0.0001),
            beta_end: self.beta_end.unwrap_or(0.02),
            schedule,
            rescale_zero_terminal_snr: self.rescale_betas_zero_snr.unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }

    /// What the model predicts; diffusers' default is ε.
    pub fn prediction(&self) -> Result<PredictionType> {
        match self.prediction_type.as_deref() {
            None | Some("epsilon") => Ok(PredictionType::Epsilon),
            Some("v_prediction") => Ok(PredictionType::VPrediction),
            Some("sample") => Ok(PredictionType::Sample),
            Some(other) => Err(invalid(
                "prediction_type",
                other,
                "one of \"epsilon\", \"v_prediction\", \"sample\"",
            )),
        }
    }

    /// How inference timesteps are placed, with the reading class's default when the key is absent.
    pub fn spacing(&self, class_default: TimestepSpacing) -> Result<TimestepSpacing> {
        match self.timestep_spacing.as_deref() {
            None => Ok(class_default),
            Some("linspace") => Ok(TimestepSpacing::Linspace),
            Some("leading") => Ok(TimestepSpacing::Leading),
            Some("trailing") => Ok(TimestepSpacing::Trailing),
            Some(other) => Err(invalid(
                "timestep_spacing",
                other,
                "one of \"linspace\", \"leading\", \"trailing\"",
            )),
        }
    }

    /// The last sigma of an inference schedule (Euler, DPM-Solver); diffusers' default is zero.
    pub fn final_sigmas(&self) -> Result<FinalSigma> {
        match self.final_sigmas_type.as_deref() {
            None | Some("zero") => Ok(FinalSigma::Zero),
            Some("sigma_min") => Ok(FinalSigma::SigmaMin),
            Some(other) => Err(invalid(
                "final_sigmas_type",
                other,
                "one of \"zero\", \"sigma_min\"",
            )),
        }
    }

    /// Refuses a flag this crate does not implement when it is switched on, naming it.
    pub(crate) fn refuse_flag(&self, key: &'static str, value: Option<bool>) -> Result<()> {
        match value {
            Some(true) => Err(invalid(key, "true", "false (not implemented here)")),
            _ => Ok(()),
        }
    }
}

/// The "scheduler config key has a value we do not accept" error.
pub(crate) fn invalid(key: &'static str, value: impl ToString, expected: impl ToString) -> Error {
    Error::SchedulerConfig {
        key,
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

/// How the training betas are laid out over the timesteps.
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    Linear,
    /// `linspace(√beta_start, √beta_end)²`: SDXL's (and SGM's "LegacyDDPMDiscretization").
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal, capped at 0.999.
    SquaredCosCapV2,
    /// Betas given one per training timestep.
    Trained(Vec<f64>),
}

/// The most training timesteps a schedule may have (SDXL's has 1000; a schedule's tables hold one value
/// per step, so a corrupt `num_train_timesteps` must not become an allocation of its size).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// The training noise schedule: the part of the config every scheduler shares.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BetaConfig {
    /// Number of diffusion steps the model was trained with (1000 for SDXL; at most
    /// [`MAX_TRAIN_TIMESTEPS`]).
    pub num_train_timesteps: usize,
    /// First beta (linear and scaled-linear schedules).
    pub beta_start: f64,
    /// Last beta (linear and scaled-linear schedules).
    pub beta_end: f64,
    /// The layout of the betas.
    pub schedule: BetaSchedule,
    /// Rescales the betas to zero terminal SNR (Lin et al. 2023, algorithm 1).
    pub rescale_zero_terminal_snr: bool,
}

impl BetaConfig {
    /// SDXL's schedule: scaled-linear 0.00085–0.012 over 1000 steps.
    pub fn sdxl() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            schedule: BetaSchedule::ScaledLinear,
            rescale_zero_terminal_snr: false,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&self.num_train_timesteps) {
            return Err(invalid(
                "num_train_timesteps",
                self.num_train_timesteps,
                format!("from 2 to {MAX_TRAIN_TIMESTEPS}"),
            ));
        }
        let in_unit = |beta: f64| beta > 0.0 && beta < 1.0;
        match &self.schedule {
            BetaSchedule::Linear | BetaSchedule::ScaledLinear => {
                if !in_unit(self.beta_start) {
                    return Err(invalid("beta_start", self.beta_start, "a number in (0, 1)"));
                }
                if !in_unit(self.beta_end) {
                    return Err(invalid("beta_end", self.beta_end, "a number in (0, 1)"));
                }
            }
            BetaSchedule::SquaredCosCapV2 => {}
            BetaSchedule::Trained(betas) => {
                if betas.len() != self.num_train_timesteps {
                    return Err(invalid(
                        "trained_betas",
                        format!("{} values", betas.len()),
                        format!("num_train_timesteps = {} values", self.num_train_timesteps),
                    ));
                }
                if let Some(bad) = betas.iter().find(|&&beta| !in_unit(beta)) {
                    return Err(invalid("trained_betas", bad, "every beta in (0, 1)"));
                }
            }
        }
        Ok(())
    }
}

/// How `set_timesteps` places the inference timesteps (Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// Evenly from 0 to the last training step, both ends included.
    Linspace,
    /// Multiples of `num_train_timesteps / steps` from 0, plus `steps_offset`: SDXL's.
    Leading,
    /// Multiples of `num_train_timesteps / steps` down from the last training step.
    Trailing,
}

/// What the model's output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise ε that was added (SDXL base).
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// The sigma appended after the last inference step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    /// Zero: the last step lands on the clean sample.
    Zero,
    /// The smallest training sigma, that of timestep 0.
    SigmaMin,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sdxl_file_and_class_defaults() {
        let text = r#"{
  "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
  "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
  "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
  "sample_max_value": 1.0, "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
  "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false
}"#;
        let config = SchedulerConfig::from_json(text).unwrap();
        assert_eq!(config, SchedulerConfig::sdxl());
        assert_eq!(config.betas().unwrap(), BetaConfig::sdxl());
        let empty = SchedulerConfig::default();
        assert_eq!(
            empty.spacing(TimestepSpacing::Linspace).unwrap(),
            TimestepSpacing::Linspace
        );
        assert_eq!(empty.betas().unwrap().schedule, BetaSchedule::Linear);
        let infinite = SchedulerConfig::from_json(r#"{"lambda_min_clipped": -Infinity}"#).unwrap();
        assert_eq!(infinite.lambda_min_clipped, None);
    }

    #[test]
    fn nonsense_is_an_error_naming_the_key() {
        let config = |json: &str| SchedulerConfig::from_json(json).unwrap();
        let err = config(r#"{"timestep_spacing": "sideways"}"#)
            .spacing(TimestepSpacing::Leading)
            .unwrap_err();
        assert!(err.to_string().contains("timestep_spacing"), "{err}");
        let err = config(r#"{"beta_schedule": "quadratic"}"#)
            .betas()
            .unwrap_err();
        assert!(err.to_string().contains("beta_schedule"), "{err}");
        let err = config(r#"{"beta_start": 0.0}"#).betas().unwrap_err();
        assert!(err.to_string().contains("beta_start"), "{err}");
        let err = config(r#"{"num_train_timesteps": 1}"#).betas().unwrap_err();
        assert!(err.to_string().contains("num_train_timesteps"), "{err}");
        // Found by fuzzing: a schedule of 10^19 steps was an allocation that aborts the process.
        let err = config(r#"{"num_train_timesteps": 10000000000000000000}"#)
            .betas()
            .unwrap_err();
        assert!(err.to_string().contains("from 2 to 100000"), "{err}");
        config(r#"{"num_train_timesteps": 100000}"#)
            .betas()
            .unwrap();
        let err = config(r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}"#)
            .betas()
            .unwrap_err();
        assert!(err.to_string().contains("trained_betas"), "{err}");
        let err = config(r#"{"prediction_type": "flow_prediction"}"#)
            .prediction()
            .unwrap_err();
        assert!(err.to_string().contains("prediction_type"), "{err}");
        assert!(SchedulerConfig::from_json(r#"{"steps_offset": "one"}"#).is_err());
    }
}
