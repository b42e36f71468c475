//! AdamW with 8-bit block-quantized states, as bitsandbytes defines it, and with fp32 states.
//!
//! [`AdamW`] with [`AdamWConfig::eight_bit`] reproduces bitsandbytes 0.50's `AdamW8bit` (the
//! CUDA kernel's arithmetic, in vectorised tensor operations that run on the CPU and on CUDA);
//! [`AdamWConfig::fp32`] keeps fp32 moments behind the same interface. [`quantize`] holds the
//! dynamic 8-bit data type, and [`AdamW::save`] / [`AdamW::load`] write and read the complete
//! state as safetensors for an exact resume.
//!
//! ```
//! use optim8bit::{AdamW, AdamWConfig, ParamGroup};
//! use tch::{Kind, Tensor};
//!
//! let w = Tensor::zeros([64, 128], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let mut opt = AdamW::new(vec![ParamGroup::new(vec![w.shallow_clone()], 1e-3, 1e-2)], AdamWConfig::eight_bit())?;
//! let loss = (&w - 1.0).square().mean(None);
//! loss.backward();
//! opt.step()?;
//! opt.zero_grad()?;
//! assert!(w.mean(None).double_value(&[]) > 0.0);
//! # Ok::<(), optim8bit::Error>(())
//! ```

#![warn(missing_docs)]

mod adamw;
mod error;
pub mod quantize;
mod state_file;

pub use adamw::{AdamW, AdamWConfig, ParamGroup, StatePrecision};
pub use error::{Error, Result};
