//! AdamW with 8-bit block-quantized states, as bitsandbytes defines it, and with fp32 states.
//!
//! This crate will hold both optimizers and the save/load of their state.

#![warn(missing_docs)]

mod error;

pub use error::{Error, Result};
