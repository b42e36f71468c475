//! The collectives the training step calls, behind a trait: [`SingleProcess`] today (one process,
//! every collective the identity), libtorch's c10d process group (NCCL on CUDA, Gloo on the CPU,
//! through `torch-cuda`) next. Every operation works in place on persistent tensors and reads
//! nothing on the host, so a step that calls them stays capturable as a CUDA graph.

use tch::Tensor;

use super::World;
use crate::{Error, Result};

/// What the step and the loop need from the processes training together.
pub trait Collective {
    /// This process's rank.
    fn rank(&self) -> usize;

    /// How many processes train together.
    fn world_size(&self) -> usize;

    /// Replaces `tensor` by the mean of every rank's `tensor` (the flat gradient buffer, the loss):
    /// DDP's gradient averaging.
    ///
    /// # Errors
    /// Transport errors naming the rank that failed or timed out.
    fn all_reduce_mean(&self, tensor: &Tensor) -> Result<()>;

    /// Replaces `tensor` by the element-wise maximum over ranks: decisions every rank must take
    /// alike, e.g. "some rank saw a non-finite gradient" as a 0-dim flag.
    ///
    /// # Errors
    /// As [`Collective::all_reduce_mean`].
    fn all_reduce_max(&self, tensor: &Tensor) -> Result<()>;

    /// Replaces `tensor` by the element-wise minimum over ranks.
    ///
    /// # Errors
    /// As [`Collective::all_reduce_mean`].
    fn all_reduce_min(&self, tensor: &Tensor) -> Result<()>;

    /// Replaces `tensor` on every rank by rank `root`'s (the initial LoRA, so all ranks start
    /// alike).
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for a root outside the world; transport errors.
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()>;

    /// The ranks' `tensor`s (equal shapes) concatenated along dimension 0 in rank order: how the
    /// shares of a caching pass ([`super::cache_share`]) come together.
    ///
    /// # Errors
    /// Transport errors; tensors of different shapes.
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor>;

    /// Waits until every rank has called it (around checkpoints, which rank 0 writes alone).
    ///
    /// # Errors
    /// A rank that does not arrive within the process group's timeout, named.
    fn barrier(&self) -> Result<()>;

    /// Whether CUDA tensors go through NCCL (a CUDA graph then captures the collectives in
    /// thread-local mode, as NCCL's watchdog thread polls the stream during a capture).
    fn uses_nccl(&self) -> bool {
        false
    }

    /// A line for the run's log saying what carries the collectives (`None`: one process, nothing).
    fn describe(&self) -> Option<String> {
        None
    }
}

/// The collectives of a run of one process: each one leaves its tensor as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl SingleProcess {
    /// The collectives of `world`, which must be a single process.
    ///
    /// # Errors
    /// [`Error::Environment`] when `world` has several processes: they need the process group.
    pub fn for_world(world: &World) -> Result<Self> {
        if world.world_size != 1 {
            return Err(Error::Environment {
                variable: "WORLD_SIZE",
                problem: format!(
                    "is {}, and this build trains in one process only: the process group \
                     (c10d) is not wired into the trainer yet",
                    world.world_size
                ),
            });
        }
        Ok(Self)
    }
}

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&self, _tensor: &Tensor) -> Result<()> {
        Ok(())
    }

    fn all_reduce_max(&self, _tensor: &Tensor) -> Result<()> {
        Ok(())
    }

    fn all_reduce_min(&self, _tensor: &Tensor) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _tensor: &Tensor, root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::InvalidOption {
                option: "broadcast root",
                problem: format!("rank {root} is outside a world of 1 process"),
            });
        }
        Ok(())
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.shallow_clone())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_collectives_are_the_identity() {
        let group = SingleProcess::for_world(&World::SINGLE).unwrap();
        let t = Tensor::from_slice(&[1.5f32, -2.0, 3.25]);
        let before = t.copy();
        group.all_reduce_mean(&t).unwrap();
        group.all_reduce_max(&t).unwrap();
        group.all_reduce_min(&t).unwrap();
        group.broadcast(&t, 0).unwrap();
        group.barrier().unwrap();
        assert!(t.equal(&before));
        assert!(group.all_gather(&t).unwrap().equal(&before));
        assert_eq!((group.rank(), group.world_size()), (0, 1));
        assert!(group.broadcast(&t, 1).is_err());
    }

    #[test]
    fn several_processes_need_the_process_group() {
        let world = World {
            rank: 0,
            world_size: 2,
            local_rank: 0,
        };
        let e = SingleProcess::for_world(&world).unwrap_err().to_string();
        assert!(e.starts_with("WORLD_SIZE: is 2"), "{e}");
    }
}
