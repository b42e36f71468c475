//! Helpers shared by this crate's integration tests (each test binary uses some of them).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};

/// The fixtures folder: `SDXL_FIXTURES` when set (the GPU harness runs binaries away from the
/// checkout they were built in), else the repository's `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    std::env::var_os("SDXL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

/// The path of a fixture (file or folder), which must exist: a missing one fails the test naming it.
pub fn fixture(name: impl AsRef<Path>) -> PathBuf {
    let path = fixtures().join(name);
    assert!(
        path.exists(),
        "missing fixture {}: regenerate it with tools/fixtures/regenerate.sh \
         (tools/fixtures/README.md says which generator writes it)",
        path.display()
    );
    path
}

/// A golden-output file of the fixtures folder.
pub fn golden(name: &str) -> TensorFile {
    TensorFile::open(fixture(name)).unwrap()
}

/// One tensor of a golden file, on the CPU in its stored kind.
pub fn get(file: &TensorFile, key: &str) -> Tensor {
    file.tensor(key, Device::Cpu, None).unwrap()
}

/// `max |a − b| / max |b|` in f64: the error measure used against golden outputs.
pub fn rel(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size());
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let scale = e.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
    (&a - &e).abs().max().double_value(&[]) / scale
}
