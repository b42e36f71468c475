//! Helpers shared by the integration tests.

#![allow(dead_code, unused_imports)] // each test binary uses some of the helpers

pub use test_support::{fixture, fixtures_dir, max_rel_error};

/// The SDXL models' depths for the numeric bounds, shared with sdxl-model's tests.
#[path = "../../crates/sdxl-model/tests/common/depth.rs"]
pub mod sdxl_depth;

pub mod tiny_lora;
