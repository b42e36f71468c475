//! The error type of the `optim8bit` crate.

use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// libtorch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),

    /// A hyper-parameter outside the range where AdamW is defined.
    #[error("invalid optimizer setting: {name} = {value} ({reason})")]
    InvalidHyperParameter {
        /// The setting, e.g. `betas.0` or `param_groups[1].lr`.
        name: String,
        /// The value given.
        value: f64,
        /// The range it must lie in.
        reason: &'static str,
    },

    /// A parameter the optimizer cannot update.
    #[error("param_groups[{group}].params[{index}]: {reason}")]
    UnsupportedParameter {
        /// The parameter group.
        group: usize,
        /// The parameter's position in its group.
        index: usize,
        /// Why it cannot be optimized.
        reason: String,
    },

    /// A parameter-group index that does not exist.
    #[error("there is no parameter group {group}; the optimizer has {groups}")]
    NoSuchGroup {
        /// The index asked for.
        group: usize,
        /// How many groups there are.
        groups: usize,
    },

    /// A condition for [`crate::AdamW::step_if`] that is not a 0-dim real tensor on the
    /// optimizer's device.
    #[error(
        "step_if: the condition must be a 0-dim bool or 0/1 float tensor on {expected:?}, got {kind:?} of shape {shape:?} on {device:?}"
    )]
    StepCondition {
        /// The condition's shape.
        shape: Vec<i64>,
        /// The condition's element type.
        kind: tch::Kind,
        /// Where the condition lives.
        device: tch::Device,
        /// Where the optimizer's parameters and states live.
        expected: tch::Device,
    },

    /// Tensors whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A block size that cannot hold a block.
    #[error("block size must be positive, got {0}")]
    InvalidBlockSize(i64),

    /// Reading or writing a state file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A state file that libtorch cannot parse as safetensors.
    #[error("{}: not a readable safetensors file: {source}", path.display())]
    UnreadableStateFile {
        /// The file.
        path: PathBuf,
        /// What the reader said.
        source: tch::TchError,
    },

    /// A state file that does not belong to this optimizer (other parameters, other settings).
    #[error("{}: tensor `{key}`: {reason}", path.display())]
    StateMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor key in the file.
        key: String,
        /// What does not fit.
        reason: String,
    },

    /// A parameter [`crate::EMAModel`] cannot average.
    #[error("EMAModel parameters[{index}]: {reason}")]
    EmaParameter {
        /// The parameter's position in the list.
        index: usize,
        /// Why it cannot be averaged.
        reason: String,
    },

    /// [`crate::EMAModel::restore`] without a [`crate::EMAModel::store`] before it.
    #[error("EMAModel has no store()d weights to restore()")]
    EmaNotStored,

    /// A multi-tensor operation of libtorch (through `torch-cuda`) failed.
    #[error(transparent)]
    Foreach(#[from] torch_cuda::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
