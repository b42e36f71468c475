//! One run per output folder: the lock that a second run refuses ([`OutputLock`]), what another
//! run left in the folder ([`PreviousRun`]) and where `--overwrite_output_dir` moves it
//! ([`move_aside`]), and the temporary files that runs which died left behind
//! ([`clean_leftovers`]).

mod lock;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use lock::{LOCK_FILE, OutputLock};

use crate::checkpoint::{CheckpointStore, io_error};
use crate::outputs::{KOHYA_FILE, LORA_FILE};
use crate::{Error, Result};

/// The prefix of the folders `--overwrite_output_dir` moves an earlier run into.
pub const MOVED_ASIDE_PREFIX: &str = "previous-run-";

/// The files of a finished run beside its checkpoints.
const FINISHED_FILES: [&str; 3] = [LORA_FILE, KOHYA_FILE, "model_card.json"];

/// What an earlier run left in an output folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreviousRun {
    /// Its checkpoints' steps.
    pub checkpoints: Vec<u64>,
    /// Its final outputs present (the LoRA files, the model card).
    pub finished: Vec<&'static str>,
    /// Whether it left logs (`logs/metrics.jsonl`, TensorBoard events).
    pub logs: bool,
}

impl PreviousRun {
    /// Looks for another run's checkpoints, final outputs and logs in `store`'s folder.
    ///
    /// # Errors
    /// [`Error::Io`] when the folder cannot be read.
    pub fn find(store: &CheckpointStore) -> Result<Self> {
        let dir = store.output_dir();
        let checkpoints = store.list()?.into_iter().map(|(step, _)| step).collect();
        let finished = FINISHED_FILES
            .into_iter()
            .filter(|name| dir.join(name).exists())
            .collect();
        let logs_dir = dir.join("logs");
        let logs = logs_dir.join("metrics.jsonl").exists()
            || fs::read_dir(&logs_dir).is_ok_and(|entries| {
                entries.flatten().any(|entry| {
                    (entry.file_name().to_string_lossy()).starts_with("events.out.tfevents.")
                })
            });
        Ok(Self {
            checkpoints,
            finished,
            logs,
        })
    }

    /// Whether the folder holds nothing of another run.
    pub fn is_empty(&self) -> bool {
        self.checkpoints.is_empty() && self.finished.is_empty() && !self.logs
    }

    /// `checkpoint-25, checkpoint-50, pytorch_lora_weights.safetensors, logs/`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .checkpoints
            .iter()
            .map(|step| format!("checkpoint-{step}"))
            .collect();
        if parts.len() > 3 {
            let count = parts.len();
            parts.drain(1..count - 1);
            parts.insert(1, format!("… ({count} checkpoints)"));
        }
        parts.extend(self.finished.iter().map(|&name| name.to_owned()));
        if self.logs {
            parts.push("logs/".into());
        }
        parts.join(", ")
    }
}

/// `--overwrite_output_dir`: moves everything in `output_dir` but the lock file and the runs moved
/// aside before into a new sub-folder `previous-run-<UTC time>` (`-2`, `-3`, … appended when one
/// of that second exists) and returns it. Nothing is deleted or mixed: the new run starts in an
/// empty folder and the old one stays whole beside it.
///
/// # Errors
/// [`Error::Io`] naming the entry that cannot be moved.
pub fn move_aside(output_dir: &Path) -> Result<PathBuf> {
    let stamp: String = crate::kohya_metadata::iso_date(SystemTime::now())
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let base = format!("{MOVED_ASIDE_PREFIX}{stamp}Z");
    let mut target = output_dir.join(&base);
    let mut n = 1;
    loop {
        match fs::create_dir(&target) {
            Ok(()) => break,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                n += 1;
                target = output_dir.join(format!("{base}-{n}"));
            }
            Err(source) => {
                return Err(Error::Io {
                    path: target,
                    source,
                });
            }
        }
    }
    for entry in fs::read_dir(output_dir).map_err(io_error(output_dir))? {
        let entry = entry.map_err(io_error(output_dir))?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text == LOCK_FILE || text.starts_with(MOVED_ASIDE_PREFIX) {
            continue;
        }
        fs::rename(entry.path(), target.join(&name)).map_err(io_error(&entry.path()))?;
    }
    fs::File::open(output_dir)
        .and_then(|folder| folder.sync_all())
        .map_err(io_error(output_dir))?;
    Ok(target)
}

/// Removes what runs that died left half-written in `store`'s folder — the checkpoint store's
/// staging and trash folders ([`CheckpointStore::clean_stale`], which also puts back a checkpoint
/// a replacing save had moved aside) and the temporary files of the atomic writes of the LoRA
/// files, logs, plots and images (in the folder, `logs/` and `validation/`) — and returns the
/// paths removed. Call it holding the folder's [`OutputLock`]: no live run is writing there then.
///
/// # Errors
/// [`Error::Io`] naming the entry that cannot be read or removed.
pub fn clean_leftovers(store: &CheckpointStore) -> Result<Vec<PathBuf>> {
    let mut removed = store.clean_stale()?;
    let dir = store.output_dir();
    for folder in [dir.to_owned(), dir.join("logs"), dir.join("validation")] {
        let entries = match fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(Error::Io {
                    path: folder,
                    source,
                });
            }
        };
        for entry in entries {
            let entry = entry.map_err(io_error(&folder))?;
            let path = entry.path();
            let is_file = entry.file_type().map_err(io_error(&path))?.is_file();
            if is_file && is_temporary(&entry.file_name().to_string_lossy()) {
                fs::remove_file(&path).map_err(io_error(&path))?;
                removed.push(path);
            }
        }
    }
    Ok(removed)
}

/// The extensions of the files whose atomic writes go through a temporary file.
const WRITTEN_EXTENSIONS: [&str; 6] = ["safetensors", "png", "json", "jsonl", "md", "toml"];

/// Whether `name` is the temporary file of an atomic write of one of our files:
/// `.<name>.tmp-<pid>` ([`crate::checkpoint::write_atomic`]), `<name>.tmp<pid>` (the LoRA
/// files) or `<name>.tmp` (PNG images); `<name>` ends with an extension we write.
fn is_temporary(name: &str) -> bool {
    let Some((stem, suffix)) = name.rsplit_once(".tmp") else {
        return false;
    };
    let digits = suffix.strip_prefix('-').unwrap_or(suffix);
    let suffix_ok =
        suffix.is_empty() || (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
    let stem = stem.strip_prefix('.').unwrap_or(stem);
    suffix_ok
        && stem
            .rsplit_once('.')
            .is_some_and(|(base, ext)| !base.is_empty() && WRITTEN_EXTENSIONS.contains(&ext))
}

#[cfg(test)]
mod tests;
