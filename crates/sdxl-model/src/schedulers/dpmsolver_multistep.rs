//! DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", algorithm 2): an exponential integrator in
//! λ = log(α/σ) that predicts x̂₀ and reuses the previous steps' predictions for a higher order.
//! `solver_order` 2 is "DPM++ 2M"; with Karras sigmas, "DPM++ 2M Karras". Follows diffusers'
//! `schedulers/scheduling_dpmsolver_multistep.py` (`DPMSolverMultistepScheduler`) for
//! `algorithm_type` "dpmsolver++".

use tch::{Kind, Tensor};

use super::config::{
    BetaConfig, BetaSchedule, FinalSigma, PredictionType, SchedulerConfig, TimestepSpacing, invalid,
};
use super::{Scheduler, check_step, check_step_count, schedule};
use crate::Result;

/// How the second-order term is formed (DPM-Solver paper, appendix; diffusers' `solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// The midpoint rule (diffusers' default).
    Midpoint,
    /// Heun's rule.
    Heun,
}

/// The settings of [`DpmSolverMultistepScheduler`] (only the deterministic "dpmsolver++" algorithm;
/// thresholding, Lu lambdas and exponential, beta or flow sigmas are not implemented).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DpmSolverMultistepConfig {
    /// The training noise schedule.
    pub betas: BetaConfig,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// How the inference timesteps are placed.
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (1 for SDXL).
    pub steps_offset: i64,
    /// 1, 2 (DPM++ 2M) or 3 (DPM++ 3M).
    pub solver_order: usize,
    /// The second-order rule.
    pub solver_type: SolverType,
    /// Lowers the order in the last steps of short schedules (fewer than 15 steps) for stability.
    pub lower_order_final: bool,
    /// Makes the very last step first-order whatever the schedule length.
    pub euler_at_final: bool,
    /// Karras et al.'s ρ = 7 sigmas between the training schedule's ends.
    pub use_karras_sigmas: bool,
    /// The sigma after the last step.
    pub final_sigma: FinalSigma,
    /// Leaves out the timesteps whose λ is below this (−∞: none).
    pub lambda_min_clipped: f64,
}

impl DpmSolverMultistepConfig {
    /// DPM++ 2M with SDXL's schedule; `use_karras_sigmas` gives "DPM++ 2M Karras".
    pub fn sdxl() -> Self {
        Self {
            betas: BetaConfig::sdxl(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            solver_order: 2,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            final_sigma: FinalSigma::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
        }
    }

    /// Reads a diffusers config; absent keys take `DPMSolverMultistepScheduler`'s defaults.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        match config.algorithm_type.as_deref() {
            // diffusers maps the retired "deis" to "dpmsolver++".
            None | Some("dpmsolver++") | Some("deis") => {}
            Some(other) => return Err(invalid("algorithm_type", other, "\"dpmsolver++\"")),
        }
        let solver_type = match config.solver_type.as_deref() {
            // diffusers maps UniPC's solver types to the midpoint rule.
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => {
                SolverType::Midpoint
            }
            Some("heun") => SolverType::Heun,
            Some(other) => {
                return Err(invalid("solver_type", other, "\"midpoint\" or \"heun\""));
            }
        };
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(invalid("solver_order", solver_order, "1, 2 or 3"));
        }
        if let Some(variance_type) = &config.variance_type {
            return Err(invalid(
                "variance_type",
                variance_type,
                "null (learned variances are not implemented)",
            ));
        }
        config.refuse_flag("thresholding", config.thresholding)?;
        config.refuse_flag("use_lu_lambdas", config.use_lu_lambdas)?;
        config.refuse_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        config.refuse_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        config.refuse_flag("use_flow_sigmas", config.use_flow_sigmas)?;
        let lambda_min_clipped = config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        if lambda_min_clipped.is_nan() {
            return Err(invalid(
                "lambda_min_clipped",
                "NaN",
                "a number or -Infinity",
            ));
        }
        Ok(Self {
            betas: config.betas()?,
            prediction_type: config.prediction()?,
            timestep_spacing: config.spacing(TimestepSpacing::Linspace)?,
            steps_offset: config.steps_offset.unwrap_or(0),
            solver_order,
            solver_type,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            use_karras_sigmas: config.use_karras_sigmas.unwrap_or(false),
            final_sigma: config.final_sigmas()?,
            lambda_min_clipped,
        })
    }
}

/// α_t and σ_t (the VP-SDE coefficients) from the EDM noise level σ: α = 1/√(σ²+1), σ_t = σ·α.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α − log σ_t: the half log-SNR the solver integrates in.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// The DPM-Solver++ multistep sampler.
#[derive(Debug)]
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverMultistepConfig,
    train_sigmas: Vec<f32>,
    /// Training timesteps kept after `lambda_min_clipped`.
    last_timestep: usize,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    /// The x̂₀ predictions of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    /// How many steps have filled the history, up to `solver_order`.
    lower_order_nums: usize,
    step_index: usize,
}

impl DpmSolverMultistepScheduler {
    /// Builds the training schedule; [`Scheduler::set_timesteps`] must come before the first step.
    pub fn new(config: DpmSolverMultistepConfig) -> Result<Self> {
        let alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(&config.betas)?)?;
        if config.betas.rescale_zero_terminal_snr {
            let _ = alphas_cumprod.f_get(-1)?.f_fill_(2f64.powi(-24))?;
        }
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod)?;
        // λ_t from ᾱ with float32 tensor ops, as diffusers; count the timesteps whose λ falls below the clip.
        let lambdas = schedule::to_vec(
            &alphas_cumprod
                .f_sqrt()?
                .f_log()?
                .f_sub(&alphas_cumprod.f_rsub_scalar(1.0)?.f_sqrt()?.f_log()?)?,
        )?;
        let clip = config.lambda_min_clipped as f32;
        let clipped = lambdas.iter().filter(|&&l| l < clip).count();
        let last_timestep = config.betas.num_train_timesteps - clipped;
        Ok(Self {
            model_outputs: std::iter::repeat_with(|| None)
                .take(config.solver_order)
                .collect(),
            config,
            train_sigmas,
            last_timestep,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            lower_order_nums: 0,
            step_index: 0,
        })
    }

    /// The config it was built with.
    pub fn config(&self) -> &DpmSolverMultistepConfig {
        &self.config
    }

    /// x̂₀ from the model output at the current step (diffusers' `convert_model_output`).
    fn predict_original(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[self.step_index]);
        Ok(match self.config.prediction_type {
            PredictionType::Epsilon => sample
                .f_sub(&model_output.f_mul_scalar(f64::from(sigma))?)?
                .f_div_scalar(f64::from(alpha))?,
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => sample
                .f_mul_scalar(f64::from(alpha))?
                .f_sub(&model_output.f_mul_scalar(f64::from(sigma))?)?,
        })
    }

    /// The history entry `back` steps ago (0: this step's x̂₀).
    fn history(&self, back: usize) -> Result<&Tensor> {
        let order = self.model_outputs.len();
        self.model_outputs[order - 1 - back]
            .as_ref()
            .ok_or(crate::Error::SchedulerExhausted {
                step_index: self.step_index,
                steps: self.timesteps.len(),
            })
    }

    /// Updates `sample` (float32) from σ_i to σ_{i+1} with the given solver order.
    fn update(&self, order: usize, sample: &Tensor) -> Result<Tensor> {
        let index = self.step_index;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let (lambda_t, lambda_s0) = (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0));
        let h = lambda_t - lambda_s0;
        let exp_neg_h_minus_one = (-h).exp() - 1.0;
        // The first-order (DDIM-like) part every order shares: σ_t/σ_s·x − α_t(e^{−h} − 1)·D0.
        let d0 = self.history(0)?;
        let first_order = sample
            .f_mul_scalar(f64::from(sigma_t / sigma_s0))?
            .f_sub(&d0.f_mul_scalar(f64::from(alpha_t * exp_neg_h_minus_one))?)?;
        if order == 1 {
            return Ok(first_order);
        }
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let r0 = (lambda_s0 - lambda_s1) / h;
        let m1 = self.history(1)?;
        let d1_0 = d0.f_sub(m1)?.f_mul_scalar(f64::from(1.0 / r0))?;
        if order == 2 {
            return Ok(match self.config.solver_type {
                SolverType::Midpoint => first_order
                    .f_sub(&d1_0.f_mul_scalar(f64::from(0.5 * (alpha_t * exp_neg_h_minus_one)))?)?,
                SolverType::Heun => first_order.f_add(
                    &d1_0.f_mul_scalar(f64::from(alpha_t * (exp_neg_h_minus_one / h + 1.0)))?,
                )?,
            });
        }
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[index - 2]);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let r1 = (lambda_s1 - lambda_s2) / h;
        let m2 = self.history(2)?;
        let d1_1 = m1.f_sub(m2)?.f_mul_scalar(f64::from(1.0 / r1))?;
        let d1_difference = d1_0.f_sub(&d1_1)?;
        let d1 = d1_0.f_add(&d1_difference.f_mul_scalar(f64::from(r0 / (r0 + r1)))?)?;
        let d2 = d1_difference.f_mul_scalar(f64::from(1.0 / (r0 + r1)))?;
        Ok(first_order
            .f_add(&d1.f_mul_scalar(f64::from(alpha_t * (exp_neg_h_minus_one / h + 1.0)))?)?
            .f_sub(&d2.f_mul_scalar(f64::from(
                alpha_t * ((exp_neg_h_minus_one + h) / (h * h) - 0.5),
            ))?)?)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let train = config.betas.num_train_timesteps;
        check_step_count(num_inference_steps, train)?;
        let (n, last) = (num_inference_steps, self.last_timestep);
        let mut timesteps: Vec<i64> = match config.timestep_spacing {
            // n + 1 points, the final 0 dropped.
            TimestepSpacing::Linspace => schedule::linspace(0.0, last as f64 - 1.0, n + 1)
                .into_iter()
                .rev()
                .take(n)
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = (last / (n + 1)) as i64;
                (1..=n as i64)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                schedule::arange(last as f64, 0.0, -(train as f64 / n as f64))
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        let sigmas = if config.use_karras_sigmas {
            let sigma_min = f64::from(self.train_sigmas[0]);
            let sigma_max = f64::from(self.train_sigmas[train - 1]);
            let sigmas = schedule::karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas = schedule::ln_f32(&self.train_sigmas);
            let round = config.betas.schedule != BetaSchedule::SquaredCosCapV2;
            timesteps = sigmas
                .iter()
                .map(|&sigma| {
                    let t = schedule::sigma_to_t(sigma, &log_sigmas);
                    // Unrounded timesteps are truncated by the int64 cast, as in diffusers.
                    if round {
                        t.round_ties_even() as i64
                    } else {
                        t as i64
                    }
                })
                .collect();
            sigmas
        } else {
            let at: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
            schedule::interp(&at, &self.train_sigmas)
        };
        let final_sigma = match config.final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => f64::from(self.train_sigmas[0]),
        };
        self.sigmas = sigmas
            .into_iter()
            .chain([final_sigma])
            .map(|sigma| sigma as f32)
            .collect();
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.model_outputs = std::iter::repeat_with(|| None)
            .take(config.solver_order)
            .collect();
        self.lower_order_nums = 0;
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
        Some(&self.sigmas)
    }

    fn step_index(&self) -> usize {
        self.step_index
    }

    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        Ok(sample.shallow_clone())
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
        let (index, steps) = (self.step_index, self.timesteps.len());
        check_step(index, steps, model_output, sample, None)?;
        let config = &self.config;
        let short = config.lower_order_final && steps < 15;
        let final_first_order = index == steps - 1
            && (config.euler_at_final || short || config.final_sigma == FinalSigma::Zero);
        let final_second_order = index + 2 == steps && short;

        let pred_original = self.predict_original(model_output, sample)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(pred_original));

        let sample = sample.f_to_kind(Kind::Float)?;
        let order = if config.solver_order == 1 || self.lower_order_nums < 1 || final_first_order {
            1
        } else if config.solver_order == 2 || self.lower_order_nums < 2 || final_second_order {
            2
        } else {
            3
        };
        let prev_sample = self.update(order, &sample)?;
        if self.lower_order_nums < config.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev_sample.f_to_kind(model_output.kind())?)
    }
}
