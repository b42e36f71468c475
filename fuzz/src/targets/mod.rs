//! The fuzz targets of issue 24 (deliverable 7): every parser of ours that takes a user's bytes or
//! text, reached through the library's own entry points. A target turns one input into the file(s)
//! the entry point reads (in its work folder), calls it and formats the error, if any; it must never
//! panic, abort, hang or run out of memory, whatever the input.
//!
//! The same bodies run under AFL (`fuzz/src/bin/fuzz_target.rs`, persistent mode: the model and
//! trainer a target needs are loaded once per process) and in the plain replay test
//! `tests/fuzz_replay.rs`, which runs every committed corpus file (`fuzz/corpus/<target>/`) through
//! its target. Inputs whose name starts with `ok-` must be accepted (valid files: they show the
//! target reaches past the parser).

use std::path::{Path, PathBuf};

mod checkpoint;
mod configs;
mod datasets;
mod lora_file;
mod prompt;

/// What a target made of one input: `Ok` when the entry point accepted it, else its error message.
pub type Outcome = Result<(), String>;

/// A target ready to run inputs (its fixed state, e.g. a loaded model, is built once).
pub type Runner = Box<dyn FnMut(&[u8]) -> Outcome>;

/// Every target's name, as the corpus folders and `tools/fuzz/run.sh` spell them.
pub const NAMES: [&str; 9] = [
    "prompt",
    "model_config",
    "train_config",
    "kohya_dataset",
    "metadata_jsonl",
    "image",
    "parquet",
    "lora_file",
    "checkpoint",
];

/// Builds target `name`. `repo` is the repository root (for `tests/fixtures`); `work` an empty
/// folder the target owns (the files it writes from each input live there).
///
/// # Errors
/// An unknown name, or a fixture that cannot be loaded.
pub fn runner(name: &str, repo: &Path, work: &Path) -> Result<Runner, String> {
    let fixtures = repo.join("tests/fixtures");
    std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    Ok(match name {
        "prompt" => prompt::runner()?,
        "model_config" => configs::model_config(work),
        "train_config" => configs::train_config(work),
        "kohya_dataset" => configs::kohya_dataset(work),
        "metadata_jsonl" => datasets::metadata_jsonl(&fixtures, work),
        "image" => datasets::image(work),
        "parquet" => datasets::parquet(work),
        "lora_file" => lora_file::runner(&fixtures, work)?,
        "checkpoint" => checkpoint::runner(&fixtures, work)?,
        other => return Err(format!("no fuzz target {other:?}; the targets: {NAMES:?}")),
    })
}

/// Writes `bytes` to `dir/name` (replacing it), returning the path.
fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, String> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Empties folder `dir` (creating it when missing).
fn fresh(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

/// The error of a library call as text (formatting it is part of what is fuzzed).
fn text(error: impl std::fmt::Display) -> String {
    let text = error.to_string();
    if text.trim().is_empty() {
        defect("an error with an empty message (it names no culprit)");
    }
    text
}

/// A broken promise of the library (fuzzing reports the panic as a crash; under AFL the panic
/// hook aborts).
#[allow(clippy::panic)] // reporting a defect is the point
fn defect(what: &str) -> ! {
    panic!("fuzz target: {what}")
}

/// Splits an input into at most `n` parts at the separator line `\n--8<--\n` (the multi-file
/// targets' input format: one part per file, in a fixed order).
fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    const SEPARATOR: &[u8] = b"\n--8<--\n";
    let mut parts = Vec::with_capacity(n);
    let mut rest = data;
    while parts.len() + 1 < n {
        match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(at) => {
                parts.push(&rest[..at]);
                rest = &rest[at + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}
