//! Image summaries and the HParams plugin's summaries of [`EventWriter`], and a reader of the images.
//!
//! An image is a `Summary.Value` with `image` (field 4, `Summary.Image`: height 1, width 2,
//! colorspace 3, `encoded_image_string` 4, a PNG), as `torch.utils.tensorboard`'s `add_image` writes it.
//! The hyper-parameters follow the HParams plugin (`tensorboard/plugins/hparams/plugin_data.proto`,
//! `api.proto`) as `torch.utils.tensorboard.summary.hparams` writes them: two `Summary.Value`s with no
//! value, only `metadata` (field 9, `SummaryMetadata.plugin_data`: plugin name `hparams`, content an
//! `HParamsPluginData` of version 0), tagged `_hparams_/experiment` (an `Experiment`: the
//! hyper-parameters' names and types, the metrics' tags) and `_hparams_/session_start_info` (a
//! `SessionStartInfo`: the values, as `google.protobuf.Value`s).

use std::path::Path;

use super::{
    EventWriter, Field, Fields, WIRE_FIXED64, WIRE_VARINT, encode_bytes_field, encode_event_header,
    encode_varint, field_key, io_error, records, wall_time_now,
};
use crate::{Error, Result};

/// A hyper-parameter's value for [`EventWriter::add_hparams`].
#[derive(Clone, Debug, PartialEq)]
pub enum HParam {
    /// A number (`DATA_TYPE_FLOAT64`).
    Number(f64),
    /// A string (`DATA_TYPE_STRING`).
    Text(String),
    /// A boolean (`DATA_TYPE_BOOL`).
    Bool(bool),
}

/// One image summary read back from an event file.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// The summary tag, e.g. `validation`.
    pub tag: String,
    /// The global step it was logged at.
    pub step: i64,
    /// Width and height in pixels, as the summary states them.
    pub size: (i64, i64),
    /// The encoded image (PNG).
    pub encoded: Vec<u8>,
}

/// The width, height and channels of a PNG, from its `IHDR` chunk.
fn png_size(png: &[u8]) -> Option<(u32, u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if !png.starts_with(SIGNATURE) || png.get(12..16) != Some(b"IHDR") {
        return None;
    }
    let width = u32::from_be_bytes(png.get(16..20)?.try_into().ok()?);
    let height = u32::from_be_bytes(png.get(20..24)?.try_into().ok()?);
    let channels = match png.get(25)? {
        0 => 1, // grey
        4 => 2, // grey and alpha
        6 => 4, // RGBA
        _ => 3, // RGB, or a palette decoded to RGB
    };
    Some((width, height, channels))
}

fn varint_field(out: &mut Vec<u8>, field: u8, value: u64) {
    out.push(field_key(field, WIRE_VARINT));
    encode_varint(out, value);
}

fn double_field(out: &mut Vec<u8>, field: u8, value: f64) {
    out.push(field_key(field, WIRE_FIXED64));
    out.extend_from_slice(&value.to_le_bytes());
}

/// A `google.protobuf.Value`.
fn encode_value(value: &HParam) -> Vec<u8> {
    let mut out = Vec::new();
    match value {
        HParam::Number(n) => double_field(&mut out, 2, *n),
        HParam::Text(s) => encode_bytes_field(&mut out, 3, s.as_bytes()),
        HParam::Bool(b) => varint_field(&mut out, 4, u64::from(*b)),
    }
    out
}

/// A `Summary.Value` with `tag` and the HParams plugin's metadata holding `data` (one field of
/// `HParamsPluginData`).
fn hparams_value(tag: &str, data_field: u8, data: &[u8]) -> Vec<u8> {
    let mut plugin_data = Vec::new();
    varint_field(&mut plugin_data, 1, 0); // version
    encode_bytes_field(&mut plugin_data, data_field, data);
    let mut plugin = Vec::new();
    encode_bytes_field(&mut plugin, 1, b"hparams");
    encode_bytes_field(&mut plugin, 2, &plugin_data);
    let mut metadata = Vec::new();
    encode_bytes_field(&mut metadata, 1, &plugin);
    let mut value = Vec::new();
    encode_bytes_field(&mut value, 1, tag.as_bytes());
    encode_bytes_field(&mut value, 9, &metadata);
    value
}

impl EventWriter {
    fn write_summary_value(&mut self, step: i64, value: &[u8]) -> Result<()> {
        let mut summary = Vec::with_capacity(value.len() + 4);
        encode_bytes_field(&mut summary, 1, value);
        let mut event = Vec::with_capacity(summary.len() + 24);
        encode_event_header(&mut event, wall_time_now(), step);
        encode_bytes_field(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Logs the PNG `png` under `tag` at `step` (TensorBoard's Images tab).
    ///
    /// # Errors
    /// [`Error::LogIo`] when `png` is not a PNG (naming the event file) or the file cannot be written.
    pub fn add_image(&mut self, tag: &str, step: i64, png: &[u8]) -> Result<()> {
        let Some((width, height, channels)) = png_size(png) else {
            return Err(Error::LogIo {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the image for `{tag}` is not a PNG"),
                ),
            });
        };
        let mut image = Vec::with_capacity(png.len() + 24);
        varint_field(&mut image, 1, u64::from(height));
        varint_field(&mut image, 2, u64::from(width));
        varint_field(&mut image, 3, u64::from(channels));
        encode_bytes_field(&mut image, 4, png);
        let mut value = Vec::with_capacity(image.len() + tag.len() + 8);
        encode_bytes_field(&mut value, 1, tag.as_bytes());
        encode_bytes_field(&mut value, 4, &image);
        self.write_summary_value(step, &value)
    }

    /// Logs the PNG file `path` under `tag` at `step`.
    ///
    /// # Errors
    /// [`Error::LogIo`] when the file cannot be read or is not a PNG, or the event file cannot be
    /// written.
    pub fn add_image_file(&mut self, tag: &str, step: i64, path: &Path) -> Result<()> {
        let png = std::fs::read(path).map_err(io_error(path))?;
        self.add_image(tag, step, &png)
    }

    /// Logs the run's hyper-parameters for TensorBoard's HParams tab: their names and types, the
    /// scalar tags to show beside them (`metrics`), and their values, at step 0.
    ///
    /// # Errors
    /// [`Error::LogIo`] when the file cannot be written.
    pub fn add_hparams(&mut self, hparams: &[(String, HParam)], metrics: &[&str]) -> Result<()> {
        let mut experiment = Vec::new();
        for (name, value) in hparams {
            let mut info = Vec::new();
            encode_bytes_field(&mut info, 1, name.as_bytes());
            let data_type = match value {
                HParam::Text(_) => 1,
                HParam::Bool(_) => 2,
                HParam::Number(_) => 3,
            };
            varint_field(&mut info, 4, data_type);
            encode_bytes_field(&mut experiment, 4, &info);
        }
        for tag in metrics {
            let mut name = Vec::new();
            encode_bytes_field(&mut name, 2, tag.as_bytes());
            let mut info = Vec::new();
            encode_bytes_field(&mut info, 1, &name);
            encode_bytes_field(&mut experiment, 5, &info);
        }
        let experiment = hparams_value("_hparams_/experiment", 2, &experiment);
        self.write_summary_value(0, &experiment)?;
        let mut start = Vec::new();
        for (name, value) in hparams {
            let mut entry = Vec::new();
            encode_bytes_field(&mut entry, 1, name.as_bytes());
            encode_bytes_field(&mut entry, 2, &encode_value(value));
            encode_bytes_field(&mut start, 1, &entry);
        }
        double_field(&mut start, 5, wall_time_now());
        let start = hparams_value("_hparams_/session_start_info", 3, &start);
        self.write_summary_value(0, &start)
    }
}

/// Every image summary of an event file, in file order, checking both checksums of every record.
///
/// # Errors
/// As [`super::read_scalars`].
pub fn read_images(path: &Path) -> Result<Vec<Image>> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let mut images = Vec::new();
    for (offset, data) in records(path, &bytes)? {
        decode_images(data, &mut images).map_err(|problem| Error::CorruptEventFile {
            path: path.to_path_buf(),
            offset,
            problem,
        })?;
    }
    Ok(images)
}

fn decode_images(event: &[u8], images: &mut Vec<Image>) -> Result<(), String> {
    let mut step = 0i64;
    let mut summaries = Vec::new();
    let mut fields = Fields::new(event);
    while let Some((number, field)) = fields.next_field()? {
        match (number, field) {
            (2, Field::Varint(raw)) => step = raw as i64,
            (5, Field::Bytes(summary)) => summaries.push(summary),
            _ => {}
        }
    }
    for summary in summaries {
        let mut values = Fields::new(summary);
        while let Some((number, field)) = values.next_field()? {
            let (1, Field::Bytes(value)) = (number, field) else {
                continue;
            };
            let (mut tag, mut image) = (String::new(), None);
            let mut value_fields = Fields::new(value);
            while let Some((number, field)) = value_fields.next_field()? {
                match (number, field) {
                    (1, Field::Bytes(raw)) => tag = String::from_utf8_lossy(raw).into_owned(),
                    (4, Field::Bytes(raw)) => image = Some(raw),
                    _ => {}
                }
            }
            let Some(image) = image else { continue };
            let (mut size, mut encoded) = ((0, 0), Vec::new());
            let mut image_fields = Fields::new(image);
            while let Some((number, field)) = image_fields.next_field()? {
                match (number, field) {
                    (1, Field::Varint(h)) => size.1 = h as i64,
                    (2, Field::Varint(w)) => size.0 = w as i64,
                    (4, Field::Bytes(png)) => encoded = png.to_vec(),
                    _ => {}
                }
            }
            images.push(Image {
                tag,
                step,
                size,
                encoded,
            });
        }
    }
    Ok(())
}
