//! libtorch's c10d process group (through `torch-cuda`) as the trainer's [`Collective`]: Gloo for
//! CPU tensors, NCCL for CUDA tensors, rendezvous through the `TCPStore` rank 0 hosts at
//! `MASTER_ADDR:MASTER_PORT`. [`join`] picks it whenever torchrun (or `--nproc_per_node`) started
//! this process, and [`SingleProcess`] otherwise.

use std::time::Duration;

use tch::Tensor;
use torch_cuda::dist::{GroupConfig, ProcessGroup, ReduceOp};

use super::{Collective, SingleProcess, World};
use crate::{Error, Result};

/// The collectives of this process: a c10d process group when torchrun's `RANK` is set (even for a
/// world of one, so `torchrun --nproc-per-node 1` runs through NCCL as larger worlds do), the
/// identity otherwise. Every collective, the rendezvous included, waits at most `timeout`.
///
/// # Errors
/// [`Error::Environment`] for a torchrun variable that is missing or wrong; [`Error::Collective`]
/// when the rendezvous fails (a rank that never came, named).
pub fn join(world: &World, timeout: Duration) -> Result<Box<dyn Collective>> {
    join_with(world, timeout, |name| std::env::var(name).ok())
}

/// [`join`] over any lookup of variables.
///
/// # Errors
/// As [`join`].
pub fn join_with(
    world: &World,
    timeout: Duration,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Box<dyn Collective>> {
    if var("RANK").is_none() {
        return Ok(Box::new(SingleProcess::for_world(world)?));
    }
    let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
    let port = var("MASTER_PORT").unwrap_or_else(|| "29500".into());
    let master_port = port.trim().parse().map_err(|_| Error::Environment {
        variable: "MASTER_PORT",
        problem: format!("`{port}` is not a port (0..=65535)"),
    })?;
    let config = GroupConfig {
        rank: world.rank,
        world_size: world.world_size,
        local_rank: world.local_rank,
        master_addr,
        master_port,
    };
    let group = ProcessGroup::new(config, timeout).map_err(|e| collective_error(world.rank, e))?;
    Ok(Box::new(Group { group }))
}

/// A c10d process group behind [`Collective`].
struct Group {
    group: ProcessGroup,
}

fn collective_error(rank: usize, error: torch_cuda::Error) -> Error {
    let problem = match error {
        torch_cuda::Error::Dist(message) => message,
        other => other.to_string(),
    };
    Error::Collective { rank, problem }
}

impl Group {
    fn check(&self, result: Result<(), torch_cuda::Error>) -> Result<()> {
        result.map_err(|e| collective_error(self.group.rank(), e))
    }
}

impl Collective for Group {
    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn world_size(&self) -> usize {
        self.group.world_size()
    }

    fn all_reduce_mean(&self, tensor: &Tensor) -> Result<()> {
        self.check(self.group.all_reduce_mean(tensor))
    }

    fn all_reduce_max(&self, tensor: &Tensor) -> Result<()> {
        self.check(self.group.all_reduce(tensor, ReduceOp::Max))
    }

    fn all_reduce_min(&self, tensor: &Tensor) -> Result<()> {
        self.check(self.group.all_reduce(tensor, ReduceOp::Min))
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        self.check(self.group.broadcast(tensor, root))
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        self.group
            .all_gather(tensor)
            .map_err(|e| collective_error(self.group.rank(), e))
    }

    fn barrier(&self) -> Result<()> {
        self.check(self.group.barrier())
    }

    fn uses_nccl(&self) -> bool {
        self.group.has_nccl()
    }

    fn describe(&self) -> Option<String> {
        let config = self.group.config();
        let backends = if self.group.has_nccl() {
            format!(
                "NCCL on cuda:{} for CUDA tensors, Gloo for CPU tensors",
                config.local_rank
            )
        } else {
            "Gloo (CPU tensors)".to_owned()
        };
        Some(format!(
            "c10d process group: rank {} of {} through the store at {}:{}; {backends}; timeout {:.0} s",
            config.rank,
            config.world_size,
            config.master_addr,
            config.master_port,
            self.group.timeout().as_secs_f64()
        ))
    }
}

#[cfg(test)]
/// Runs `work` as each rank of a world of `world_size` threads joined through Gloo; the ranks'
/// results in rank order, or `None` when this build has no c10d shim.
pub(crate) fn in_ranks<T: Send + 'static>(
    world_size: usize,
    work: impl Fn(&dyn Collective) -> Result<T> + Send + Sync + 'static,
) -> Option<Vec<T>> {
    if !torch_cuda::dist::available() {
        println!("skipped: this build has no c10d shim");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let work = std::sync::Arc::new(work);
    let ranks: Vec<_> = (0..world_size)
        .map(|rank| {
            let work = work.clone();
            std::thread::spawn(move || -> Result<T> {
                let world = World {
                    rank,
                    world_size,
                    local_rank: rank,
                };
                let vars = move |name: &str| match name {
                    "RANK" => Some(rank.to_string()),
                    "MASTER_ADDR" => Some("127.0.0.1".into()),
                    "MASTER_PORT" => Some(port.to_string()),
                    _ => None,
                };
                let group = join_with(&world, Duration::from_secs(120), vars)?;
                work(group.as_ref())
            })
        })
        .collect();
    let results = ranks.into_iter().enumerate().map(|(rank, handle)| {
        let result = handle.join().expect("rank thread");
        result.unwrap_or_else(|e| panic!("rank {rank}: {e}"))
    });
    Some(results.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks in two threads of this process, through a real TCPStore and Gloo.
    #[test]
    fn two_ranks_average_and_gather_through_gloo() {
        let Some(ranks) = in_ranks(2, |group| {
            let rank = group.rank() as f32;
            let t = Tensor::from_slice(&[rank + 1.0, 4.0 * rank]);
            group.all_reduce_mean(&t)?;
            let gathered = group.all_gather(&Tensor::from_slice(&[rank]))?;
            group.barrier()?;
            Ok((
                Vec::<f32>::try_from(&t).map_err(Error::from)?,
                Vec::<f32>::try_from(&gathered).map_err(Error::from)?,
            ))
        }) else {
            return;
        };
        for (mean, gathered) in ranks {
            assert_eq!(mean, [1.5, 2.0]);
            assert_eq!(gathered, [0.0, 1.0]);
        }
    }

    #[test]
    fn without_torchrun_the_collectives_are_one_process() {
        let group = join_with(&World::SINGLE, Duration::from_secs(1), |_| None).unwrap();
        assert_eq!((group.rank(), group.world_size()), (0, 1));
        assert!(!group.uses_nccl());
    }
}
