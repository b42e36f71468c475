//! The fuzz corpora replayed (issue 24, deliverable 7): every committed input of
//! `fuzz/corpus/<target>/` run through the same target body that AFL fuzzes
//! (`fuzz/src/targets/`), without AFL. A panic fails the test (the fuzzers' crashes, once fixed,
//! are kept in the corpora as regressions); inputs named `ok-…` must be accepted, which shows each
//! target reaches past its parser. docs/RELIABILITY.md ("Fuzzing") says how the corpora are grown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

#[path = "../fuzz/src/targets/mod.rs"]
mod targets;

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs every corpus file of target `name`; returns how many there were.
fn replay(name: &str) -> usize {
    let corpus = repo().join("fuzz/corpus").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    // SDXL_LORA_FUZZ_WORK keeps the targets' files (e.g. the checkpoint target's real checkpoint,
    // `checkpoint-seed.bin`) in that folder, one subfolder per target.
    let kept = std::env::var_os("SDXL_LORA_FUZZ_WORK").map(|dir| PathBuf::from(dir).join(name));
    let work = kept.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "sdxl-lora-fuzz-replay-{name}-{}",
            std::process::id()
        ))
    });
    let mut run = targets::runner(name, &repo(), &work).unwrap();
    let mut accepted = 0;
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let outcome = run(&data);
        if is_ok_seed(file) {
            if let Err(e) = outcome {
                panic!("{}: a valid input was refused: {e}", file.display());
            }
            accepted += 1;
        }
    }
    drop(run);
    if kept.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    assert!(
        accepted > 0,
        "{}: no `ok-` input (a valid file the target must accept)",
        corpus.display()
    );
    files.len()
}

fn is_ok_seed(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ok-"))
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let count = replay(stringify!($name));
                eprintln!("{}: {count} inputs replayed", stringify!($name));
            }
        )*

        /// Every target of `fuzz/src/targets` has its replay test here.
        #[test]
        fn every_target_is_replayed() {
            let mut here = vec![$(stringify!($name)),*];
            let mut all = targets::NAMES.to_vec();
            here.sort_unstable();
            all.sort_unstable();
            assert_eq!(here, all);
        }
    };
}

replay_tests!(
    prompt,
    model_config,
    train_config,
    kohya_dataset,
    metadata_jsonl,
    image,
    parquet,
    lora_file,
    checkpoint,
);
