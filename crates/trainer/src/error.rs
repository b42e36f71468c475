//! The error type of the `trainer` crate.

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtorch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),

    /// A training option with a value the trainer cannot use.
    #[error("{option}: {problem}")]
    InvalidOption {
        /// The command-line flag, e.g. `--lr_warmup_steps`.
        option: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
