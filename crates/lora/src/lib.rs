//! LoRA and DoRA adapters for libtorch linear layers.
//!
//! This crate will hold a linear layer that can carry adapters, injection by module-path patterns,
//! merge and unmerge, and the LoRA file formats of diffusers, peft and kohya. It knows nothing of
//! SDXL: block renaming tables are supplied by the caller.

#![warn(missing_docs)]

mod error;

pub use error::{Error, Result};
