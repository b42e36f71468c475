//! TensorBoard event files: a writer for scalar, image and hyper-parameter summaries and readers that
//! check them.
//!
//! Follows TensorFlow's record format (`tensorflow/core/lib/io/record_writer.cc`) and the writers of
//! `torch.utils.tensorboard` / tensorboardX: a file `events.out.tfevents.<secs>.<host>.<pid>.<n>`
//! of TFRecords, each `u64 length (LE) | masked CRC32C of the length | Event protobuf | masked CRC32C
//! of the protobuf`. The first event carries `file_version: "brain.Event:2"`; every later one a
//! `Summary` with one `simple_value`. A run has one file: resumed, it appends to it a `SessionLog`
//! START event, as `SummaryWriter(purge_step=...)` writes it, and TensorBoard drops the killed run's
//! events from that step on ([`EventWriter::continue_run`]). The few protobuf fields needed (`tensorflow/core/util/
//! event.proto`, `summary.proto`) are encoded by hand rather than through a protobuf crate.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::io_error;
use crate::{Error, Result};

/// The version string of the first event; TensorBoard reads files that start with it.
const FILE_VERSION: &str = "brain.Event:2";

/// `SessionLog.SessionStatus.START`, the status of the event that marks a restart.
const SESSION_START: u8 = 1;

/// Event files opened by this process so far: the last part of the file name, as the Python writers
/// number theirs, so two writers in one process and second never collide.
static FILES_OPENED: AtomicU64 = AtomicU64::new(0);

/// One scalar read back from an event file.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    /// The summary tag, e.g. `train/loss`.
    pub tag: String,
    /// The global step it was logged at.
    pub step: i64,
    /// The value.
    pub value: f32,
    /// Seconds since the Unix epoch when it was logged.
    pub wall_time: f64,
}

/// Appends scalar summaries to a new TensorBoard event file.
///
/// Records are buffered: call [`EventWriter::flush`] where TensorBoard should see them (the buffer is
/// also flushed when the writer is dropped, but then a failure goes unreported).
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("event-writer-doc-{}", std::process::id()));
/// use trainer::logs::{EventWriter, read_scalars};
///
/// let mut events = EventWriter::create(&dir)?;
/// events.add_scalar("train/loss", 1, 0.25)?;
/// events.flush()?;
/// let scalars = read_scalars(events.path())?;
/// assert_eq!((scalars[0].tag.as_str(), scalars[0].step, scalars[0].value), ("train/loss", 1, 0.25));
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), trainer::Error>(())
/// ```
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates `log_dir` if needed and a new event file in it, and writes the file-version event.
    ///
    /// # Errors
    /// [`Error::LogIo`] when the folder or file cannot be created or written.
    pub fn create(log_dir: &Path) -> Result<Self> {
        Self::create_with_purge(log_dir, None)
    }

    fn create_with_purge(log_dir: &Path, purge_step: Option<i64>) -> Result<Self> {
        std::fs::create_dir_all(log_dir).map_err(io_error(log_dir))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!(
            "events.out.tfevents.{now:010}.{}.{}.{}",
            hostname(),
            std::process::id(),
            FILES_OPENED.fetch_add(1, Ordering::Relaxed)
        );
        let path = log_dir.join(name);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let mut writer = Self {
            path,
            file: BufWriter::new(file),
        };
        let mut event = Vec::new();
        encode_event_header(&mut event, wall_time_now(), purge_step.unwrap_or(0));
        encode_bytes_field(&mut event, 3, FILE_VERSION.as_bytes());
        writer.write_record(&event)?;
        if let Some(step) = purge_step {
            // TensorBoard keeps what it read before this event only for steps below its step.
            let mut event = Vec::new();
            encode_event_header(&mut event, wall_time_now(), step);
            encode_bytes_field(&mut event, 7, &[field_key(1, WIRE_VARINT), SESSION_START]);
            writer.write_record(&event)?;
        }
        writer.flush()?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs `value` under `tag` at `step`, stamped with the current time.
    ///
    /// # Errors
    /// [`Error::LogIo`] when the file cannot be written.
    pub fn add_scalar(&mut self, tag: &str, step: i64, value: f32) -> Result<()> {
        let mut summary_value = Vec::with_capacity(tag.len() + 8);
        encode_bytes_field(&mut summary_value, 1, tag.as_bytes());
        summary_value.push(field_key(2, WIRE_FIXED32));
        summary_value.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::with_capacity(summary_value.len() + 2);
        encode_bytes_field(&mut summary, 1, &summary_value);
        let mut event = Vec::with_capacity(summary.len() + 24);
        encode_event_header(&mut event, wall_time_now(), step);
        encode_bytes_field(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Writes buffered records to the file.
    ///
    /// # Errors
    /// [`Error::LogIo`] when the file cannot be written.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(io_error(&self.path))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let length = (data.len() as u64).to_le_bytes();
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&length);
        header[8..].copy_from_slice(&masked_crc32c(&length).to_le_bytes());
        self.file
            .write_all(&header)
            .and_then(|()| self.file.write_all(data))
            .and_then(|()| self.file.write_all(&masked_crc32c(data).to_le_bytes()))
            .map_err(io_error(&self.path))
    }
}

/// Reads every scalar summary of an event file, in file order, checking both checksums of every
/// record.
///
/// # Errors
/// [`Error::LogIo`] when the file cannot be read; [`Error::CorruptEventFile`] naming the file and the
/// record's byte offset for a truncated record (a writer that died mid-record), a checksum mismatch
/// or protobuf that does not decode.
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let mut scalars = Vec::new();
    for (offset, data) in records(path, &bytes)? {
        let corrupt = |problem: String| Error::CorruptEventFile {
            path: path.to_path_buf(),
            offset,
            problem,
        };
        decode_event(data, &mut scalars).map_err(corrupt)?;
    }
    Ok(scalars)
}

/// Splits an event file into its records' protobuf bytes, each with its byte offset.
fn records<'a>(path: &Path, bytes: &'a [u8]) -> Result<Vec<(u64, &'a [u8])>> {
    let mut records = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let corrupt = |problem: String| Error::CorruptEventFile {
            path: path.to_path_buf(),
            offset: offset as u64,
            problem,
        };
        let rest = &bytes[offset..];
        let (Some(length), Some(length_crc)) = (read_u64(rest, 0), read_u32(rest, 8)) else {
            return Err(corrupt(format!(
                "truncated record header: {} of 12 bytes",
                rest.len()
            )));
        };
        if masked_crc32c(&rest[..8]) != length_crc {
            return Err(corrupt(
                "checksum of the record length does not match".to_owned(),
            ));
        }
        let available = (rest.len() - 12) as u64;
        if length.saturating_add(4) > available {
            return Err(corrupt(format!(
                "truncated record: {length} data bytes and a checksum announced, {available} bytes left"
            )));
        }
        let end = 12 + length as usize;
        let data = &rest[12..end];
        if read_u32(rest, end) != Some(masked_crc32c(data)) {
            return Err(corrupt(
                "checksum of the record data does not match".to_owned(),
            ));
        }
        records.push((offset as u64, data));
        offset += end + 4;
    }
    Ok(records)
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn wall_time_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The machine's name for the file name, as Python's `socket.gethostname()` gives it.
pub(crate) fn hostname() -> String {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let name = from_kernel
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    // The name ends up in a file name: keep it to characters that are safe there.
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

// ---------------------------------------------------------------------------------------------
// Protobuf: the wire format of the handful of fields used (`Event`, `Summary`, `Summary.Value`).

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_BYTES: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn field_key(field: u8, wire_type: u8) -> u8 {
    (field << 3) | wire_type
}

fn encode_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn encode_bytes_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field_key(field, WIRE_BYTES));
    encode_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event.wall_time` (field 1, double) and `Event.step` (field 2, int64; a negative step is the
/// ten-byte two's-complement varint protobuf uses).
fn encode_event_header(out: &mut Vec<u8>, wall_time: f64, step: i64) {
    out.push(field_key(1, WIRE_FIXED64));
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(field_key(2, WIRE_VARINT));
    encode_varint(out, step as u64);
}

/// A protobuf field as read from the wire.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

/// Iterates over the `(field number, value)` pairs of one protobuf message.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at).ok_or("truncated varint")?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".to_owned())
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(count)
            .filter(|&end| end <= self.bytes.len())
            .ok_or("field runs past the end of its message")?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn next_field(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.at == self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match (key & 7) as u8 {
            WIRE_VARINT => Field::Varint(self.varint()?),
            WIRE_FIXED64 => Field::Fixed64(self.take(8)?.try_into().map_err(|_| "short fixed64")?),
            WIRE_BYTES => {
                let length =
                    usize::try_from(self.varint()?).map_err(|_| "length does not fit in memory")?;
                Field::Bytes(self.take(length)?)
            }
            WIRE_FIXED32 => Field::Fixed32(self.take(4)?.try_into().map_err(|_| "short fixed32")?),
            other => return Err(format!("unsupported protobuf wire type {other}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

/// Decodes one `Event`, appending its scalar summary values (other events, like the file version,
/// carry none).
fn decode_event(bytes: &[u8], scalars: &mut Vec<Scalar>) -> Result<(), String> {
    let (mut wall_time, mut step) = (0.0, 0i64);
    let mut values = Vec::new();
    let mut fields = Fields::new(bytes);
    while let Some((number, field)) = fields.next_field()? {
        match (number, field) {
            (1, Field::Fixed64(raw)) => wall_time = f64::from_le_bytes(raw),
            (2, Field::Varint(raw)) => step = raw as i64,
            (5, Field::Bytes(summary)) => decode_summary(summary, &mut values)?,
            _ => {}
        }
    }
    scalars.extend(values.into_iter().map(|(tag, value)| Scalar {
        tag,
        step,
        value,
        wall_time,
    }));
    Ok(())
}

/// Decodes a `Summary`'s `Value`s that hold a `simple_value`.
fn decode_summary(bytes: &[u8], values: &mut Vec<(String, f32)>) -> Result<(), String> {
    let mut fields = Fields::new(bytes);
    while let Some((number, field)) = fields.next_field()? {
        let (1, Field::Bytes(value_bytes)) = (number, field) else {
            continue;
        };
        let (mut tag, mut simple_value) = (String::new(), None);
        let mut value_fields = Fields::new(value_bytes);
        while let Some((number, field)) = value_fields.next_field()? {
            match (number, field) {
                (1, Field::Bytes(raw)) => {
                    tag = String::from_utf8(raw.to_vec()).map_err(|_| "summary tag is not UTF-8")?
                }
                (2, Field::Fixed32(raw)) => simple_value = Some(f32::from_le_bytes(raw)),
                _ => {}
            }
        }
        if let Some(value) = simple_value {
            values.push((tag, value));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli), the checksum of TFRecords.

/// The Castagnoli polynomial, bit-reversed (the CRC is computed least significant bit first).
const CASTAGNOLI_REVERSED: u32 = 0x82f6_3b78;

/// The CRC of every byte value, built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ CASTAGNOLI_REVERSED
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
};

/// CRC32C of `bytes`.
fn crc32c(bytes: &[u8]) -> u32 {
    let crc = bytes.iter().fold(!0u32, |crc, &byte| {
        CRC32C_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8)
    });
    !crc
}

/// The CRC as TFRecords store it: rotated and offset, because a CRC of data that itself contains
/// CRCs is weak (`tensorflow/core/lib/hash/crc32c.h`, `Mask`).
fn masked_crc32c(bytes: &[u8]) -> u32 {
    crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

mod append;
mod summaries;

pub use summaries::{HParam, Image, read_images};

#[cfg(test)]
mod tests;
