//! Helpers shared by the integration tests.

#![allow(dead_code, unused_imports)] // each test binary uses some of the helpers

pub use test_support::{fixture, fixtures_dir, max_rel_error};

/// The SDXL models' depths for the numeric bounds, shared with sdxl-model's tests.
#[path = "../../crates/sdxl-model/tests/common/depth.rs"]
pub mod sdxl_depth;

pub mod tiny_lora;

/// The path of example `name` that `cargo test` builds beside the test binaries
/// (`target/<profile>/examples/<name>`); run `cargo build --examples` first when running a test
/// alone.
pub fn example_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lies in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: `cargo test` builds the examples; alone, run `cargo build --examples` first",
        path.display()
    );
    path
}
