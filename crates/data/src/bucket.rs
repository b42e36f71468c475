//! Target sizes: the single square of diffusers' SDXL scripts, or aspect-ratio buckets exactly as
//! kohya's sd-scripts make and assign them (`BucketManager` in `library/train_util.py`, v0.10.1).
//!
//! kohya's flags and what they do here ([`BucketConfig`], defaults as kohya's):
//!
//! - `--enable_bucket` off (the default): one bucket, `--resolution` itself; every image is resized
//!   to cover it and centre- or randomly cropped.
//! - `--enable_bucket` on: `--min_bucket_reso` is lowered and `--max_bucket_reso` raised to multiples
//!   of `--bucket_reso_steps` (256, 1024, 64 by default; kohya's SDXL scripts keep these defaults and
//!   only require the steps to divide by 32, see [`BucketConfig::verify_bucket_reso_steps`]). The
//!   candidate buckets are kohya's `make_bucket_resolutions`: the square of side
//!   `⌊√(w·h) / steps⌋·steps`, and for every width from the minimum to the maximum in steps the
//!   tallest height, a multiple of the steps and at most the maximum, with `width·height ≤ w·h`, and
//!   its transpose, sorted. An image whose size is a candidate keeps it; any other goes to the
//!   candidate with the smallest `|bucket w / bucket h − image w / image h|` (float64, the first of
//!   equals in sorted order) and is scaled to cover it, each side rounded `int(x + 0.5)`.
//! - `--bucket_no_upscale`: no candidates; an image larger than `w·h` in area is scaled down to about
//!   that area (kohya's choice between rounding its width or its height to the steps), a smaller one
//!   keeps its size, and its bucket is that size rounded down to the steps. An image narrower or
//!   shorter than one step gets no bucket (kohya fails on it).
//!
//! The buckets in use are those the images land in, sorted by `(width, height)` as kohya's
//! `BucketManager.sort` leaves them; [`Buckets::add`] collects them.

use std::collections::BTreeSet;

use crate::transform::covering_size;
use crate::{Error, Result};

/// kohya's bucket flags, with kohya's meanings and defaults ([`BucketConfig::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BucketConfig {
    /// `--resolution` as `(width, height)`: the bucket area `width·height`, or the single bucket.
    pub resolution: (u32, u32),
    /// `--enable_bucket`: aspect-ratio buckets instead of the single `resolution` bucket.
    pub enable_bucket: bool,
    /// `--min_bucket_reso`: the smallest bucket side (lowered to a multiple of the steps).
    pub min_bucket_reso: u32,
    /// `--max_bucket_reso`: the largest bucket side (raised to a multiple of the steps).
    pub max_bucket_reso: u32,
    /// `--bucket_reso_steps`: bucket sides are multiples of this.
    pub bucket_reso_steps: u32,
    /// `--bucket_no_upscale`: one bucket per image size, never enlarging an image.
    pub bucket_no_upscale: bool,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
/// [`BucketConfig::new`] at SDXL's 1024 × 1024.
impl Default for BucketConfig {
    fn default() -> Self {
        Self::new((1024, 1024))
    }
}

impl BucketConfig {
    /// Sets [`BucketConfig::resolution`].
    #[must_use]
    pub fn with_resolution(mut self, resolution: (u32, u32)) -> Self {
        self.resolution = resolution;
        self
    }

    /// Sets [`BucketConfig::enable_bucket`].
    #[must_use]
    pub fn with_enable_bucket(mut self, enable_bucket: bool) -> Self {
        self.enable_bucket = enable_bucket;
        self
    }

    /// Sets [`BucketConfig::min_bucket_reso`].
    #[must_use]
    pub fn with_min_bucket_reso(mut self, min_bucket_reso: u32) -> Self {
        self.min_bucket_reso = min_bucket_reso;
        self
    }

    /// Sets [`BucketConfig::max_bucket_reso`].
    #[must_use]
    pub fn with_max_bucket_reso(mut self, max_bucket_reso: u32) -> Self {
        self.max_bucket_reso = max_bucket_reso;
        self
    }

    /// Sets [`BucketConfig::bucket_reso_steps`].
    #[must_use]
    pub fn with_bucket_reso_steps(mut self, bucket_reso_steps: u32) -> Self {
        self.bucket_reso_steps = bucket_reso_steps;
        self
    }

    /// Sets [`BucketConfig::bucket_no_upscale`].
    #[must_use]
    pub fn with_bucket_no_upscale(mut self, bucket_no_upscale: bool) -> Self {
        self.bucket_no_upscale = bucket_no_upscale;
        self
    }
}

impl BucketConfig {
    /// kohya's defaults for `resolution`: buckets off, 256, 1024, steps 64, upscaling allowed.
    pub fn new(resolution: (u32, u32)) -> Self {
        Self {
            resolution,
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
        }
    }

    /// kohya's SDXL scripts' check (`verify_bucket_reso_steps(32)`; 64 for SD 1.x/2.x): with buckets
    /// on, `--bucket_reso_steps` must be a multiple of `min_steps`.
    pub fn verify_bucket_reso_steps(&self, min_steps: u32) -> Result<()> {
        if self.enable_bucket
            && (min_steps == 0 || !self.bucket_reso_steps.is_multiple_of(min_steps))
        {
            return Err(Error::InvalidOption {
                option: "--bucket_reso_steps",
                problem: format!(
                    "{} must be divisible by {min_steps}",
                    self.bucket_reso_steps
                ),
            });
        }
        Ok(())
    }
}

/// Where one image goes: its bucket and the size it is resized to before being cropped to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The bucket `(width, height)`: the size of the crop.
    pub bucket: (u32, u32),
    /// The size `(width, height)` after resizing, at least the bucket's on both sides (kohya's
    /// `resized_size`).
    pub resized: (u32, u32),
}

/// How images are given their target size.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// diffusers' scripts: one square, torchvision's `Resize` (truncating) to cover it.
    Square(u32),
    /// kohya: the nearest of these sorted candidates by aspect ratio (`--enable_bucket` without
    /// `--bucket_no_upscale`, or the single `--resolution` bucket).
    Predefined(Vec<(u32, u32)>),
    /// kohya's `--bucket_no_upscale`: a bucket per image size.
    NoUpscale {
        /// `--resolution`'s area.
        max_area: u64,
        /// `--bucket_reso_steps`.
        steps: u32,
    },
}

/// How images get their target sizes, and the buckets in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    rule: Rule,
    /// The buckets in use, sorted.
    sizes: Vec<(u32, u32)>,
}

impl Buckets {
    /// A single square bucket, as diffusers' scripts crop: every image is resized with torchvision's
    /// `Resize(side)` (the short side to `side`, the long one truncated) and cropped to `side × side`.
    pub fn square(side: u32) -> Result<Self> {
        if side == 0 {
            return Err(Error::InvalidOption {
                option: "resolution",
                problem: "must be positive".into(),
            });
        }
        Ok(Self {
            rule: Rule::Square(side),
            sizes: vec![(side, side)],
        })
    }

    /// kohya's buckets for its flags, refusing what kohya refuses (or crashes on) with an
    /// [`Error::InvalidOption`] naming the flag. No bucket is in use until [`Buckets::add`].
    ///
    /// ```
    /// # fn main() -> data::Result<()> {
    /// let mut flags = data::BucketConfig::new((1024, 1024)); // kohya's defaults: 256, 1024, 64
    /// flags.enable_bucket = true;
    /// let buckets = data::Buckets::kohya(&flags)?;
    /// let photo = buckets.select(3000, 2000).expect("kohya buckets every image when upscaling");
    /// assert_eq!((photo.bucket, photo.resized), ((1024, 704), (1056, 704)));
    /// # Ok(())
    /// # }
    /// ```
    pub fn kohya(config: &BucketConfig) -> Result<Self> {
        let invalid = |option, problem: String| Err(Error::InvalidOption { option, problem });
        let (width, height) = config.resolution;
        if width == 0 || height == 0 {
            return invalid("--resolution", format!("{width},{height} must be positive"));
        }
        if !config.enable_bucket {
            // kohya: BucketManager(False, resolution, None, None, None) with one predefined size.
            return Ok(Self {
                rule: Rule::Predefined(vec![(width, height)]),
                sizes: Vec::new(),
            });
        }
        let steps = config.bucket_reso_steps;
        if steps == 0 {
            return invalid("--bucket_reso_steps", "must be positive".into());
        }
        // kohya's BaseDataset.adjust_min_max_bucket_reso_by_steps.
        let min_reso = config.min_bucket_reso - config.min_bucket_reso % steps;
        let max_reso = match u64::from(config.max_bucket_reso) % u64::from(steps) {
            0 => u64::from(config.max_bucket_reso),
            rest => u64::from(config.max_bucket_reso) + u64::from(steps) - rest,
        };
        if width.min(height) < min_reso {
            return invalid(
                "--min_bucket_reso",
                format!(
                    "{} (lowered to {min_reso}, a multiple of --bucket_reso_steps {steps}) must be \
                     at most the resolution's shorter side {}",
                    config.min_bucket_reso,
                    width.min(height)
                ),
            );
        }
        if u64::from(width.max(height)) > max_reso {
            return invalid(
                "--max_bucket_reso",
                format!(
                    "{} (raised to {max_reso}, a multiple of --bucket_reso_steps {steps}) must be at \
                     least the resolution's longer side {}",
                    config.max_bucket_reso,
                    width.max(height)
                ),
            );
        }
        let max_area = u64::from(width) * u64::from(height);
        if config.bucket_no_upscale {
            // kohya ignores the minimum and maximum here (after checking them as above).
            return Ok(Self {
                rule: Rule::NoUpscale { max_area, steps },
                sizes: Vec::new(),
            });
        }
        if min_reso == 0 {
            // kohya divides the area by each width from the minimum up: a ZeroDivisionError.
            return invalid(
                "--min_bucket_reso",
                format!(
                    "{} is lowered to 0 by --bucket_reso_steps {steps}; it must be at least {steps}",
                    config.min_bucket_reso
                ),
            );
        }
        let candidates =
            make_bucket_resolutions(max_area, u64::from(min_reso), max_reso, u64::from(steps));
        let Ok(candidates) = candidates
            .into_iter()
            .map(|(w, h)| Ok((u32::try_from(w)?, u32::try_from(h)?)))
            .collect::<Result<Vec<_>, std::num::TryFromIntError>>()
        else {
            return invalid("--max_bucket_reso", format!("{max_reso} is too large"));
        };
        Ok(Self {
            rule: Rule::Predefined(candidates),
            sizes: Vec::new(),
        })
    }

    /// Whether sizes follow kohya's rules (resize `int(x + 0.5)`, kohya's crops and crop corner)
    /// rather than diffusers' square crop.
    pub fn is_kohya(&self) -> bool {
        !matches!(self.rule, Rule::Square(_))
    }

    /// The candidate buckets, sorted: kohya's `predefined_resos` (empty under `--bucket_no_upscale`,
    /// where every image size makes its own), or the one square.
    pub fn candidates(&self) -> &[(u32, u32)] {
        match &self.rule {
            Rule::Square(_) => &self.sizes,
            Rule::Predefined(resos) => resos,
            Rule::NoUpscale { .. } => &[],
        }
    }

    /// The buckets in use (the square, or those [`Buckets::add`] was given), sorted by `(width,
    /// height)`. Items and batches refer to buckets by their index here.
    pub fn sizes(&self) -> &[(u32, u32)] {
        &self.sizes
    }

    /// The bucket and resized size of a `width × height` image (kohya's `select_bucket`; diffusers'
    /// covering resize in the square mode), or `None` where kohya cannot bucket it: under
    /// `--bucket_no_upscale`, an image that would get a bucket side of 0 (narrower or shorter than
    /// one step), and any image with a side of 0.
    pub fn select(&self, width: u32, height: u32) -> Option<Assignment> {
        if width == 0 || height == 0 {
            return None;
        }
        match &self.rule {
            Rule::Square(side) => Some(Assignment {
                bucket: (*side, *side),
                resized: covering_size(width, height, (*side, *side)),
            }),
            Rule::Predefined(resos) => Some(select_predefined(resos, width, height)),
            Rule::NoUpscale { max_area, steps } => {
                select_no_upscale(*max_area, *steps, width, height)
            }
        }
    }

    /// Puts `bucket` among the buckets in use if it is new (kohya's `add_if_new_reso`), keeping them
    /// sorted (kohya's `sort`); the indices of larger buckets shift.
    pub fn add(&mut self, bucket: (u32, u32)) {
        if let Err(at) = self.sizes.binary_search(&bucket) {
            self.sizes.insert(at, bucket);
        }
    }

    /// The index of `bucket` among the buckets in use.
    pub fn index(&self, bucket: (u32, u32)) -> Option<usize> {
        self.sizes.binary_search(&bucket).ok()
    }

    /// The side no image may fall below under `--bucket_no_upscale` (the steps), if that is on.
    pub(crate) fn no_upscale_steps(&self) -> Option<u32> {
        match self.rule {
            Rule::NoUpscale { steps, .. } => Some(steps),
            _ => None,
        }
    }
}

/// kohya's `make_bucket_resolutions(max_reso, min_size, max_size, divisible)`
/// (`library/model_util.py`), sorted.
fn make_bucket_resolutions(
    max_area: u64,
    min_size: u64,
    max_size: u64,
    divisible: u64,
) -> Vec<(u64, u64)> {
    let mut resos = BTreeSet::new();
    // int(math.sqrt(max_area) // divisible) * divisible
    let side = py_floor_div((max_area as f64).sqrt(), divisible as f64) as u64 * divisible;
    resos.insert((side, side));
    let mut width = min_size;
    while width <= max_size {
        let height = max_size.min(max_area / width / divisible * divisible);
        if height >= min_size {
            resos.insert((width, height));
            resos.insert((height, width));
        }
        width += divisible;
    }
    resos.into_iter().collect()
}

/// kohya's `select_bucket` without `--bucket_no_upscale`: the image's own size if it is a candidate,
/// else the first candidate of least aspect-ratio error; scaled to cover it.
fn select_predefined(resos: &[(u32, u32)], width: u32, height: u32) -> Assignment {
    let aspect_ratio = f64::from(width) / f64::from(height);
    let bucket = if resos.binary_search(&(width, height)).is_ok() {
        (width, height)
    } else {
        // np.abs(predefined_aspect_ratios - aspect_ratio).argmin(): the first of equal errors.
        let mut best = (f64::INFINITY, resos[0]);
        for &(w, h) in resos {
            let error = (f64::from(w) / f64::from(h) - aspect_ratio).abs();
            if error < best.0 {
                best = (error, (w, h));
            }
        }
        best.1
    };
    let bucket_ratio = f64::from(bucket.0) / f64::from(bucket.1);
    let scale = if aspect_ratio > bucket_ratio {
        f64::from(bucket.1) / f64::from(height)
    } else {
        f64::from(bucket.0) / f64::from(width)
    };
    let resized = (
        py_int(f64::from(width) * scale + 0.5),
        py_int(f64::from(height) * scale + 0.5),
    );
    Assignment { bucket, resized }
}

/// kohya's `select_bucket` with `--bucket_no_upscale`; `None` where kohya divides by zero or would
/// make a bucket side of 0.
fn select_no_upscale(max_area: u64, steps: u32, width: u32, height: u32) -> Option<Assignment> {
    let aspect_ratio = f64::from(width) / f64::from(height);
    let steps64 = u64::from(steps);
    let round_to_steps = |x: f64| {
        let x = py_int_u64(x + 0.5);
        x - x % steps64
    };
    let resized = if u64::from(width) * u64::from(height) > max_area {
        let resized_width = (max_area as f64 * aspect_ratio).sqrt();
        let resized_height = max_area as f64 / resized_width;
        // kohya asserts this ("aspect is illegal").
        if (resized_width / resized_height - aspect_ratio).abs() >= 1e-2 {
            return None;
        }
        let b_width_rounded = round_to_steps(resized_width);
        let b_height_in_wr = round_to_steps(b_width_rounded as f64 / aspect_ratio);
        if b_height_in_wr == 0 {
            return None;
        }
        let ar_width_rounded = b_width_rounded as f64 / b_height_in_wr as f64;
        let b_height_rounded = round_to_steps(resized_height);
        let b_width_in_hr = round_to_steps(b_height_rounded as f64 * aspect_ratio);
        if b_height_rounded == 0 {
            return None;
        }
        let ar_height_rounded = b_width_in_hr as f64 / b_height_rounded as f64;
        let (w, h) =
            if (ar_width_rounded - aspect_ratio).abs() < (ar_height_rounded - aspect_ratio).abs() {
                (
                    b_width_rounded,
                    py_int_u64(b_width_rounded as f64 / aspect_ratio + 0.5),
                )
            } else {
                (
                    py_int_u64(b_height_rounded as f64 * aspect_ratio + 0.5),
                    b_height_rounded,
                )
            };
        (u32::try_from(w).ok()?, u32::try_from(h).ok()?)
    } else {
        (width, height)
    };
    let bucket = (resized.0 - resized.0 % steps, resized.1 - resized.1 % steps);
    if bucket.0 == 0 || bucket.1 == 0 {
        return None;
    }
    Some(Assignment { bucket, resized })
}

/// kohya's `BucketManager.get_crop_ltrb` as `BaseDataset.__getitem__` turns it into SDXL's
/// `crop_top_lefts`: not the crop that was taken but where the image would sit, centred, if it were
/// scaled to fit inside the bucket (the letterbox corner of Stability AI's preprocessing), in whole
/// pixels `(top, left)`; when flipped, the left is the bucket width minus the letterbox's right edge.
/// The same for centre and random crops.
///
/// kohya's float arithmetic makes this `-1` where the fitted image overshoots the bucket by a
/// rounding error: an image of exactly the bucket's aspect ratio whose bucket height is not exactly
/// `width / (width / height)` (e.g. 384×1504, 736×1376, 1088×896), so the corner is signed.
pub fn kohya_crop_top_left(bucket: (u32, u32), image: (u32, u32), flipped: bool) -> (i32, i32) {
    let (bucket_w, bucket_h) = (f64::from(bucket.0), f64::from(bucket.1));
    let bucket_ar = bucket_w / bucket_h;
    let image_ar = f64::from(image.0) / f64::from(image.1);
    let (resized_width, resized_height) = if bucket_ar > image_ar {
        (bucket_h * image_ar, bucket_h)
    } else {
        (bucket_w, bucket_w / image_ar)
    };
    let crop_left = py_floor_div(bucket_w - resized_width, 2.0);
    let crop_top = py_floor_div(bucket_h - resized_height, 2.0);
    let left = if flipped {
        bucket_w - (crop_left + resized_width)
    } else {
        crop_left
    };
    // Python's int() truncates toward zero: -1.0 stays -1, a flipped -0.000…1 becomes 0.
    (crop_top.trunc() as i32, left.trunc() as i32)
}

/// Python's `int(x)` for a float: truncation toward zero (saturating at the ends of `u32`, and 0 for
/// negative values).
fn py_int(x: f64) -> u32 {
    x.trunc() as u32
}

/// Python's `int(x)` into `u64`.
fn py_int_u64(x: f64) -> u64 {
    x.trunc() as u64
}

/// Python's float floor division `a // b` (CPython's `float_floor_div`): exact, unlike
/// `(a / b).floor()`, whose quotient may round up to the next integer.
fn py_floor_div(a: f64, b: f64) -> f64 {
    let rest = a % b;
    let mut div = (a - rest) / b;
    if rest != 0.0 && ((b < 0.0) != (rest < 0.0)) {
        div -= 1.0;
    }
    let mut floor = div.floor();
    if div - floor > 0.5 {
        floor += 1.0;
    }
    floor
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kohya(resolution: u32, min: u32, max: u32, steps: u32, no_upscale: bool) -> Result<Buckets> {
        Buckets::kohya(&BucketConfig {
            resolution: (resolution, resolution),
            enable_bucket: true,
            min_bucket_reso: min,
            max_bucket_reso: max,
            bucket_reso_steps: steps,
            bucket_no_upscale: no_upscale,
        })
    }

    #[test]
    fn sdxl_with_kohyas_defaults_caps_the_long_side_at_1024() {
        let buckets = kohya(1024, 256, 1024, 64, false).unwrap();
        let candidates = buckets.candidates();
        assert_eq!(candidates.len(), 25);
        assert!(candidates.iter().all(|&(w, h)| w.max(h) == 1024));
        assert_eq!((candidates[0], candidates[24]), ((256, 1024), (1024, 1024)));
        // 1920x1080 (ar 1.778): nearest is 1024x576 (ar 1.778), covered exactly.
        let at = buckets.select(1920, 1080).unwrap();
        assert_eq!((at.bucket, at.resized), ((1024, 576), (1024, 576)));
        // A candidate size is kept as it is.
        assert_eq!(buckets.select(640, 1024).unwrap().bucket, (640, 1024));
    }

    #[test]
    fn ties_go_to_the_first_candidate() {
        let buckets = kohya(1024, 256, 1024, 64, false).unwrap();
        // 31:32 = 0.96875 is exactly halfway between 960x1024 (0.9375) and 1024x1024 (1.0).
        assert_eq!(buckets.select(992, 1024).unwrap().bucket, (960, 1024));
    }

    #[test]
    fn no_upscale_buckets_follow_each_image() {
        let mut buckets = kohya(1024, 256, 1024, 64, true).unwrap();
        assert!(buckets.candidates().is_empty() && buckets.sizes().is_empty());
        let small = buckets.select(700, 300).unwrap();
        assert_eq!((small.bucket, small.resized), ((640, 256), (700, 300)));
        assert_eq!(buckets.select(40, 300), None);
        for size in [(1024, 1024), (640, 256), (640, 256), (256, 640)] {
            buckets.add(size);
        }
        assert_eq!(buckets.sizes(), [(256, 640), (640, 256), (1024, 1024)]);
        assert_eq!(buckets.index((640, 256)), Some(1));
    }

    #[test]
    fn crop_corner_is_the_letterbox_of_the_fitted_image() {
        // 2223x2012 into 1024x896: fitted 990x896, centred at left 17; flipped, 1024 - 17 - 990 = 17.
        assert_eq!(
            kohya_crop_top_left((1024, 896), (2223, 2012), false),
            (0, 17)
        );
        assert_eq!(
            kohya_crop_top_left((1024, 896), (2223, 2012), true),
            (0, 17)
        );
        assert_eq!(
            kohya_crop_top_left((1024, 1024), (1024, 1024), true),
            (0, 0)
        );
        // 1088 / (1088 / 896) = 896.0000000000001: kohya's floor((896 - that) / 2) is -1.
        assert_eq!(
            kohya_crop_top_left((1088, 896), (2176, 1792), false),
            (-1, 0)
        );
        assert_eq!(
            kohya_crop_top_left((1088, 896), (2176, 1792), true),
            (-1, 0)
        );
    }

    #[test]
    fn python_floor_division() {
        assert_eq!(py_floor_div(7.5, 2.0), 3.0);
        assert_eq!(py_floor_div(-0.5, 2.0), -1.0);
        assert_eq!(py_floor_div(1024.0, 64.0), 16.0);
        assert_eq!(py_floor_div(-1e-13, 2.0), -1.0);
    }

    #[test]
    fn nonsense_configurations_are_refused_naming_the_flag() {
        let flag = |result: Result<Buckets>| match result {
            Err(Error::InvalidOption { option, .. }) => option,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            flag(kohya(1024, 256, 1024, 0, false)),
            "--bucket_reso_steps"
        );
        assert_eq!(
            flag(kohya(1024, 1088, 2048, 64, false)),
            "--min_bucket_reso"
        );
        assert_eq!(flag(kohya(1024, 256, 960, 64, false)), "--max_bucket_reso");
        assert_eq!(flag(kohya(1024, 48, 1024, 64, false)), "--min_bucket_reso");
        assert_eq!(flag(kohya(0, 0, 1024, 64, false)), "--resolution");
        // Under --bucket_no_upscale kohya never uses the minimum, so 0 is accepted as kohya does.
        assert!(kohya(1024, 0, 1024, 64, true).is_ok());
        assert!(Buckets::square(0).is_err());
        let mut sdxl = BucketConfig::new((1024, 1024));
        sdxl.enable_bucket = true;
        assert!(sdxl.verify_bucket_reso_steps(32).is_ok());
        sdxl.bucket_reso_steps = 48;
        assert!(sdxl.verify_bucket_reso_steps(32).is_err());
    }
}
