//! The error type of the `sdxl-model` crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {source}")]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What the safetensors parser said.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor in a file has an element type libtorch cannot hold.
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// The dtype as written in the file.
        dtype: String,
    },
    /// A tensor the caller asked for is not in the file.
    #[error("{path}: no tensor `{key}`")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The key that was asked for.
        key: String,
    },
    /// Loading weights into a model did not match every variable to a tensor one to one.
    #[error("loading {files:?}: {report}")]
    Load {
        /// The files that were read.
        files: Vec<PathBuf>,
        /// What matched and what did not.
        report: Box<crate::weights::LoadReport>,
    },
    /// A tensor handed to a model or function has the wrong shape.
    #[error("{what}: expected {expected}, got {actual}")]
    Shape {
        /// The input or operation.
        what: String,
        /// The shape that was expected, in words.
        expected: String,
        /// The shape(s) that were given.
        actual: String,
    },
    /// A run-time setting (backend, slice size, ...) has a value this crate does not accept.
    #[error("{setting}: `{value}` is not valid; expected {expected}")]
    InvalidSetting {
        /// The setting.
        setting: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A model's `config.json` could not be parsed.
    #[error("{path}: not a valid config: {source}")]
    ConfigJson {
        /// The file.
        path: PathBuf,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A model config holds a value this crate cannot build a model from.
    #[error("config `{field}`: {reason}")]
    InvalidConfig {
        /// The config key.
        field: &'static str,
        /// Why the value is not accepted.
        reason: String,
    },
    /// A scheduler config key has a value this crate does not accept.
    #[error("scheduler config `{key}` = {value}: expected {expected}")]
    SchedulerConfig {
        /// The diffusers `scheduler_config.json` key (or `num_inference_steps`).
        key: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// A `scheduler_config.json` file is not JSON of the expected form.
    #[error("{path}: not a valid scheduler config: {source}")]
    SchedulerConfigFile {
        /// The file.
        path: PathBuf,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A scheduler was stepped with no step left, or before `set_timesteps`.
    #[error(
        "scheduler step {step_index} requested, but the schedule has {steps} steps \
         (call set_timesteps first, once per sampling run)"
    )]
    SchedulerExhausted {
        /// The step asked for.
        step_index: usize,
        /// The steps in the schedule.
        steps: usize,
    },
    /// A tensor handed to a scheduler does not have the shape it must have.
    #[error("scheduler: `{what}` has shape {actual:?}, expected {expected:?}")]
    SchedulerShape {
        /// The argument.
        what: &'static str,
        /// The shape it must have.
        expected: Vec<i64>,
        /// The shape it has.
        actual: Vec<i64>,
    },
    /// A weight tensor holds NaN or infinity (in the file, or once converted to the model's
    /// element type): a model built from it computes nothing but NaN.
    #[error(
        "{path}: tensor `{key}` holds {count} non-finite value(s) (NaN or infinity) as {kind:?}"
    )]
    NonFiniteWeights {
        /// The weight file.
        path: PathBuf,
        /// The tensor's key in the file.
        key: String,
        /// How many of its values are not finite.
        count: i64,
        /// The element type it was checked in (the model's).
        kind: tch::Kind,
    },
    /// A model folder's weight files cannot be found or its shard index is malformed.
    #[error("{path}: {reason}")]
    WeightFiles {
        /// The folder or index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A model name that looks like a local path (see [`crate::hub::is_repo_id`]) names nothing.
    #[error("no such folder: {}", path.display())]
    NoSuchFolder {
        /// The path as given.
        path: PathBuf,
    },
    /// A model repository could not be fetched from the hub (or found in its cache).
    #[error("hub model `{repo}`: {problem}")]
    Hub {
        /// The repository id.
        repo: String,
        /// What went wrong.
        problem: String,
    },
    /// A pipeline's components do not fit together (text encoders too narrow for the UNet, a VAE
    /// with other latent channels).
    #[error("incompatible components: {what}: expected {expected}, got {actual}")]
    Incompatible {
        /// The two sides compared, with the config keys involved.
        what: String,
        /// What the first side requires.
        expected: String,
        /// What the second side provides.
        actual: String,
    },
    /// A model folder's tokenizer files are missing or malformed.
    #[error("{path}: {reason}")]
    TokenizerFiles {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer could not be built or failed on a prompt.
    #[error("tokenizer: {what}: {source}")]
    Tokenizer {
        /// What was being done (building the tokenizer, encoding prompt N).
        what: String,
        /// What the `tokenizers` crate said.
        #[source]
        source: tokenizers::Error,
    },
    /// A LoRA could not be attached, scaled or switched.
    #[error("LoRA: {0}")]
    Lora(#[from] lora::Error),

    /// Saving or restoring the random generator around a recomputed segment (gradient
    /// checkpointing).
    #[error("gradient checkpointing: {0}")]
    Rng(#[from] torch_cuda::Error),
    /// An image could not be encoded or written.
    #[error("{path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What the `image` crate said.
        #[source]
        source: image::ImageError,
    },
    /// libtorch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// Capturing or replaying the denoising step's CUDA graph failed.
    #[error("the denoising step's CUDA graph: {0}")]
    CudaGraph(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
