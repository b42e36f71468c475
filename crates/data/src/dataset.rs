//! A dataset ready for training: the selected rows, decoded once to check them and learn their
//! sizes, with their content hashes, captions and buckets. Samples are made from it per step.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::bucket::{Assignment, BucketConfig, Buckets};
use crate::caption::CaptionRules;
use crate::record::{Origin, RawRow};
use crate::rng::Rng;
use crate::source::Source;
use crate::transform::{self, Pixels, Placement, TransformConfig};
use crate::{Error, Result};

/// Which rows of the source are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every row.
    All,
    /// The first `n` rows in source order (the seed recipe trains on the first 75).
    First(usize),
    /// `count` rows (all if `None`) drawn by a shuffle seeded with `seed`, kept in source order.
    Shuffled {
        /// How many rows; `None` keeps them all.
        count: Option<usize>,
        /// The shuffle's seed.
        seed: u64,
    },
}

/// Where a sample's prompt comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionSource {
    /// The source's caption column (or `.txt` file).
    Column,
    /// One prompt for every image (DreamBooth-style instance prompt).
    Instance(String),
}

/// How prompts are made from captions.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Captions {
    /// The caption column or an instance prompt.
    pub source: CaptionSource,
    /// A template with `{}` where the caption goes, e.g. `"a drawing in naruto style, {}"`.
    pub template: Option<String>,
    /// Probability of replacing the prompt with the empty prompt at a step (classifier-free guidance
    /// training), drawn anew each step.
    pub dropout: f64,
    /// kohya's caption rules, applied at each step to the (templated) caption after `dropout` was
    /// drawn: prefix/suffix, caption dropout, first line only, tag shuffle with kept tags, tag
    /// dropout ([`crate::caption::process_caption`]). `None`: the caption is used as it is.
    pub kohya: Option<CaptionRules>,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
impl Captions {
    /// Sets [`Captions::source`].
    #[must_use]
    pub fn with_source(mut self, source: CaptionSource) -> Self {
        self.source = source;
        self
    }

    /// Sets [`Captions::template`].
    #[must_use]
    pub fn with_template(mut self, template: Option<String>) -> Self {
        self.template = template;
        self
    }

    /// Sets [`Captions::dropout`].
    #[must_use]
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    /// Sets [`Captions::kohya`].
    #[must_use]
    pub fn with_kohya(mut self, kohya: Option<CaptionRules>) -> Self {
        self.kohya = kohya;
        self
    }
}

impl Default for Captions {
    fn default() -> Self {
        Self {
            source: CaptionSource::Column,
            template: None,
            dropout: 0.0,
            kohya: None,
        }
    }
}

/// Everything that decides which samples a dataset yields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DatasetConfig {
    /// Which rows.
    pub selection: Selection,
    /// How often each selected row appears per epoch (kohya's repeats); at least 1. It multiplies
    /// each item's own [`Item::repeats`] (a kohya `<repeats>_<name>` folder's count).
    pub repeats: u32,
    /// Prompts.
    pub captions: Captions,
    /// Target sizes: diffusers' one square, or kohya's buckets. [`Dataset::open`] adds the buckets
    /// its images use, so an opened dataset's `config().buckets.sizes()` are the buckets in use.
    pub buckets: Buckets,
    /// Resize, crop, flip.
    pub transform: TransformConfig,
    /// Leave out rows that fail (undecodable, too small, bad path, missing caption) and report them
    /// in [`Dataset::skipped`] instead of failing.
    pub skip_bad_rows: bool,
    /// Threads used to decode and check the images once at opening.
    pub threads: usize,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
impl DatasetConfig {
    /// Sets [`DatasetConfig::selection`].
    #[must_use]
    pub fn with_selection(mut self, selection: Selection) -> Self {
        self.selection = selection;
        self
    }

    /// Sets [`DatasetConfig::repeats`].
    #[must_use]
    pub fn with_repeats(mut self, repeats: u32) -> Self {
        self.repeats = repeats;
        self
    }

    /// Sets [`DatasetConfig::captions`].
    #[must_use]
    pub fn with_captions(mut self, captions: Captions) -> Self {
        self.captions = captions;
        self
    }

    /// Sets [`DatasetConfig::buckets`].
    #[must_use]
    pub fn with_buckets(mut self, buckets: Buckets) -> Self {
        self.buckets = buckets;
        self
    }

    /// Sets [`DatasetConfig::transform`].
    #[must_use]
    pub fn with_transform(mut self, transform: TransformConfig) -> Self {
        self.transform = transform;
        self
    }

    /// Sets [`DatasetConfig::skip_bad_rows`].
    #[must_use]
    pub fn with_skip_bad_rows(mut self, skip_bad_rows: bool) -> Self {
        self.skip_bad_rows = skip_bad_rows;
        self
    }

    /// Sets [`DatasetConfig::threads`].
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }
}

impl DatasetConfig {
    /// Every row, captions from the `text` column, `resolution²` centre crops as diffusers' scripts
    /// take them, no flip.
    pub fn new(resolution: u32) -> Result<Self> {
        Self::from_buckets(Buckets::square(resolution)?)
    }

    /// As [`DatasetConfig::new`], with kohya's buckets for its bucket flags instead of the square.
    pub fn kohya(buckets: &BucketConfig) -> Result<Self> {
        Self::from_buckets(Buckets::kohya(buckets)?)
    }

    fn from_buckets(buckets: Buckets) -> Result<Self> {
        Ok(Self {
            selection: Selection::All,
            repeats: 1,
            captions: Captions::default(),
            buckets,
            transform: TransformConfig::default(),
            skip_bad_rows: false,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }
}

/// One usable image of the dataset.
#[derive(Debug, Clone)]
pub struct Item {
    /// Where it came from.
    pub origin: Origin,
    /// The encoded image, decoded again at every step.
    pub bytes: Arc<[u8]>,
    /// SHA-256 of `bytes`: the image's identity in cache keys.
    pub content_hash: [u8; 32],
    /// Size `(width, height)` of the decoded image.
    pub size: (u32, u32),
    /// The source's caption, if read.
    pub caption: Option<String>,
    /// Index into the buckets in use (`config().buckets.sizes()`).
    pub bucket: usize,
    /// Size `(width, height)` the image is resized to before the crop (kohya's `resized_size`).
    pub resized: (u32, u32),
    /// How often the item appears per epoch before [`DatasetConfig::repeats`] multiplies it: the
    /// `<repeats>` of a kohya `<repeats>_<name>` folder times its subset's repeats (for
    /// regularization images, as balanced by [`Dataset::open_subsets`]), else 1.
    pub repeats: u32,
    /// The subset it belongs to (an index into [`Dataset::subsets`]; 0 for [`Dataset::open`]).
    pub subset: usize,
}

/// One part of a dataset with its own source, selection, prompts and repeats: a kohya
/// `[[datasets.subsets]]` table, or DreamBooth's instance and class images.
#[derive(Debug, Clone)]
pub struct Subset {
    /// Where its images come from.
    pub source: Source,
    /// Which of the source's rows.
    pub selection: Selection,
    /// How its prompts are made.
    pub captions: Captions,
    /// Multiplies each item's own repeats (kohya's `num_repeats`).
    pub repeats: u32,
    /// Regularization (class) images (kohya's `is_reg`): repeated so that an epoch holds as many of
    /// them as of the other images, as kohya balances them.
    pub is_reg: bool,
}

/// A row left out under `skip_bad_rows`, with the reason.
#[derive(Debug)]
pub struct Skipped {
    /// The error the row produced; its message names the row or file.
    pub error: Error,
}

/// Identifies one sample: which item, at which step and position in the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleKey {
    /// The run's seed.
    pub seed: u64,
    /// Global step (0-based).
    pub step: u64,
    /// Position in the step's batch.
    pub slot: u32,
    /// Index of the item in the dataset.
    pub item: usize,
}

/// One transformed sample.
#[derive(Debug)]
pub struct Sample {
    /// Index of the item in the dataset.
    pub item: usize,
    /// Pixels `[3, height, width]` in `[-1, 1]`.
    pub pixels: Pixels,
    /// The prompt for this step (empty when dropped out).
    pub prompt: String,
    /// The decoded image's size `(height, width)`: SDXL's `original_size`.
    pub original_size: (u32, u32),
    /// SDXL's `crops_coords_top_left` `(top, left)`: the crop's corner in the resized, flipped image
    /// in the square mode; with kohya's buckets, kohya's letterbox corner
    /// ([`kohya_crop_top_left`](crate::kohya_crop_top_left), which may be `-1`), whatever the crop
    /// taken.
    pub crop_top_left: (i32, i32),
    /// The crop's size `(height, width)`, the bucket's: SDXL's `target_size`.
    pub target_size: (u32, u32),
    /// Size `(height, width)` after resizing, before the crop.
    pub resized_size: (u32, u32),
    /// Whether the image was mirrored.
    pub flipped: bool,
    /// SHA-256 of the encoded image.
    pub content_hash: [u8; 32],
}

/// The selected, checked rows of a source with the rules that turn them into samples.
#[derive(Debug)]
pub struct Dataset {
    items: Vec<Item>,
    skipped: Vec<Skipped>,
    config: DatasetConfig,
    subsets: Vec<Subset>,
}

/// Purposes of the random streams, so that changing one option never shifts another's draws.
const STREAM_TRANSFORM: u64 = 1;
const STREAM_CAPTION: u64 = 2;
const STREAM_SELECTION: u64 = 3;

impl Dataset {
    /// Opens `source`, selects rows, decodes each once to check it and learn its size, and assigns
    /// buckets. Fails on the first bad row unless `config.skip_bad_rows`.
    pub fn open(source: &Source, config: DatasetConfig) -> Result<Self> {
        let subset = Subset {
            source: source.clone(),
            selection: config.selection,
            captions: config.captions.clone(),
            repeats: 1,
            is_reg: false,
        };
        Self::open_subsets(vec![subset], config)
    }

    /// Opens several subsets into one dataset sharing `config`'s buckets and transform (its
    /// `selection` and `captions` are the subsets' own). Items keep subset order, then source
    /// order. Regularization subsets are balanced as kohya's DreamBooth dataset does: when they hold
    /// fewer images (counting repeats) than the other subsets, their items' repeats grow, one at a
    /// time in order, until they match.
    pub fn open_subsets(subsets: Vec<Subset>, mut config: DatasetConfig) -> Result<Self> {
        if config.repeats == 0 || subsets.iter().any(|s| s.repeats == 0) {
            return Err(Error::InvalidOption {
                option: "repeats",
                problem: "must be at least 1".into(),
            });
        }
        let mut items = Vec::new();
        let mut skipped = Vec::new();
        for (index, subset) in subsets.iter().enumerate() {
            for row in open_subset(subset, &config)? {
                match row {
                    Ok(Checked { item, bucket }) => items.push(Checked {
                        item: Item {
                            subset: index,
                            repeats: item.repeats * subset.repeats,
                            ..item
                        },
                        bucket,
                    }),
                    Err(error) if config.skip_bad_rows => skipped.push(Skipped { error }),
                    Err(error) => return Err(error),
                }
            }
        }
        let items = number_buckets(&mut config.buckets, items)?;
        if items.is_empty() {
            return Err(Error::EmptySelection {
                reason: format!("all {} selected rows were skipped as bad", skipped.len()),
            });
        }
        let items = balance_regularization(items, &subsets);
        Ok(Self {
            items,
            skipped,
            config,
            subsets,
        })
    }

    /// The subsets, in the order they were opened.
    pub fn subsets(&self) -> &[Subset] {
        &self.subsets
    }

    /// Whether `item` is a regularization (class) image.
    pub fn is_reg(&self, item: usize) -> bool {
        self.items
            .get(item)
            .and_then(|i| self.subsets.get(i.subset))
            .is_some_and(|s| s.is_reg)
    }

    /// The usable items, in source order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// Number of usable items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are no items (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Rows left out under `skip_bad_rows`.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The configuration the dataset was opened with.
    pub fn config(&self) -> &DatasetConfig {
        &self.config
    }

    /// The prompt of `key.item` at `key.step`: caption or instance prompt, templated, maybe dropped,
    /// then through kohya's rules if set (all draws from the step's caption stream).
    pub fn prompt(&self, key: &SampleKey) -> Result<String> {
        let item = self.item(key.item)?;
        let captions = self
            .subsets
            .get(item.subset)
            .map_or(&self.config.captions, |s| &s.captions);
        let mut rng = key_rng(key, STREAM_CAPTION);
        if captions.dropout > 0.0 && rng.chance(captions.dropout) {
            return Ok(String::new());
        }
        let base = match &captions.source {
            CaptionSource::Instance(prompt) => prompt.as_str(),
            CaptionSource::Column => item.caption.as_deref().unwrap_or(""),
        };
        let caption = match &captions.template {
            Some(template) => template.replace("{}", base),
            None => base.to_owned(),
        };
        Ok(match &captions.kohya {
            Some(rules) => rules.apply(&caption, &mut rng),
            None => caption,
        })
    }

    /// The flip and crop of `key.item` at `key.step`, without touching pixels.
    pub fn placement(&self, key: &SampleKey) -> Result<Placement> {
        self.place(key, None)
    }

    /// The placement of `key.item` mirrored or not as asked, whatever the key would draw: what a
    /// cache of both mirror images of a centre crop needs. The crop is the key's (random crops draw
    /// from the key's stream without the flip's draw).
    pub fn placement_flipped(&self, key: &SampleKey, flipped: bool) -> Result<Placement> {
        self.place(key, Some(flipped))
    }

    /// The placement of `key`: the flip drawn from the key's stream, or `flip` when given.
    fn place(&self, key: &SampleKey, flip: Option<bool>) -> Result<Placement> {
        let item = self.item(key.item)?;
        let target = self.bucket_size(item)?;
        let mut rng = key_rng(key, STREAM_TRANSFORM);
        let config = &self.config.transform;
        Ok(if self.config.buckets.is_kohya() {
            let assignment = Assignment {
                bucket: target,
                resized: item.resized,
            };
            match flip {
                None => transform::place_kohya(item.size, assignment, config, &mut rng),
                Some(flipped) => transform::kohya_placement(
                    item.size,
                    assignment,
                    flipped,
                    config.crop,
                    &mut rng,
                ),
            }
        } else {
            let (width, height) = item.size;
            match flip {
                None => transform::place(width, height, target, config, &mut rng),
                Some(flipped) => {
                    let unflipped = TransformConfig {
                        random_flip: false,
                        ..*config
                    };
                    let placement = transform::place(width, height, target, &unflipped, &mut rng);
                    Placement {
                        flipped,
                        ..placement
                    }
                }
            }
        })
    }

    /// Decodes and transforms one sample. A pure function of the key: any thread, any run.
    pub fn sample(&self, key: &SampleKey) -> Result<Sample> {
        self.sample_placed(key, self.placement(key)?)
    }

    /// The sample of `key` with the given placement instead of the one drawn for the key (e.g. the
    /// mirrored twin of a centre crop, to cache both).
    pub fn sample_placed(&self, key: &SampleKey, placement: Placement) -> Result<Sample> {
        let item = self.item(key.item)?;
        let image = transform::decode(&item.bytes, &item.origin, self.config.transform.max_pixels)?;
        let pixels = transform::apply(&image, &placement)?;
        let swap = |(w, h): (u32, u32)| (h, w);
        Ok(Sample {
            item: key.item,
            pixels,
            prompt: self.prompt(key)?,
            original_size: swap(item.size),
            crop_top_left: placement.reported_crop_top_left,
            target_size: swap(placement.target),
            resized_size: swap(placement.resized),
            flipped: placement.flipped,
            content_hash: item.content_hash,
        })
    }

    fn bucket_size(&self, item: &Item) -> Result<(u32, u32)> {
        let sizes = self.config.buckets.sizes();
        sizes
            .get(item.bucket)
            .copied()
            .ok_or_else(|| Error::InvalidOption {
                option: "bucket",
                problem: format!("{} is past the {} buckets", item.bucket, sizes.len()),
            })
    }

    fn item(&self, index: usize) -> Result<&Item> {
        self.items.get(index).ok_or_else(|| Error::InvalidOption {
            option: "item",
            problem: format!("{index} is past the {} items", self.items.len()),
        })
    }
}

/// Checks a subset's prompt rules, then reads, decodes and checks its selected rows.
fn open_subset(subset: &Subset, config: &DatasetConfig) -> Result<Vec<Result<Checked>>> {
    let captions = &subset.captions;
    if !(0.0..=1.0).contains(&captions.dropout) {
        return Err(Error::InvalidOption {
            option: "caption_dropout",
            problem: format!("{} is not a probability", captions.dropout),
        });
    }
    if let Some(rules) = &captions.kohya {
        rules.validate()?;
    }
    let captions_needed = captions.source == CaptionSource::Column;
    let opened = subset.source.open(captions_needed)?;
    let indices = select(opened.len(), subset.selection)?;
    let rows = opened.read_rows(&indices)?;
    Ok(check_rows(rows, config, captions_needed))
}

/// kohya's balancing of regularization images (sd-scripts `DreamBoothDataset.__init__`, commit
/// 48d368fa, `library/train_util.py` lines 2166–2182): regularization items are taken in order,
/// each with its repeats, until they are at least as many as the other items (counting repeats);
/// the rest are left out. If all were taken and they are still fewer, each gets one more repeat in
/// turn until they match.
fn balance_regularization(items: Vec<Item>, subsets: &[Subset]) -> Vec<Item> {
    let is_reg = |item: &Item| subsets.get(item.subset).is_some_and(|s| s.is_reg);
    let train: u64 = items
        .iter()
        .filter(|i| !is_reg(i))
        .map(|i| u64::from(i.repeats))
        .sum();
    let (mut kept, mut reg) = (Vec::with_capacity(items.len()), Vec::new());
    let mut n = 0;
    for item in items {
        if !is_reg(&item) {
            kept.push(item);
        } else if n < train {
            n += u64::from(item.repeats);
            reg.push(kept.len());
            kept.push(item);
        }
    }
    while !reg.is_empty() && n < train {
        for &index in &reg {
            kept[index].repeats += 1;
            n += 1;
            if n >= train {
                break;
            }
        }
    }
    kept
}

/// The random stream of `key` for `stream` (a transform's or a caption's draws).
fn key_rng(key: &SampleKey, stream: u64) -> Rng {
    Rng::keyed(
        key.seed,
        &[stream, key.step, u64::from(key.slot), key.item as u64],
    )
}

/// The selected row indices, ascending.
fn select(available: usize, selection: Selection) -> Result<Vec<usize>> {
    let indices: Vec<usize> = match selection {
        Selection::All => (0..available).collect(),
        Selection::First(n) => (0..n.min(available)).collect(),
        Selection::Shuffled { count, seed } => {
            let mut all: Vec<usize> = (0..available).collect();
            Rng::keyed(seed, &[STREAM_SELECTION]).shuffle(&mut all);
            all.truncate(count.unwrap_or(available));
            all.sort_unstable();
            all
        }
    };
    if indices.is_empty() {
        return Err(Error::EmptySelection {
            reason: format!("{selection:?} of a source with {available} rows selects nothing"),
        });
    }
    Ok(indices)
}

/// An item whose bucket is known by size, not yet by index.
struct Checked {
    item: Item,
    bucket: (u32, u32),
}

/// Adds the items' buckets to `buckets` (kohya's `add_if_new_reso`, kept sorted) and gives each item
/// its bucket's index.
fn number_buckets(buckets: &mut Buckets, checked: Vec<Checked>) -> Result<Vec<Item>> {
    for row in &checked {
        buckets.add(row.bucket);
    }
    checked
        .into_iter()
        .map(|Checked { mut item, bucket }| {
            item.bucket = buckets.index(bucket).ok_or_else(|| {
                Error::Worker(format!("bucket {bucket:?} missing after being added"))
            })?;
            Ok(item)
        })
        .collect()
}

/// Reads, hashes, decodes and size-checks rows on `config.threads` threads, keeping their order.
fn check_rows(
    rows: Vec<Result<RawRow>>,
    config: &DatasetConfig,
    captions_needed: bool,
) -> Vec<Result<Checked>> {
    let threads = config.threads.clamp(1, rows.len().max(1));
    let chunk = rows.len().div_ceil(threads).max(1);
    let mut rows: Vec<Option<Result<RawRow>>> = rows.into_iter().map(Some).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks_mut(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter_mut()
                        .map(|row| match row.take() {
                            Some(row) => check_row(row?, config, captions_needed),
                            None => Err(Error::Worker("row taken twice".into())),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    vec![Err(Error::Worker("image check thread panicked".into()))]
                })
            })
            .collect()
    })
}

fn check_row(row: RawRow, config: &DatasetConfig, captions_needed: bool) -> Result<Checked> {
    if captions_needed && row.caption.is_none() {
        return Err(Error::BadCell {
            origin: row.origin,
            problem: "no caption".into(),
        });
    }
    let bytes = row.image.bytes()?;
    let image = transform::decode(&bytes, &row.origin, config.transform.max_pixels)?;
    let size = image.dimensions();
    let Some(assignment) = config.buckets.select(size.0, size.1) else {
        // kohya's --bucket_no_upscale cannot bucket an image narrower or shorter than one step.
        let steps = config.buckets.no_upscale_steps().unwrap_or(1);
        return Err(Error::ImageTooSmall {
            origin: row.origin,
            width: size.0,
            height: size.1,
            crop_width: steps,
            crop_height: steps,
        });
    };
    if !config.buckets.is_kohya() {
        transform::check_size(
            size.0,
            size.1,
            assignment.bucket,
            &config.transform,
            &row.origin,
        )?;
    }
    let (resized_width, resized_height) = assignment.resized;
    if u64::from(resized_width) * u64::from(resized_height) > config.transform.max_pixels {
        return Err(Error::ResizedTooLarge {
            origin: row.origin,
            width: size.0,
            height: size.1,
            resized_width,
            resized_height,
            bucket_width: assignment.bucket.0,
            bucket_height: assignment.bucket.1,
            max: config.transform.max_pixels,
        });
    }
    Ok(Checked {
        item: Item {
            content_hash: Sha256::digest(&bytes).into(),
            bytes: bytes.into(),
            origin: row.origin,
            size,
            caption: row.caption,
            bucket: 0,
            repeats: row.repeats,
            subset: 0,
            resized: assignment.resized,
        },
        bucket: assignment.bucket,
    })
}
