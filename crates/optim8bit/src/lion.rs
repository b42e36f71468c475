//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") as `lion-pytorch`
//! 0.2.5 implements it (`lion_pytorch/lion_pytorch.py`, `update_fn`), per parameter:
//!
//! 1. `p ← p·(1 − lr·wd)` (weight decay first, decoupled);
//! 2. `p ← p − lr·sign(β₁·m + (1−β₁)·g)`;
//! 3. `m ← β₂·m + (1−β₂)·g`.
//!
//! `m` starts at zero, in float32. The factors `1 − lr·wd`, `1 − β` are computed in float64 and
//! rounded to float32 where they meet the tensors, as in the reference.
//! lion-pytorch's `decoupled_weight_decay` option (weight decay divided by the initial lr) and its
//! Triton kernel are not reproduced: pass the weight decay you want applied as `lr·wd`.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::adamw::check_range;
use crate::common::{Entry, Groups, load_entries, put, save_entries, scalar, shared_methods};
use crate::{ParamGroup, Result};

/// Lion's settings shared by all groups; learning rate and weight decay are per group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionConfig {
    /// Weight of the momentum in the update direction, β₁.
    pub beta1: f64,
    /// Decay of the momentum, β₂.
    pub beta2: f64,
}

impl LionConfig {
    /// Bytes [`Lion::state_bytes`] counts for one parameter of `shape`: a float32 momentum.
    pub fn state_bytes(&self, shape: &[i64]) -> i64 {
        4 * shape.iter().product::<i64>()
    }
}

impl Default for LionConfig {
    /// lion-pytorch's defaults: betas (0.9, 0.99).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.99,
        }
    }
}

/// Lion with a float32 momentum per parameter. See the [module documentation](crate::lion).
#[derive(Debug)]
pub struct Lion {
    config: LionConfig,
    /// Per parameter: the momentum `exp_avg`.
    groups: Groups<Tensor>,
    step: Tensor,
}

impl Lion {
    /// An optimizer over `groups` of float32 parameters on one device.
    pub fn new(groups: Vec<ParamGroup>, config: LionConfig) -> Result<Self> {
        for (name, beta) in [("betas.0", config.beta1), ("betas.1", config.beta2)] {
            check_range(
                name,
                beta,
                (0.0..=1.0).contains(&beta),
                "must lie in [0, 1]",
            )?;
        }
        let groups = Groups::new(groups, |p| Ok(p.f_zeros_like()?))?;
        let step = scalar(0.0, groups.device)?;
        Ok(Self {
            config,
            groups,
            step,
        })
    }

    /// The shared settings.
    pub fn config(&self) -> &LionConfig {
        &self.config
    }

    shared_methods!();

    fn step_inner(&mut self, gate: Option<&Tensor>) -> Result<()> {
        let LionConfig { beta1, beta2 } = self.config;
        for group in &self.groups.groups {
            // 1 − lr·wd in float64 on the device.
            let decay = group
                .lr
                .f_mul_scalar(-group.weight_decay)?
                .f_add_scalar(1.0)?;
            for (param, m) in group.params.iter().zip(&group.states) {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = grad.f_to_kind(Kind::Float)?;
                let decayed = param.f_mul(&decay)?;
                let direction = m
                    .f_mul_scalar(beta1)?
                    .f_add(&grad.f_mul_scalar(1.0 - beta1)?)?
                    .f_sign()?;
                let updated = decayed.f_sub(&direction.f_mul(&group.lr)?)?;
                let new_m = m
                    .f_mul_scalar(beta2)?
                    .f_add(&grad.f_mul_scalar(1.0 - beta2)?)?;
                put(param, &updated, gate)?;
                put(m, &new_m, gate)?;
            }
        }
        put(&self.step, &self.step.f_add_scalar(1.0)?, gate)
    }

    fn entries(&self) -> Vec<(String, Entry)> {
        let mut entries = vec![
            ("step".to_string(), Entry::State(self.step.shallow_clone())),
            ("beta1".to_string(), Entry::Setting(self.config.beta1)),
            ("beta2".to_string(), Entry::Setting(self.config.beta2)),
        ];
        entries.extend(self.groups.group_entries());
        for (g, group) in self.groups.groups.iter().enumerate() {
            for (i, m) in group.states.iter().enumerate() {
                entries.push((
                    format!("state.{g}.{i}.exp_avg"),
                    Entry::State(m.shallow_clone()),
                ));
            }
        }
        entries
    }

    /// Writes the complete state (step, learning rates, momenta; settings for checking) to
    /// `path` atomically as safetensors. Reads the device tensors, so it synchronises.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_entries(path.as_ref(), &self.entries())
    }

    /// Restores a state written by [`Lion::save`] for the same parameters and settings (betas and
    /// weight decays must be equal; learning rates are taken from the file). Nothing changes if a
    /// check fails.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        load_entries(path.as_ref(), &self.entries())?;
        self.groups.sync_lr_values()
    }
}
