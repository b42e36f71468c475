//! Where adapters draw their random numbers: the down-projections' initial values at injection and
//! the dropout masks while training.
//!
//! By default both come from libtorch's process-wide generators ([`DefaultGenerator`], what
//! `tch::manual_seed` seeds), as peft's do from PyTorch's. A program that runs several models at once
//! (two trainers in one process) gives each its own [`Randomness`] — [`crate::inject_with`] for the
//! initial values, [`crate::set_randomness`] for dropout — so that one's draws do not move the
//! other's.

use std::fmt::Debug;

use tch::{Device, Kind, Tensor};

use crate::Result;

/// A source of the random numbers adapters draw.
pub trait Randomness: Send + Sync + Debug {
    /// `tch::Tensor::zeros(shape, (kind, device)).uniform_(lo, hi)`: values uniform in `[lo, hi)`
    /// (tch's `nn::Init::Uniform`).
    ///
    /// # Errors
    /// The source's errors (e.g. a device it does not draw for).
    fn uniform(
        &self,
        shape: &[i64],
        lo: f64,
        hi: f64,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor>;

    /// `tch::Tensor::randn(shape, (kind, device))`: standard normal values.
    ///
    /// # Errors
    /// The source's errors.
    fn randn(&self, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor>;

    /// `xs.dropout(p, true)` (`0 < p < 1`): each value zeroed with probability `p`, the others scaled
    /// by `1 / (1 - p)`, differentiable. Called inside a layer's forward, which cannot fail: a source
    /// that cannot draw for `xs`'s device panics with its reason.
    fn dropout(&self, xs: &Tensor, p: f64) -> Tensor;
}

/// libtorch's process-wide default generator of each device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DefaultGenerator;

impl Randomness for DefaultGenerator {
    fn uniform(
        &self,
        shape: &[i64],
        lo: f64,
        hi: f64,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor> {
        Ok(Tensor::f_zeros(shape, (kind, device))?.f_uniform_(lo, hi)?)
    }

    fn randn(&self, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        Ok(Tensor::f_randn(shape, (kind, device))?)
    }

    fn dropout(&self, xs: &Tensor, p: f64) -> Tensor {
        xs.dropout(p, true)
    }
}
