//! How the ranks of a data-parallel run share the caching passes out: each rank encodes its
//! [`cache_share`] (contiguous blocks in rank order), and the blocks come back together in rank order
//! through [`Collective::all_gather`], each padded to the largest block so the shapes agree and
//! trimmed after. The result is the one-process table row for row: the same inputs go through the
//! encoders in the same batches, only on different ranks.
//!
//! Every rank must prepare the same list (the plan and the dataset are functions of the config and
//! the seed, so they do); [`check_same_list`] turns a rank that does not into an error naming it,
//! instead of a gather that silently mixes two lists.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::{BucketLatents, CachedLatents, LatentEncoder};
use crate::distributed::{Collective, World, cache_share};
use crate::{Error, Result};

/// The latents of every item with the cache in memory: this rank encodes its share, and each
/// bucket's rows are gathered from the ranks' blocks. Also says what this rank encoded.
///
/// # Errors
/// As [`LatentEncoder::encode`]; a rank with another dataset; transport errors.
pub(super) fn encode_latents_in_memory(
    encoder: &LatentEncoder<'_>,
    group: &dyn Collective,
) -> Result<(CachedLatents, String)> {
    let dataset = encoder.dataset;
    check_same_dataset(encoder, group)?;
    let mine = cache_share(dataset.len(), &world_of(group));
    let share = mine.len();
    let local = encoder.encode(mine)?;
    let cache = encoder.cache;
    let report = format!(
        "rank {} encoded its share of {share} of {} images: {} reused, {} encoded; \
         gathered from {} ranks",
        group.rank(),
        dataset.len(),
        cache.hits(),
        cache.misses(),
        group.world_size()
    );
    let items = dataset.items();
    let buckets: BTreeSet<usize> = items.iter().map(|item| item.bucket).collect();
    let mut gathered = BTreeMap::new();
    for bucket in buckets {
        let counts = share_counts(group, dataset.len(), |range| {
            encoder.flips * items[range].iter().filter(|i| i.bucket == bucket).count()
        });
        let mine = local.buckets.get(&bucket);
        let gather = |pick: fn(&BucketLatents) -> &Tensor, dims| {
            gather_blocks(
                group,
                mine.map(pick),
                &counts,
                (dims, Kind::Float, Device::Cpu),
            )
        };
        let latents = BucketLatents {
            mean: gather(|b| &b.mean, 4)?,
            std: gather(|b| &b.std, 4)?,
            time_ids: gather(|b| &b.time_ids, 2)?,
        };
        gathered.insert(bucket, latents);
    }
    let rows = row_layout(encoder);
    let cached = CachedLatents {
        buckets: gathered,
        rows,
    };
    Ok((cached, report))
}

/// The latents of every item with the cache on disk: this rank encodes its share into the cache
/// folder, every rank waits for the others, then reads every entry back (an entry still missing,
/// e.g. a folder that is not shared between machines, is encoded here). Also says what this rank
/// encoded.
///
/// # Errors
/// As [`LatentEncoder::encode`]; a rank with another dataset; transport errors.
pub(super) fn encode_latents_on_disk(
    encoder: &LatentEncoder<'_>,
    group: &dyn Collective,
) -> Result<(CachedLatents, String)> {
    let dataset = encoder.dataset;
    check_same_dataset(encoder, group)?;
    let mine = cache_share(dataset.len(), &world_of(group));
    let share = mine.len();
    drop(encoder.encode(mine)?);
    let cache = encoder.cache;
    let (reused, encoded) = (cache.hits(), cache.misses());
    group.barrier()?;
    let cached = encoder.encode(0..dataset.len())?;
    let missing = cache.misses() - encoded;
    let mut report = format!(
        "rank {} encoded its share of {share} of {} images: {reused} reused, {encoded} encoded; \
         read back every rank's entries",
        group.rank(),
        dataset.len(),
    );
    if missing > 0 {
        report += &format!(", {missing} of them missing and encoded here");
    }
    Ok((cached, report))
}

/// Fails unless every rank caches the same items in the same buckets with the same mirror images.
fn check_same_dataset(encoder: &LatentEncoder<'_>, group: &dyn Collective) -> Result<()> {
    let parts: Vec<Vec<u8>> = encoder
        .dataset
        .items()
        .iter()
        .map(|item| {
            let mut part = item.content_hash.to_vec();
            part.extend_from_slice(&(item.bucket as u64).to_le_bytes());
            part.extend_from_slice(&(encoder.flips as u64).to_le_bytes());
            part.extend_from_slice(&encoder.seed.to_le_bytes());
            part
        })
        .collect();
    check_same_list(group, "dataset", parts.iter().map(Vec::as_slice))
}

/// Where the one-process pass puts each (item, mirrored) row: each bucket's rows in item order,
/// then mirror order.
fn row_layout(encoder: &LatentEncoder<'_>) -> HashMap<(usize, bool), (usize, i64)> {
    let mut next: HashMap<usize, i64> = HashMap::new();
    let mut rows = HashMap::new();
    for (index, item) in encoder.dataset.items().iter().enumerate() {
        for flipped in [false, true].into_iter().take(encoder.flips) {
            let row = next.entry(item.bucket).or_default();
            rows.insert((index, flipped), (item.bucket, *row));
            *row += 1;
        }
    }
    rows
}

/// The world of `group`, for [`cache_share`].
pub(super) fn world_of(group: &dyn Collective) -> World {
    World {
        rank: group.rank(),
        world_size: group.world_size(),
        local_rank: group.rank(),
    }
}

/// How many units (prompts, latent rows) each rank's share holds, in rank order, when the items
/// `0..len` are shared out and `units(range)` counts the units of a range of items.
pub(super) fn share_counts(
    group: &dyn Collective,
    len: usize,
    units: impl Fn(std::ops::Range<usize>) -> usize,
) -> Vec<usize> {
    let world_size = group.world_size();
    (0..world_size)
        .map(|rank| {
            let world = World {
                rank,
                world_size,
                local_rank: rank,
            };
            units(cache_share(len, &world))
        })
        .collect()
}

/// Fails unless every rank passes the same `parts` (a fingerprint of them is gathered): the
/// error names `what` and the ranks whose list differs from rank 0's.
///
/// # Errors
/// [`Error::Collective`] for a rank that prepares another list; transport errors.
pub(super) fn check_same_list<'a>(
    group: &dyn Collective,
    what: &str,
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> Result<()> {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
        count += 1;
    }
    hasher.update(count.to_le_bytes());
    let digest = hasher.finalize();
    let words: Vec<i64> = digest
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let gathered = group.all_gather(&Tensor::from_slice(&words).view([1, -1]))?;
    let all = Vec::<i64>::try_from(gathered.flatten(0, -1))?;
    let differing: Vec<String> = all
        .chunks(words.len())
        .enumerate()
        .filter(|(_, fingerprint)| *fingerprint != &all[..words.len()])
        .map(|(rank, _)| rank.to_string())
        .collect();
    if differing.is_empty() {
        return Ok(());
    }
    Err(Error::Collective {
        rank: group.rank(),
        problem: format!(
            "rank(s) {} prepare another {what} than rank 0 (every rank must plan the same data: \
             same dataset, flags and seed)",
            differing.join(", ")
        ),
    })
}

/// Gathers the ranks' blocks of rows in rank order: `rows` is this rank's block (`None` when its
/// share is empty), `counts` the rows of every rank's block, `dims` the number of dimensions of the
/// rows and `(kind, device)` where the result lives. Every block is padded with zeros to the
/// largest, gathered, and the padding dropped.
///
/// # Errors
/// Transport errors; blocks whose shapes disagree.
pub(super) fn gather_blocks(
    group: &dyn Collective,
    rows: Option<&Tensor>,
    counts: &[usize],
    (dims, kind, device): (usize, Kind, Device),
) -> Result<Tensor> {
    let trailing = trailing_shape(group, rows, dims)?;
    let block = counts.iter().copied().max().unwrap_or(0) as i64;
    let mut shape = vec![block];
    shape.extend_from_slice(&trailing);
    if block == 0 {
        // Every rank knows the counts, so all of them skip the gather alike.
        return Ok(Tensor::f_zeros(&shape, (kind, device))?);
    }
    // Gloo's support of half kinds varies: CPU blocks travel in fp32, which holds them exactly.
    let wire = match (device, kind) {
        (Device::Cpu, Kind::Half | Kind::BFloat16) => Kind::Float,
        _ => kind,
    };
    let padded = Tensor::f_zeros(&shape, (wire, device))?;
    if let Some(rows) = rows {
        let n = rows.size().first().copied().unwrap_or(0);
        padded
            .f_narrow(0, 0, n)?
            .f_copy_(&rows.f_to_device(device)?.f_to_kind(wire)?)?;
    }
    let gathered = group.all_gather(&padded)?;
    let keep: Vec<i64> = counts
        .iter()
        .enumerate()
        .flat_map(|(rank, &count)| (0..count as i64).map(move |row| rank as i64 * block + row))
        .collect();
    let keep = Tensor::from_slice(&keep).to_device(device);
    Ok(gathered.f_index_select(0, &keep)?.f_to_kind(kind)?)
}

/// The shape of a row (all dimensions but the first) of the ranks' blocks, from the ranks whose
/// block is not empty (they must agree); zeros when every block is empty.
fn trailing_shape(group: &dyn Collective, rows: Option<&Tensor>, dims: usize) -> Result<Vec<i64>> {
    if dims < 2 {
        return Err(Error::Collective {
            rank: group.rank(),
            problem: format!("cached blocks are gathered by row, and {dims}-d tensors have none"),
        });
    }
    let mine: Vec<i64> = match rows {
        Some(rows) if rows.size().len() == dims => rows.size()[1..].to_vec(),
        Some(rows) => {
            return Err(Error::Collective {
                rank: group.rank(),
                problem: format!(
                    "a cached block has shape {:?}, expected {dims} dimensions",
                    rows.size()
                ),
            });
        }
        None => vec![0; dims - 1],
    };
    let gathered = group.all_gather(&Tensor::from_slice(&mine).view([1, -1]))?;
    let all = Vec::<i64>::try_from(gathered.flatten(0, -1))?;
    let shapes: Vec<&[i64]> = all
        .chunks(dims - 1)
        .filter(|shape| shape.iter().any(|&d| d != 0))
        .collect();
    match shapes.first() {
        None => Ok(mine),
        Some(first) if shapes.iter().all(|shape| shape == first) => Ok(first.to_vec()),
        Some(_) => Err(Error::Collective {
            rank: group.rank(),
            problem: format!("the ranks' cached blocks disagree in shape: {shapes:?}"),
        }),
    }
}
