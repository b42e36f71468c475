//! The metrics log: one JSON object per line in `output_dir/logs/metrics.jsonl`.
//!
//! Every record is written with a single `write` of the line and its newline, straight to the file,
//! so after a crash the file holds whole records plus at most one partial last line. Opening drops
//! that line; resuming from a checkpoint also drops the records of steps after it, which a killed
//! run logged but the resumed run will log again. Both rewrite the file atomically (temporary file +
//! rename) before anything is appended.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::ser::Error as _;

use super::{io_error, write_atomic};
use crate::{Error, Result};

/// An append-only JSON-lines log of training metrics.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("metrics-log-doc-{}", std::process::id()));
/// use trainer::logs::MetricsLog;
///
/// let path = dir.join("logs/metrics.jsonl");
/// let mut log = MetricsLog::open(&path, None)?;
/// log.write(&serde_json::json!({"step": 1, "loss": 0.12}))?;
/// log.write(&serde_json::json!({"step": 2, "loss": 0.11}))?;
/// // A run resumed from the checkpoint of step 1 forgets step 2.
/// drop(MetricsLog::open(&path, Some(1))?);
/// assert_eq!(MetricsLog::read(&path)?, vec![serde_json::json!({"step": 1, "loss": 0.12})]);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), trainer::Error>(())
/// ```
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    /// Lines in the file, to name the line of a record that fails to serialise.
    lines: usize,
}

impl MetricsLog {
    /// Opens the log at `path` for appending, creating it and its folder if needed.
    ///
    /// A partial last line (a crash in the middle of a write) is dropped. With `resume_from_step`,
    /// records whose `"step"` is greater than it are dropped too; records without a numeric
    /// `"step"` are kept. Without it, the records already there are kept and new ones follow them.
    ///
    /// # Errors
    /// [`Error::LogIo`] when the file or folder cannot be read, written or created;
    /// [`Error::MetricsJson`] naming the line when a complete line of an existing log is not JSON
    /// (only checked when resuming, where every record's step is read).
    pub fn open(path: &Path, resume_from_step: Option<u64>) -> Result<Self> {
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder).map_err(io_error(folder))?;
        }
        let existing = match std::fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(Error::LogIo {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mut lines = 0;
        if let Some(bytes) = existing {
            let complete = complete_lines(&bytes);
            let mut kept = Vec::with_capacity(complete.len());
            let mut dropped_any = complete.len() < bytes.len();
            for (index, line) in complete.split_inclusive(|&b| b == b'\n').enumerate() {
                let keep = match resume_from_step {
                    Some(resume) => {
                        step_of(path, index + 1, line)?.is_none_or(|step| step <= resume)
                    }
                    None => true,
                };
                if keep {
                    kept.extend_from_slice(line);
                    lines += 1;
                } else {
                    dropped_any = true;
                }
            }
            if dropped_any {
                write_atomic(path, &kept)?;
            }
        }
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_error(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            lines,
        })
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` as one line and hands it to the operating system at once.
    ///
    /// # Errors
    /// [`Error::MetricsJson`] when `record` does not serialise to a JSON object (a map or a struct);
    /// [`Error::LogIo`] when the file cannot be written.
    pub fn write(&mut self, record: &impl serde::Serialize) -> Result<()> {
        let line_number = self.lines + 1;
        let json_error = |source| Error::MetricsJson {
            path: self.path.clone(),
            line: line_number,
            source,
        };
        let value = serde_json::to_value(record).map_err(json_error)?;
        if !value.is_object() {
            return Err(json_error(serde_json::Error::custom(format!(
                "a metrics record must be a JSON object, got {value}"
            ))));
        }
        let mut line = serde_json::to_vec(&value).map_err(json_error)?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(io_error(&self.path))?;
        self.lines += 1;
        Ok(())
    }

    /// Reads every complete line of the log at `path` as JSON, skipping blank lines and a partial
    /// last line (a write in progress or cut off by a crash).
    ///
    /// # Errors
    /// [`Error::LogIo`] when the file cannot be read; [`Error::MetricsJson`] naming the first line
    /// that is not JSON.
    pub fn read(path: &Path) -> Result<Vec<serde_json::Value>> {
        let bytes = std::fs::read(path).map_err(io_error(path))?;
        let mut records = Vec::new();
        for (index, line) in complete_lines(&bytes)
            .split_inclusive(|&b| b == b'\n')
            .enumerate()
        {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let record = serde_json::from_slice(line).map_err(|source| Error::MetricsJson {
                path: path.to_path_buf(),
                line: index + 1,
                source,
            })?;
            records.push(record);
        }
        Ok(records)
    }
}

/// `bytes` up to and including its last newline.
fn complete_lines(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |last| last + 1);
    &bytes[..end]
}

/// The `"step"` of a record line, if it has a non-negative integer one.
fn step_of(path: &Path, line_number: usize, line: &[u8]) -> Result<Option<u64>> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let record: serde_json::Value =
        serde_json::from_slice(line).map_err(|source| Error::MetricsJson {
            path: path.to_path_buf(),
            line: line_number,
            source,
        })?;
    Ok(record.get("step").and_then(serde_json::Value::as_u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::test_dir::TestDir;
    use serde_json::json;

    #[derive(serde::Serialize)]
    struct StepRecord {
        step: u64,
        loss: f64,
        lr: f64,
    }

    fn steps(path: &Path) -> Vec<u64> {
        MetricsLog::read(path)
            .unwrap()
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn records_append_one_per_line_and_survive_reopening() {
        let dir = TestDir::new("jsonl-append");
        let path = dir.path().join("out/logs/metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        for step in 1..=3 {
            log.write(&StepRecord {
                step,
                loss: 1.0 / step as f64,
                lr: 1e-4,
            })
            .unwrap();
        }
        // Each record is on disk as soon as it is written, without closing the log.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert_eq!(
            text.lines().next().unwrap(),
            r#"{"loss":1.0,"lr":0.0001,"step":1}"#
        );
        drop(log);
        let mut log = MetricsLog::open(&path, None).unwrap();
        log.write(&json!({"step": 4, "event": "validation"}))
            .unwrap();
        assert_eq!(steps(&path), [1, 2, 3, 4]);
        assert_eq!(MetricsLog::read(&path).unwrap()[3]["event"], "validation");
    }

    #[test]
    fn resuming_drops_the_steps_after_the_checkpoint() {
        let dir = TestDir::new("jsonl-resume");
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        for step in 1..=8 {
            log.write(&json!({"step": step, "loss": 0.5})).unwrap();
        }
        log.write(&json!({"note": "no step: kept"})).unwrap();
        drop(log);
        let mut log = MetricsLog::open(&path, Some(5)).unwrap();
        log.write(&json!({"step": 6, "loss": 0.25})).unwrap();
        let records = MetricsLog::read(&path).unwrap();
        assert_eq!(records.len(), 7);
        assert_eq!(records[5]["note"], "no step: kept");
        assert_eq!(records[6], json!({"step": 6, "loss": 0.25}));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Resuming from a step after every record changes nothing.
        let before = std::fs::read(&path).unwrap();
        drop(MetricsLog::open(&path, Some(100)).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_partial_last_line_is_dropped_not_an_error() {
        let dir = TestDir::new("jsonl-partial");
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"lo").unwrap();
        assert_eq!(steps(&path), [1], "the reader skips it too");
        let mut log = MetricsLog::open(&path, None).unwrap();
        log.write(&json!({"step": 2, "loss": 0.4})).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"step\":1,\"loss\":0.5}\n{\"loss\":0.4,\"step\":2}\n"
        );
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"st").unwrap();
        drop(MetricsLog::open(&path, Some(1)).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":1}\n");
    }

    #[test]
    fn bad_lines_and_bad_records_are_named() {
        let dir = TestDir::new("jsonl-bad");
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1}\n\nnot json\n{\"step\":3}\n").unwrap();
        for result in [
            MetricsLog::read(&path).map(drop),
            MetricsLog::open(&path, Some(2)).map(drop),
        ] {
            match result {
                Err(Error::MetricsJson {
                    path: named, line, ..
                }) => assert_eq!((named, line), (path.clone(), 3)),
                other => panic!("expected the bad line to be named, got {other:?}"),
            }
        }
        let mut log = MetricsLog::open(&path, None).unwrap();
        let err = log.write(&[1.0, 2.0]).unwrap_err().to_string();
        assert!(
            err.contains("metrics.jsonl: line 5") && err.contains("JSON object"),
            "{err}"
        );
        let err = log
            .write(&json!({"loss": f64::NAN}))
            .map(|()| std::fs::read_to_string(&path).unwrap());
        // serde_json writes a non-finite float as null rather than failing; the line stays valid JSON.
        assert!(err.unwrap().ends_with("{\"loss\":null}\n"));
        assert!(matches!(
            MetricsLog::read(&dir.path().join("missing.jsonl")),
            Err(Error::LogIo { .. })
        ));
    }
}
