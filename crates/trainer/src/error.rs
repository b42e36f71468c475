//! The error type of the `trainer` crate.

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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

    /// Reading or writing a log file (TensorBoard events, metrics, plots) failed.
    #[error("{}: {source}", path.display())]
    LogIo {
        /// The file or folder.
        path: std::path::PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A TensorBoard event file that does not decode: a bad checksum, a truncated record, bad protobuf.
    #[error("{}: at byte {offset}: {problem}", path.display())]
    CorruptEventFile {
        /// The event file.
        path: std::path::PathBuf,
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong with it.
        problem: String,
    },

    /// A line of a JSON-lines metrics log that is not JSON, or a record that does not serialise.
    #[error("{}: line {line}: {source}", path.display())]
    MetricsJson {
        /// The metrics log.
        path: std::path::PathBuf,
        /// The 1-based line number (for a record being written: the line it would have had).
        line: usize,
        /// What serde_json said.
        source: serde_json::Error,
    },

    /// A plot that cannot be drawn (no finite points) or written.
    #[error("{}: {problem}", path.display())]
    Plot {
        /// The image file.
        path: std::path::PathBuf,
        /// What went wrong.
        problem: String,
    },

    /// A file or folder of the checkpoint store could not be read, written, renamed or removed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A path that cannot serve as a checkpoint or an atomically written file.
    #[error("{}: {problem}", path.display())]
    Checkpoint {
        /// The folder or file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// A `--resume_from_checkpoint` value that names no checkpoint.
    #[error("--resume_from_checkpoint {}: {problem}", path.display())]
    ResumeFromCheckpoint {
        /// The path given (or where it was looked for).
        path: std::path::PathBuf,
        /// Why it cannot be resumed from.
        problem: String,
    },

    /// An `--output_dir` that another training run holds (its lock is taken).
    #[error(
        "--output_dir {}: another training run is using it ({}); wait for it to end, or choose \
         another --output_dir",
        path.display(),
        holder.as_deref().unwrap_or("its lock file names no process yet")
    )]
    OutputDirInUse {
        /// The folder.
        path: std::path::PathBuf,
        /// The holder as its lock file names it: `pid N on HOST since TIME UTC`.
        holder: Option<String>,
    },

    /// An `--output_dir` this run cannot use as it is (it holds another run's outputs).
    #[error("--output_dir {}: {problem}", path.display())]
    OutputDir {
        /// The folder.
        path: std::path::PathBuf,
        /// What is in the way, and what to do.
        problem: String,
    },

    /// A TOML config file that does not parse or has keys the trainer does not know.
    #[error("{}: {problem}", path.display())]
    ConfigFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong (the TOML parser's message names the key and line).
        problem: String,
    },

    /// Loading or running a model part failed.
    #[error(transparent)]
    Model(#[from] sdxl_model::Error),

    /// Injecting, extracting or writing the LoRA failed.
    #[error(transparent)]
    Lora(#[from] lora::Error),

    /// The optimizer refused its parameters or state.
    #[error(transparent)]
    Optimizer(#[from] optim8bit::Error),

    /// The dataset could not be opened or a sample not loaded.
    #[error(transparent)]
    Data(#[from] data::Error),

    /// A kohya `--dataset_config` file that cannot be read or used.
    #[error("--dataset_config {0}")]
    DatasetConfig(#[from] crate::config::kohya::KohyaConfigError),

    /// The class-image folder of `--class_data_dir` could not be read, created or written.
    #[error("--class_data_dir {}: {problem}", path.display())]
    ClassImages {
        /// The folder, or the file in it.
        path: std::path::PathBuf,
        /// What went wrong.
        problem: String,
    },

    /// A model repository could not be fetched from the hub.
    #[error("hub model `{repo}`: {problem}")]
    Hub {
        /// The repository id.
        repo: String,
        /// What went wrong.
        problem: String,
    },

    /// Training was stopped because too many optimizer steps had a non-finite loss or gradient.
    #[error(
        "stopped at step {step}: {skipped} optimizer steps were skipped for a non-finite loss or gradient \
         (limit --max_nonfinite_steps {limit}); lower --learning_rate, or check the data and --mixed_precision"
    )]
    TooManyNonFinite {
        /// The optimizer step when the count was read.
        step: u64,
        /// Steps skipped so far.
        skipped: u64,
        /// The limit.
        limit: u64,
    },

    /// Every optimizer step of the run was skipped for a non-finite loss or gradient, however few:
    /// nothing was trained, so no LoRA is written and the run fails.
    #[error(
        "all {steps} optimizer steps of this run were skipped for a non-finite loss or gradient, so \
         nothing was trained and no LoRA was written: check the model's weights (outputs that \
         overflow), the data, --mixed_precision and --learning_rate"
    )]
    EveryStepSkipped {
        /// The optimizer steps this run made.
        steps: u64,
    },

    /// A sweep file (`--sweep`) that cannot be used: its table and key named.
    #[error("{}: {problem}", path.display())]
    SweepFile {
        /// The sweep file.
        path: std::path::PathBuf,
        /// What is wrong, naming the table (`[base]`, `[[variant]]` 2 `lr-high`) and the key.
        problem: String,
    },

    /// Every variant of a sweep failed (diverged); the sweep's summary lists why.
    #[error("every variant of the sweep failed: {}", failures.join("; "))]
    SweepFailed {
        /// `name: error` of each variant.
        failures: Vec<String>,
    },

    /// A LoRA parameter holds NaN or infinity at a point where it would be written to a file.
    #[error("refusing to write {what}: LoRA parameter `{parameter}` is not finite")]
    NonFiniteLora {
        /// What was about to be written.
        what: String,
        /// The first non-finite parameter.
        parameter: String,
    },

    /// The run's own random generator failed (libtorch's message).
    #[error("the run's random generator: {0}")]
    Random(torch_cuda::Error),

    /// Capturing or replaying the training step as a CUDA graph failed.
    #[error("--cuda_graph: {0}")]
    CudaGraph(torch_cuda::Error),

    /// A torchrun variable (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`)
    /// that is missing or does not fit the others.
    #[error("{variable}: {problem}")]
    Environment {
        /// The environment variable.
        variable: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// A checkpoint resumed with another global batch (`--train_batch_size` × processes).
    #[error(
        "the checkpoint was trained with a global batch of {recorded}, and this run's is {now}: \
         choose --train_batch_size and --nproc_per_node (torchrun's --nproc-per-node) whose product \
         is {}",
        recorded.global_batch()
    )]
    GlobalBatchChanged {
        /// The layout the checkpoint records.
        recorded: crate::distributed::BatchLayout,
        /// This run's layout.
        now: crate::distributed::BatchLayout,
    },

    /// `--nproc_per_node`'s launcher could not start its processes, or one of them failed.
    #[error("--nproc_per_node: {problem}")]
    Launch {
        /// What went wrong, naming the rank.
        problem: String,
    },

    /// A collective of the process group failed: a rank that died, hung past `--ddp_timeout` or
    /// never joined (named in `problem`).
    #[error("process group (this is rank {rank}): {problem}")]
    Collective {
        /// This process's rank.
        rank: usize,
        /// What failed, naming the ranks that did not answer.
        problem: String,
    },

    /// Recording the profiled step failed.
    #[error("--profile_step: {0}")]
    Profile(torch_cuda::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
