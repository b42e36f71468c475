//! Training logs: TensorBoard event files, a JSON-lines metrics log and a loss-curve PNG.
//!
//! The three follow what the diffusers training scripts leave behind (`accelerate`'s TensorBoard
//! tracker under `output_dir/logs`), plus two files a person can read without TensorBoard.

pub mod jsonl;
pub mod plot;
pub mod tensorboard;

pub use jsonl::MetricsLog;
pub use plot::loss_curve_png;
pub use tensorboard::{EventWriter, HParam, Image, Scalar, read_images, read_scalars};

use std::path::Path;

use crate::{Error, Result};

/// Wraps an I/O error with the file it concerns.
pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::LogIo {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically ([`crate::checkpoint::write_atomic`]), reporting I/O failures as
/// [`Error::LogIo`].
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::checkpoint::write_atomic_reporting(path, bytes, |path, source| Error::LogIo {
        path,
        source,
    })
}

/// Whether this process keeps its story to itself: the processes of a data-parallel run other
/// than rank 0 (accelerate logs on the main process only). Errors are not lines of the story: the
/// caller reports them.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Silences [`say`] in this process (the ranks other than 0), or lets it speak again.
pub(crate) fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

/// A line of the run's story: a `tracing` info event (the program's subscriber decides where it
/// goes; `sdxl-lora` and the examples write the message alone on stderr).
pub(crate) fn say(message: impl AsRef<str>) {
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(target: "trainer", "[trainer] {}", message.as_ref());
    }
}

/// A progress bar of `len` steps drawn with `template` (indicatif's) on stderr: hidden where [`say`]
/// is silent (the ranks other than 0, `--quiet`), and by indicatif itself when stderr is not a
/// terminal (so logs and tests see plain lines only).
pub(crate) fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let silent = QUIET.load(std::sync::atomic::Ordering::Relaxed)
        || !tracing::enabled!(target: "trainer", tracing::Level::INFO);
    let progress = if silent {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(len)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress
}

/// [`say`] while the progress bar runs: above the bar on a terminal, plainly otherwise (a hidden
/// bar would swallow the line). Nothing when info events are off (`--quiet`).
pub(crate) fn say_above(progress: &indicatif::ProgressBar, message: impl AsRef<str>) {
    if QUIET.load(std::sync::atomic::Ordering::Relaxed)
        || !tracing::enabled!(target: "trainer", tracing::Level::INFO)
    {
        return;
    }
    if progress.is_hidden() {
        say(message);
    } else {
        progress.println(format!("[trainer] {}", message.as_ref()));
    }
}

#[cfg(test)]
pub(crate) mod test_dir {
    use std::path::{Path, PathBuf};

    /// A fresh, empty folder under the system's temporary folder, removed when dropped.
    pub(crate) struct TestDir(PathBuf);

    impl TestDir {
        pub(crate) fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("trainer-logs-{name}-{}", std::process::id()));
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
