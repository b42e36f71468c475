//! Counter-based random numbers: every draw is a pure function of a seed and a position.
//!
//! The loader must give the same sample at the same step whether the run started at step 0 or was
//! resumed at step 5000, and whichever worker thread computes it. A generator keyed by
//! `(seed, purpose, epoch, step, slot)` gives that without carrying state between steps; it is
//! SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", 2014).

/// The loader's counter-based generator (SplitMix64): every per-step draw of a [`crate::Loader`]
/// comes from a stream `Rng::keyed(seed, key)` derives from the seed and a position, so a draw is
/// reproducible from its step alone. [`caption::process_caption`](crate::caption::process_caption)
/// and [`transform::kohya_placement`](crate::transform::kohya_placement) take one, to replay a
/// step outside a loader.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

/// SplitMix64's output function: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    /// A stream determined by `seed` and every element of `key` (order matters).
    pub fn keyed(seed: u64, key: &[u64]) -> Self {
        let mut state = mix(seed ^ GOLDEN_GAMMA);
        for &part in key {
            state = mix(state.wrapping_add(GOLDEN_GAMMA) ^ mix(part.wrapping_add(GOLDEN_GAMMA)));
        }
        Self { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..=max` (Lemire's multiply-shift; the bias is below 2^-32 for our ranges).
    pub fn below_or_equal(&mut self, max: u64) -> u64 {
        let span = max as u128 + 1;
        ((self.next_u64() as u128 * span) >> 64) as u64
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below_or_equal(i as u64) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_depend_on_every_part_of_the_key() {
        let a = Rng::keyed(1, &[2, 3]).next_u64();
        assert_eq!(a, Rng::keyed(1, &[2, 3]).next_u64());
        assert_ne!(a, Rng::keyed(1, &[3, 2]).next_u64());
        assert_ne!(a, Rng::keyed(2, &[2, 3]).next_u64());
        assert_ne!(a, Rng::keyed(1, &[2, 3, 0]).next_u64());
    }

    #[test]
    fn draws_cover_their_range_evenly() {
        let mut rng = Rng::keyed(7, &[]);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[rng.below_or_equal(4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
        let mean = (0..50_000).map(|_| rng.next_f64()).sum::<f64>() / 50_000.0;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let mut v: Vec<u32> = (0..100).collect();
        rng.shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}
