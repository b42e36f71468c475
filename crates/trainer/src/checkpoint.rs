//! Crash-safe storage of training checkpoints: `output_dir/checkpoint-<step>/` folders.
//!
//! This follows the layout of diffusers' `train_text_to_image_lora_sdxl.py` (the accelerate
//! `save_state` folders `checkpoint-<global_step>`, `--checkpoints_total_limit`,
//! `--resume_from_checkpoint latest | <path>`), but not its way of writing them: diffusers writes
//! straight into the final folder, so a run killed mid-save leaves a half-written `checkpoint-N`
//! that the next `latest` resume picks up. Here a checkpoint only ever appears under its final
//! name complete and flushed to disk:
//!
//! - it is written into `.checkpoint-<step>.tmp-<pid>`, every file and folder in it is fsynced,
//!   and only then is the folder renamed to `checkpoint-<step>` (and `output_dir` fsynced, so
//!   the rename itself survives a power cut);
//! - a folder that goes away (pruned, or replaced by a new save of the same step) is first
//!   renamed to `.trash-checkpoint-<step>-<pid>` and only then deleted, so a deletion cut short
//!   never leaves a partial folder under a checkpoint name;
//! - an existing `checkpoint-<step>` that a save replaces is first moved aside to
//!   `.checkpoint-<step>.old-<pid>`; if the process dies before the new folder is renamed in,
//!   [`CheckpointStore::clean_stale`] puts the old one back.
//!
//! What goes inside a checkpoint is the trainer's business: [`CheckpointStore::save`] takes a
//! closure that fills the folder. Files written elsewhere (the final LoRA, a config copy) can use
//! [`write_atomic`].

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The flag whose value [`CheckpointStore::resolve`] reads, named in its errors.
const RESUME_FLAG: &str = "--resume_from_checkpoint";

/// The checkpoints under one output directory.
///
/// ```
/// # fn main() -> trainer::Result<()> {
/// use trainer::checkpoint::{write_atomic, CheckpointStore};
///
/// let output_dir = std::env::temp_dir().join(format!("checkpoint-doc-{}", std::process::id()));
/// let store = CheckpointStore::new(&output_dir);
/// store.clean_stale()?;
/// for step in [100, 200, 300] {
///     store.save(step, |folder| write_atomic(&folder.join("step.txt"), step.to_string().as_bytes()))?;
///     store.prune(2)?;
/// }
/// let steps: Vec<u64> = store.list()?.into_iter().map(|(step, _)| step).collect();
/// assert_eq!(steps, [200, 300]);
/// assert_eq!(store.resolve("latest")?.map(|(step, _)| step), Some(300));
/// # std::fs::remove_dir_all(&output_dir).ok();
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    output_dir: PathBuf,
}

impl CheckpointStore {
    /// A store for the checkpoints under `output_dir`; nothing is read or created yet.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
        }
    }

    /// The folder holding the checkpoints.
    pub fn output_dir(&self) -> &Path {
        &self.output_dir
    }

    /// Where checkpoint `step` lives once saved: `output_dir/checkpoint-<step>`.
    pub fn checkpoint_path(&self, step: u64) -> PathBuf {
        self.output_dir.join(format!("checkpoint-{step}"))
    }

    /// Writes checkpoint `step` and returns its final path.
    ///
    /// `write` fills a fresh temporary folder inside `output_dir`
    /// (`.checkpoint-<step>.tmp-<pid>`; `output_dir` is created if needed). Every file and folder
    /// in it is then fsynced, the folder is renamed to `checkpoint-<step>` and `output_dir` is
    /// fsynced. If `write` fails, the temporary folder is removed and its error returned.
    ///
    /// If `checkpoint-<step>` already exists (a resumed run saving the same step again), it is
    /// replaced: moved aside to `.checkpoint-<step>.old-<pid>`, the new folder renamed in, then the
    /// old one deleted through a `.trash-*` name. Killed between the two renames, a run leaves the
    /// old checkpoint complete under the `.old-*` name, and [`clean_stale`](Self::clean_stale)
    /// restores it, so either the old or the new checkpoint survives whole.
    pub fn save<E>(
        &self,
        step: u64,
        write: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, E>
    where
        E: From<Error>,
    {
        fs::create_dir_all(&self.output_dir).map_err(io_error(&self.output_dir))?;
        let staging = self
            .output_dir
            .join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
        // Only a crashed earlier process with the same pid can have left this behind.
        remove_if_present(&staging)?;
        fs::create_dir(&staging).map_err(io_error(&staging))?;
        if let Err(error) = write(&staging) {
            let _ = fs::remove_dir_all(&staging);
            return Err(error);
        }
        self.publish(step, &staging).map_err(|error| {
            let _ = fs::remove_dir_all(&staging);
            E::from(error)
        })
    }

    /// Flushes a filled staging folder and renames it to `checkpoint-<step>`, replacing an
    /// existing one as [`save`](Self::save) describes.
    fn publish(&self, step: u64, staging: &Path) -> Result<PathBuf> {
        sync_tree(staging)?;
        let final_path = self.checkpoint_path(step);
        let displaced = match fs::symlink_metadata(&final_path) {
            Ok(metadata) if metadata.is_dir() => {
                let aside = self
                    .output_dir
                    .join(format!(".checkpoint-{step}.old-{}", std::process::id()));
                remove_if_present(&aside)?;
                fs::rename(&final_path, &aside).map_err(io_error(&final_path))?;
                Some(aside)
            }
            Ok(_) => {
                return Err(Error::Checkpoint {
                    path: final_path,
                    problem: "exists and is not a folder, so a checkpoint cannot be saved under this name".into(),
                });
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                return Err(Error::Io {
                    path: final_path,
                    source: error,
                });
            }
        };
        if let Err(error) = fs::rename(staging, &final_path) {
            if let Some(aside) = &displaced {
                let _ = fs::rename(aside, &final_path);
            }
            return Err(Error::Io {
                path: final_path,
                source: error,
            });
        }
        sync_dir(&self.output_dir)?;
        if let Some(aside) = displaced {
            self.discard(step, &aside)?;
        }
        Ok(final_path)
    }

    /// Complete checkpoints, sorted by step: the folders named exactly `checkpoint-<step>` (the
    /// way [`checkpoint_path`](Self::checkpoint_path) spells it, so no sign or leading zeros).
    /// Temporary and trash folders, files and other names are ignored; a missing `output_dir`
    /// has no checkpoints.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut checkpoints = Vec::new();
        for (name, path) in self.entries()? {
            let Some(step) = name.to_str().and_then(parse_checkpoint_name) else {
                continue;
            };
            // `metadata` follows a symbolic link, so a link to a checkpoint folder counts.
            if fs::metadata(&path).is_ok_and(|metadata| metadata.is_dir()) {
                checkpoints.push((step, path));
            }
        }
        checkpoints.sort_unstable_by_key(|(step, _)| *step);
        Ok(checkpoints)
    }

    /// The checkpoint with the highest step, if any.
    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        Ok(self.list()?.pop())
    }

    /// Resolves a `--resume_from_checkpoint` value to the checkpoint to resume from.
    ///
    /// `"latest"` gives the newest checkpoint, or `None` when there is none (as in diffusers, the
    /// run then starts fresh, and a line on stderr says so). Anything else is a path to a
    /// `checkpoint-<step>` folder, tried as given and then, if relative, inside `output_dir`
    /// (so `checkpoint-500` works, as in diffusers); its step is parsed from the folder's name.
    /// A path that is not a folder or not named like a checkpoint is an error naming the flag
    /// and the path.
    pub fn resolve(&self, arg: &str) -> Result<Option<(u64, PathBuf)>> {
        if arg == "latest" {
            let latest = self.latest()?;
            if latest.is_none() {
                tracing::info!(
                    "{RESUME_FLAG} latest: no checkpoint in {}; starting a new training run",
                    self.output_dir.display()
                );
            }
            return Ok(latest);
        }
        let resume_error = |path: &Path, problem: String| Error::ResumeFromCheckpoint {
            path: path.to_owned(),
            problem,
        };
        if arg.is_empty() {
            return Err(resume_error(
                Path::new(arg),
                "expected `latest` or the path of a checkpoint-<step> folder".into(),
            ));
        }
        let given = PathBuf::from(arg);
        let path = if given.is_dir() {
            given
        } else if given.is_relative() && self.output_dir.join(&given).is_dir() {
            self.output_dir.join(&given)
        } else {
            let also = if given.is_relative() {
                format!(" (nor is {})", self.output_dir.join(&given).display())
            } else {
                String::new()
            };
            return Err(resume_error(
                &given,
                format!("no such checkpoint folder{also}"),
            ));
        };
        match path
            .file_name()
            .and_then(OsStr::to_str)
            .and_then(parse_checkpoint_name)
        {
            Some(step) => Ok(Some((step, path))),
            None => Err(resume_error(
                &path,
                "not a checkpoint folder: its name must be checkpoint-<step>".into(),
            )),
        }
    }

    /// Keeps the newest `limit` checkpoints (`--checkpoints_total_limit`) and deletes the older
    /// ones, each renamed to a `.trash-*` name before its files go, so a deletion cut short never
    /// looks like a checkpoint. Returns the steps removed, oldest first.
    pub fn prune(&self, limit: usize) -> Result<Vec<u64>> {
        let checkpoints = self.list()?;
        let excess = checkpoints.len().saturating_sub(limit);
        let mut removed = Vec::with_capacity(excess);
        for (step, path) in checkpoints.into_iter().take(excess) {
            self.discard(step, &path)?;
            removed.push(step);
        }
        Ok(removed)
    }

    /// Tidies up after crashed runs; call it at start-up, while no other process writes to
    /// `output_dir`. Removes temporary folders and files (`.<name>.tmp-<pid>`) and trash folders
    /// (`.trash-checkpoint-<step>-<pid>`), and deals with checkpoints a replacing save moved aside
    /// (`.checkpoint-<step>.old-<pid>`): one whose `checkpoint-<step>` is missing is renamed back
    /// (the save died before its new folder was in place), the others are removed. Returns the
    /// paths removed.
    pub fn clean_stale(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let mut displaced = Vec::new();
        for (name, path) in self.entries()? {
            let Some(name) = name.to_str() else { continue };
            match parse_leftover(name) {
                Some(Leftover::Temporary | Leftover::Trash) => {
                    remove_any(&path)?;
                    removed.push(path);
                }
                Some(Leftover::Displaced { step }) => displaced.push((step, path)),
                None => {}
            }
        }
        displaced.sort();
        for (step, path) in displaced {
            let final_path = self.checkpoint_path(step);
            if fs::symlink_metadata(&final_path).is_ok() {
                self.discard(step, &path)?;
                removed.push(path);
            } else {
                fs::rename(&path, &final_path).map_err(io_error(&path))?;
                sync_dir(&self.output_dir)?;
                tracing::warn!(
                    "{}: restored from {}, which an interrupted save had moved aside",
                    final_path.display(),
                    path.display()
                );
            }
        }
        Ok(removed)
    }

    /// Deletes a checkpoint folder (or one moved aside) without it ever being partial under a
    /// name that [`list`](Self::list) or [`clean_stale`](Self::clean_stale) would keep: it is
    /// renamed to `.trash-checkpoint-<step>-<pid>`, the rename made durable, and then removed.
    fn discard(&self, step: u64, path: &Path) -> Result<()> {
        let trash = self
            .output_dir
            .join(format!(".trash-checkpoint-{step}-{}", std::process::id()));
        remove_if_present(&trash)?;
        fs::rename(path, &trash).map_err(io_error(path))?;
        sync_dir(&self.output_dir)?;
        remove_any(&trash)
    }

    /// The names and paths of the entries of `output_dir`; none when it does not exist.
    fn entries(&self) -> Result<Vec<(OsString, PathBuf)>> {
        let reader = match fs::read_dir(&self.output_dir) {
            Ok(reader) => reader,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(Error::Io {
                    path: self.output_dir.clone(),
                    source: error,
                });
            }
        };
        reader
            .map(|entry| {
                let entry = entry.map_err(io_error(&self.output_dir))?;
                Ok((entry.file_name(), entry.path()))
            })
            .collect()
    }
}

/// Writes `bytes` to `path` atomically: into a temporary file `.<name>.tmp-<pid>` in the same
/// folder, fsynced, renamed over `path`, and the folder fsynced. A reader sees the old content or
/// the new, never part of it; if anything fails the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_reporting(path, bytes, |path, source| Error::Io { path, source })
}

/// [`write_atomic`] with I/O failures reported through `io` (the logs report theirs as
/// [`Error::LogIo`]).
pub(crate) fn write_atomic_reporting(
    path: &Path,
    bytes: &[u8],
    io: fn(PathBuf, std::io::Error) -> Error,
) -> Result<()> {
    let Some(name) = path.file_name() else {
        return Err(Error::Checkpoint {
            path: path.to_owned(),
            problem: "not a file path".into(),
        });
    };
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temporary_name = OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(format!(".tmp-{}", std::process::id()));
    let temporary = folder.join(temporary_name);
    let written = (|| {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if let Err(error) = written {
        let _ = fs::remove_file(&temporary);
        return Err(io(path.to_owned(), error));
    }
    File::open(folder)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| io(folder.to_owned(), source))
}

/// The step of a folder name spelled exactly `checkpoint-<step>`.
fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    let step = parse_decimal(digits)?;
    // Only the canonical spelling: `checkpoint-007` next to `checkpoint-7` would be two
    // checkpoints of one step.
    (step.to_string() == digits).then_some(step)
}

/// A non-empty run of ASCII digits (`u64::from_str` would also take a leading `+`).
fn parse_decimal(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a crashed run can leave in `output_dir`.
#[derive(Debug, PartialEq)]
enum Leftover {
    /// `.<name>.tmp-<pid>`: a checkpoint folder being written, or a [`write_atomic`] file.
    Temporary,
    /// `.trash-checkpoint-<step>-<pid>`: a folder being deleted.
    Trash,
    /// `.checkpoint-<step>.old-<pid>`: a complete checkpoint moved aside by a replacing save.
    Displaced {
        /// The step it holds.
        step: u64,
    },
}

/// Recognises the names this module gives to temporary, trash and moved-aside entries; other
/// names (the user's own files included) are never touched.
fn parse_leftover(name: &str) -> Option<Leftover> {
    if let Some(rest) = name.strip_prefix(".trash-checkpoint-") {
        let (step, pid) = rest.split_once('-')?;
        return (parse_decimal(step).is_some() && parse_decimal(pid).is_some())
            .then_some(Leftover::Trash);
    }
    let hidden = name.strip_prefix('.')?;
    if let Some((stem, pid)) = hidden.rsplit_once(".tmp-") {
        return (!stem.is_empty() && parse_decimal(pid).is_some()).then_some(Leftover::Temporary);
    }
    if let Some((stem, pid)) = hidden.rsplit_once(".old-") {
        let step = parse_checkpoint_name(stem)?;
        return parse_decimal(pid).map(|_| Leftover::Displaced { step });
    }
    None
}

/// Maps an I/O error to [`Error::Io`] naming `path`.
pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Removes a file or a folder with everything in it (a symbolic link itself, not its target).
fn remove_any(path: &Path) -> Result<()> {
    let metadata = fs::symlink_metadata(path).map_err(io_error(path))?;
    let removed = if metadata.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    removed.map_err(io_error(path))
}

/// [`remove_any`], doing nothing when `path` does not exist.
fn remove_if_present(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => remove_any(path),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(Error::Io {
            path: path.to_owned(),
            source: error,
        }),
    }
}

/// Flushes a folder's entries (creations, renames, removals) to disk.
fn sync_dir(folder: &Path) -> Result<()> {
    File::open(folder)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error(folder))
}

/// Flushes every file under `folder`, every sub-folder and `folder` itself to disk. Symbolic
/// links are not followed: what they point to is not part of the checkpoint.
fn sync_tree(folder: &Path) -> Result<()> {
    for entry in fs::read_dir(folder).map_err(io_error(folder))? {
        let entry = entry.map_err(io_error(folder))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_error(&path))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            File::open(&path)
                .and_then(|file| file.sync_all())
                .map_err(io_error(&path))?;
        }
    }
    sync_dir(folder)
}

#[cfg(test)]
mod tests;
