//! Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free
//! Learner") as `prodigyopt` 1.1.2 implements it (`prodigyopt/prodigy.py`, `slice_p = 1`, no
//! FSDP), with every scalar on the device.
//!
//! The reference keeps `d`, `d_max` and `d_numerator` as Python floats and reads the global sums
//! with `.item()`; here they are 0-dim float64 tensors and the sums are device reductions, so the
//! step reads nothing back to the host. Per step, with `k` steps taken, `bc = √(1−β₂ᵏ⁺¹)/(1−β₁ᵏ⁺¹)`
//! (or 1 without bias correction) and `dlr = d·lr·bc`:
//!
//! 1. for every parameter with a gradient: `num += (d/d₀)·dlr·⟨g, p₀ − p⟩`;
//!    `m ← β₁m + d(1−β₁)g`; `v ← β₂v + d²(1−β₂)g²`;
//!    `s ← β₃s + (d/d₀)·(d if safeguard_warmup else dlr)·g`; `den += Σ|s|`
//!    (with coupled weight decay, `g ← g + wd·p` first);
//! 2. if `den = 0` the reference returns here (moments already updated): a device `where` here;
//! 3. `d̂ = d_coef·(β₃·d_numerator + num)/den`; if `d = d₀`: `d ← max(d, d̂)`;
//!    `d_max ← max(d_max, d̂)`; `d ← min(d_max, d·growth_rate)`;
//! 4. per parameter: `p ← p − wd·dlr·p` (decoupled), `p ← p − dlr·m/(√v + d·ε)` (with the new `d`
//!    and the old `dlr`); without a first moment (β₁ = 0), `p ← p − dlr·d·g/(√v + d·ε)`.
//!
//! `p₀` is each parameter as it was at the first step. The reference counts `k` per optimizer
//! (its first group's), as here. All groups must have the same learning rate or 0, as the
//! reference requires; groups with 0 are left alone.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::adamw::check_range;
use crate::common::{Entry, Groups, and, load_entries, put, save_entries, scalar, shared_methods};
use crate::{Error, ParamGroup, Result};

/// Prodigy's settings (prodigyopt's keyword arguments); weight decay is per group.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ProdigyConfig {
    /// Decay of the first moment, β₁; 0 keeps no first moment.
    pub beta1: f64,
    /// Decay of the second moment, β₂.
    pub beta2: f64,
    /// Decay of `s` and of `d_numerator`; `None` means √β₂.
    pub beta3: Option<f64>,
    /// Added to `√v` (times `d`).
    pub eps: f64,
    /// AdamW-style decoupled weight decay (true) or weight decay added to the gradient (false).
    pub decouple: bool,
    /// Adam's bias correction in the step size.
    pub use_bias_correction: bool,
    /// Leaves the learning rate out of `s` (against too large `d` during a warm-up).
    pub safeguard_warmup: bool,
    /// Initial estimate of `d`.
    pub d0: f64,
    /// Factor on the estimate `d̂`.
    pub d_coef: f64,
    /// Largest factor by which `d` may grow in a step (`f64::INFINITY`: unbounded).
    pub growth_rate: f64,
}

setters! {
    /// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
    /// from [`Default`] (or a named constructor) by these.
    ProdigyConfig {
        with_beta1 => beta1: f64,
        with_beta2 => beta2: f64,
        with_beta3 => beta3: Option<f64>,
        with_eps => eps: f64,
        with_decouple => decouple: bool,
        with_use_bias_correction => use_bias_correction: bool,
        with_safeguard_warmup => safeguard_warmup: bool,
        with_d0 => d0: f64,
        with_d_coef => d_coef: f64,
        with_growth_rate => growth_rate: f64,
    }
}

impl Default for ProdigyConfig {
    /// prodigyopt's defaults: betas (0.9, 0.999), beta3 √β₂, eps 1e-8, decoupled weight decay,
    /// no bias correction, no safeguard, d0 1e-6, d_coef 1, unbounded growth.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            beta3: None,
            eps: 1e-8,
            decouple: true,
            use_bias_correction: false,
            safeguard_warmup: false,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f64::INFINITY,
        }
    }
}

impl ProdigyConfig {
    /// Bytes [`Prodigy::state_bytes`] counts for one parameter of `shape`: float32 `exp_avg`
    /// (with β₁ > 0), `exp_avg_sq`, `s` and the initial parameter `p0`.
    pub fn state_bytes(&self, shape: &[i64]) -> i64 {
        let tensors = if self.beta1 > 0.0 { 4 } else { 3 };
        4 * tensors * shape.iter().product::<i64>()
    }

    fn validate(&self) -> Result<()> {
        check_range("d0", self.d0, self.d0 > 0.0, "must be > 0")?;
        check_range("eps", self.eps, self.eps > 0.0, "must be > 0")?;
        for (name, beta) in [("betas.0", self.beta1), ("betas.1", self.beta2)] {
            check_range(name, beta, (0.0..1.0).contains(&beta), "must lie in [0, 1)")?;
        }
        let beta3 = self.beta3();
        check_range(
            "beta3",
            beta3,
            (0.0..=1.0).contains(&beta3),
            "must lie in [0, 1]",
        )?;
        check_range(
            "d_coef",
            self.d_coef,
            self.d_coef.is_finite(),
            "must be finite",
        )?;
        check_range(
            "growth_rate",
            self.growth_rate,
            self.growth_rate > 0.0,
            "must be > 0",
        )
    }

    fn beta3(&self) -> f64 {
        self.beta3.unwrap_or_else(|| self.beta2.sqrt())
    }
}

/// Per group, per parameter: the gradient a step used (`None`: skipped).
type Grads = Vec<Vec<Option<Tensor>>>;

/// The states of one parameter.
#[derive(Debug)]
pub(crate) struct Slot {
    exp_avg: Option<Tensor>,
    exp_avg_sq: Tensor,
    s: Tensor,
    p0: Tensor,
}

/// Prodigy with float32 states and device scalars. See the [module documentation](crate::prodigy).
#[derive(Debug)]
pub struct Prodigy {
    config: ProdigyConfig,
    groups: Groups<Slot>,
    /// Steps taken, `k` (float64).
    step: Tensor,
    d: Tensor,
    d_max: Tensor,
    d_numerator: Tensor,
}

impl Prodigy {
    /// An optimizer over `groups` of float32 parameters on one device. Every group's learning
    /// rate must be the largest one or 0 (prodigyopt's rule, checked again at every step, so set
    /// learning rates of all nonzero groups together); the usual value is 1.
    pub fn new(groups: Vec<ParamGroup>, config: ProdigyConfig) -> Result<Self> {
        config.validate()?;
        let lr = groups.iter().map(|g| g.lr).fold(0.0, f64::max);
        check_lrs(groups.iter().map(|g| g.lr), lr)?;
        let first_moment = config.beta1 > 0.0;
        let groups = Groups::new(groups, |p| {
            Ok(Slot {
                exp_avg: if first_moment {
                    Some(p.f_zeros_like()?)
                } else {
                    None
                },
                exp_avg_sq: p.f_zeros_like()?,
                s: p.f_zeros_like()?.f_flatten(0, -1)?,
                p0: p.f_flatten(0, -1)?.f_detach_copy()?,
            })
        })?;
        let device = groups.device;
        Ok(Self {
            config,
            step: scalar(0.0, device)?,
            d: scalar(config.d0, device)?,
            d_max: scalar(config.d0, device)?,
            d_numerator: scalar(0.0, device)?,
            groups,
        })
    }

    /// The shared settings.
    pub fn config(&self) -> &ProdigyConfig {
        &self.config
    }

    /// The current estimate `d` (0-dim float64 on the device; the step size is `d·lr`).
    pub fn d(&self) -> &Tensor {
        &self.d
    }

    shared_methods!();

    fn step_inner(&mut self, gate: Option<&Tensor>) -> Result<()> {
        // The learning rates' host copies decide which group's device tensor is the shared one.
        let lrs: Vec<f64> = self.groups.groups.iter().map(|g| g.lr_value).collect();
        let lr = lrs.iter().copied().fold(0.0, f64::max);
        check_lrs(lrs.iter().copied(), lr)?;
        let Some(shared) = lrs.iter().position(|&v| v == lr && v > 0.0) else {
            return Ok(()); // all learning rates 0: the reference does nothing at all
        };
        let dlr = self.dlr(&self.groups.groups[shared].lr)?;
        let (delta_numerator, d_denom, grads) = self.update_moments(&dlr, gate)?;
        // The reference returns before touching d and the parameters when the denominator is 0.
        let moved = d_denom.f_ne(0.0)?;
        let gate = and(gate, Some(&moved))?;
        let gate = gate.as_ref();
        let c = self.config;
        let d = &self.d;
        let numerator = self
            .d_numerator
            .f_mul_scalar(c.beta3())?
            .f_add(&delta_numerator)?;
        let d_hat = numerator.f_mul_scalar(c.d_coef)?.f_div(&d_denom)?;
        let at_start = d.f_eq(c.d0)?;
        let raised = d.f_maximum(&d_hat)?.f_where_self(&at_start, d)?;
        let d_max = self.d_max.f_maximum(&d_hat)?;
        let new_d = d_max.f_minimum(&raised.f_mul_scalar(c.growth_rate)?)?;
        self.update_params(&dlr, &new_d, &grads, gate)?;
        put(&self.d_numerator, &numerator, gate)?;
        put(&self.d_max, &d_max, gate)?;
        put(&self.d, &new_d, gate)?;
        put(&self.step, &self.step.f_add_scalar(1.0)?, gate)
    }

    /// `d·lr·bc`, with Adam's bias correction `bc = √(1−β₂ᵏ⁺¹)/(1−β₁ᵏ⁺¹)` or 1.
    fn dlr(&self, lr: &Tensor) -> Result<Tensor> {
        let c = self.config;
        let bias_correction = if c.use_bias_correction {
            let k1 = self.step.f_add_scalar(1.0)?;
            let b2 = Tensor::f_pow_scalar(c.beta2, &k1)?
                .f_neg()?
                .f_add_scalar(1.0)?;
            let b1 = Tensor::f_pow_scalar(c.beta1, &k1)?
                .f_neg()?
                .f_add_scalar(1.0)?;
            b2.f_pow_tensor_scalar(0.5)?.f_div(&b1)?
        } else {
            // A fill on the device, not a host-to-device copy (capturable).
            self.d.f_ones_like()?
        };
        Ok(self.d.f_mul(lr)?.f_mul(&bias_correction)?)
    }

    /// The first loop of the reference: `p₀` on the first step, the moments and `s` of every
    /// parameter with a gradient in a group with lr > 0; returns `Σ (d/d₀)·dlr·⟨g, p₀ − p⟩`,
    /// `Σ|s|` (float64 device scalars) and the gradients used (with coupled weight decay added).
    fn update_moments(
        &self,
        dlr: &Tensor,
        gate: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Grads)> {
        let c = self.config;
        let d = &self.d;
        let d_over_d0 = d.f_div_scalar(c.d0)?;
        let num_coef = d_over_d0.f_mul(dlr)?;
        let s_coef = d_over_d0.f_mul(if c.safeguard_warmup { d } else { dlr })?;
        let m_coef = d.f_mul_scalar(1.0 - c.beta1)?;
        let v_coef = d.f_mul(d)?.f_mul_scalar(1.0 - c.beta2)?;
        let mut delta_numerator = d.f_zeros_like()?;
        let mut d_denom = d.f_zeros_like()?;
        let first = self.step.f_eq(0.0)?;
        let mut grads = Vec::new();
        for group in &self.groups.groups {
            let mut group_grads = Vec::new();
            for (param, slot) in group.params.iter().zip(&group.states) {
                let grad = param.grad();
                if !grad.defined() || group.lr_value == 0.0 {
                    group_grads.push(None);
                    continue;
                }
                let mut grad = grad.f_to_kind(Kind::Float)?;
                if group.weight_decay != 0.0 && !c.decouple {
                    grad = grad.f_add(&param.f_mul_scalar(group.weight_decay)?)?;
                }
                let flat = param.f_flatten(0, -1)?;
                put(&slot.p0, &flat.f_where_self(&first, &slot.p0)?, gate)?;
                let flat_grad = grad.f_flatten(0, -1)?;
                let dot = flat_grad.f_dot(&slot.p0.f_sub(&flat)?)?;
                delta_numerator =
                    delta_numerator.f_add(&num_coef.f_mul(&dot.f_to_kind(Kind::Double)?)?)?;
                if let Some(m) = &slot.exp_avg {
                    let new_m = m.f_mul_scalar(c.beta1)?.f_add(&grad.f_mul(&m_coef)?)?;
                    put(m, &new_m, gate)?;
                }
                let new_v = slot
                    .exp_avg_sq
                    .f_mul_scalar(c.beta2)?
                    .f_add(&grad.f_mul(&v_coef)?.f_mul(&grad)?)?;
                put(&slot.exp_avg_sq, &new_v, gate)?;
                let new_s = slot
                    .s
                    .f_mul_scalar(c.beta3())?
                    .f_add(&flat_grad.f_mul(&s_coef)?)?;
                put(&slot.s, &new_s, gate)?;
                let s_sum = new_s.f_abs()?.f_sum(Kind::Float)?.f_to_kind(Kind::Double)?;
                d_denom = d_denom.f_add(&s_sum)?;
                group_grads.push(Some(grad));
            }
            grads.push(group_grads);
        }
        Ok((delta_numerator, d_denom, grads))
    }

    /// The second loop: decoupled weight decay and the Adam step with the new `d` in `ε·d` and
    /// the old `dlr`.
    fn update_params(
        &self,
        dlr: &Tensor,
        new_d: &Tensor,
        grads: &Grads,
        gate: Option<&Tensor>,
    ) -> Result<()> {
        let c = self.config;
        let eps_d = new_d.f_mul_scalar(c.eps)?;
        for (group, group_grads) in self.groups.groups.iter().zip(grads) {
            let decay = dlr.f_mul_scalar(-group.weight_decay)?;
            for ((param, slot), grad) in group.params.iter().zip(&group.states).zip(group_grads) {
                let Some(grad) = grad else { continue };
                let denom = slot.exp_avg_sq.f_sqrt()?.f_add(&eps_d)?;
                let mut p = param.shallow_clone();
                if group.weight_decay != 0.0 && c.decouple {
                    p = p.f_add(&p.f_mul(&decay)?)?;
                }
                // addcdiv's order: (value·t₁)/t₂.
                let step = match &slot.exp_avg {
                    Some(m) => m.f_mul(dlr)?.f_div(&denom)?,
                    None => grad.f_mul(&dlr.f_mul(new_d)?)?.f_div(&denom)?,
                };
                put(param, &p.f_sub(&step)?, gate)?;
            }
        }
        Ok(())
    }

    fn entries(&self) -> Vec<(String, Entry)> {
        let c = &self.config;
        let mut entries = vec![
            ("step".to_string(), Entry::State(self.step.shallow_clone())),
            ("d".to_string(), Entry::State(self.d.shallow_clone())),
            (
                "d_max".to_string(),
                Entry::State(self.d_max.shallow_clone()),
            ),
            (
                "d_numerator".to_string(),
                Entry::State(self.d_numerator.shallow_clone()),
            ),
            ("beta1".to_string(), Entry::Setting(c.beta1)),
            ("beta2".to_string(), Entry::Setting(c.beta2)),
            ("beta3".to_string(), Entry::Setting(c.beta3())),
            ("eps".to_string(), Entry::Setting(c.eps)),
            (
                "decouple".to_string(),
                Entry::Setting(f64::from(u8::from(c.decouple))),
            ),
            (
                "use_bias_correction".to_string(),
                Entry::Setting(f64::from(u8::from(c.use_bias_correction))),
            ),
            (
                "safeguard_warmup".to_string(),
                Entry::Setting(f64::from(u8::from(c.safeguard_warmup))),
            ),
            ("d0".to_string(), Entry::Setting(c.d0)),
            ("d_coef".to_string(), Entry::Setting(c.d_coef)),
            ("growth_rate".to_string(), Entry::Setting(c.growth_rate)),
        ];
        entries.extend(self.groups.group_entries());
        for (g, group) in self.groups.groups.iter().enumerate() {
            for (i, slot) in group.states.iter().enumerate() {
                let key = |name: &str| format!("state.{g}.{i}.{name}");
                if let Some(m) = &slot.exp_avg {
                    entries.push((key("exp_avg"), Entry::State(m.shallow_clone())));
                }
                entries.push((
                    key("exp_avg_sq"),
                    Entry::State(slot.exp_avg_sq.shallow_clone()),
                ));
                entries.push((key("s"), Entry::State(slot.s.shallow_clone())));
                entries.push((key("p0"), Entry::State(slot.p0.shallow_clone())));
            }
        }
        entries
    }

    /// Writes the complete state (step, `d`, `d_max`, `d_numerator`, learning rates, per-parameter
    /// `exp_avg`, `exp_avg_sq`, `s`, `p0`; settings for checking) to `path` atomically as
    /// safetensors. Reads the device tensors, so it synchronises.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_entries(path.as_ref(), &self.entries())
    }

    /// Restores a state written by [`Prodigy::save`] for the same parameters and settings
    /// (learning rates are taken from the file). Nothing changes if a check fails.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        load_entries(path.as_ref(), &self.entries())?;
        self.groups.sync_lr_values()
    }
}

/// prodigyopt's rule: every group's learning rate is the largest one or 0.
fn check_lrs(lrs: impl Iterator<Item = f64>, lr: f64) -> Result<()> {
    for (g, group_lr) in lrs.enumerate() {
        if group_lr != lr && group_lr != 0.0 {
            return Err(Error::InvalidHyperParameter {
                name: format!("param_groups[{g}].lr"),
                value: group_lr,
                reason: "Prodigy needs one learning rate shared by all groups, or 0",
            });
        }
    }
    Ok(())
}
