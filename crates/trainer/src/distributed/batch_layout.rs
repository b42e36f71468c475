//! How a run's global batch is laid out over its processes, recorded in each checkpoint so that a
//! resume with another world size keeps the global batch (issue 19: the LoRA depends on the global
//! batch, not on the world size).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The world size and per-process batch of a run; their product is the global batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchLayout {
    /// Processes training together.
    pub world_size: usize,
    /// `--train_batch_size`: samples per process and micro-step.
    pub train_batch_size: usize,
}

impl BatchLayout {
    /// Samples per micro-step over all processes: what the plan deals.
    pub fn global_batch(&self) -> usize {
        self.world_size * self.train_batch_size
    }

    /// Whether a run laid out as `self` may continue a checkpoint written by a run laid out as
    /// `recorded`: any world size and per-process batch whose product is the recorded global batch
    /// (then every micro-step trains on the same samples with the same draws).
    ///
    /// # Errors
    /// [`Error::GlobalBatchChanged`], naming the flags that set the global batch.
    pub fn check_resume(&self, recorded: &BatchLayout) -> Result<()> {
        if self.global_batch() == recorded.global_batch() {
            return Ok(());
        }
        Err(Error::GlobalBatchChanged {
            recorded: *recorded,
            now: *self,
        })
    }
}

impl std::fmt::Display for BatchLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let processes = if self.world_size == 1 {
            "process"
        } else {
            "processes"
        };
        write!(
            f,
            "{} (--train_batch_size {} × {} {processes})",
            self.global_batch(),
            self.train_batch_size,
            self.world_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(world_size: usize, train_batch_size: usize) -> BatchLayout {
        BatchLayout {
            world_size,
            train_batch_size,
        }
    }

    #[test]
    fn a_resume_keeps_the_global_batch_whatever_the_world_size() {
        let recorded = layout(2, 1);
        layout(1, 2).check_resume(&recorded).unwrap();
        layout(2, 1).check_resume(&recorded).unwrap();
        layout(4, 3).check_resume(&layout(3, 4)).unwrap();
    }

    #[test]
    fn another_global_batch_is_an_error_naming_the_flags() {
        let e = layout(1, 1).check_resume(&layout(2, 1)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("global batch of 2 (--train_batch_size 1 × 2 processes)")
                && text.contains("this run's is 1 (--train_batch_size 1 × 1 process)")
                && text.contains("--nproc_per_node"),
            "{text}"
        );
        assert!(layout(2, 2).check_resume(&layout(1, 2)).is_err());
    }

    #[test]
    fn a_layout_round_trips_through_json() {
        let l = layout(2, 3);
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<BatchLayout>(&text).unwrap(), l);
    }
}
