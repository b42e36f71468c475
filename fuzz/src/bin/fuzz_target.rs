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
    afl::fuzz!(|data: &[u8]| {
        let _ = call(&mut run, data);
    });
}

fn call(run: &mut AssertUnwindSafe<targets::Runner>, data: &[u8]) -> targets::Outcome {
    (run.0)(data)
}
