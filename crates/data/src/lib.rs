//! Image-caption datasets for diffusion fine-tuning.
//!
//! - **Sources** ([`Source`]): a hub dataset repository ([`HubDataset`], through the standard
//!   Hugging Face cache), local parquet files as the `datasets` library writes them, an
//!   `imagefolder` with `metadata.jsonl`, or a folder of images with `.txt` captions.
//! - **Selection and captions** ([`DatasetConfig`]): first N rows or a seeded subset, repeats,
//!   caption column or instance prompt, a template and caption dropout.
//! - **Per-step transforms** ([`transform`]): antialiased resize, centre or random crop reporting its
//!   top-left, random flip, `[-1, 1]` pixels; aspect-ratio [`Buckets`].
//! - **Caches** ([`TensorCache`]): latents and text embeddings keyed by content ([`CacheKey`]).
//! - **Loader** ([`Loader`]): worker threads, deterministic for a seed and step.
//!
//! The crate knows nothing of SDXL beyond returning each sample's original size and crop corner.

#![warn(missing_docs)]

mod bucket;
mod cache;
mod dataset;
mod error;
mod folder;
mod hub;
mod loader;
mod parquet;
mod record;
pub mod rng;
mod source;
pub mod transform;

pub use bucket::{BucketConfig, Buckets};
pub use cache::{CacheKey, CacheKeyBuilder, Entry, TensorCache};
pub use dataset::{
    CaptionSource, Captions, Dataset, DatasetConfig, Item, Sample, SampleKey, Selection, Skipped,
};
pub use error::{Error, Result};
pub use hub::HubDataset;
pub use loader::{Batch, Batches, Loader, LoaderConfig};
pub use record::{ImageRef, Origin, RawRow};
pub use source::{Columns, Source};
pub use transform::{CropMode, Pixels, Placement, TransformConfig};
