//! The AFL entry point of every fuzz target: `fuzz_target NAME` (built by `cargo afl build`, run by
//! `tools/fuzz/run.sh NAME SECONDS`). The target's fixed state (a model, a trainer) is built once,
//! before AFL's fork server starts (deferred and persistent mode, `afl::fuzz!`), so executions are
//! the parsing alone. `SDXL_LORA_FUZZ_WORK` names the work folder (default: a folder of the
//! target's under the temporary folder).

#[path = "../targets/mod.rs"]
mod targets;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = std::env::var_os("SDXL_LORA_FUZZ_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("sdxl-lora-fuzz-{name}")));
    // One thread: AFL's forked children must not depend on a pool started in the parent.
    tch::set_num_threads(1);
    tch::set_num_interop_threads(1);
    let run = match targets::runner(&name, &repo, &work) {
        Ok(run) => run,
        Err(e) => {
            eprintln!("error: fuzz target {name:?}: {e}");
            std::process::exit(2);
        }
    };
    // The target is unwind safe as far as AFL cares: a panic aborts the process.
    let mut run = AssertUnwindSafe(run);
    let hook = std::sync::Once::new();
    afl::fuzz!(|data: &[u8]| {
        hook.call_once(let_caught_panics_unwind);
        let _ = call(&mut run, data);
    });
}

/// Source folders of crates whose panics the library catches by design (`catch_unwind` around the
/// calls, the panic becoming an error naming the file): the `parquet` reader's (`data::parquet`;
/// docs/RELIABILITY.md, "What fuzzing found"). The replay test runs their crashing inputs
/// (`fuzz/corpus/parquet/crash-reader-panic-*`) and sees the errors.
const CAUGHT_BY_DESIGN: &[&str] = &["/parquet-"];

/// Module paths of those crates, for panics raised in a crate they call (e.g. `bytes`, under the
/// `parquet` crate's decoders): the stack then holds one of their frames.
const CAUGHT_BY_DESIGN_FRAMES: &[&str] = &["parquet::"];

/// AFL's panic hook (installed by `afl::fuzz!`) aborts at the panic, before any `catch_unwind` can
/// catch it. Wrapped by this hook, a panic raised in a crate of [`CAUGHT_BY_DESIGN`], or in a crate
/// it called ([`CAUGHT_BY_DESIGN_FRAMES`] on the stack), unwinds instead; every other panic still
/// aborts at once, and one that unwinds out of the target still aborts (`afl::fuzz!` aborts when
/// the input's call panicked), so no panic the library lets through is lost.
fn let_caught_panics_unwind() {
    let afl_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let raised_there = info
            .location()
            .is_some_and(|at| CAUGHT_BY_DESIGN.iter().any(|dir| at.file().contains(dir)));
        if !raised_there && !called_from_there() {
            afl_hook(info);
        }
    }));
}

/// Whether the stack holds a frame of a crate of [`CAUGHT_BY_DESIGN_FRAMES`] (symbols resolved from
/// the fuzz build's debug information; only on a panic).
fn called_from_there() -> bool {
    let trace = std::backtrace::Backtrace::force_capture().to_string();
    trace.lines().any(|line| {
        line.trim_start()
            .split_once(": ")
            .is_some_and(|(_, symbol)| {
                let symbol = symbol.trim_start_matches('<');
                CAUGHT_BY_DESIGN_FRAMES
                    .iter()
                    .any(|prefix| symbol.starts_with(prefix))
            })
    })
}

fn call(run: &mut AssertUnwindSafe<targets::Runner>, data: &[u8]) -> targets::Outcome {
    (run.0)(data)
}
