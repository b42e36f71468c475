//! Adafactor (Shazeer & Stern 2018) as `transformers.optimization.Adafactor` implements it
//! (transformers 5.17.0), with the step count on the device.
//!
//! Per parameter, at step `t` (shared by all parameters here; the reference counts per
//! parameter, which differs only for parameters that go without a gradient on some steps):
//!
//! 1. `RMS = ‖p‖/√n`; the step size is `ρ·max(ε₂, RMS)` with `scale_parameter`, else `ρ`, where
//!    `ρ = min(10⁻⁶·t if warmup_init else 10⁻², 1/√t)` with `relative_step`, else the group's lr;
//! 2. `β₂ₜ = 1 − t^decay_rate`; `u = g² + ε₁`;
//! 3. parameters of ≥ 2 dimensions keep factored second moments over the last two dimensions:
//!    `R ← β₂ₜR + (1−β₂ₜ)·mean₋₁(u)`, `C ← β₂ₜC + (1−β₂ₜ)·mean₋₂(u)`,
//!    `u = g·rsqrt(R/mean₋₁(R))·rsqrt(C)`; others a full one, `V ← β₂ₜV + (1−β₂ₜ)u`, `u = g·rsqrt(V)`;
//! 4. `u ← u / max(1, RMS(u)/clip_threshold) · lr`;
//! 5. with `beta1`: `m ← β₁m + (1−β₁)u`, `u = m`;
//! 6. `p ← p − wd·lr·p` (if weight decay), `p ← p − u`.
//!
//! The reference's step size is a float32 tensor when `RMS > ε₂` (a tensor times a Python float)
//! and a float64 number otherwise; both are rounded to float32 where they meet the update, as
//! here.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::adamw::check_range;
use crate::common::{Entry, Groups, load_entries, put, save_entries, scalar, shared_methods};
use crate::{Error, ParamGroup, Result};

/// Adafactor's settings (transformers' keyword arguments); lr and weight decay are per group.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct AdafactorConfig {
    /// Regularisation constants `(ε₁, ε₂)`: added to `g²`, and the least parameter scale.
    pub eps: (f64, f64),
    /// Largest RMS of the unscaled update.
    pub clip_threshold: f64,
    /// Exponent of the second-moment decay `β₂ₜ = 1 − t^decay_rate`.
    pub decay_rate: f64,
    /// Decay of a first moment; `None` keeps none.
    pub beta1: Option<f64>,
    /// Scale the step size by the parameter's RMS.
    pub scale_parameter: bool,
    /// Time-dependent step size `min(10⁻², 1/√t)` instead of the groups' learning rates (which
    /// must then be 0: they are not used).
    pub relative_step: bool,
    /// With `relative_step`: `min(10⁻⁶·t, 1/√t)`.
    pub warmup_init: bool,
}

setters! {
    /// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
    /// from [`Default`] (or a named constructor) by these.
    AdafactorConfig {
        with_eps => eps: (f64, f64),
        with_clip_threshold => clip_threshold: f64,
        with_decay_rate => decay_rate: f64,
        with_beta1 => beta1: Option<f64>,
        with_scale_parameter => scale_parameter: bool,
        with_relative_step => relative_step: bool,
        with_warmup_init => warmup_init: bool,
    }
}

impl Default for AdafactorConfig {
    /// transformers' defaults: eps (1e-30, 1e-3), clip_threshold 1, decay_rate −0.8, no beta1,
    /// scale_parameter, relative_step, no warmup_init.
    fn default() -> Self {
        Self {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

impl AdafactorConfig {
    /// Bytes [`Adafactor::state_bytes`] counts for one parameter of `shape`: float32 row and
    /// column means over the last two dimensions (a full second moment below 2 dimensions), and
    /// a first moment with `beta1`.
    pub fn state_bytes(&self, shape: &[i64]) -> i64 {
        let numel: i64 = shape.iter().product();
        let second = match shape {
            [lead @ .., rows, cols] => lead.iter().product::<i64>() * (rows + cols),
            _ => numel,
        };
        let first = if self.beta1.is_some() { numel } else { 0 };
        4 * (second + first)
    }

    fn validate(&self) -> Result<()> {
        if self.warmup_init && !self.relative_step {
            return Err(Error::InvalidHyperParameter {
                name: "warmup_init".into(),
                value: 1.0,
                reason: "needs relative_step",
            });
        }
        check_range("eps.0", self.eps.0, self.eps.0 >= 0.0, "must be ≥ 0")?;
        check_range("eps.1", self.eps.1, self.eps.1 >= 0.0, "must be ≥ 0")?;
        let clip = self.clip_threshold;
        check_range("clip_threshold", clip, clip > 0.0, "must be > 0")?;
        let rate = self.decay_rate;
        check_range(
            "decay_rate",
            rate,
            rate.is_finite() && rate < 0.0,
            "must be < 0",
        )?;
        if let Some(beta1) = self.beta1 {
            check_range(
                "beta1",
                beta1,
                (0.0..1.0).contains(&beta1),
                "must lie in [0, 1)",
            )?;
        }
        Ok(())
    }
}

/// The second moment of one parameter.
#[derive(Debug)]
pub(crate) enum SecondMoment {
    /// Row and column means over the last two dimensions.
    Factored { row: Tensor, col: Tensor },
    /// One value per element (parameters of fewer than 2 dimensions).
    Full(Tensor),
}

/// The states of one parameter.
#[derive(Debug)]
pub(crate) struct Slot {
    exp_avg: Option<Tensor>,
    second: SecondMoment,
}

/// Adafactor with float32 states. See the [module documentation](crate::adafactor).
#[derive(Debug)]
pub struct Adafactor {
    config: AdafactorConfig,
    groups: Groups<Slot>,
    step: Tensor,
}

impl Adafactor {
    /// An optimizer over `groups` of float32 parameters on one device. With `relative_step` the
    /// groups' learning rates must be 0 (transformers refuses an lr with `relative_step`).
    pub fn new(groups: Vec<ParamGroup>, config: AdafactorConfig) -> Result<Self> {
        config.validate()?;
        if config.relative_step
            && let Some(g) = groups.iter().position(|g| g.lr != 0.0)
        {
            return Err(Error::InvalidHyperParameter {
                name: format!("param_groups[{g}].lr"),
                value: groups[g].lr,
                reason: "must be 0 with relative_step (the step size is computed)",
            });
        }
        let first_moment = config.beta1.is_some();
        let groups = Groups::new(groups, |p| {
            let shape = p.size();
            let second = if shape.len() >= 2 {
                let n = shape.len();
                let mut col = shape[..n - 2].to_vec();
                col.push(shape[n - 1]);
                SecondMoment::Factored {
                    row: Tensor::f_zeros(&shape[..n - 1], (Kind::Float, p.device()))?,
                    col: Tensor::f_zeros(&col, (Kind::Float, p.device()))?,
                }
            } else {
                SecondMoment::Full(p.f_zeros_like()?)
            };
            Ok(Slot {
                exp_avg: if first_moment {
                    Some(p.f_zeros_like()?)
                } else {
                    None
                },
                second,
            })
        })?;
        let step = scalar(0.0, groups.device)?;
        Ok(Self {
            config,
            groups,
            step,
        })
    }

    /// The shared settings.
    pub fn config(&self) -> &AdafactorConfig {
        &self.config
    }

    shared_methods!();

    /// ρ: the step size before parameter scaling, float64 on the device.
    fn relative_step_size(&self, t: &Tensor, lr: &Tensor) -> Result<Tensor> {
        if !self.config.relative_step {
            return Ok(lr.shallow_clone());
        }
        let min_step = if self.config.warmup_init {
            t.f_mul_scalar(1e-6)?
        } else {
            // A fill on the device, not a host-to-device copy (capturable).
            t.f_full_like(1e-2)?
        };
        Ok(min_step.f_minimum(&t.f_sqrt()?.f_reciprocal()?)?)
    }

    /// The step size of one parameter as float32: `ρ·max(ε₂, RMS(p))` or `ρ`.
    fn step_size(&self, param: &Tensor, rho: &Tensor) -> Result<Tensor> {
        let c = self.config;
        Ok(if c.scale_parameter {
            let rms = rms(param)?;
            // A float32 tensor times ρ (rounded to float32) where RMS wins, else ε₂·ρ.
            let scaled = rms.f_mul(&rho.f_to_kind(Kind::Float)?)?;
            let floor = rho.f_mul_scalar(c.eps.1)?.f_to_kind(Kind::Float)?;
            scaled.f_where_self(&rms.f_gt(c.eps.1)?, &floor)?
        } else {
            rho.f_to_kind(Kind::Float)?
        })
    }

    fn step_inner(&mut self, gate: Option<&Tensor>) -> Result<()> {
        let c = self.config;
        let t = self.step.f_add_scalar(1.0)?;
        // β₂ₜ = 1 − t^decay_rate and 1 − β₂ₜ, float64.
        let beta2t = t
            .f_pow_tensor_scalar(c.decay_rate)?
            .f_neg()?
            .f_add_scalar(1.0)?;
        let one_minus_beta2t = beta2t.f_neg()?.f_add_scalar(1.0)?;
        for group in &self.groups.groups {
            let rho = self.relative_step_size(&t, &group.lr)?;
            for (param, slot) in group.params.iter().zip(&group.states) {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = grad.f_to_kind(Kind::Float)?;
                let lr = self.step_size(param, &rho)?;
                let u = grad.f_square()?.f_add_scalar(c.eps.0)?;
                let mut update = match &slot.second {
                    SecondMoment::Factored { row, col } => {
                        let new_row = decay(
                            row,
                            &beta2t,
                            &u.f_mean_dim(-1, false, None)?,
                            &one_minus_beta2t,
                        )?;
                        let new_col = decay(
                            col,
                            &beta2t,
                            &u.f_mean_dim(-2, false, None)?,
                            &one_minus_beta2t,
                        )?;
                        put(row, &new_row, gate)?;
                        put(col, &new_col, gate)?;
                        let r = new_row
                            .f_div(&new_row.f_mean_dim(-1, true, None)?)?
                            .f_rsqrt()?
                            .f_unsqueeze(-1)?;
                        let cf = new_col.f_unsqueeze(-2)?.f_rsqrt()?;
                        r.f_mul(&cf)?.f_mul(&grad)?
                    }
                    SecondMoment::Full(v) => {
                        let new_v = decay(v, &beta2t, &u, &one_minus_beta2t)?;
                        put(v, &new_v, gate)?;
                        new_v.f_rsqrt()?.f_mul(&grad)?
                    }
                };
                let clip = rms(&update)?
                    .f_div_scalar(c.clip_threshold)?
                    .f_clamp_min(1.0)?;
                update = update.f_div(&clip)?.f_mul(&lr)?;
                if let (Some(beta1), Some(m)) = (c.beta1, &slot.exp_avg) {
                    let new_m = m
                        .f_mul_scalar(beta1)?
                        .f_add(&update.f_mul_scalar(1.0 - beta1)?)?;
                    put(m, &new_m, gate)?;
                    update = new_m;
                }
                let mut p = param.shallow_clone();
                if group.weight_decay != 0.0 {
                    let factor = lr
                        .f_to_kind(Kind::Double)?
                        .f_mul_scalar(-group.weight_decay)?;
                    p = p.f_add(&p.f_mul(&factor)?)?;
                }
                put(param, &p.f_sub(&update)?, gate)?;
            }
        }
        put(&self.step, &t, gate)
    }

    fn entries(&self) -> Vec<(String, Entry)> {
        let c = &self.config;
        let flag = |b: bool| Entry::Setting(f64::from(u8::from(b)));
        let mut entries = vec![
            ("step".to_string(), Entry::State(self.step.shallow_clone())),
            ("eps.0".to_string(), Entry::Setting(c.eps.0)),
            ("eps.1".to_string(), Entry::Setting(c.eps.1)),
            (
                "clip_threshold".to_string(),
                Entry::Setting(c.clip_threshold),
            ),
            ("decay_rate".to_string(), Entry::Setting(c.decay_rate)),
            ("beta1".to_string(), Entry::Setting(c.beta1.unwrap_or(-1.0))),
            ("scale_parameter".to_string(), flag(c.scale_parameter)),
            ("relative_step".to_string(), flag(c.relative_step)),
            ("warmup_init".to_string(), flag(c.warmup_init)),
        ];
        entries.extend(self.groups.group_entries());
        for (g, group) in self.groups.groups.iter().enumerate() {
            for (i, slot) in group.states.iter().enumerate() {
                let key = |name: &str| format!("state.{g}.{i}.{name}");
                if let Some(m) = &slot.exp_avg {
                    entries.push((key("exp_avg"), Entry::State(m.shallow_clone())));
                }
                match &slot.second {
                    SecondMoment::Factored { row, col } => {
                        entries.push((key("exp_avg_sq_row"), Entry::State(row.shallow_clone())));
                        entries.push((key("exp_avg_sq_col"), Entry::State(col.shallow_clone())));
                    }
                    SecondMoment::Full(v) => {
                        entries.push((key("exp_avg_sq"), Entry::State(v.shallow_clone())));
                    }
                }
            }
        }
        entries
    }

    /// Writes the complete state (step, learning rates, moments under transformers' names;
    /// settings for checking, `beta1` −1 for none) to `path` atomically as safetensors. Reads the
    /// device tensors, so it synchronises.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_entries(path.as_ref(), &self.entries())
    }

    /// Restores a state written by [`Adafactor::save`] for the same parameters and settings
    /// (learning rates are taken from the file). Nothing changes if a check fails.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        load_entries(path.as_ref(), &self.entries())?;
        self.groups.sync_lr_values()
    }
}

/// transformers' `_rms`: `‖x‖₂ / √numel`, float32.
fn rms(x: &Tensor) -> Result<Tensor> {
    let n = (x.numel() as f64).sqrt();
    Ok(x.f_norm()?.f_div_scalar(n)?)
}

/// `state·β + x·(1−β)` with float64 device factors (rounded to float32 on use).
fn decay(state: &Tensor, beta: &Tensor, x: &Tensor, one_minus_beta: &Tensor) -> Result<Tensor> {
    Ok(state.f_mul(beta)?.f_add(&x.f_mul(one_minus_beta)?)?)
}
