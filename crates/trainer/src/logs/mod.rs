//! Training logs: TensorBoard event files, a JSON-lines metrics log and a loss-curve PNG.
//!
//! The three follow what the diffusers training scripts leave behind (`accelerate`'s TensorBoard
//! tracker under `output_dir/logs`), plus two files a person can read without TensorBoard.

pub mod jsonl;
pub mod plot;
pub mod tensorboard;

pub use jsonl::MetricsLog;
pub use plot::loss_curve_png;
pub use tensorboard::{EventWriter, Scalar, read_scalars};

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Wraps an I/O error with the file it concerns.
pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::LogIo { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a reader
/// (or a crash) sees the old file or the new one, never half of one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = temporary_sibling(path);
    let written = std::fs::File::create(&temporary)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&temporary, path));
    written.map_err(|source| {
        // Best effort: the write already failed, and that is the error worth reporting.
        let _ = std::fs::remove_file(&temporary);
        Error::LogIo { path: path.to_path_buf(), source }
    })
}

/// `dir/.name.tmp-<pid>`: hidden, next to `path` (a rename across file systems is not atomic) and
/// distinct per process.
fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
pub(crate) mod test_dir {
    use std::path::{Path, PathBuf};

    /// A fresh, empty folder under the system's temporary folder, removed when dropped.
    pub(crate) struct TestDir(PathBuf);

    impl TestDir {
        pub(crate) fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("trainer-logs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
