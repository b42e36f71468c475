//! An exponential moving average of parameters, as diffusers 0.42.1's `EMAModel`
//! (`diffusers/training_utils.py`) keeps it for its training scripts' `--use_ema`.
//!
//! Each [`EMAModel::step`] counts `optimization_step += 1`, takes the decay of that step
//! ([`EMAModel::get_decay`]) and moves every shadow parameter toward its parameter:
//!
//! ```text
//! step  = max(0, optimization_step − update_after_step − 1)
//! decay = 0                                            if step ≤ 0 (min_decay is not applied then)
//!       = 1 − (1 + step / inv_gamma)^(−power)          with use_ema_warmup
//!       = (1 + step) / (10 + step)                     otherwise
//! decay = max(min(decay, decay_max), min_decay)        (decay_max: the `decay` setting)
//! s    ← s − (1 − decay)·(s − p)
//! ```
//!
//! The decay is computed in float64 (Python's floats) and `1 − decay` rounded to float32 where it
//! meets the float32 tensors; the update is diffusers' per-parameter arithmetic
//! (`s_param.sub_(one_minus_decay * (s_param - param))`, its `foreach=False` default): three
//! float32 roundings in that order — computed over all parameters at once in one flat buffer, which
//! changes no bit of the elementwise arithmetic and keeps a step at a few kernels. The step count
//! and the decay are device tensors, so a step only enqueues device work and can be captured in a
//! CUDA graph with the optimizer step; [`EMAModel::step_if`] gates it with a device condition as
//! the optimizers' `step_if` do.
//!
//! [`EMAModel::store`], [`EMAModel::copy_to`] and [`EMAModel::restore`] swap the averaged weights
//! into the parameters and back (to write files or render validation images with them), and
//! [`EMAModel::save`] / [`EMAModel::load`] keep the state (diffusers' `state_dict` entries) in a
//! safetensors file for an exact resume.
//!
//! ```
//! use optim8bit::{EMAConfig, EMAModel};
//! use tch::{Kind, Tensor};
//!
//! let w = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
//! let mut ema = EMAModel::new(vec![w.shallow_clone()], EMAConfig::default())?;
//! for _ in 0..3 {
//!     let _ = w.shallow_clone().fill_(1.0); // what an optimizer step would do
//!     ema.step()?;
//! }
//! // Steps 1 and 2 copy (decay 0), step 3 averages with decay (1 + 2) / (10 + 2).
//! assert_eq!(ema.cur_decay_value().double_value(&[]), 0.25);
//! assert_eq!(ema.shadow_params()[0].double_value(&[0]), 1.0);
//! # Ok::<(), optim8bit::Error>(())
//! ```

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::adamw::{assign, check_range};
use crate::common::{Entry, check_condition, load_entries, put, save_entries, scalar};
use crate::{Error, Result};

/// `EMAModel`'s settings, with its argument names and defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct EMAConfig {
    /// The largest decay (diffusers' `decay`, 0.9999).
    pub decay: f64,
    /// The smallest decay once the average has started (`min_decay`, 0).
    pub min_decay: f64,
    /// Steps during which the shadow parameters copy the parameters (`update_after_step`, 0).
    pub update_after_step: u64,
    /// The warm-up schedule `1 − (1 + step/inv_gamma)^(−power)` instead of `(1 + step)/(10 + step)`
    /// (`use_ema_warmup`, false).
    pub use_ema_warmup: bool,
    /// The warm-up's inverse multiplicative factor (`inv_gamma`, 1).
    pub inv_gamma: f64,
    /// The warm-up's exponent (`power`, 2/3).
    pub power: f64,
}

setters! {
    /// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
    /// from [`Default`] (or a named constructor) by these.
    EMAConfig {
        with_decay => decay: f64,
        with_min_decay => min_decay: f64,
        with_update_after_step => update_after_step: u64,
        with_use_ema_warmup => use_ema_warmup: bool,
        with_inv_gamma => inv_gamma: f64,
        with_power => power: f64,
    }
}

impl Default for EMAConfig {
    fn default() -> Self {
        Self {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_ema_warmup: false,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }
}

impl EMAConfig {
    fn check(&self) -> Result<()> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        check_range("decay", self.decay, unit(self.decay), "must lie in [0, 1]")?;
        check_range(
            "min_decay",
            self.min_decay,
            unit(self.min_decay),
            "must lie in [0, 1]",
        )?;
        check_range(
            "inv_gamma",
            self.inv_gamma,
            self.inv_gamma.is_finite() && self.inv_gamma > 0.0,
            "must be finite and > 0",
        )?;
        check_range(
            "power",
            self.power,
            self.power.is_finite() && self.power >= 0.0,
            "must be finite and >= 0",
        )
    }
}

/// The moving average of a list of float32 parameters. See the [module documentation](crate::ema).
#[derive(Debug)]
pub struct EMAModel {
    config: EMAConfig,
    /// Handles of the tracked parameters (sharing their storage).
    params: Vec<Tensor>,
    /// Views into `flat`, one per parameter, with its shape.
    shadow_params: Vec<Tensor>,
    /// Every shadow parameter in one buffer, so a step is a handful of kernels whatever the
    /// parameter count (the arithmetic is elementwise: grouping does not change a bit).
    flat: Tensor,
    /// Steps taken, 0-dim float64 on the device.
    optimization_step: Tensor,
    /// The decay of the last step, 0-dim float64 on the device (0 before the first).
    cur_decay_value: Tensor,
    /// `inv_gamma` on the device: a true division on CUDA, which turns a division by a host
    /// scalar into a multiplication by its reciprocal.
    inv_gamma: Tensor,
    temp_stored_params: Option<Vec<Tensor>>,
    device: Device,
}

impl EMAModel {
    /// An average over `params` (float32, one device) starting from their current values.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] for a setting out of range; [`Error::EmaParameter`] for
    /// an undefined, non-float32 or misplaced parameter.
    pub fn new(params: Vec<Tensor>, config: EMAConfig) -> Result<Self> {
        config.check()?;
        let device = params.first().map_or(Device::Cpu, Tensor::device);
        for (index, param) in params.iter().enumerate() {
            let reason = if !param.defined() {
                "undefined tensor".to_string()
            } else if param.kind() != Kind::Float {
                format!("element type {:?}; the average is float32", param.kind())
            } else if param.device() != device {
                format!(
                    "lives on {:?}, the first parameter on {device:?}",
                    param.device()
                )
            } else {
                continue;
            };
            return Err(Error::EmaParameter { index, reason });
        }
        let flat = match flatten(&params)? {
            Some(values) => values,
            None => Tensor::f_zeros([0], (Kind::Float, device))?,
        };
        let mut shadow_params = Vec::with_capacity(params.len());
        let mut offset = 0;
        for param in &params {
            let numel = param.numel() as i64;
            shadow_params.push(
                flat.f_narrow(0, offset, numel)?
                    .f_view(param.size().as_slice())?,
            );
            offset += numel;
        }
        Ok(Self {
            config,
            params,
            shadow_params,
            flat,
            optimization_step: scalar(0.0, device)?,
            cur_decay_value: scalar(0.0, device)?,
            inv_gamma: scalar(config.inv_gamma, device)?,
            temp_stored_params: None,
            device,
        })
    }

    /// The settings.
    pub fn config(&self) -> &EMAConfig {
        &self.config
    }

    /// The averaged parameters, in the order of the tracked ones.
    pub fn shadow_params(&self) -> &[Tensor] {
        &self.shadow_params
    }

    /// Steps taken (diffusers' `optimization_step`), as a 0-dim float64 device tensor.
    pub fn optimization_step(&self) -> &Tensor {
        &self.optimization_step
    }

    /// The decay the last step used (diffusers' `cur_decay_value`), 0-dim float64 on the device.
    pub fn cur_decay_value(&self) -> &Tensor {
        &self.cur_decay_value
    }

    /// Bytes of device memory the average keeps: one float32 copy of the tracked parameters.
    pub fn state_bytes(&self) -> i64 {
        self.shadow_params
            .iter()
            .map(|s| s.numel() as i64 * 4)
            .sum()
    }

    /// The decay of step `optimization_step` (a float64 device tensor), computed on the device.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn get_decay(&self, optimization_step: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let step = optimization_step
            .f_to_kind(Kind::Double)?
            .f_sub_scalar(c.update_after_step as f64 + 1.0)?
            .f_clamp_min(0.0)?;
        let decay = if c.use_ema_warmup {
            step.f_div(&self.inv_gamma)?
                .f_add_scalar(1.0)?
                .f_pow_tensor_scalar(-c.power)?
                .f_neg()?
                .f_add_scalar(1.0)?
        } else {
            step.f_add_scalar(1.0)?.f_div(&step.f_add_scalar(10.0)?)?
        };
        let decay = decay.f_clamp_max(c.decay)?.f_clamp_min(c.min_decay)?;
        Ok(decay.f_where_self(&step.f_gt(0.0)?, &step.f_zeros_like()?)?)
    }

    /// One step: counts it, takes its decay and moves every shadow parameter toward its parameter.
    /// Nothing is read back to the host.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn step(&mut self) -> Result<()> {
        tch::no_grad(|| self.step_inner(None))
    }

    /// [`step`](Self::step) if `apply` holds, decided on the device: `apply` is a 0-dim bool (or
    /// 0/1 number) on the parameters' device. When it is false the shadow parameters, the step
    /// count and the last decay keep their exact values.
    ///
    /// # Errors
    /// [`Error::StepCondition`] for a condition of another shape or device; libtorch errors.
    pub fn step_if(&mut self, apply: &Tensor) -> Result<()> {
        let apply = check_condition(apply, self.device)?;
        tch::no_grad(|| self.step_inner(Some(&apply)))
    }

    fn step_inner(&mut self, gate: Option<&Tensor>) -> Result<()> {
        let step = self.optimization_step.f_add_scalar(1.0)?;
        let decay = self.get_decay(&step)?;
        // 1 − decay in float64, rounded to float32 where it meets the tensors (PyTorch's
        // `python_float * float32_tensor`).
        let one_minus_decay = decay.f_neg()?.f_add_scalar(1.0)?.f_to_kind(Kind::Float)?;
        if let Some(mut update) = flatten(&self.params)? {
            // s − p as s + (−p) (the same rounding), in place: one transient copy of the weights.
            let _ = update.f_neg_()?;
            let _ = update.f_add_(&self.flat)?;
            let _ = update.f_mul_(&one_minus_decay)?;
            match gate {
                Some(_) => put(&self.flat, &self.flat.f_sub(&update)?, gate)?,
                None => {
                    let _ = self.flat.shallow_clone().f_sub_(&update)?;
                }
            }
        }
        put(&self.optimization_step, &step, gate)?;
        put(&self.cur_decay_value, &decay, gate)
    }

    /// Copies the averaged weights into the tracked parameters (diffusers' `copy_to`).
    ///
    /// # Errors
    /// libtorch errors.
    pub fn copy_to(&self) -> Result<()> {
        tch::no_grad(|| {
            for (s_param, param) in self.shadow_params.iter().zip(&self.params) {
                assign(param, s_param)?;
            }
            Ok(())
        })
    }

    /// Keeps a copy of the tracked parameters' current values (on their device) for
    /// [`restore`](Self::restore) (diffusers' `store`).
    ///
    /// # Errors
    /// libtorch errors.
    pub fn store(&mut self) -> Result<()> {
        let stored = self.params.iter().map(copy_of).collect::<Result<_>>()?;
        self.temp_stored_params = Some(stored);
        Ok(())
    }

    /// Writes the values kept by [`store`](Self::store) back into the tracked parameters and drops
    /// the copy (diffusers' `restore`).
    ///
    /// # Errors
    /// [`Error::EmaNotStored`] when nothing was stored; libtorch errors.
    pub fn restore(&mut self) -> Result<()> {
        let stored = self.temp_stored_params.take().ok_or(Error::EmaNotStored)?;
        tch::no_grad(|| {
            for (c_param, param) in stored.iter().zip(&self.params) {
                assign(param, c_param)?;
            }
            Ok(())
        })
    }

    fn entries(&self) -> Vec<(String, Entry)> {
        let c = &self.config;
        let mut entries = vec![
            (
                "optimization_step".to_string(),
                Entry::State(self.optimization_step.shallow_clone()),
            ),
            ("decay".to_string(), Entry::Setting(c.decay)),
            ("min_decay".to_string(), Entry::Setting(c.min_decay)),
            (
                "update_after_step".to_string(),
                Entry::Setting(c.update_after_step as f64),
            ),
            (
                "use_ema_warmup".to_string(),
                Entry::Setting(f64::from(u8::from(c.use_ema_warmup))),
            ),
            ("inv_gamma".to_string(), Entry::Setting(c.inv_gamma)),
            ("power".to_string(), Entry::Setting(c.power)),
        ];
        for (i, s) in self.shadow_params.iter().enumerate() {
            entries.push((
                format!("shadow_params.{i}"),
                Entry::State(s.shallow_clone()),
            ));
        }
        entries
    }

    /// Writes the state (diffusers' `state_dict`: the step count, the settings and the shadow
    /// parameters) to `path` atomically as safetensors. Reads the device tensors, so it
    /// synchronises.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file; libtorch errors.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_entries(path.as_ref(), &self.entries())
    }

    /// Restores a state written by [`EMAModel::save`] for the same parameters (count, shapes) and
    /// the same settings. Checks every entry before it changes anything.
    ///
    /// # Errors
    /// [`Error::UnreadableStateFile`], or [`Error::StateMismatch`] naming the file and the
    /// entry that does not fit (a missing shadow parameter, another shape, another setting).
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        load_entries(path.as_ref(), &self.entries())
    }
}

/// A new tensor holding `t`'s current values (no autograd history).
fn copy_of(t: &Tensor) -> Result<Tensor> {
    let mut copy = t.f_empty_like()?;
    copy.f_copy_(&t.f_detach()?)?;
    Ok(copy)
}

/// The values of `params` one after the other in a new 1-D tensor (`None` for no parameters).
fn flatten(params: &[Tensor]) -> Result<Option<Tensor>> {
    if params.is_empty() {
        return Ok(None);
    }
    let flat = params
        .iter()
        .map(|p| Ok(p.f_detach()?.f_reshape([-1])?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Tensor::f_cat(&flat, 0)?))
}
