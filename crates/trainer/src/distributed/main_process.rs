//! Side effects of rank 0 alone: logs, checkpoints, validation images and the LoRA files are
//! written by the main process (accelerate's `is_main_process`), and every rank meets at a barrier
//! after a checkpoint, so no rank runs ahead of a checkpoint that is still being written and a
//! rank that dies mid-write is seen by the others at the barrier's timeout.

use super::Collective;
use crate::Result;

/// Runs `write` on rank 0 only, then waits at a barrier with every rank; rank 0 gets `write`'s
/// value, the other ranks `None`. Rank 0 reaches the barrier even when `write` fails, so the
/// others are not left waiting for a rank that is about to report an error.
///
/// # Errors
/// `write`'s error (rank 0); the barrier's errors (a rank that failed or timed out).
pub fn on_main_process<T>(
    group: &dyn Collective,
    write: impl FnOnce() -> Result<T>,
) -> Result<Option<T>> {
    let written = (group.rank() == 0).then(write).transpose();
    group.barrier()?;
    written
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use tch::Tensor;

    use super::*;

    /// One rank of a world, counting its barriers (the collectives the gate must not call are
    /// errors).
    struct Rank {
        rank: usize,
        barriers: Cell<usize>,
    }

    impl Collective for Rank {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_mean(&self, _: &Tensor) -> Result<()> {
            unexpected()
        }
        fn all_reduce_max(&self, _: &Tensor) -> Result<()> {
            unexpected()
        }
        fn all_reduce_min(&self, _: &Tensor) -> Result<()> {
            unexpected()
        }
        fn broadcast(&self, _: &Tensor, _: usize) -> Result<()> {
            unexpected()
        }
        fn all_gather(&self, _: &Tensor) -> Result<Tensor> {
            Err(crate::Error::Launch {
                problem: "unexpected all_gather".into(),
            })
        }
        fn barrier(&self) -> Result<()> {
            self.barriers.set(self.barriers.get() + 1);
            Ok(())
        }
    }

    fn unexpected() -> Result<()> {
        Err(crate::Error::Launch {
            problem: "unexpected collective".into(),
        })
    }

    #[test]
    fn rank_0_writes_and_every_rank_meets_at_the_barrier() {
        for rank in 0..2 {
            let group = Rank {
                rank,
                barriers: Cell::new(0),
            };
            let writes = Cell::new(0);
            let got = on_main_process(&group, || {
                writes.set(writes.get() + 1);
                Ok("checkpoint-4")
            })
            .unwrap();
            assert_eq!(got, (rank == 0).then_some("checkpoint-4"));
            assert_eq!(
                (writes.get(), group.barriers.get()),
                (usize::from(rank == 0), 1)
            );
        }
    }

    #[test]
    fn a_failed_write_still_reaches_the_barrier() {
        let group = Rank {
            rank: 0,
            barriers: Cell::new(0),
        };
        let got: Result<Option<()>> = on_main_process(&group, || {
            Err(crate::Error::Launch {
                problem: "disk full".into(),
            })
        });
        assert!(got.is_err());
        assert_eq!(group.barriers.get(), 1);
    }
}
