//! One event file per run: a resumed run appends to the file its interrupted part wrote, after
//! a `SessionLog` START event at the step it resumes from + 1 (what `SummaryWriter(purge_step=…)`
//! writes), so TensorBoard drops the interrupted part's events of the steps this run logs again.
//! A record cut short by a kill is cut off first (TensorBoard stops reading a file at a damaged
//! record).

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use super::{
    EventWriter, FILE_VERSION, SESSION_START, WIRE_VARINT, encode_bytes_field, encode_event_header,
    field_key, masked_crc32c, read_u32, read_u64, wall_time_now,
};
use crate::Result;
use crate::logs::io_error;

/// The prefix of TensorBoard's event file names.
const EVENT_FILE_PREFIX: &str = "events.out.tfevents.";

impl EventWriter {
    /// The event writer of a run that starts at optimizer step `start_step` (0: from the start)
    /// with its logs in `log_dir`: the newest event file there is continued (its damaged tail, if
    /// any, cut off) after a restart event at `start_step + 1`, TensorBoard's purge step; without
    /// one, a new file is created (with the restart event when `start_step` is above 0).
    ///
    /// # Errors
    /// [`crate::Error::LogIo`] when the folder or file cannot be read, created or written.
    pub fn continue_run(log_dir: &Path, start_step: u64) -> Result<Self> {
        let purge_step = i64::try_from(start_step)
            .unwrap_or(i64::MAX)
            .saturating_add(1);
        let Some(path) = newest_event_file(log_dir)? else {
            return Self::create_with_purge(log_dir, (start_step > 0).then_some(purge_step));
        };
        let bytes = fs::read(&path).map_err(io_error(&path))?;
        let whole = whole_records(&bytes);
        let file = File::options()
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        if whole < bytes.len() {
            file.set_len(whole as u64).map_err(io_error(&path))?;
        }
        let mut writer = Self {
            path,
            file: BufWriter::new(file),
        };
        if whole == 0 {
            let mut event = Vec::new();
            encode_event_header(&mut event, wall_time_now(), 0);
            encode_bytes_field(&mut event, 3, FILE_VERSION.as_bytes());
            writer.write_record(&event)?;
        }
        let mut event = Vec::new();
        encode_event_header(&mut event, wall_time_now(), purge_step);
        encode_bytes_field(&mut event, 7, &[field_key(1, WIRE_VARINT), SESSION_START]);
        writer.write_record(&event)?;
        writer.flush()?;
        Ok(writer)
    }
}

/// The event file of `log_dir` written last (by modification time, then name); none when the
/// folder does not exist or holds none.
fn newest_event_file(log_dir: &Path) -> Result<Option<PathBuf>> {
    let entries = match fs::read_dir(log_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error(log_dir)(source)),
    };
    let mut newest = None;
    for entry in entries {
        let entry = entry.map_err(io_error(log_dir))?;
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(EVENT_FILE_PREFIX) {
            continue;
        }
        let path = entry.path();
        let metadata = entry.metadata().map_err(io_error(&path))?;
        if !metadata.is_file() {
            continue;
        }
        let key = (metadata.modified().ok(), name);
        if newest.as_ref().is_none_or(|(newest, _)| key > *newest) {
            newest = Some((key, path));
        }
    }
    Ok(newest.map(|(_, path)| path))
}

/// The length of the longest run of whole records at the start of `bytes` (each length and
/// data checksum correct).
fn whole_records(bytes: &[u8]) -> usize {
    let mut offset = 0;
    while let Some(rest) = bytes.get(offset..).filter(|rest| !rest.is_empty()) {
        let (Some(length), Some(length_crc)) = (read_u64(rest, 0), read_u32(rest, 8)) else {
            break;
        };
        if masked_crc32c(&rest[..8]) != length_crc {
            break;
        }
        let Some(end) = usize::try_from(length)
            .ok()
            .and_then(|length| length.checked_add(12))
            .filter(|end| end.saturating_add(4) <= rest.len())
        else {
            break;
        };
        if read_u32(rest, end) != Some(masked_crc32c(&rest[12..end])) {
            break;
        }
        offset += end + 4;
    }
    offset
}
