//! A rank's draws of a data-parallel micro-step. Each rank seeds the run's generator with the
//! micro-step's seed as a one-process run does, draws every tensor for the whole global batch in
//! the order of [`Draws::sample`], and keeps its own rows: its samples get exactly the noise and
//! timesteps a one-process run gives those rows. The global draws cost `world_size` times the
//! (small) random tensors of one rank, keep every shape fixed and read nothing on the host, so the
//! step stays capturable.

use std::ops::Range;

use tch::{Kind, Tensor};

use super::{Draws, StepSettings};
use crate::Result;
use crate::distributed::World;
use crate::rng::RunRng;

/// Which rows of a global batch this rank trains on: blocks of consecutive rows, in order (one
/// block, or two with prior preservation: the rank's instance rows, then its class rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowShare {
    /// Samples of the global batch.
    pub global: i64,
    /// This rank's rows, as blocks in batch order.
    pub blocks: Vec<Range<i64>>,
}

impl RowShare {
    /// The whole batch of `batch` samples (one process).
    pub fn whole(batch: i64) -> Self {
        Self {
            global: batch,
            blocks: std::iter::once(0..batch).collect(),
        }
    }

    /// The rows of `world`'s rank in a global batch of `groups` consecutive groups (1, or 2 with
    /// prior preservation: instances then classes) of `per_rank × world_size` samples each — the
    /// rows [`crate::plan::share_rows`] picks from a planned micro-step.
    pub fn for_rank(per_rank: usize, groups: usize, world: &World) -> Self {
        let block = (per_rank * world.world_size) as i64;
        let rows = world.rows(per_rank);
        let (start, end) = (rows.start as i64, rows.end as i64);
        Self {
            global: block * groups as i64,
            blocks: (0..groups as i64)
                .map(|g| g * block + start..g * block + end)
                .collect(),
        }
    }

    fn is_whole(&self) -> bool {
        matches!(self.blocks.as_slice(), [only] if *only == (0..self.global))
    }

    /// Standard normal draws for this rank's rows of a global tensor `[global, rest…]`, where
    /// `local` (`[rows, rest…]`) gives the rest of the shape, the element type and the device
    /// (`randn_like(local)` for the whole batch).
    ///
    /// # Errors
    /// The generator's errors.
    pub(crate) fn randn_like(&self, local: &Tensor, rng: &RunRng) -> Result<Tensor> {
        self.randn(&local.size()[1..], local.kind(), rng)
    }

    fn randn(&self, rest: &[i64], kind: Kind, rng: &RunRng) -> Result<Tensor> {
        let mut size = vec![self.global];
        size.extend_from_slice(rest);
        Ok(self.narrow(rng.randn(&size, kind)?))
    }

    /// This rank's rows of `global` (`[global, …]`): narrows, concatenated when there are several
    /// blocks (fixed shapes, no host data: capturable).
    fn narrow(&self, global: Tensor) -> Tensor {
        if self.is_whole() {
            return global;
        }
        let parts: Vec<Tensor> = self
            .blocks
            .iter()
            .map(|b| global.narrow(0, b.start, b.end - b.start))
            .collect();
        match parts.as_slice() {
            [one] => one.shallow_clone(),
            _ => Tensor::cat(&parts, 0),
        }
    }
}

impl Draws {
    /// [`Draws::sample`] for this rank's rows `clean` (`[rows, channels, h, w]`) of a global batch:
    /// the global batch's ε, offset noise and timesteps drawn in the script's order, narrowed to
    /// `share.blocks`. With [`RowShare::whole`] it is [`Draws::sample`].
    ///
    /// # Errors
    /// The generator's errors.
    pub(crate) fn sample_share(
        clean: &Tensor,
        share: &RowShare,
        settings: &StepSettings,
        num_train_timesteps: usize,
        rng: &RunRng,
    ) -> Result<Self> {
        if share.is_whole() {
            return Self::sample(clean, settings, num_train_timesteps, rng);
        }
        let size = clean.size();
        let noise = share.randn_like(clean, rng)?;
        let offset_noise = if settings.noise_offset > 0.0 {
            Some(share.randn(&[size[1], 1, 1], settings.kind, rng)?)
        } else {
            None
        };
        let timesteps = share.narrow(rng.randint(num_train_timesteps as i64, &[share.global])?);
        Ok(Self {
            noise,
            offset_noise,
            timesteps,
        })
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn settings() -> StepSettings {
        StepSettings {
            kind: Kind::Float,
            scaling_factor: 0.13025,
            shift_factor: 0.0,
            noise_offset: 0.05,
            snr_gamma: None,
            accumulation: 1,
            gradient_checkpointing: false,
            max_grad_norm: 1.0,
        }
    }

    /// Asserts that the rank's draws of world size 2 and 3 are the one-process draws of its rows.
    fn assert_ranks_draw_the_one_process_rows(seed: u64) {
        let clean = Tensor::zeros([6, 4, 3, 5], (Kind::Float, Device::Cpu));
        let rng = RunRng::new(Device::Cpu, seed).unwrap();
        let posterior = rng.randn_like(&clean).unwrap();
        let whole = Draws::sample(&clean, &settings(), 1000, &rng).unwrap();
        let whole_offset = whole.offset_noise.as_ref().expect("noise offset is on");
        for world_size in [2i64, 3] {
            let per_rank = 6 / world_size;
            for rank in 0..world_size {
                let rows = rank * per_rank..(rank + 1) * per_rank;
                let share = RowShare {
                    global: 6,
                    blocks: std::iter::once(rows.start..rows.end).collect(),
                };
                let local = clean.narrow(0, rows.start, per_rank);
                rng.seed(seed).unwrap();
                let own_posterior = share.randn_like(&local, &rng).unwrap();
                let draws = Draws::sample_share(&local, &share, &settings(), 1000, &rng).unwrap();
                let expect = |t: &Tensor| t.narrow(0, rows.start, per_rank);
                let at = format!("rank {rank} of {world_size}");
                assert!(own_posterior.equal(&expect(&posterior)), "posterior, {at}");
                assert!(draws.noise.equal(&expect(&whole.noise)), "noise, {at}");
                assert!(
                    draws.timesteps.equal(&expect(&whole.timesteps)),
                    "timesteps, {at}"
                );
                let own_offset = draws.offset_noise.as_ref().expect("noise offset is on");
                assert!(own_offset.equal(&expect(whole_offset)), "offset, {at}");
            }
        }
    }

    #[test]
    fn a_ranks_blocks_are_the_rows_the_plan_shares() {
        let world = World {
            rank: 1,
            world_size: 3,
            local_rank: 1,
        };
        let share = RowShare::for_rank(2, 2, &world);
        assert_eq!(
            (share.global, share.blocks.clone()),
            (12, vec![2..4, 8..10])
        );
        let rows: Vec<usize> = share
            .blocks
            .iter()
            .flat_map(|b| b.start as usize..b.end as usize)
            .collect();
        assert_eq!(rows, crate::plan::share_rows(2, 2, &world));
        let global = Tensor::arange(12, (Kind::Int64, Device::Cpu));
        assert_eq!(
            Vec::<i64>::try_from(share.narrow(global)).unwrap(),
            [2, 3, 8, 9]
        );
        assert!(RowShare::for_rank(4, 1, &World::SINGLE).is_whole());
    }

    /// The rank's draws are the one-process draws of its rows, bit for bit: the same generator
    /// stream, the same global shapes, then a narrow. The run's generator is its own, so other test
    /// threads drawing from libtorch's default generator meanwhile change nothing (they do, below).
    #[test]
    fn the_ranks_draw_the_one_process_rows() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let noise = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tch::manual_seed(7);
                    let _ = Tensor::randn([64], (Kind::Float, Device::Cpu));
                }
            })
        };
        for seed in [1234, 5678] {
            assert_ranks_draw_the_one_process_rows(seed);
        }
        // The whole share is the one-process path itself.
        let clean = Tensor::zeros([6, 4, 3, 5], (Kind::Float, Device::Cpu));
        let rng = RunRng::new(Device::Cpu, 99).unwrap();
        let whole = Draws::sample(&clean, &settings(), 1000, &rng).unwrap();
        rng.seed(99).unwrap();
        let again =
            Draws::sample_share(&clean, &RowShare::whole(6), &settings(), 1000, &rng).unwrap();
        assert!(again.noise.equal(&whole.noise));
        assert!(again.timesteps.equal(&whole.timesteps));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        noise.join().unwrap();
    }
}
