//! Dynamic loss scaling for fp16 training, with `torch.amp.GradScaler`'s semantics, on the device.
//!
//! fp16 has 5 exponent bits: gradients below 2⁻²⁴ flush to zero. A GradScaler multiplies the loss
//! by a large scale before the backward pass, so the gradients land in fp16's range, and divides
//! them by it again before the optimizer step. When the scale was too large the gradients overflow
//! to inf or NaN; that step is skipped and the scale halved. After `growth_interval` steps in a
//! row without an overflow the scale doubles. This follows PyTorch 2.11's
//! `torch/amp/grad_scaler.py` (`GradScaler.scale`, `unscale_`, `update`) and the ATen kernels it
//! calls, which [`GradScaler`] calls too:
//!
//! - [`GradScaler::scale`]: `loss * scale` (the scale a 0-dim fp32 tensor).
//! - [`GradScaler::unscale`]: `inv_scale = scale.double().reciprocal().float()` ("FP32 division
//!   can be imprecise for certain compile options, so we carry out the reciprocal in FP64"), a
//!   fresh `found_inf = 0.0` (fp32), then `torch._amp_foreach_non_finite_check_and_unscale_`:
//!   `found_inf = 1` if any gradient element is not finite, and every element multiplied by
//!   `inv_scale` (left as it is when `inv_scale == 1`).
//! - the optimizer step is skipped when `found_inf` is set: torch's `GradScaler.step` reads it on
//!   the host; here [`GradScaler::finite`] is the device condition for `step_if`.
//! - [`GradScaler::update`]: `torch._amp_update_scale_`: on an overflow `scale *= backoff_factor`
//!   and the growth tracker (int32) resets to 0; otherwise the tracker counts up and, on reaching
//!   `growth_interval`, `scale *= growth_factor` (only if the result is finite) and resets.
//!
//! Nothing is read back to the host, so a step with scaling can be captured in a CUDA graph. The
//! state (scale, growth tracker) is saved and loaded for an exact resume.
//!
//! ```
//! use optim8bit::{GradScaler, GradScalerConfig, Lion, LionConfig, ParamGroup};
//! use tch::{Kind, Tensor};
//!
//! let w = Tensor::ones([4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let mut opt = Lion::new(vec![ParamGroup::new(vec![w.shallow_clone()], 1e-2, 0.0)], LionConfig::default())?;
//! let mut scaler = GradScaler::new(GradScalerConfig::default(), tch::Device::Cpu)?;
//! let loss = (&w * f64::INFINITY).sum(Kind::Float);
//! scaler.scale(&loss)?.backward();
//! scaler.unscale(&[w.shallow_clone()])?;
//! opt.step_if(&scaler.finite()?)?; // skipped: an overflow
//! scaler.update()?;
//! assert_eq!(w.sum(Kind::Float).double_value(&[]), 4.0);
//! assert_eq!(scaler.scale_tensor().double_value(&[]), 32768.0); // 65536 · 0.5
//! # Ok::<(), optim8bit::Error>(())
//! ```

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::common::{Entry, load_entries, save_entries};
use crate::{Error, Result};

/// The scaler's settings; the defaults are torch's (`torch.amp.GradScaler()`), which accelerate
/// uses for `--mixed_precision fp16`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct GradScalerConfig {
    /// The scale before the first step (torch: 2¹⁶).
    pub init_scale: f64,
    /// Factor of the scale after `growth_interval` steps without an overflow (torch: 2).
    pub growth_factor: f64,
    /// Factor of the scale after an overflow (torch: 0.5).
    pub backoff_factor: f64,
    /// Steps without an overflow before the scale grows (torch: 2000).
    pub growth_interval: i64,
}

setters! {
    /// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
    /// from [`Default`] (or a named constructor) by these.
    GradScalerConfig {
        with_init_scale => init_scale: f64,
        with_growth_factor => growth_factor: f64,
        with_backoff_factor => backoff_factor: f64,
        with_growth_interval => growth_interval: i64,
    }
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl GradScalerConfig {
    /// Checks the settings as torch's constructor does (`growth_factor > 1`,
    /// `0 < backoff_factor < 1`, `growth_interval > 0`), and a finite, positive initial scale.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, value: f64, reason: &'static str| {
            Err(Error::InvalidHyperParameter {
                name: name.into(),
                value,
                reason,
            })
        };
        let scale = self.init_scale;
        if !(scale.is_finite() && scale > 0.0 && (scale as f32).is_finite()) {
            return bad("init_scale", scale, "must be finite in float32 and > 0");
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return bad("growth_factor", self.growth_factor, "must be > 1");
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad("backoff_factor", self.backoff_factor, "must be in (0, 1)");
        }
        if self.growth_interval <= 0 || self.growth_interval > i64::from(i32::MAX) {
            return bad(
                "growth_interval",
                self.growth_interval as f64,
                "must be a positive int32",
            );
        }
        Ok(())
    }
}

/// Dynamic loss scaling whose scale, growth tracker and overflow flag are device tensors.
#[derive(Debug)]
pub struct GradScaler {
    config: GradScalerConfig,
    /// The scale, 0-dim float32 (torch's `_scale`).
    scale: Tensor,
    /// Steps without an overflow since the last change, 0-dim int32 (torch's `_growth_tracker`).
    growth_tracker: Tensor,
    /// 1.0 if the last [`GradScaler::unscale`] met a non-finite gradient, 0-dim float32.
    found_inf: Tensor,
}

impl GradScaler {
    /// A scaler at `config.init_scale` with its state on `device`.
    ///
    /// # Errors
    /// Invalid settings ([`GradScalerConfig::validate`]); libtorch errors.
    pub fn new(config: GradScalerConfig, device: Device) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            scale: Tensor::f_full([] as [i64; 0], config.init_scale, (Kind::Float, device))?,
            growth_tracker: Tensor::f_zeros([] as [i64; 0], (Kind::Int, device))?,
            found_inf: Tensor::f_zeros([] as [i64; 0], (Kind::Float, device))?,
        })
    }

    /// The settings.
    pub fn config(&self) -> &GradScalerConfig {
        &self.config
    }

    /// The current scale, the device tensor itself (0-dim float32).
    pub fn scale_tensor(&self) -> &Tensor {
        &self.scale
    }

    /// The growth tracker, the device tensor itself (0-dim int32).
    pub fn growth_tracker(&self) -> &Tensor {
        &self.growth_tracker
    }

    /// 1.0 if the last [`unscale`](Self::unscale) found an inf or NaN, else 0.0 (0-dim float32).
    pub fn found_inf(&self) -> &Tensor {
        &self.found_inf
    }

    /// `loss * scale`, to back-propagate instead of `loss`.
    ///
    /// # Errors
    /// libtorch errors (a loss on another device).
    pub fn scale(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(loss.f_mul(&self.scale.f_to_device(loss.device())?)?)
    }

    /// Divides the gradients of `params` by the scale in place and records in
    /// [`found_inf`](Self::found_inf) whether any of them holds an inf or NaN (they keep it).
    /// Parameters without a gradient are ignored. Call it once per optimizer step, after the last
    /// backward pass and before clipping.
    ///
    /// # Errors
    /// [`Error::UnsupportedParameter`] for an fp16 gradient (as torch's `unscale_`, which refuses
    /// to unscale fp16 gradients: the masters must be fp32) or one on another device than the
    /// scale; libtorch errors.
    pub fn unscale(&mut self, params: &[Tensor]) -> Result<()> {
        tch::no_grad(|| {
            let grads: Vec<(usize, Tensor)> = params
                .iter()
                .map(Tensor::grad)
                .enumerate()
                .filter(|(_, g)| g.defined())
                .collect();
            for (index, grad) in &grads {
                let reason = if grad.kind() == Kind::Half {
                    Some(
                        "an fp16 gradient cannot be unscaled; keep the trained weights fp32".into(),
                    )
                } else if grad.device() != self.scale.device() {
                    Some(format!(
                        "gradient on {:?}, the scale on {:?}",
                        grad.device(),
                        self.scale.device()
                    ))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Err(Error::UnsupportedParameter {
                        group: 0,
                        index: *index,
                        reason,
                    });
                }
            }
            let inv_scale = self
                .scale
                .f_to_kind(Kind::Double)?
                .f_reciprocal()?
                .f_to_kind(Kind::Float)?;
            let _ = self.found_inf.f_zero_()?;
            for (_, grad) in grads {
                let mut grad = grad;
                grad.f_internal_amp_non_finite_check_and_unscale(&mut self.found_inf, &inv_scale)?;
            }
            Ok(())
        })
    }

    /// Whether the last unscaled gradients were all finite: the condition for the optimizer's
    /// `step_if` (0-dim bool on the device).
    ///
    /// # Errors
    /// libtorch errors.
    pub fn finite(&self) -> Result<Tensor> {
        Ok(self.found_inf.f_eq(0.0)?)
    }

    /// Updates the scale from the last [`unscale`](Self::unscale)'s
    /// [`found_inf`](Self::found_inf) (torch's `_amp_update_scale_`).
    ///
    /// # Errors
    /// libtorch errors.
    pub fn update(&mut self) -> Result<()> {
        let c = self.config;
        let _ = self.scale.f_internal_amp_update_scale_(
            &self.growth_tracker,
            &self.found_inf,
            c.growth_factor,
            c.backoff_factor,
            c.growth_interval,
        )?;
        Ok(())
    }

    fn entries(&self) -> Vec<(String, Entry)> {
        let c = self.config;
        let state = |t: &Tensor| Entry::State(t.shallow_clone());
        vec![
            ("scale".into(), state(&self.scale)),
            ("growth_tracker".into(), state(&self.growth_tracker)),
            ("init_scale".into(), Entry::Setting(c.init_scale)),
            ("growth_factor".into(), Entry::Setting(c.growth_factor)),
            ("backoff_factor".into(), Entry::Setting(c.backoff_factor)),
            (
                "growth_interval".into(),
                Entry::Setting(c.growth_interval as f64),
            ),
        ]
    }

    /// Writes the scale, the growth tracker and the settings as safetensors (via a temporary
    /// file renamed into place).
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_entries(path.as_ref(), &self.entries())
    }

    /// Restores the scale and growth tracker written by [`save`](Self::save), bit for bit. The
    /// file's settings must equal this scaler's; nothing changes unless the whole file fits.
    ///
    /// # Errors
    /// [`Error::UnreadableStateFile`], [`Error::StateMismatch`] naming the file and key.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        load_entries(path.as_ref(), &self.entries())
    }
}
