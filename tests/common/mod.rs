//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use tch::Tensor;

/// The fixtures folder: `SDXL_FIXTURES` when set (the GPU harness runs binaries away from the
/// checkout they were built in), else `tests/fixtures` of this checkout.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("SDXL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

/// The path of a fixture (file or folder), which must exist: a missing one fails the test naming it.
pub fn fixture(name: impl AsRef<Path>) -> PathBuf {
    let path = fixtures_dir().join(name);
    assert!(
        path.exists(),
        "missing fixture {}: regenerate it with tools/fixtures/regenerate.sh \
         (tools/fixtures/README.md says which generator writes it)",
        path.display()
    );
    path
}

/// `max |a - b| / max |b|`, computed in f64: the error measure used against golden outputs.
pub fn max_rel_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shape mismatch");
    let a = actual
        .to_kind(tch::Kind::Double)
        .to_device(tch::Device::Cpu);
    let e = expected
        .to_kind(tch::Kind::Double)
        .to_device(tch::Device::Cpu);
    let diff = (&a - &e).abs().max().double_value(&[]);
    let scale = e.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
    diff / scale
}
