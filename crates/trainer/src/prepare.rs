//! What is computed once before training: the text conditioning of every prompt (both CLIP encoders,
//! then the encoders are freed) and, with `--cache_latents`, each image's latent posterior (the VAE
//! in fp32, through the data crate's content-keyed cache, then the VAE is freed).
//!
//! diffusers' DreamBooth script does the same: it encodes the instance prompt once and, with
//! `--cache_latents`, keeps each image's `latent_dist` and draws a fresh sample from it every step.
//! Everything here ends as device tensors indexed by dataset item, so a training step only gathers
//! rows by item index: no host data enters the step beyond one index tensor.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use data::{CacheKey, Dataset, SampleKey, TensorCache};
use sdxl_model::prompt::{PromptEncoder, add_time_ids, add_time_ids_tensor};
use sdxl_model::vae::AutoencoderKL;

use crate::Result;

/// The text conditioning of the dataset's prompts.
#[derive(Debug)]
pub struct TextConditioning {
    /// The distinct prompts, in first-use order.
    pub prompts: Vec<String>,
    /// Per-token context of each distinct prompt, `[prompts, 77, 2048]`, in the UNet's kind.
    pub context: Tensor,
    /// Pooled embedding of each distinct prompt, `[prompts, 1280]`, in the UNet's kind.
    pub pooled: Tensor,
    /// For every dataset item, the row of its prompt, `[items]` int64 on the device.
    pub prompt_of_item: Tensor,
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

/// Encodes every distinct prompt of the dataset once.
///
/// Prompts come from [`Dataset::prompt`] at step 0; with caption dropout they would change per step,
/// which the trainer does not offer.
///
/// # Errors
/// Dataset and text-encoder errors.
pub fn encode_prompts(
    encoder: &PromptEncoder,
    dataset: &Dataset,
    seed: u64,
    device: Device,
    kind: Kind,
) -> Result<TextConditioning> {
    let mut rows: BTreeMap<String, i64> = BTreeMap::new();
    let mut prompts = Vec::new();
    let mut prompt_of_item = Vec::with_capacity(dataset.len());
    for item in 0..dataset.len() {
        let prompt = dataset.prompt(&fixed_key(seed, item))?;
        let next = prompts.len() as i64;
        let row = *rows.entry(prompt.clone()).or_insert_with(|| {
            prompts.push(prompt);
            next
        });
        prompt_of_item.push(row);
    }
    let (mut contexts, mut pooled) = (Vec::new(), Vec::new());
    for chunk in prompts.chunks(8) {
        let embeds = tch::no_grad(|| encoder.encode(chunk, None, None))?;
        contexts.push(embeds.context.to_device(device).to_kind(kind));
        pooled.push(embeds.pooled.to_device(device).to_kind(kind));
    }
    Ok(TextConditioning {
        prompts,
        context: Tensor::cat(&contexts, 0),
        pooled: Tensor::cat(&pooled, 0),
        prompt_of_item: Tensor::from_slice(&prompt_of_item).to_device(device),
    })
}

/// Every item's latent posterior and SDXL time ids, for transforms that do not change per step.
#[derive(Debug)]
pub struct CachedLatents {
    /// Posterior means (unscaled), `[items, 4, h, w]` fp32 on the training device.
    pub mean: Tensor,
    /// Posterior standard deviations, same shape.
    pub std: Tensor,
    /// `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]` per item, `[items, 6]` fp32.
    pub time_ids: Tensor,
}

/// Encodes every item once with `vae` (its weights' kind; fp32 for SDXL training) through `cache`,
/// keyed by the image content, its placement and `encoder_id`.
///
/// # Errors
/// Dataset, cache and VAE errors.
pub fn encode_latents(
    vae: &AutoencoderKL,
    encoder_id: &str,
    dataset: &Dataset,
    cache: &TensorCache,
    seed: u64,
    device: Device,
) -> Result<CachedLatents> {
    let (mut means, mut stds, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for item in 0..dataset.len() {
        let sample = dataset.sample(&fixed_key(seed, item))?;
        let key = CacheKey::latents(encoder_id, &sample);
        let entry = cache.get_or_insert_with(&key, || -> Result<_> {
            let pixels = sample.pixels.to_tensor()?.unsqueeze(0).to_device(device);
            let posterior = tch::no_grad(|| vae.encode(&pixels))?;
            Ok(vec![
                (
                    "mean".to_owned(),
                    posterior.mean.to_kind(Kind::Float).to_device(Device::Cpu),
                ),
                (
                    "std".to_owned(),
                    posterior.std().to_kind(Kind::Float).to_device(Device::Cpu),
                ),
            ])
        })?;
        let get = |name: &str| {
            entry
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
        };
        let (Some(mean), Some(std)) = (get("mean"), get("std")) else {
            return Err(data::Error::Worker(format!(
                "latent cache entry {} lacks mean or std",
                key.as_str()
            ))
            .into());
        };
        means.push(mean);
        stds.push(std);
        ids.push(time_ids_of(&sample));
    }
    Ok(CachedLatents {
        mean: Tensor::cat(&means, 0).to_device(device),
        std: Tensor::cat(&stds, 0).to_device(device),
        time_ids: add_time_ids_tensor(&ids, Kind::Float, device),
    })
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
