//! The run's random generator: every draw of a run — the LoRA's initial values, the posterior
//! samples, noise and timesteps of each micro-step, the adapters' dropout masks — comes from one
//! generator of the run's own on its device ([`torch_cuda::rng::Generator`]), re-seeded from
//! `(seed, micro-step)` before each micro-step. Another trainer or pipeline in the same process
//! (another thread) therefore cannot move a run's draws, and a run draws exactly what it drew when
//! it used libtorch's default generator seeded alike (the same kernels, the same streams).
//!
//! A build of `torch-cuda` without CUDA's headers has no CUDA generators of its own: on such a
//! build a CUDA run draws from the device's default generator, as PyTorch scripts do (said once in
//! the log); its draws are then the same, but not independent of other users of that generator.

use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};
use torch_cuda::rng::Generator;

use crate::{Error, Result};

/// The run's generator (see the module documentation).
#[derive(Debug)]
pub(crate) struct RunRng {
    /// `None`: the device's default generator (a build without the generator shim for the device).
    own: Option<Arc<Generator>>,
    device: Device,
    /// The first failure of a dropout draw (inside a layer's forward, which cannot return it), for
    /// [`RunRng::check`] to report after the micro-step.
    failure: Mutex<Option<String>>,
}

impl RunRng {
    /// A generator on `device` seeded with `seed`.
    pub(crate) fn new(device: Device, seed: u64) -> Result<Self> {
        if !torch_cuda::rng::available(device) {
            crate::logs::say(format!(
                "note: this build has no random generator of its own for {device:?}; the run draws \
                 from libtorch's default generator"
            ));
            tch::manual_seed(seed as i64);
            return Ok(Self {
                own: None,
                device,
                failure: Mutex::new(None),
            });
        }
        let own = Generator::on(device, seed).map_err(Error::Random)?;
        Ok(Self {
            own: Some(Arc::new(own)),
            device,
            failure: Mutex::new(None),
        })
    }

    /// Fails with the first dropout draw that failed since the last check (the adapters' dropout
    /// runs inside layers' forwards, which cannot return an error).
    pub(crate) fn check(&self) -> Result<()> {
        let failure = self.failure.lock().ok().and_then(|mut slot| slot.take());
        match failure {
            Some(message) => Err(Error::Random(torch_cuda::Error::Rng(message))),
            None => Ok(()),
        }
    }

    /// The generator, for CUDA graphs to register and for gradient checkpointing to replay (`None`
    /// when the run draws from the default generator).
    pub(crate) fn generator(&self) -> Option<&Arc<Generator>> {
        self.own.as_ref()
    }

    /// Starts the stream again from `seed` (before each micro-step, outside any capture).
    pub(crate) fn seed(&self, seed: u64) -> Result<()> {
        match &self.own {
            Some(own) => own.manual_seed(seed).map_err(Error::Random),
            None => {
                tch::manual_seed(seed as i64);
                Ok(())
            }
        }
    }

    /// `torch.randn(shape, dtype=kind, device=…)`.
    pub(crate) fn randn(&self, shape: &[i64], kind: Kind) -> Result<Tensor> {
        match &self.own {
            Some(own) => own.randn_on_device(shape, kind).map_err(Error::Random),
            None => Ok(Tensor::f_randn(shape, (kind, self.device))?),
        }
    }

    /// `torch.randn_like(like)` (`like` on the run's device).
    pub(crate) fn randn_like(&self, like: &Tensor) -> Result<Tensor> {
        self.randn(&like.size(), like.kind())
    }

    /// `torch.randint(high, shape)`, int64 on the run's device.
    pub(crate) fn randint(&self, high: i64, shape: &[i64]) -> Result<Tensor> {
        match &self.own {
            Some(own) => own.randint(high, shape).map_err(Error::Random),
            None => Ok(Tensor::f_randint(high, shape, (Kind::Int64, self.device))?),
        }
    }
}

impl lora::Randomness for RunRng {
    fn uniform(
        &self,
        shape: &[i64],
        lo: f64,
        hi: f64,
        kind: Kind,
        device: Device,
    ) -> lora::Result<Tensor> {
        match &self.own {
            Some(own) if device == own.device() => own
                .uniform(shape, lo, hi, kind)
                .map_err(|e| lora::Error::Randomness(e.to_string())),
            _ => lora::DefaultGenerator.uniform(shape, lo, hi, kind, device),
        }
    }

    fn randn(&self, shape: &[i64], kind: Kind, device: Device) -> lora::Result<Tensor> {
        match &self.own {
            Some(own) if device == own.device() => own
                .randn_on_device(shape, kind)
                .map_err(|e| lora::Error::Randomness(e.to_string())),
            _ => lora::DefaultGenerator.randn(shape, kind, device),
        }
    }

    fn dropout(&self, xs: &Tensor, p: f64) -> Tensor {
        match &self.own {
            Some(own) => own.dropout(xs, p).unwrap_or_else(|e| {
                // Not expected (the probability was checked with its flag, the adapters live on the
                // run's device): kept for `check`, which fails the micro-step; the forward goes on
                // with the default generator's mask meanwhile.
                if let Ok(mut slot) = self.failure.lock() {
                    slot.get_or_insert_with(|| format!("adapter dropout: {e}"));
                }
                xs.dropout(p, true)
            }),
            None => xs.dropout(p, true),
        }
    }
}
