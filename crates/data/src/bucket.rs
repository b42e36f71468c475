//! Aspect-ratio buckets (NovelAI's "aspect ratio bucketing", as kohya's `BucketManager` does it):
//! sizes whose sides are multiples of a step, within a minimum and maximum side, each with an area
//! close to `resolution²` from below. Every image goes to the bucket whose aspect ratio is nearest to
//! its own, and a batch only holds images of one bucket, so they stack without padding.

use crate::{Error, Result};

/// How bucket sizes are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// The side of the square whose area each bucket approaches, e.g. 1024.
    pub resolution: u32,
    /// Smallest side of a bucket, e.g. 512.
    pub min_side: u32,
    /// Largest side of a bucket, e.g. 2048.
    pub max_side: u32,
    /// Sides are multiples of this, e.g. 64 (the VAE's factor 8 times the UNet's factor 8).
    pub step: u32,
}

/// A set of target sizes `(width, height)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    sizes: Vec<(u32, u32)>,
}

impl Buckets {
    /// A single square bucket: every image is resized and cropped to `side × side`.
    pub fn square(side: u32) -> Result<Self> {
        if side == 0 {
            return Err(Error::InvalidOption {
                option: "resolution",
                problem: "must be positive".into(),
            });
        }
        Ok(Self {
            sizes: vec![(side, side)],
        })
    }

    /// Buckets by area: for each width `w` (a multiple of `step` in `[min_side, max_side]`) the
    /// tallest height, also a multiple of `step` and at most `max_side`, with `w·h ≤ resolution²`.
    pub fn by_area(config: BucketConfig) -> Result<Self> {
        let BucketConfig {
            resolution,
            min_side,
            max_side,
            step,
        } = config;
        let invalid = |option, problem: String| Err(Error::InvalidOption { option, problem });
        if step == 0 {
            return invalid("bucket_step", "must be positive".into());
        }
        if min_side == 0 || min_side > max_side {
            return invalid(
                "bucket_min_side",
                format!("{min_side} must be in 1..={max_side} (the maximum side)"),
            );
        }
        if resolution < min_side || resolution > max_side {
            return invalid(
                "resolution",
                format!("{resolution} must lie in {min_side}..={max_side}"),
            );
        }
        let area = u64::from(resolution) * u64::from(resolution);
        let mut sizes = Vec::new();
        let mut width = min_side.div_ceil(step) * step;
        while width <= max_side {
            let tallest = (area / u64::from(width)) / u64::from(step) * u64::from(step);
            let height = u32::try_from(tallest)
                .unwrap_or(u32::MAX)
                .min(max_side / step * step);
            if height >= min_side && !sizes.contains(&(width, height)) {
                sizes.push((width, height));
            }
            width += step;
        }
        if sizes.is_empty() {
            return invalid(
                "bucket_step",
                format!("no multiple of {step} lies in {min_side}..={max_side}"),
            );
        }
        Ok(Self { sizes })
    }

    /// The bucket sizes `(width, height)`.
    pub fn sizes(&self) -> &[(u32, u32)] {
        &self.sizes
    }

    /// The bucket whose aspect ratio is nearest (in log scale, so 2:1 and 1:2 are equally far from
    /// 1:1) to a `width × height` image; ties go to the first bucket.
    pub fn assign(&self, width: u32, height: u32) -> usize {
        let aspect = (f64::from(width) / f64::from(height.max(1))).ln();
        let distance = |&(w, h): &(u32, u32)| (aspect - (f64::from(w) / f64::from(h)).ln()).abs();
        let mut best = 0;
        for (index, size) in self.sizes.iter().enumerate() {
            if distance(size) < distance(&self.sizes[best]) {
                best = index;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_buckets_keep_their_area_and_bounds() {
        let buckets = Buckets::by_area(BucketConfig {
            resolution: 1024,
            min_side: 512,
            max_side: 2048,
            step: 64,
        })
        .unwrap();
        assert!(buckets.sizes().contains(&(1024, 1024)));
        assert!(buckets.sizes().contains(&(512, 2048)));
        assert!(buckets.sizes().contains(&(2048, 512)));
        assert!(buckets.sizes().contains(&(1152, 896)));
        for &(w, h) in buckets.sizes() {
            assert_eq!((w % 64, h % 64), (0, 0));
            assert!(
                w * h <= 1024 * 1024 && w * h > 1024 * 1024 * 85 / 100,
                "{w}x{h}"
            );
            assert!((512..=2048).contains(&w) && (512..=2048).contains(&h));
        }
        let at = |w, h| buckets.sizes()[buckets.assign(w, h)];
        assert_eq!(at(3000, 3000), (1024, 1024));
        assert_eq!(at(1920, 1080), (1344, 768));
        assert_eq!(at(100, 1000), (512, 2048));
    }

    #[test]
    fn nonsense_configurations_are_refused() {
        let bad = [
            (1024, 512, 2048, 0),
            (1024, 600, 500, 64),
            (100, 512, 2048, 64),
            (1024, 0, 2048, 64),
        ];
        for (resolution, min_side, max_side, step) in bad {
            let err = Buckets::by_area(BucketConfig {
                resolution,
                min_side,
                max_side,
                step,
            })
            .unwrap_err();
            assert!(err.to_string().starts_with("invalid option"), "{err}");
        }
        assert!(Buckets::square(0).is_err());
    }
}
