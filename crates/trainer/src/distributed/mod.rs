//! Data parallelism as torchrun and accelerate arrange it: which process this is ([`World`], from
//! torchrun's environment), the collectives the step calls ([`Collective`]; [`SingleProcess`] until
//! the c10d process group implements it), how a global batch survives a change of world size on
//! resume ([`BatchLayout`]), how caching work is shared out ([`cache_share`]), rank 0's side
//! effects ([`on_main_process`]) and the trainer's own launcher ([`launch`], `--nproc_per_node`).
//!
//! The semantics follow accelerate, as diffusers' scripts use it: `--train_batch_size` is the batch
//! of one process, and the global batch of a micro-step is `train_batch_size × world_size`. The
//! plan deals that global batch exactly as a one-process run with that batch would, and rank `r`
//! trains on its rows `[r·b, (r+1)·b)` (docs/TRAINING.md, "Multi-GPU (data parallel)").

mod batch_layout;
mod collective;
pub mod launch;
mod main_process;
mod process_group;
mod world;

pub use batch_layout::BatchLayout;
pub use collective::{Collective, SingleProcess};
pub use main_process::on_main_process;
#[cfg(test)]
pub(crate) use process_group::in_ranks;
pub use process_group::{join, join_with};
pub use world::{World, cache_share};
