//! The lock that makes an output folder one run's: `output_dir/.trainer.lock`, an advisory
//! `flock` held for the whole run on a file that names the holder.
//!
//! Why `flock` (std's [`File::try_lock`]) and not a file created exclusively: the kernel releases
//! the lock when its holder dies, however it dies (`kill -9`, a power cut, an out-of-memory kill),
//! so a stale lock is recognised by the lock itself being free — not by guessing from a pid that
//! may since belong to another process. The file still records the holder's pid, host and start
//! time, for the message that refuses a second run, and for the line that says a dead run's lock
//! was taken over.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::checkpoint::io_error;
use crate::{Error, Result};

/// The lock file's name inside `output_dir`.
pub const LOCK_FILE: &str = ".trainer.lock";

/// Attempts at taking the lock when the file is replaced under us (its holder released it
/// between our open and our lock).
const ATTEMPTS: usize = 20;

/// `output_dir` held by this process; released (the file removed, then unlocked) when dropped —
/// also on every error path, as the holder unwinds.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: File,
}

/// What the lock file says about the process that holds (or held) it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// The machine it runs on.
    pub host: String,
    /// When it took the lock, in seconds since the Unix epoch.
    pub since: u64,
}

impl Holder {
    fn this_process() -> Self {
        Self {
            pid: std::process::id(),
            host: crate::logs::tensorboard::hostname(),
            since: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    fn to_text(&self) -> String {
        format!(
            "pid {}\nhost {}\nsince {}\n",
            self.pid, self.host, self.since
        )
    }

    /// Reads the text [`Holder::to_text`] writes; `None` for anything else (an empty file that
    /// its creator has not filled yet, or one damaged).
    fn parse(text: &str) -> Option<Self> {
        let mut fields = text.lines().filter_map(|line| line.split_once(' '));
        let mut take = |key: &str| {
            fields
                .next()
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.to_owned())
        };
        Some(Self {
            pid: take("pid")?.parse().ok()?,
            host: take("host")?,
            since: take("since")?.parse().ok()?,
        })
    }

    /// `pid N on HOST since YYYY-MM-DDTHH:MM:SS UTC`.
    pub fn describe(&self) -> String {
        let since = UNIX_EPOCH + Duration::from_secs(self.since);
        format!(
            "pid {} on {} since {} UTC",
            self.pid,
            self.host,
            crate::kohya_metadata::iso_date(since)
        )
    }
}

impl OutputLock {
    /// Takes `output_dir`'s lock (the folder must exist). Returns the lock and, when the file was
    /// left by a run that died holding it, that run's [`Holder`] (its lock is taken over).
    ///
    /// # Errors
    /// [`Error::OutputDirInUse`] naming the holder's pid when another process holds the lock;
    /// [`Error::Io`] naming the lock file when it cannot be opened, locked or written.
    pub fn acquire(output_dir: &Path) -> Result<(Self, Option<Holder>)> {
        let path = output_dir.join(LOCK_FILE);
        for _ in 0..ATTEMPTS {
            let mut file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_error(&path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::OutputDirInUse {
                        path: output_dir.to_owned(),
                        holder: read_holder(&path, &mut file).map(|h| h.describe()),
                    });
                }
                Err(TryLockError::Error(source)) => return Err(Error::Io { path, source }),
            }
            // The holder we waited on may have removed the file between our open and our lock: the
            // lock is then on a file no one else will see; start again on the path's file.
            if !same_file(&path, &file)? {
                continue;
            }
            let mut previous = String::new();
            file.read_to_string(&mut previous)
                .map_err(io_error(&path))?;
            let stale = Holder::parse(&previous);
            let written = (|| {
                file.set_len(0)?;
                file.rewind()?;
                file.write_all(Holder::this_process().to_text().as_bytes())?;
                file.sync_all()
            })();
            let lock = Self { path, file };
            written.map_err(io_error(&lock.path))?;
            return Ok((lock, stale));
        }
        Err(Error::OutputDirInUse {
            path: output_dir.to_owned(),
            holder: None,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so a waiting process finds either our locked file or none.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// The holder named in a lock file another process holds; it writes the file right after taking
/// the lock, so an empty file is read again for a moment.
fn read_holder(path: &Path, file: &mut File) -> Option<Holder> {
    for _ in 0..50 {
        let mut text = String::new();
        if file.rewind().is_ok()
            && file.read_to_string(&mut text).is_ok()
            && let Some(holder) = Holder::parse(&text)
        {
            return Some(holder);
        }
        // The holder may also have replaced the file: read the path's.
        if let Ok(text) = std::fs::read_to_string(path)
            && let Some(holder) = Holder::parse(&text)
        {
            return Some(holder);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Whether `path` is (still) the file `file` has open.
fn same_file(path: &Path, file: &File) -> Result<bool> {
    let open = file.metadata().map_err(io_error(path))?;
    match std::fs::metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("output-lock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_the_lock_goes_with_its_holder() {
        let dir = scratch("second");
        let (lock, stale) = OutputLock::acquire(&dir).unwrap();
        assert_eq!(stale, None);
        let text = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(Holder::parse(&text).unwrap().pid, std::process::id());
        match OutputLock::acquire(&dir) {
            Err(Error::OutputDirInUse { path, holder }) => {
                assert_eq!(path, dir);
                let holder = holder.unwrap();
                assert!(
                    holder.starts_with(&format!("pid {} on ", std::process::id())),
                    "{holder}"
                );
            }
            other => panic!("expected the folder in use, got {other:?}"),
        }
        drop(lock);
        assert!(!dir.join(LOCK_FILE).exists(), "released: the file is gone");
        let (again, stale) = OutputLock::acquire(&dir).unwrap();
        assert_eq!(stale, None);
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_left_by_a_dead_holder_is_taken_over() {
        let dir = scratch("stale");
        let dead = Holder {
            pid: 4_000_000,
            host: "elsewhere".into(),
            since: 1_700_000_000,
        };
        std::fs::write(dir.join(LOCK_FILE), dead.to_text()).unwrap();
        let (lock, stale) = OutputLock::acquire(&dir).unwrap();
        assert_eq!(stale, Some(dead));
        assert_eq!(
            stale.map(|h| h.describe()).unwrap(),
            "pid 4000000 on elsewhere since 2023-11-14T22:13:20 UTC"
        );
        drop(lock);
        // A damaged or empty file is taken over too, naming no one.
        std::fs::write(dir.join(LOCK_FILE), "garbage").unwrap();
        let (_lock, stale) = OutputLock::acquire(&dir).unwrap();
        assert_eq!(stale, None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
