//! One type for "the optimizer", whichever of the crate's optimizers it is: [`OptimizerConfig`]
//! names an optimizer and its settings, [`Optimizer`] holds the built one and forwards every
//! method a training loop needs, so the loop has no per-optimizer branches beyond choosing the
//! config.
//!
//! ```
//! use optim8bit::{Optimizer, OptimizerConfig, LionConfig, ParamGroup};
//! use tch::{Kind, Tensor};
//!
//! let w = Tensor::ones([16, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let config = OptimizerConfig::Lion(LionConfig::default());
//! assert_eq!(config.state_bytes(&[16, 8]), 4 * 16 * 8);
//! let mut opt = config.build(vec![ParamGroup::new(vec![w.shallow_clone()], 1e-3, 0.0)])?;
//! (&w * 2.0).sum(Kind::Float).backward();
//! opt.step()?;
//! opt.zero_grad()?;
//! assert_eq!(opt.state_bytes(), 4 * 16 * 8);
//! assert_eq!(opt.step_count().double_value(&[]), 1.0);
//! # Ok::<(), optim8bit::Error>(())
//! ```

use std::path::Path;

use tch::{Device, Tensor};

use crate::{
    Adafactor, AdafactorConfig, AdamW, AdamWConfig, Lion, LionConfig, ParamGroup, Prodigy,
    ProdigyConfig, Result,
};

/// An optimizer of this crate and its settings, before it is built over parameters.
/// `#[non_exhaustive]`: a new optimizer is a new variant.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum OptimizerConfig {
    /// [`AdamW`], with 8-bit or fp32 states.
    AdamW(AdamWConfig),
    /// [`Lion`].
    Lion(LionConfig),
    /// [`Prodigy`].
    Prodigy(ProdigyConfig),
    /// [`Adafactor`].
    Adafactor(AdafactorConfig),
}

impl OptimizerConfig {
    /// The optimizer over `groups`.
    ///
    /// # Errors
    /// The optimizer's own checks of its settings and parameters.
    pub fn build(self, groups: Vec<ParamGroup>) -> Result<Optimizer> {
        Ok(match self {
            Self::AdamW(c) => Optimizer::AdamW(AdamW::new(groups, c)?),
            Self::Lion(c) => Optimizer::Lion(Lion::new(groups, c)?),
            Self::Prodigy(c) => Optimizer::Prodigy(Prodigy::new(groups, c)?),
            Self::Adafactor(c) => Optimizer::Adafactor(Adafactor::new(groups, c)?),
        })
    }

    /// Bytes of per-parameter state the built optimizer keeps for a parameter of `shape`
    /// (what its `state_bytes` counts), computed without allocating anything.
    pub fn state_bytes(&self, shape: &[i64]) -> i64 {
        match self {
            Self::AdamW(c) => c.state_bytes(shape),
            Self::Lion(c) => c.state_bytes(shape),
            Self::Prodigy(c) => c.state_bytes(shape),
            Self::Adafactor(c) => c.state_bytes(shape),
        }
    }
}

/// A built optimizer of this crate. Every method forwards to the optimizer's own.
/// `#[non_exhaustive]`, as [`OptimizerConfig`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Optimizer {
    /// [`AdamW`], with 8-bit or fp32 states.
    AdamW(AdamW),
    /// [`Lion`].
    Lion(Lion),
    /// [`Prodigy`].
    Prodigy(Prodigy),
    /// [`Adafactor`].
    Adafactor(Adafactor),
}

/// `$body` with `$o` bound to the optimizer inside `$self`, whichever it is.
macro_rules! each {
    ($self:expr, $o:ident => $body:expr) => {
        match $self {
            Optimizer::AdamW($o) => $body,
            Optimizer::Lion($o) => $body,
            Optimizer::Prodigy($o) => $body,
            Optimizer::Adafactor($o) => $body,
        }
    };
}

impl Optimizer {
    /// The settings it was built with.
    pub fn config(&self) -> OptimizerConfig {
        match self {
            Self::AdamW(o) => OptimizerConfig::AdamW(*o.config()),
            Self::Lion(o) => OptimizerConfig::Lion(*o.config()),
            Self::Prodigy(o) => OptimizerConfig::Prodigy(*o.config()),
            Self::Adafactor(o) => OptimizerConfig::Adafactor(*o.config()),
        }
    }

    /// The device the parameters and states live on.
    pub fn device(&self) -> Device {
        each!(self, o => o.device())
    }

    /// Number of parameter groups.
    pub fn group_count(&self) -> usize {
        each!(self, o => o.group_count())
    }

    /// The learning rate of a group.
    ///
    /// # Errors
    /// [`Error::NoSuchGroup`](crate::Error::NoSuchGroup).
    pub fn learning_rate(&self, group: usize) -> Result<f64> {
        each!(self, o => o.learning_rate(group))
    }

    /// Sets a group's learning rate: writes the device tensor the step reads (between steps,
    /// outside a captured graph; a replayed graph then uses the new value).
    ///
    /// # Errors
    /// A missing group or an invalid rate (and Prodigy's rule that groups share one rate or 0).
    pub fn set_learning_rate(&mut self, group: usize, lr: f64) -> Result<()> {
        each!(self, o => o.set_learning_rate(group, lr))
    }

    /// Steps taken, as the device tensor the step updates (0-dim float64).
    pub fn step_count(&self) -> &Tensor {
        each!(self, o => o.step_count())
    }

    /// Number of parameter elements the optimizer updates.
    pub fn param_count(&self) -> i64 {
        each!(self, o => o.param_count())
    }

    /// Bytes held by the per-parameter states.
    pub fn state_bytes(&self) -> i64 {
        each!(self, o => o.state_bytes())
    }

    /// Sets every parameter's gradient to zero.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn zero_grad(&mut self) -> Result<()> {
        each!(self, o => o.zero_grad())
    }

    /// One step over every parameter that has a gradient; nothing is read back to the host.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn step(&mut self) -> Result<()> {
        each!(self, o => o.step())
    }

    /// The step if the 0-dim device tensor `apply` holds, decided on the device (capturable);
    /// otherwise parameters, states and the step count keep their exact values.
    ///
    /// # Errors
    /// [`Error::StepCondition`](crate::Error::StepCondition) for a condition that is not a
    /// 0-dim real tensor on the optimizer's device; libtorch errors.
    pub fn step_if(&mut self, apply: &Tensor) -> Result<()> {
        each!(self, o => o.step_if(apply))
    }

    /// Writes the complete state to `path` atomically as safetensors (synchronises).
    ///
    /// # Errors
    /// I/O and libtorch errors.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        each!(self, o => o.save(path))
    }

    /// Restores a state written by [`Optimizer::save`] of the same optimizer over the same
    /// parameters and settings; nothing changes if a check fails.
    ///
    /// # Errors
    /// An unreadable file, or one whose keys, shapes or settings differ, naming the key.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        each!(self, o => o.load(path))
    }
}

macro_rules! from_each {
    ($($variant:ident),*) => {
        $(impl From<$variant> for Optimizer {
            fn from(optimizer: $variant) -> Self {
                Self::$variant(optimizer)
            }
        })*
    };
}
from_each!(AdamW, Lion, Prodigy, Adafactor);
