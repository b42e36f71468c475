//! Training data: an imagefolder's `metadata.jsonl` (and the captions in it, through kohya's
//! caption rules), one image file through the decoder and the transforms (resize, crop, flip, into
//! a square or a kohya bucket), and a `datasets` parquet file whose rows go through the same
//! transforms. Each opens a [`Dataset`] as the trainer does and makes every sample of step 0.

use std::path::{Path, PathBuf};

use super::{Outcome, Runner, fresh, put, text};
use data::{
    BucketConfig, CaptionRules, CaptionSource, Captions, Columns, CropMode, Dataset, DatasetConfig,
    SampleKey, Selection, Source,
};

/// At most this many samples are made per input (a row count is the input's to choose).
const MAX_SAMPLES: usize = 8;

/// The pixel limit of the `image` and `parquet` targets' images (`TransformConfig::max_pixels`),
/// decoded or resized: 1024². A few hundred bytes can describe a JPEG of 170 million pixels, whose
/// decoding is legitimate work of seconds, not a hang; under this limit the decoders and the
/// transforms run the same code on at most a million pixels an image, so that what takes long is a
/// finding. The default limit's largest images are timed apart (`tools/fuzz/largest_images.py`,
/// docs/RELIABILITY.md).
const MAX_PIXELS: u64 = 1 << 20;

/// Opens `source` and makes the prompt and pixels of its first [`MAX_SAMPLES`] items.
fn open_and_sample(source: &Source, config: DatasetConfig) -> Outcome {
    let dataset = Dataset::open(source, config).map_err(text)?;
    for item in 0..dataset.len().min(MAX_SAMPLES) {
        let key = SampleKey {
            seed: 7,
            step: 0,
            slot: 0,
            item,
        };
        dataset.prompt(&key).map_err(text)?;
        dataset.sample(&key).map_err(text)?;
    }
    Ok(())
}

/// Square 32 px targets (upscaling allowed, so every image size is a sample), one thread.
fn square_config() -> Result<DatasetConfig, String> {
    let mut config = DatasetConfig::new(32).map_err(text)?;
    config.threads = 1;
    config.transform.allow_upscale = true;
    Ok(config)
}

/// An imagefolder: the input is its `metadata.jsonl`, beside the fixture's images (`000.png` …
/// `007.png`, `002.jpg`, `005.jpg`). Captions from `text`, through kohya's caption rules (tag
/// shuffle, kept tags, `|||` separator, tag dropout), random crops and flips.
pub(super) fn metadata_jsonl(fixtures: &Path, work: &Path) -> Runner {
    let root = work.join("imagefolder");
    let images = fixtures.join("captioned-images/imagefolder");
    let setup = (|| -> Result<(), String> {
        fresh(&root)?;
        for entry in std::fs::read_dir(&images).map_err(text)? {
            let path = entry.map_err(text)?.path();
            if path.extension().is_some_and(|e| e != "jsonl")
                && let Some(name) = path.file_name()
            {
                std::fs::copy(&path, root.join(name)).map_err(text)?;
            }
        }
        Ok(())
    })();
    Box::new(move |data: &[u8]| -> Outcome {
        setup.clone()?;
        put(&root, "metadata.jsonl", data)?;
        let mut config = square_config()?;
        config.transform.crop = CropMode::Random;
        config.transform.random_flip = true;
        config.captions.kohya = Some(
            CaptionRules::default()
                .with_caption_prefix(Some("pre".into()))
                .with_shuffle_caption(true)
                .with_keep_tokens(1)
                .with_keep_tokens_separator(Some("|||".into()))
                .with_caption_tag_dropout_rate(0.2),
        );
        let source = Source::ImageFolder {
            root: root.clone(),
            caption_column: Some("text".into()),
        };
        open_and_sample(&source, config)
    })
}

/// One image file of a caption folder, through the decoder and the transforms. The input's first
/// byte picks the settings (bit 0: kohya buckets 32–128 px instead of the 32 px square; bit 1:
/// random crop; bit 2: flip; bit 3: no upscaling); the rest is the file `image.png` (the decoder
/// goes by the content, so any format).
pub(super) fn image(work: &Path) -> Runner {
    let root = work.join("images");
    Box::new(move |data: &[u8]| -> Outcome {
        let (&mode, bytes) = data.split_first().unwrap_or((&0, &[]));
        fresh(&root)?;
        put(&root, "image.png", bytes)?;
        let mut config = if mode & 1 == 0 {
            square_config()?
        } else {
            let mut buckets = BucketConfig::new((64, 64));
            buckets.enable_bucket = true;
            buckets.min_bucket_reso = 32;
            buckets.max_bucket_reso = 128;
            buckets.bucket_reso_steps = 32;
            buckets.bucket_no_upscale = mode & 8 != 0;
            let mut config = DatasetConfig::kohya(&buckets).map_err(text)?;
            config.threads = 1;
            config
        };
        if mode & 2 != 0 {
            config.transform.crop = CropMode::Random;
        }
        config.transform.random_flip = mode & 4 != 0;
        config.transform.allow_upscale = mode & 8 == 0;
        config.transform.max_pixels = MAX_PIXELS;
        config.captions =
            Captions::default().with_source(CaptionSource::Instance("a photo of sks dog".into()));
        let source = Source::CaptionFiles {
            root: root.clone(),
            read_captions: false,
        };
        open_and_sample(&source, config)
    })
}

/// A `datasets` parquet shard (`image` struct or bytes column, `text` captions), its rows through
/// the transforms; bad rows are skipped and reported, as `--skip_bad_images` does, so the good
/// rows of a damaged file still reach the transforms.
pub(super) fn parquet(work: &Path) -> Runner {
    let work = work.to_owned();
    Box::new(move |data: &[u8]| -> Outcome {
        let path: PathBuf = put(&work, "train-00000-of-00001.parquet", data)?;
        let mut config = square_config()?;
        config.skip_bad_rows = true;
        config.transform.max_pixels = MAX_PIXELS;
        // The rows sampled are the ones opened (each is decoded to be checked): a few kilobytes
        // of dictionary-encoded rows can repeat one image thousands of times.
        config.selection = Selection::First(MAX_SAMPLES);
        let source = Source::Parquet {
            files: vec![path],
            columns: Columns::default(),
        };
        open_and_sample(&source, config)
    })
}
