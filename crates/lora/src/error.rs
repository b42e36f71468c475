//! The error type of the `lora` crate.

use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// libtorch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),

    /// A LoRA configuration that cannot describe an adapter.
    #[error("invalid LoRA configuration: {field} {reason}")]
    InvalidConfig {
        /// The offending field, e.g. `rank` or `alpha_pattern["to_q"]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A [`crate::Randomness`] source could not draw (its own message).
    #[error("drawing the adapters' random values: {0}")]
    Randomness(String),

    /// No linear layer of the model matched the target patterns.
    #[error("no linear layer matches the LoRA targets {targets:?}")]
    NoTargetMatched {
        /// The target patterns that matched nothing.
        targets: Vec<String>,
    },

    /// A layer already carries an adapter of that name.
    #[error("module `{module}` already has an adapter named `{adapter}`")]
    DuplicateAdapter {
        /// The module path.
        module: String,
        /// The adapter name.
        adapter: String,
    },

    /// A layer has no adapter of that name.
    #[error("module `{module}` has no adapter named `{adapter}`")]
    UnknownAdapter {
        /// The module path (empty when the whole model was searched).
        module: String,
        /// The adapter name.
        adapter: String,
    },

    /// Merging an adapter would put NaN or infinity into the base weight.
    #[error(
        "merging adapter `{adapter}` into `{module}` gives non-finite weights; the adapter seems broken"
    )]
    NonFiniteMerge {
        /// The module path.
        module: String,
        /// The adapter name.
        adapter: String,
    },

    /// An operation that would rewrite a base weight stored in fp8.
    #[error(
        "module `{module}` stores its base weight in fp8: {operation} is refused, since it would round \
         the weight to fp8 again (merge into a model loaded without fp8 base weights)"
    )]
    Fp8BaseWeight {
        /// The module path.
        module: String,
        /// What was asked, e.g. `merging an adapter`.
        operation: &'static str,
    },

    /// A layer with merged adapters cannot be quantized: its merge records refer to the
    /// full-precision weight.
    #[error(
        "module `{module}` has merged adapters; unmerge them before storing its base weight in fp8"
    )]
    QuantizeMerged {
        /// The module path.
        module: String,
    },

    /// Adapter tensors whose shapes do not fit together or do not fit the layer.
    #[error("LoRA module `{module}`: {reason}")]
    ShapeMismatch {
        /// The module path.
        module: String,
        /// Which shapes disagree.
        reason: String,
    },

    /// Modules of a LoRA that the model does not have.
    #[error("the model has no linear layer for these LoRA modules: {}", modules.join(", "))]
    ModulesNotInModel {
        /// The component-qualified module paths, e.g. `unet.mid_block.attentions.0.proj_in`.
        modules: Vec<String>,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A malformed safetensors file.
    #[error("{}: {source}", path.display())]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        source: safetensors::SafeTensorError,
    },

    /// A tensor whose element type this crate does not read or write.
    #[error("{}: tensor `{key}` has element type {dtype}, which LoRA files do not use", path.display())]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The element type.
        dtype: String,
    },

    /// A file whose keys fit none of the known LoRA formats, or several at once.
    #[error("{}: cannot tell the LoRA format: {reason}", path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// Keys of a LoRA file that the reader cannot place on a module.
    #[error("{}: cannot place {} key(s): {}", path.display(), keys.len(), keys.join(", "))]
    UnplacedKeys {
        /// The file.
        path: PathBuf,
        /// Every key that could not be placed, with the reason in parentheses.
        keys: Vec<String>,
    },

    /// Header metadata that does not parse.
    #[error("{}: metadata `{key}` is not valid: {reason}", path.display())]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A tensor of a LoRA file holds NaN or infinity: applied, it would turn every image black.
    #[error("{}: tensor `{key}` holds {count} non-finite value(s) (NaN or infinity)", path.display())]
    NonFiniteTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// How many of its values are not finite.
        count: i64,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
