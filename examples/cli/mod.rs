//! The command line every example shares, the same as `sdxl-lora`'s (`src/cli/mod.rs`): `--help` on
//! stdout with exit 0, a usage error on one line with exit 2, an error while running on one line with
//! exit 1, never a backtrace.

// Each example includes this module and uses the part it needs.
#![allow(dead_code, unused_imports)]

pub use sdxl_lora::cli::{Precision, UsageError, finish, run};
