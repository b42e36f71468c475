//! LoRA and DoRA adapters for libtorch linear layers.
//!
//! Present today: [`Linear`], the linear layer every model of the workspace uses, and
//! [`HasLinears`], through which models expose their linear layers by module path.
//!
//! This crate will also hold the adapters themselves, injection by module-path patterns,
//! merge and unmerge, and the LoRA file formats of diffusers, peft and kohya. It knows nothing of
//! SDXL: block renaming tables are supplied by the caller.

#![warn(missing_docs)]

mod error;
mod linear;

pub use error::{Error, Result};
pub use linear::{HasLinears, Linear};
