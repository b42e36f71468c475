//! The error type of the `data` crate.
//!
//! Every variant that comes from a user's dataset names the culprit: the file, the row (as an
//! [`Origin`]), the column or the option, so that a bad row in a thousand-image dataset can be found.

use std::path::PathBuf;

use crate::record::Origin;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// libtorch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),

    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A parquet file could not be read.
    #[error("{path}: not a readable parquet file: {source}")]
    Parquet {
        /// The parquet file.
        path: PathBuf,
        /// What the parquet reader said.
        source: parquet::errors::ParquetError,
    },

    /// A column the configuration asks for is not in the file.
    #[error("{path}: no column `{column}` (the file has: {available})")]
    MissingColumn {
        /// The parquet file.
        path: PathBuf,
        /// The column asked for.
        column: String,
        /// The top-level columns the file has, comma-separated.
        available: String,
    },

    /// A column has a type this crate cannot read as an image or a caption.
    #[error("{path}: column `{column}` is {found}, expected {expected}")]
    ColumnType {
        /// The parquet file.
        path: PathBuf,
        /// The column.
        column: String,
        /// What was found.
        found: String,
        /// What would be accepted.
        expected: &'static str,
    },

    /// A row's cell is missing or of the wrong kind.
    #[error("{origin}: {problem}")]
    BadCell {
        /// The row.
        origin: Origin,
        /// What is wrong with it.
        problem: String,
    },

    /// A line of `metadata.jsonl` is not a JSON object with the expected fields.
    #[error("{path}:{line}: {problem}")]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },

    /// An image has no caption file next to it.
    #[error("{image}: no caption file {caption} next to it")]
    MissingCaptionFile {
        /// The image.
        image: PathBuf,
        /// The `.txt` file that was looked for.
        caption: PathBuf,
    },

    /// A folder of a kohya-layout dataset (`<repeats>_<class tokens>` subfolders) that breaks the
    /// layout: a subfolder without a repeat count or with 0, an image outside the subfolders.
    #[error("{path}: {problem}")]
    KohyaFolder {
        /// The subfolder or file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// A path given by the dataset points outside the dataset's folder.
    #[error("{origin}: image path `{path}` escapes the dataset folder {root}")]
    PathEscapesRoot {
        /// The row that names the path.
        origin: Origin,
        /// The path as written in the dataset.
        path: String,
        /// The dataset folder.
        root: PathBuf,
    },

    /// An image's bytes could not be decoded.
    #[error("{origin}: cannot decode the image: {source}")]
    Undecodable {
        /// The row or file.
        origin: Origin,
        /// What the decoder said.
        source: image::ImageError,
    },

    /// An image has more pixels than an image may have ([`crate::TransformConfig::max_pixels`];
    /// PIL's limit by default), read from its header before decoding.
    #[error(
        "{origin}: image {width}x{height} has more than the {max} pixels an image may have \
         (PIL's limit, as a decompression bomb); scale it down"
    )]
    TooManyPixels {
        /// The row or file.
        origin: Origin,
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// The limit.
        max: u64,
    },

    /// Resizing an image to cover its bucket would make more pixels than an image may have
    /// ([`crate::TransformConfig::max_pixels`]): an extreme aspect ratio (a 65,000 × 1 image
    /// covering a 1024 px square is 67 million pixels wide).
    #[error(
        "{origin}: image {width}x{height} would be resized to {resized_width}x{resized_height} to \
         cover its {bucket_width}x{bucket_height} bucket, more than the {max} pixels an image may \
         have (PIL's limit); crop it to a less extreme aspect ratio"
    )]
    ResizedTooLarge {
        /// The row or file.
        origin: Origin,
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// Width it would be resized to.
        resized_width: u32,
        /// Height it would be resized to.
        resized_height: u32,
        /// Bucket (crop) width.
        bucket_width: u32,
        /// Bucket (crop) height.
        bucket_height: u32,
        /// The limit.
        max: u64,
    },

    /// An image is smaller than the crop it must fill and upscaling is off.
    #[error(
        "{origin}: image {width}x{height} is smaller than the {crop_width}x{crop_height} crop \
         (upscaling is off: allow it, e.g. drop the trainer's --no_upscale, or lower the resolution)"
    )]
    ImageTooSmall {
        /// The row or file.
        origin: Origin,
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// Crop width in pixels.
        crop_width: u32,
        /// Crop height in pixels.
        crop_height: u32,
    },

    /// The selection left no rows to train on.
    #[error("empty selection: {reason}")]
    EmptySelection {
        /// Why nothing is left.
        reason: String,
    },

    /// A configuration value is out of range.
    #[error("invalid option `{option}`: {problem}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// What is wrong with its value.
        problem: String,
    },

    /// The hub could not be reached or answered with an error.
    #[error("hub dataset `{repo}`: {source}")]
    Hub {
        /// The dataset repository id.
        repo: String,
        /// What hf-hub said.
        source: Box<hf_hub::api::sync::ApiError>,
    },

    /// Offline use was asked for (or the hub is unreachable) and the cache lacks the dataset.
    #[error("hub dataset `{repo}` revision `{revision}` is not in the cache {cache}: {reason}")]
    NotCached {
        /// The dataset repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The hub cache folder that was searched.
        cache: PathBuf,
        /// What was missing.
        reason: String,
    },

    /// Resampling an image failed (an internal size mismatch, never expected).
    #[error("resizing an image failed: {0}")]
    Resize(#[from] fast_image_resize::ResizeError),

    /// An image buffer did not match its stated size.
    #[error("image buffer: {0}")]
    ImageBuffer(#[from] fast_image_resize::ImageBufferError),

    /// A worker thread of the loader stopped without answering.
    #[error("loader worker stopped unexpectedly: {0}")]
    Worker(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
