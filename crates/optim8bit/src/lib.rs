//! AdamW and Lion with 8-bit block-quantized states, as bitsandbytes defines them, and with fp32
//! states; Prodigy and Adafactor.
//!
//! [`AdamW`] with [`AdamWConfig::eight_bit`] reproduces bitsandbytes 0.50's `AdamW8bit` (the
//! CUDA kernel's arithmetic, in vectorised tensor operations that run on the CPU and on CUDA);
//! [`AdamWConfig::fp32`] keeps fp32 moments behind the same interface. [`quantize`] holds the
//! dynamic 8-bit data type, and [`AdamW::save`] / [`AdamW::load`] write and read the complete
//! state as safetensors for an exact resume.
//!
//! [`EMAModel`] keeps diffusers' exponential moving average of parameters (its decay schedule,
//! on the device).
//!
//! [`Lion`] (lion-pytorch 0.2.5; with [`LionConfig::eight_bit`] bitsandbytes 0.50's `Lion8bit`, its
//! momentum block-quantized as AdamW8bit's moments), [`Prodigy`] (prodigyopt 1.1.2) and
//! [`Adafactor`] (transformers 5.17.0) reproduce the optimizers LoRA trainers often pick instead,
//! with the same interface:
//! [`ParamGroup`]s, `step`/`step_if` that only enqueue device work (learning rates, step counts
//! and Prodigy's `d` are device tensors), `save`/`load` of the complete state. Their modules
//! give each update rule and how it follows its reference. [`Optimizer`] holds any of them behind
//! one type, built from an [`OptimizerConfig`].
//!
//! [`GradScaler`] is fp16 training's dynamic loss scaling (`torch.amp.GradScaler`), its skip
//! decision a device tensor for `step_if`.
//!
//! ```
//! use optim8bit::{Prodigy, ProdigyConfig, ParamGroup};
//! use tch::{Kind, Tensor};
//!
//! let w = Tensor::ones([8, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let mut opt = Prodigy::new(vec![ParamGroup::new(vec![w.shallow_clone()], 1.0, 0.0)], ProdigyConfig::default())?;
//! for _ in 0..3 {
//!     let loss = (&w - 3.0).square().mean(None);
//!     loss.backward();
//!     opt.step()?;
//!     opt.zero_grad()?;
//! }
//! assert!(opt.d().double_value(&[]) > 1e-6); // the estimate grew from d0
//! # Ok::<(), optim8bit::Error>(())
//! ```
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
//!
//! ```
//! use optim8bit::{Lion, LionConfig, ParamGroup};
//! use tch::{Kind, Tensor};
//!
//! // 8-bit momentum from 4096 elements (bitsandbytes' min_8bit_size), fp32 below.
//! let w = Tensor::zeros([64, 128], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let b = Tensor::zeros([128], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let groups = vec![ParamGroup::new(vec![w.shallow_clone(), b.shallow_clone()], 1e-4, 1e-2)];
//! let mut opt = Lion::new(groups, LionConfig::eight_bit())?;
//! assert_eq!(opt.state_bytes(), 64 * 128 + 32 * 4 + 128 * 4); // codes + absmax, fp32
//! let loss = (&w - 1.0).square().mean(None) + (&b - 1.0).square().mean(None);
//! loss.backward();
//! opt.step()?;
//! assert!((w.mean(None).double_value(&[]) - 1e-4).abs() < 1e-9); // moved by lr·sign(g)
//! # Ok::<(), optim8bit::Error>(())
//! ```
//!
//! # Skipping a step on the device
//!
//! A training step whose loss or gradients are NaN or infinite must not reach the weights, but
//! asking "is it finite?" on the host waits for the device and cannot sit inside a captured CUDA
//! graph. So the decision stays a tensor: [`clip_grad_norm`] returns the gradients' global norm
//! on the device (non-finite if any gradient is), and [`AdamW::step_if`] applies the step only
//! where that tensor says so, leaving parameters, states and the step count bit-identical
//! otherwise. The host reads the outcome later, when it reads the loss for logging anyway.
//!
//! ```
//! use optim8bit::{AdamW, AdamWConfig, ParamGroup, clip_grad_norm};
//! use tch::{Kind, Tensor};
//!
//! let w = Tensor::ones([300], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let mut opt = AdamW::new(vec![ParamGroup::new(vec![w.shallow_clone()], 1e-3, 0.0)], AdamWConfig::fp32())?;
//! let loss = (&w * f64::NAN).sum(Kind::Float);
//! loss.backward();
//! let norm = clip_grad_norm(&[w.shallow_clone()], 1.0)?;
//! opt.step_if(&loss.isfinite().logical_and(&norm.isfinite()))?;
//! assert_eq!(w.sum(Kind::Float).double_value(&[]), 300.0); // skipped: nothing moved
//! assert_eq!(opt.step_count().double_value(&[]), 0.0);
//! # Ok::<(), optim8bit::Error>(())
//! ```

#![warn(missing_docs)]

/// Builder-style `with_<field>` setters for a `#[non_exhaustive]` configuration struct, one per
/// `setter => field: Type` line, each documented as "Sets [`Struct::field`]." (the field's own
/// documentation says what it means).
macro_rules! setters {
    ($(#[$meta:meta])* $ty:ident { $($setter:ident => $field:ident: $t:ty),* $(,)? }) => {
        $(#[$meta])*
        impl $ty {
            $(
                #[doc = concat!(
                    "Sets [`", stringify!($ty), "::", stringify!($field), "`](field@",
                    stringify!($ty), "::", stringify!($field), ")."
                )]
                #[must_use]
                pub fn $setter(mut self, $field: $t) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

pub mod adafactor;
mod adamw;
mod clip;
mod common;
pub mod ema;
mod error;
pub mod lion;
mod optimizer;
pub mod prodigy;
pub mod quantize;
pub mod scaler;
mod state_file;

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig, ParamGroup, StatePrecision};
pub use clip::clip_grad_norm;
pub use ema::{EMAConfig, EMAModel};
pub use error::{Error, Result};
pub use lion::{Lion, LionConfig};
pub use optimizer::{Optimizer, OptimizerConfig};
pub use prodigy::{Prodigy, ProdigyConfig};
pub use scaler::{GradScaler, GradScalerConfig};
