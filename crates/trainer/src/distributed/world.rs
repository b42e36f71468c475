//! Which process of a data-parallel run this is, read from the variables torchrun sets (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), and how work is shared out by rank.

use std::ops::Range;

use crate::{Error, Result};

/// This process's place in the run: torchrun's `RANK`, `WORLD_SIZE` and `LOCAL_RANK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    /// This process's index among all processes, `0..world_size`.
    pub rank: usize,
    /// How many processes train together.
    pub world_size: usize,
    /// This process's index on its machine (the CUDA device it uses).
    pub local_rank: usize,
}

impl World {
    /// The world of a run without torchrun: one process.
    pub const SINGLE: World = World {
        rank: 0,
        world_size: 1,
        local_rank: 0,
    };

    /// The world torchrun describes in this process's environment; [`World::SINGLE`] when none
    /// of its variables is set.
    ///
    /// # Errors
    /// [`Error::Environment`] naming the variable that is missing or not a number, or a rank
    /// outside the world.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`World::from_env`] over any lookup of variables (tests pass a table).
    ///
    /// # Errors
    /// As [`World::from_env`].
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        const NAMES: [&str; 3] = ["RANK", "WORLD_SIZE", "LOCAL_RANK"];
        if NAMES.iter().all(|name| var(name).is_none()) {
            return Ok(Self::SINGLE);
        }
        let number = |name: &'static str| -> Result<usize> {
            let text = var(name).ok_or_else(|| Error::Environment {
                variable: name,
                problem: format!(
                    "is not set (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK together; found {})",
                    set_names(&var, &NAMES)
                ),
            })?;
            text.trim().parse().map_err(|_| Error::Environment {
                variable: name,
                problem: format!("`{text}` is not a non-negative integer"),
            })
        };
        let world = Self {
            rank: number("RANK")?,
            world_size: number("WORLD_SIZE")?,
            local_rank: number("LOCAL_RANK")?,
        };
        if world.world_size == 0 {
            return Err(Error::Environment {
                variable: "WORLD_SIZE",
                problem: "is 0; it counts the processes, at least 1".into(),
            });
        }
        if world.rank >= world.world_size || world.local_rank >= world.world_size {
            let (variable, value) = if world.rank >= world.world_size {
                ("RANK", world.rank)
            } else {
                ("LOCAL_RANK", world.local_rank)
            };
            return Err(Error::Environment {
                variable,
                problem: format!("{value} is not below WORLD_SIZE {}", world.world_size),
            });
        }
        if world.world_size > 1 {
            for name in ["MASTER_ADDR", "MASTER_PORT"] {
                if var(name).is_none_or(|v| v.trim().is_empty()) {
                    return Err(Error::Environment {
                        variable: name,
                        problem: format!(
                            "is not set; WORLD_SIZE {} needs the rendezvous address \
                             (torchrun and --nproc_per_node set it)",
                            world.world_size
                        ),
                    });
                }
            }
        }
        Ok(world)
    }

    /// Whether this is the process that writes logs, checkpoints, validation images and the
    /// LoRA (accelerate's `is_main_process`): rank 0.
    pub fn is_main_process(&self) -> bool {
        self.rank == 0
    }

    /// The rows of a global batch of `per_rank × world_size` samples this rank trains on.
    pub fn rows(&self, per_rank: usize) -> Range<usize> {
        self.rank * per_rank..(self.rank + 1) * per_rank
    }
}

fn set_names(var: &impl Fn(&str) -> Option<String>, names: &[&str]) -> String {
    let set: Vec<&str> = names.iter().copied().filter(|n| var(n).is_some()).collect();
    set.join(", ")
}

/// The items `0..len` of a caching pass (latents, prompt embeddings) that `world`'s rank encodes:
/// contiguous blocks of `ceil(len / world_size)` items, in rank order (the last ranks may get fewer
/// or none). Gathering the blocks in rank order gives back `0..len`; a gather that needs equal
/// blocks pads each to `ceil(len / world_size)` rows and drops the padding after.
pub fn cache_share(len: usize, world: &World) -> Range<usize> {
    let block = len.div_ceil(world.world_size.max(1));
    let start = (world.rank * block).min(len);
    start..(start + block).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(table: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let table: Vec<(String, String)> = table
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            table
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    fn error_of(table: &[(&str, &str)]) -> String {
        match World::from_vars(vars(table)) {
            Ok(world) => panic!("expected an error, got {world:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn no_torchrun_variables_is_one_process() {
        let world = World::from_vars(vars(&[("MASTER_PORT", "29500")])).unwrap();
        assert_eq!(world, World::SINGLE);
        assert!(world.is_main_process());
    }

    #[test]
    fn torchrun_variables_give_the_world() {
        let world = World::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!((world.rank, world.world_size, world.local_rank), (3, 4, 1));
        assert!(!world.is_main_process());
        assert_eq!(world.rows(2), 6..8);
        // World size 1 needs no rendezvous address.
        let single = [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")];
        assert_eq!(World::from_vars(vars(&single)).unwrap(), World::SINGLE);
    }

    #[test]
    fn errors_name_the_variable() {
        let e = error_of(&[("RANK", "0"), ("WORLD_SIZE", "2")]);
        assert!(e.starts_with("LOCAL_RANK: is not set"), "{e}");
        let e = error_of(&[("RANK", "x"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
        assert!(e.starts_with("RANK: `x` is not"), "{e}");
        let e = error_of(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
        assert!(e.starts_with("RANK: 2 is not below WORLD_SIZE 2"), "{e}");
        let e = error_of(&[("RANK", "0"), ("WORLD_SIZE", "0"), ("LOCAL_RANK", "0")]);
        assert!(e.starts_with("WORLD_SIZE: is 0"), "{e}");
        let e = error_of(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
        ]);
        assert!(e.starts_with("MASTER_PORT: is not set"), "{e}");
    }

    #[test]
    fn cache_shares_partition_the_items_in_rank_order() {
        for len in [0usize, 1, 5, 8, 13] {
            for world_size in 1..=5 {
                let mut next = 0;
                for rank in 0..world_size {
                    let world = World {
                        rank,
                        world_size,
                        local_rank: rank,
                    };
                    let share = cache_share(len, &world);
                    assert_eq!(share.start, next, "len {len}, world {world_size}");
                    assert!(share.len() <= len.div_ceil(world_size));
                    next = share.end;
                }
                assert_eq!(next, len, "len {len}, world {world_size}");
            }
        }
    }
}
