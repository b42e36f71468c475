//! The latent cache of `--cache_latents`: each item's VAE posterior (mean and standard deviation,
//! never sampled here) and SDXL time ids, for the item and with `--random_flip` its mirror image,
//! gathered by bucket into device tensors a step indexes by row.

use std::collections::{BTreeMap, HashMap};

use tch::{Device, Kind, Tensor};

use data::{CacheKey, Dataset, SampleKey, TensorCache};
use sdxl_model::prompt::{add_time_ids, add_time_ids_tensor};
use sdxl_model::vae::AutoencoderKL;

use crate::{Error, Result};

/// The cached posteriors of one bucket's images (one size), fp32.
#[derive(Debug)]
pub struct BucketLatents {
    /// Posterior means (unscaled), `[rows, 4, h, w]`.
    pub mean: Tensor,
    /// Posterior standard deviations, same shape.
    pub std: Tensor,
    /// `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]` per row, `[rows, 6]`.
    pub time_ids: Tensor,
}

/// Every item's latent posterior and SDXL time ids (and its mirror image's), by bucket.
#[derive(Debug)]
pub struct CachedLatents {
    /// The latents of each bucket that has images.
    pub buckets: BTreeMap<usize, BucketLatents>,
    /// (item, mirrored) → (bucket, row in the bucket's tensors).
    pub(super) rows: HashMap<(usize, bool), (usize, i64)>,
}

impl CachedLatents {
    /// Where the latents of `item` (mirrored or not) are.
    pub fn row(&self, item: usize, flipped: bool) -> Option<(usize, i64)> {
        self.rows.get(&(item, flipped)).copied()
    }

    pub(super) fn into_device(self, device: Device) -> Self {
        let buckets = self
            .buckets
            .into_iter()
            .map(|(bucket, latents)| {
                let moved = BucketLatents {
                    mean: latents.mean.to_device(device),
                    std: latents.std.to_device(device),
                    time_ids: latents.time_ids.to_device(device),
                };
                (bucket, moved)
            })
            .collect();
        Self {
            buckets,
            rows: self.rows,
        }
    }
}

/// The key of the sample an item gives when its transform does not depend on the step.
fn fixed_key(seed: u64, item: usize) -> SampleKey {
    SampleKey {
        seed,
        step: 0,
        slot: 0,
        item,
    }
}

/// What encoding the latents of a dataset takes: the VAE and its identity in cache keys, the
/// dataset, the cache, how many mirror images of each item (1 or 2) and the run's seed.
pub(super) struct LatentEncoder<'a> {
    pub(super) vae: &'a AutoencoderKL,
    pub(super) encoder_id: &'a str,
    pub(super) dataset: &'a Dataset,
    pub(super) cache: &'a TensorCache,
    pub(super) flips: usize,
    pub(super) seed: u64,
    pub(super) device: Device,
}

impl LatentEncoder<'_> {
    /// The latents of the items `items` (each bucket's rows in item order, then mirror order),
    /// on the CPU.
    pub(super) fn encode(&self, items: std::ops::Range<usize>) -> Result<CachedLatents> {
        type Rows = (Vec<Tensor>, Vec<Tensor>, Vec<[f64; 6]>);
        let dataset = self.dataset;
        let mut by_bucket: BTreeMap<usize, Rows> = BTreeMap::new();
        let mut rows = HashMap::new();
        let progress = crate::logs::progress_bar(
            (items.len() * self.flips) as u64,
            "Caching latents {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}]",
        );
        for item in items {
            let key = fixed_key(self.seed, item);
            for flipped in [false, true].into_iter().take(self.flips) {
                let placement = dataset.placement_flipped(&key, flipped)?;
                let sample = dataset.sample_placed(&key, placement)?;
                let (mean, std) =
                    encode_one(self.vae, self.encoder_id, self.cache, &sample, self.device)?;
                let bucket = dataset.items()[item].bucket;
                let (means, stds, ids) = by_bucket.entry(bucket).or_default();
                rows.insert((item, flipped), (bucket, means.len() as i64));
                means.push(mean);
                stds.push(std);
                ids.push(time_ids_of(&sample));
                progress.inc(1);
            }
        }
        progress.finish_and_clear();
        let buckets = by_bucket
            .into_iter()
            .map(|(bucket, (means, stds, ids))| {
                let latents = BucketLatents {
                    mean: Tensor::cat(&means, 0),
                    std: Tensor::cat(&stds, 0),
                    time_ids: add_time_ids_tensor(&ids, Kind::Float, Device::Cpu),
                };
                (bucket, latents)
            })
            .collect();
        Ok(CachedLatents { buckets, rows })
    }
}

/// One sample's posterior mean and standard deviation `[1, 4, h, w]` (CPU, fp32), from the cache
/// or encoded and stored.
fn encode_one(
    vae: &AutoencoderKL,
    encoder_id: &str,
    cache: &TensorCache,
    sample: &data::Sample,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let key = CacheKey::latents(encoder_id, sample);
    let entry = cache.get_or_insert_with(&key, || -> Result<_> {
        let pixels = sample.pixels.to_tensor()?.unsqueeze(0).to_device(device);
        let posterior = tch::no_grad(|| vae.encode(&pixels))?;
        let cpu = |t: Tensor| t.to_kind(Kind::Float).to_device(Device::Cpu);
        Ok(vec![
            ("mean".to_owned(), cpu(posterior.mean.shallow_clone())),
            ("std".to_owned(), cpu(posterior.std())),
        ])
    })?;
    let get = |name: &str| {
        entry
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
    };
    match (get("mean"), get("std")) {
        (Some(mean), Some(std)) => Ok((mean, std)),
        _ => Err(Error::from(data::Error::Worker(format!(
            "latent cache entry {} lacks mean or std",
            key.as_str()
        )))),
    }
}

/// SDXL's time ids of a sample as the data crate placed it: its real size, crop corner and target size.
pub fn time_ids_of(sample: &data::Sample) -> [f64; 6] {
    let to_i64 = |(a, b): (u32, u32)| (i64::from(a), i64::from(b));
    let (top, left) = sample.crop_top_left;
    add_time_ids(
        to_i64(sample.original_size),
        (i64::from(top), i64::from(left)),
        to_i64(sample.target_size),
    )
}
