//! Image-caption datasets for diffusion fine-tuning.
//!
//! - **Sources** ([`Source`]): a hub dataset repository ([`HubDataset`], through the standard
//!   Hugging Face cache), local parquet files as the `datasets` library writes them, an
//!   `imagefolder` with `metadata.jsonl`, or a folder of images with caption files ([`CaptionFolder`],
//!   flat or in kohya's `<repeats>_<class tokens>` subfolders).
//! - **Selection and captions** ([`DatasetConfig`]): first N rows or a seeded subset, repeats,
//!   caption column or instance prompt, a template and caption dropout, and kohya's caption rules
//!   ([`CaptionRules`]: prefix/suffix, tag shuffling with kept tags, tag dropout); several
//!   [`Subset`]s in one dataset.
//! - **Target sizes** ([`Buckets`]): diffusers' single square ([`DatasetConfig::new`]), or kohya's
//!   aspect-ratio buckets exactly as sd-scripts' `BucketManager` makes and assigns them, for kohya's
//!   flags `--enable_bucket`, `--min_bucket_reso`, `--max_bucket_reso`, `--bucket_reso_steps` and
//!   `--bucket_no_upscale` ([`BucketConfig`], [`DatasetConfig::kohya`]); a batch holds one bucket.
//! - **Per-step transforms** ([`transform`]): antialiased resize, centre or random crop, random flip,
//!   `[-1, 1]` pixels, with diffusers' geometry for the square and kohya's for buckets.
//! - **Caches** ([`TensorCache`]): latents and text embeddings keyed by content ([`CacheKey`]).
//! - **Loader** ([`Loader`]): worker threads, deterministic for a seed and step.
//!
//! The crate knows nothing of SDXL beyond returning each sample's original size, crop corner and
//! target size as the upstream scripts feed them to SDXL's time ids (for buckets, kohya's corner:
//! see [`kohya_crop_top_left`]). The upstream facts relied on are in `docs/DATA.md`.
//!
//! ```
//! use std::sync::Arc;
//! use data::{CaptionSource, CropMode, Dataset, DatasetConfig, Loader, LoaderConfig, Selection, Source};
//!
//! # fn main() -> data::Result<()> {
//! let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/captioned-images");
//! let source = Source::ImageFolder { root: root.join("imagefolder"), caption_column: None };
//! let mut config = DatasetConfig::new(32)?;
//! config.selection = Selection::First(6);
//! config.captions.source = CaptionSource::Instance("a drawing in naruto style".into());
//! config.transform.crop = CropMode::Random;
//! config.transform.random_flip = true;
//! let loader = Loader::new(Arc::new(Dataset::open(&source, config)?), LoaderConfig::new(2, 42))?;
//! for batch in loader.iter(0, loader.steps_per_epoch()) {
//!     let batch = batch?;
//!     assert_eq!(batch.pixels.size(), [2, 3, 32, 32]);
//!     let sample = &batch.samples[0];
//!     // SDXL's time ids: original size, crop top-left, target size.
//!     let _time_ids = (sample.original_size, sample.crop_top_left, sample.target_size);
//!     assert_eq!(sample.prompt, "a drawing in naruto style");
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod bucket;
mod cache;
pub mod caption;
mod dataset;
mod error;
mod folder;
mod hub;
mod loader;
mod parquet;
mod parquet_compact;
mod parquet_footer;
mod parquet_pages;
mod parquet_thrift;
mod record;
mod rng;
mod source;
pub mod transform;

pub use bucket::{Assignment, BucketConfig, Buckets, kohya_crop_top_left};
pub use cache::{CacheKey, CacheKeyBuilder, Entry, TensorCache};
pub use caption::CaptionRules;
pub use dataset::{
    CaptionSource, Captions, Dataset, DatasetConfig, Item, Sample, SampleKey, Selection, Skipped,
    Subset,
};
pub use error::{Error, Result};
pub use folder::{CaptionFolder, FolderLayout};
pub use hub::HubDataset;
pub use loader::{Batch, Batches, Loader, LoaderConfig};
pub use record::{ImageRef, Origin, RawRow};
pub use rng::Rng;
pub use source::{Columns, Source};
pub use transform::{CropMode, MAX_PIXELS, Pixels, Placement, TransformConfig};
