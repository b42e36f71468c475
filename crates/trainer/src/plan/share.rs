//! A rank's share of a global micro-step. The plan deals global batches of `--train_batch_size ×
//! world_size` samples exactly as a one-process run with that batch deals them (each sample's crop,
//! flip and caption draws are keyed by its global slot, [`data::SampleKey`]); rank `r` trains on
//! rows `[r·b, (r+1)·b)` of the instance images, and with prior preservation on the same rows of
//! the class images that follow them, so every rank's share keeps the instances-then-classes order
//! the loss weights expect.

use data::Batch;

use super::{MicroStep, Plan};
use crate::Result;
use crate::distributed::World;

/// The rows of a global micro-step that `world`'s rank trains on: a global batch of `groups`
/// consecutive blocks (1, or 2 with prior preservation: instances then classes) of
/// `per_rank × world_size` samples each.
pub fn share_rows(per_rank: usize, groups: usize, world: &World) -> Vec<usize> {
    let block = per_rank * world.world_size;
    (0..groups)
        .flat_map(|group| world.rows(per_rank).map(move |row| group * block + row))
        .collect()
}

impl MicroStep {
    /// The micro-step restricted to `rows` (in that order).
    pub fn select(&self, rows: &[usize]) -> MicroStep {
        MicroStep {
            bucket: self.bucket,
            keys: rows.iter().map(|&r| self.keys[r]).collect(),
            flips: rows.iter().map(|&r| self.flips[r]).collect(),
            prompts: rows.iter().map(|&r| self.prompts[r].clone()).collect(),
            reg: rows.iter().map(|&r| self.reg[r]).collect(),
        }
    }
}

impl Plan {
    /// The loaded batch of micro-step `index` (latents encoded live), restricted to `world`'s
    /// rows. Every process loads the whole global batch (its crops and flips are keyed by global
    /// slot) and keeps its rows.
    ///
    /// # Errors
    /// Loading errors naming the row.
    pub fn batch_share(&self, index: u64, world: &World) -> Result<Batch> {
        let mut batch = self.batch(index)?;
        if world.world_size > 1 {
            let per_rank = batch.samples.len() / world.world_size;
            let rows = world.rows(per_rank);
            batch.pixels = batch
                .pixels
                .f_narrow(0, rows.start as i64, per_rank as i64)?;
            batch.samples = batch.samples.drain(rows).collect();
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::TrainConfig;
    use crate::plan::Plan;

    fn world(rank: usize, world_size: usize) -> World {
        World {
            rank,
            world_size,
            local_rank: rank,
        }
    }

    #[test]
    fn share_rows_cover_each_block_in_rank_order() {
        assert_eq!(share_rows(2, 1, &world(1, 3)), [2, 3]);
        // Prior preservation: 2 × 3 instances, then 2 × 3 class images.
        assert_eq!(share_rows(2, 2, &world(1, 3)), [2, 3, 8, 9]);
        assert_eq!(share_rows(3, 2, &World::SINGLE), [0, 1, 2, 3, 4, 5]);
    }

    fn tiny_config(train_batch_size: u32) -> TrainConfig {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut config = TrainConfig::tiny_demo(
            &repo.join("tests/fixtures/tiny-sdxl"),
            &repo.join("examples/data/tiny-naruto"),
            Path::new("unused"),
        );
        config.train_batch_size = train_batch_size;
        config.random_flip = true;
        config.caption_dropout_rate = 0.3;
        config
    }

    /// The acceptance rule of issue 19 for the data: the shares of 2 ranks of batch 1, side by side,
    /// are the batches of one process of batch 2 — items, slots, flips and prompts.
    #[test]
    fn the_shares_of_the_ranks_make_the_one_process_batch() {
        let one = Plan::open(&tiny_config(2), None).unwrap();
        let steps = 0..(2 * one.steps_per_epoch() + 1);
        let expected = one.micro_steps(steps.clone()).unwrap();
        for world_size in [1usize, 2] {
            let per_rank = 2 / world_size as u32;
            let plan = Plan::open_for_world(&tiny_config(per_rank), None, world_size).unwrap();
            let global = plan.micro_steps(steps.clone()).unwrap();
            assert_eq!(global, expected, "world size {world_size}");
            for (step, whole) in global.iter().enumerate() {
                let mut joined = whole.select(&[]);
                for rank in 0..world_size {
                    let share = plan.share(whole, &world(rank, world_size));
                    assert_eq!(share.keys.len(), per_rank as usize);
                    joined.keys.extend(share.keys);
                    joined.flips.extend(share.flips);
                    joined.prompts.extend(share.prompts);
                    joined.reg.extend(share.reg);
                }
                assert_eq!(&joined, whole, "micro-step {step}, world size {world_size}");
            }
        }
    }
}
