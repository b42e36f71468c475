//! Image-caption datasets for diffusion fine-tuning.
//!
//! This crate will hold the dataset sources (hub, parquet, imagefolder, folders of `.txt` captions),
//! selection and caption rules, per-step transforms, aspect-ratio buckets, content-keyed caches and
//! the threaded loader.

#![warn(missing_docs)]

mod error;

pub use error::{Error, Result};
