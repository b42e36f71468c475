//! The training run: set-up (model, data, caches, LoRA, optimizer, resume), the loop with its
//! logging, checkpoints and validation images, and the outputs at the end.
//!
//! The loop is diffusers' `train_dreambooth_lora_sdxl.py` restructured for exact resume and for
//! CUDA graphs: before every micro-step libtorch's generator is re-seeded from `(seed, micro-step)`,
//! and the batch of a micro-step is a pure function of `(seed, micro-step)` (the data crate's
//! loader), so a run resumed from `checkpoint-N` draws exactly what an uninterrupted run draws after
//! step N; the LoRA parameters and the optimizer state are restored bit for bit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use data::{
    CaptionSource, Columns, CropMode, Dataset, DatasetConfig, HubDataset, Loader, LoaderConfig,
    Selection, Source, TensorCache,
};
use lora::format::{BlockRenames, Format, TRAINING_CONFIG_KEY, WriteOptions};
use lora::{Component, LoraConfig, LoraState};
use optim8bit::{AdamW, AdamWConfig, ParamGroup};
use sdxl_model::attention::AttentionBackend;
use sdxl_model::pipeline::{
    Denoiser, GenerateOptions, decode_images, grid_column, grid_row, save_png,
};
use sdxl_model::prompt::{PromptEmbeds, PromptEncoder, add_time_ids_tensor};
use sdxl_model::schedulers::SchedulerConfig;
use sdxl_model::schedulers::{DdpmConfig, DdpmSchedule};
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetWeights, load_unet, sgm_unet_table};
use sdxl_model::vae::{AutoencoderKL, AutoencoderKLConfig, Upcast, VaeTiling};

use crate::checkpoint::{CheckpointStore, io_error, write_atomic};
use crate::config::{Attention, MixedPrecision, TrainConfig};
use crate::estimate::{Estimate, EstimateInput, estimate};
use crate::logs::jsonl::MetricsLog;
use crate::logs::plot::loss_curve_png;
use crate::logs::tensorboard::EventWriter;
use crate::lr_scheduler::LrSchedule;
use crate::model_files::{self, ModelFolder};
use crate::prepare::{
    CachedLatents, TextConditioning, encode_latents, encode_prompts, time_ids_of,
};
use crate::step::{
    Accumulators, LatentBatch, StepInputs, StepSettings, micro_step, optimizer_step,
};
use crate::{Error, Result};
use torch_cuda::{CaptureMode, CudaGraph};

/// The adapter name the LoRA is trained under.
const ADAPTER: &str = "default";
/// File names inside `output_dir` and `checkpoint-N/`.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
/// The kohya-format copy of the final LoRA (A1111, ComfyUI).
pub const KOHYA_FILE: &str = "pytorch_lora_weights_kohya.safetensors";
const PARAMS_FILE: &str = "lora_parameters.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";
const CONFIG_FILE: &str = "config.toml";

/// Where the clean latents of a step come from.
enum Latents {
    Cached(CachedLatents),
    /// Random crops or flips: the VAE stays and encodes every step.
    Fresh {
        vae: Box<AutoencoderKL>,
        _store: VarStore,
    },
}

/// Eager optimizer steps before the step is captured (kernel selection, gradient buffers).
const GRAPH_WARMUP_STEPS: u64 = 2;

/// The captured step: one graph per micro-step of an accumulation and one for the optimizer step.
struct StepGraphs {
    /// One capture per accumulation index, replayed in that order: relaunching one graph before
    /// its previous launch has finished can hold the host until it has.
    micro_steps: Vec<CudaGraph>,
    optimizer_step: CudaGraph,
}

/// CPU time of the calling thread so far, from Linux's `/proc/thread-self/schedstat` (nanoseconds)
/// where the kernel keeps it, else `/proc/thread-self/stat` (user + system time in 1/100 s, the
/// fixed unit of /proc); `None` where neither can be read.
fn thread_cpu_seconds() -> Option<f64> {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat").ok();
    if let Some(nanos) = schedstat
        .as_deref()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        && nanos > 0.0
    {
        return Some(nanos * 1e-9);
    }
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// `--profile_step`: one optimizer step between two device synchronizations, timed on the host
/// (how long enqueueing its work took, and how long until the device finished it), optionally
/// recorded by libtorch's profiler.
struct StepProbe {
    device: Device,
    step: u64,
    started: Instant,
    cpu_started: Option<f64>,
    profiler: Option<(torch_cuda::Profiler, PathBuf)>,
    /// How long each graph launch of the step took on the host, s (each onto an idle device).
    launches: Vec<f64>,
    /// Time spent waiting for the device before those launches, s.
    waited: f64,
}

impl StepProbe {
    fn begin(device: Device, record: bool, output_dir: &Path, step: u64) -> Result<StepProbe> {
        Self::synchronize(device);
        let profiler = if record {
            let dir = output_dir.join("profile");
            std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
            let options = torch_cuda::ProfilerOptions {
                cuda: device.is_cuda(),
                shapes: true,
                memory: true,
            };
            let profiler = torch_cuda::Profiler::start(options).map_err(Error::Profile)?;
            Some((profiler, dir.join(format!("step-{step}.json"))))
        } else {
            None
        };
        Ok(StepProbe {
            device,
            step,
            started: Instant::now(),
            cpu_started: thread_cpu_seconds(),
            profiler,
            launches: Vec::new(),
            waited: 0.0,
        })
    }

    fn synchronize(device: Device) {
        if let Device::Cuda(index) = device {
            torch_cuda::graph::synchronize(index);
        }
    }

    /// Waits for the device, stops the profiler, and describes the step.
    fn end(self, captured: bool) -> Result<String> {
        let enqueued = self.started.elapsed().as_secs_f64() - self.waited;
        let cpu = self
            .cpu_started
            .zip(thread_cpu_seconds())
            .map(|(a, b)| b - a);
        Self::synchronize(self.device);
        let finished = self.started.elapsed().as_secs_f64();
        let mode = if captured { "graph replay" } else { "eager" };
        match self.profiler {
            Some((profiler, path)) => {
                profiler.finish(&path).map_err(Error::Profile)?;
                Ok(format!(
                    "step {} ({mode}) recorded by the profiler ({:.1} ms with its overhead): {}",
                    self.step,
                    finished * 1e3,
                    path.display()
                ))
            }
            None if self.launches.is_empty() => Ok(format!(
                "step {} ({mode}): the host enqueued its work in {:.1} ms ({}); the device finished it {:.1} ms after the start",
                self.step,
                enqueued * 1e3,
                cpu.map_or("its CPU time unknown".to_owned(), |c| format!(
                    "{:.1} ms of CPU time, {:.1} % of the step",
                    c * 1e3,
                    100.0 * c / finished
                )),
                finished * 1e3,
            )),
            // Graphs: a launch returns only once the device's queue has room for the graph's work, so
            // in a pipelined step the later launches mostly wait for the device. The probed step
            // therefore launches each graph onto an idle device, which times the host's own work;
            // the device was idle for about that long, so its busy time is the rest.
            None => {
                let each: Vec<String> = self
                    .launches
                    .iter()
                    .map(|s| format!("{:.2}", s * 1e3))
                    .collect();
                let busy = finished - enqueued;
                Ok(format!(
                    "step {} ({mode}, each graph launched onto an idle device): the host's own work took {:.1} ms \
                     (graph launches {} ms), {:.1} % of the {:.1} ms the device was busy",
                    self.step,
                    enqueued * 1e3,
                    each.join(", "),
                    100.0 * enqueued / busy,
                    busy * 1e3,
                ))
            }
        }
    }
}

/// Replays a graph; when a probe watches the step, onto an idle device, timing the launch.
fn timed_launch(
    probe: &mut Option<StepProbe>,
    replay: impl FnOnce() -> std::result::Result<(), torch_cuda::Error>,
) -> Result<()> {
    if let Some(probe) = probe.as_mut() {
        let waiting = Instant::now();
        StepProbe::synchronize(probe.device);
        probe.waited += waiting.elapsed().as_secs_f64();
    }
    let started = Instant::now();
    replay().map_err(Error::CudaGraph)?;
    if let Some(probe) = probe {
        probe.launches.push(started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Micro-steps done (= batches consumed; the data position).
    pub micro_steps: u64,
    /// The run's seed.
    pub seed: u64,
    /// How randomness is drawn, for a reader of the checkpoint.
    pub rng: String,
    /// The learning rate the next step uses.
    pub next_learning_rate: f64,
    /// Steps skipped for non-finite values so far.
    pub skipped_steps: f64,
    /// Loss sum and applied steps of the logging window in progress.
    pub window_loss: f64,
    /// Applied steps of the logging window in progress.
    pub window_steps: f64,
    /// (step, mean loss) at every logging step so far.
    pub loss_history: Vec<(u64, f64)>,
}

/// Validation prompt embeddings, computed with the text encoders before they are freed.
struct Validation {
    prompt: String,
    positive: PromptEmbeds,
    negative: PromptEmbeds,
}

/// A training run, set up and ready to [`Trainer::run`].
pub struct Trainer {
    config: TrainConfig,
    device: Device,
    kind: Kind,
    model: ModelFolder,
    loader: Loader,
    text: TextConditioning,
    latents: Latents,
    vae_config: AutoencoderKLConfig,
    unet: UNet2DConditionModel,
    _unet_store: VarStore,
    _lora_store: VarStore,
    params: Vec<(String, Tensor)>,
    /// bf16 copies of the LoRA under mixed precision (cast once per optimizer step, not per use).
    copies: Option<lora::ComputeCopies>,
    optimizer: AdamW,
    schedule: LrSchedule,
    ddpm: DdpmSchedule,
    scheduler_config: SchedulerConfig,
    settings: StepSettings,
    inputs: StepInputs,
    acc: Accumulators,
    store: CheckpointStore,
    validation: Option<Validation>,
    start_step: u64,
    loss_history: Vec<(u64, f64)>,
    estimate: Option<Estimate>,
    /// The batch of the current micro-step when latents are encoded live.
    fresh_batch: Option<data::Batch>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("output_dir", &self.config.output_dir)
            .field("start_step", &self.start_step)
            .finish()
    }
}

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Optimizer steps run in this process.
    pub steps_run: u64,
    /// Steps skipped for non-finite values (whole run).
    pub skipped_steps: u64,
    /// (step, mean loss) at every logging step.
    pub loss_history: Vec<(u64, f64)>,
    /// The diffusers-format LoRA.
    pub lora_file: PathBuf,
    /// The kohya-format LoRA.
    pub kohya_file: PathBuf,
    /// Seconds per optimizer step in this process (wall clock, including logging).
    pub seconds_per_step: f64,
    /// Peak allocated device memory, GiB (CUDA only).
    pub peak_memory_gib: Option<f64>,
}

fn log(message: impl AsRef<str>) {
    eprintln!("[trainer] {}", message.as_ref());
}

/// [`log`] while the progress bar runs: above the bar on a terminal, plainly otherwise (a hidden
/// bar would swallow the line).
fn log_above(progress: &indicatif::ProgressBar, message: impl AsRef<str>) {
    if progress.is_hidden() {
        log(message);
    } else {
        progress.println(format!("[trainer] {}", message.as_ref()));
    }
}

/// libtorch's cuBLAS workspace setting (`:SIZE_KIB:COUNT`, as in `CUBLAS_WORKSPACE_CONFIG` of PyTorch).
const CUBLAS_WORKSPACE_VARIABLE: &str = "CUBLAS_WORKSPACE_CONFIG";

/// `--device`.
fn pick_device(name: &str) -> Result<Device> {
    let bad = |problem: String| Error::InvalidOption {
        option: "--device",
        problem,
    };
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "cuda:0" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) if (index as i64) < tch::Cuda::device_count() => {
                Ok(Device::Cuda(index))
            }
            _ if other.starts_with("cuda") => {
                Err(bad(format!("`{other}`: no such CUDA device here")))
            }
            _ => Err(bad(format!("`{other}` is not auto, cpu, cuda or cuda:N"))),
        },
    }
}

/// `--dataset_name`: a local folder (parquet files, an imagefolder, or images with `.txt` captions)
/// or a hub dataset id.
fn dataset_source(config: &TrainConfig) -> Result<Source> {
    let columns = Columns {
        image: config.image_column.clone(),
        caption: Some(config.caption_column.clone()),
    };
    let path = Path::new(&config.dataset_name);
    if !path.is_dir() {
        return Ok(Source::Hub(HubDataset {
            columns,
            ..HubDataset::new(config.dataset_name.clone())
        }));
    }
    let mut parquet = Vec::new();
    for folder in [path.to_owned(), path.join("data")] {
        if let Ok(entries) = std::fs::read_dir(&folder) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "parquet") {
                    parquet.push(entry.path());
                }
            }
        }
    }
    parquet.sort();
    Ok(if !parquet.is_empty() {
        Source::Parquet {
            files: parquet,
            columns,
        }
    } else if path.join("metadata.jsonl").is_file() {
        Source::ImageFolder {
            root: path.to_owned(),
            caption_column: Some(config.caption_column.clone()),
        }
    } else {
        Source::CaptionFiles {
            root: path.to_owned(),
            read_captions: config.instance_prompt.is_none(),
        }
    })
}

fn open_dataset(config: &TrainConfig) -> Result<Dataset> {
    let mut data_config = DatasetConfig::new(config.resolution)?;
    data_config.selection = match config.max_train_samples {
        Some(n) => Selection::First(n as usize),
        None => Selection::All,
    };
    data_config.captions.source = match &config.instance_prompt {
        Some(prompt) => CaptionSource::Instance(prompt.clone()),
        None => CaptionSource::Column,
    };
    data_config.transform.crop = if config.center_crop {
        CropMode::Center
    } else {
        CropMode::Random
    };
    data_config.transform.random_flip = config.random_flip;
    Ok(Dataset::open(&dataset_source(config)?, data_config)?)
}

/// Mixes the run's seed and a micro-step index into the generator seed of that micro-step
/// (SplitMix64's finaliser, so neighbouring steps get unrelated streams).
fn micro_step_seed(seed: u64, micro_step: u64) -> i64 {
    let mut z = seed
        ^ micro_step
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

fn free_device_cache(device: Device) {
    if device.is_cuda() {
        torch_cuda::empty_cache();
    }
}

impl Trainer {
    /// Loads everything, computes the caches, injects the LoRA and, with
    /// `--resume_from_checkpoint`, restores the run.
    ///
    /// # Errors
    /// Anything wrong with the config, the model, the data or the checkpoint, naming the culprit.
    pub fn new(config: TrainConfig) -> Result<Self> {
        config.validate()?;
        if config.gradient_checkpointing && std::env::var_os(CUBLAS_WORKSPACE_VARIABLE).is_none() {
            // Checkpointing is the memory-saving mode: a 4 MiB cuBLAS workspace instead of
            // libtorch's 32 MiB per handle and stream on Hopper (what that takes off the peak:
            // docs/BENCHMARKS.md, "GPU runs of 2026-12-01, third session", call O). libtorch reads
            // the variable when it first creates a cuBLAS workspace, which happens only later, in
            // the first matrix product on the device.
            // SAFETY: nothing here reads the environment concurrently; the trainer has not started
            // its loader threads or any device work yet. A variable the user set is left alone.
            #[allow(unsafe_code)]
            unsafe {
                std::env::set_var(CUBLAS_WORKSPACE_VARIABLE, ":4096:1");
            }
        }
        let device = pick_device(&config.device)?;
        if device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(config.cudnn_benchmark);
        }
        if config.cuda_graph && !(device.is_cuda() && config.cache_latents) {
            return Err(Error::InvalidOption {
                option: "--cuda_graph",
                problem: "needs a CUDA device and --cache_latents (latents encoded live are not a fixed sequence of device work)".into(),
            });
        }
        let kind = match config.mixed_precision {
            MixedPrecision::Bf16 => Kind::BFloat16,
            MixedPrecision::No => Kind::Float,
        };
        std::fs::create_dir_all(&config.output_dir).map_err(io_error(&config.output_dir))?;
        let store = CheckpointStore::new(&config.output_dir);
        for stale in store.clean_stale()? {
            log(format!(
                "removed {} left by an interrupted run",
                stale.display()
            ));
        }
        // A run killed between a save and its prune leaves one checkpoint too many.
        if let Some(limit) = config.checkpoints_total_limit {
            store.prune(limit as usize)?;
        }
        let model = model_files::resolve(
            &config.pretrained_model_name_or_path,
            &config.revision,
            config.variant.as_deref(),
        )?;
        log(format!(
            "model {} (variant {:?}) on {device:?} in {kind:?}",
            model.root.display(),
            model.variant
        ));

        // 1. Data.
        let dataset = Arc::new(open_dataset(&config)?);
        for skipped in dataset.skipped() {
            log(format!("skipped a row: {}", skipped.error));
        }
        let mut loader_config = LoaderConfig::new(config.train_batch_size as usize, config.seed);
        loader_config.drop_last = true; // constant batch shapes
        if config.dataloader_num_workers > 0 {
            loader_config.workers = config.dataloader_num_workers as usize;
        }
        let loader = Loader::new(Arc::clone(&dataset), loader_config)?;
        log(format!(
            "{} images, {} batches of {} per epoch",
            dataset.len(),
            loader.steps_per_epoch(),
            config.train_batch_size
        ));

        // 2. Text conditioning, then the encoders go.
        let (text, validation) = {
            let (encoder, _stores) = PromptEncoder::from_pretrained_variant(
                &model.root,
                model.variant.as_deref(),
                device,
                kind,
            )?;
            let text = encode_prompts(&encoder, &dataset, config.seed, device, kind)?;
            let validation = match &config.validation_prompt {
                Some(prompt) => {
                    let (positive, negative) = tch::no_grad(|| {
                        encoder.encode_with_negative(std::slice::from_ref(prompt), None)
                    })?;
                    Some(Validation {
                        prompt: prompt.clone(),
                        positive,
                        negative,
                    })
                }
                None => None,
            };
            (text, validation)
        };
        free_device_cache(device);
        log(format!(
            "{} distinct prompt(s) encoded; text encoders freed",
            text.prompts.len()
        ));

        // 3. Latents (the VAE in fp32, as diffusers' script keeps it), then the VAE goes.
        let vae_folder = model.root.join("vae");
        let (vae, vae_store) = AutoencoderKL::from_pretrained_variant(
            &vae_folder,
            model.variant.as_deref(),
            device,
            Kind::Float,
            Upcast::Always,
        )?;
        let vae_config = vae.config().clone();
        let latents = if config.cache_latents {
            let encoder_id = format!("{}|{:?}|fp32", vae_folder.display(), model.variant);
            let cached = encode_latents(
                &vae,
                &encoder_id,
                &dataset,
                &TensorCache::in_memory(),
                config.seed,
                device,
            )?;
            drop((vae, vae_store));
            free_device_cache(device);
            log("latents cached; VAE freed");
            Latents::Cached(cached)
        } else {
            Latents::Fresh {
                vae: Box::new(vae),
                _store: vae_store,
            }
        };

        // 4. UNet, frozen, in the training precision; the LoRA in fp32.
        let unet_config = UNetConfig::from_file(model.root.join("unet").join("config.json"))?;
        let weights = UNetWeights::Diffusers {
            folder: model.root.join("unet"),
            variant: model.variant.clone(),
        };
        let (mut unet_store, mut unet) = load_unet(&unet_config, &weights, device, kind)?;
        unet_store.freeze();
        if config.fp8_base_weights {
            log(format!(
                "linear layers: {}",
                lora::quantize_base_fp8(&mut unet)?
            ));
            log(format!("convolutions: {}", unet.quantize_convs_fp8()?));
            if !config.gradient_checkpointing {
                // Autograd keeps each layer's widened weight for the backward: the UNet's full-precision size.
                log(
                    "note: fp8 base weights save memory in training only with --gradient_checkpointing",
                );
            }
        }
        unet.set_attention_backend(match config.attention {
            Attention::Fused => AttentionBackend::Fused,
            Attention::Sliced => AttentionBackend::Sliced(sdxl_model::attention::SliceSize::Auto),
            Attention::Plain => AttentionBackend::Plain,
        });
        tch::manual_seed(config.seed as i64);
        let lora_store = VarStore::new(device);
        let mut lora_config = LoraConfig::unet_attention(i64::from(config.rank));
        lora_config.alpha = config.lora_alpha.unwrap_or(f64::from(config.rank));
        let report = lora::inject(&mut unet, &lora_store.root(), ADAPTER, &lora_config)?;
        // With mixed precision the LoRA computes as peft does under accelerate's autocast (bf16
        // products, fp32 weights and gradients), which is what diffusers' script trains with.
        lora::set_compute_kind(&mut unet, ADAPTER, (kind != Kind::Float).then_some(kind))?;
        // The products read bf16 copies that are refreshed after each optimizer step; the masters and
        // their gradients stay fp32 (same values as casting in every use, fewer kernels).
        let copies = if kind == Kind::Float {
            None
        } else {
            lora::ComputeCopies::new(&mut unet, ADAPTER)?
        };
        if let Some(copies) = &copies {
            log(format!(
                "LoRA computes from {:?} copies in {} groups",
                copies.kind(),
                copies.groups()
            ));
        }
        let params: Vec<(String, Tensor)> =
            lora::trainable_variables(&mut unet).into_iter().collect();
        let lora_params: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        log(format!(
            "LoRA rank {} on {} layers: {lora_params} trainable parameters",
            config.rank,
            report.adapted.len()
        ));

        // 5. Optimizer, schedules.
        let mut adam = if config.use_8bit_adam {
            AdamWConfig::eight_bit()
        } else {
            AdamWConfig::fp32()
        };
        adam.beta1 = config.adam_beta1;
        adam.beta2 = config.adam_beta2;
        adam.eps = config.adam_epsilon;
        let base_lr = config.base_learning_rate();
        let group = ParamGroup::new(
            params.iter().map(|(_, p)| p.shallow_clone()).collect(),
            base_lr,
            config.adam_weight_decay,
        );
        let optimizer = AdamW::new(vec![group], adam)?;
        let schedule = LrSchedule::from_script_flags(
            config.lr_scheduler,
            base_lr,
            config.lr_warmup_steps,
            config.max_train_steps,
            config.lr_num_cycles,
            config.lr_power,
        )?;
        let scheduler_file = model.root.join("scheduler").join("scheduler_config.json");
        let mut scheduler_config = if scheduler_file.is_file() {
            SchedulerConfig::from_file(&scheduler_file)?
        } else {
            SchedulerConfig::sdxl()
        };
        if let Some(prediction) = &config.prediction_type {
            scheduler_config.prediction_type = Some(prediction.clone());
        }
        let ddpm = DdpmSchedule::new(DdpmConfig::from_config(&scheduler_config)?, device)?;
        let settings = StepSettings {
            kind,
            scaling_factor: vae_config.scaling_factor,
            shift_factor: vae_config.shift_factor.unwrap_or(0.0),
            noise_offset: config.noise_offset,
            snr_gamma: config.snr_gamma,
            accumulation: i64::from(config.gradient_accumulation_steps),
            gradient_checkpointing: config.gradient_checkpointing,
            max_grad_norm: config.max_grad_norm,
        };
        let inputs = StepInputs::new(i64::from(config.train_batch_size), device);
        let acc = Accumulators::new(device);
        let estimate = device.is_cuda().then(|| {
            let latent = i64::from(config.resolution) / vae_config.downscale_factor();
            estimate(&EstimateInput {
                unet_params: unet_store
                    .variables()
                    .values()
                    .map(|v| v.numel() as i64)
                    .sum(),
                weight_bytes: if kind == Kind::BFloat16 { 2 } else { 4 },
                stored_weight_bytes: unet_store
                    .variables()
                    .values()
                    .map(|v| (v.numel() * v.kind().elt_size_in_bytes()) as i64)
                    .sum(),
                lora_params,
                optimizer_state_bytes: optimizer.state_bytes(),
                batch: i64::from(config.train_batch_size),
                latent_pixels: latent * latent,
                accumulation: i64::from(config.gradient_accumulation_steps),
                steps: config.max_train_steps,
                checkpointing: config.gradient_checkpointing,
                cuda_graph: config.cuda_graph,
            })
        });

        let mut trainer = Self {
            config,
            device,
            kind,
            model,
            loader,
            text,
            latents,
            vae_config,
            unet,
            _unet_store: unet_store,
            _lora_store: lora_store,
            params,
            copies,
            optimizer,
            schedule,
            ddpm,
            scheduler_config,
            settings,
            inputs,
            acc,
            store,
            validation,
            start_step: 0,
            loss_history: Vec::new(),
            estimate,
            fresh_batch: None,
        };
        if let Some(arg) = trainer.config.resume_from_checkpoint.clone() {
            match trainer.store.resolve(&arg)? {
                Some((step, path)) => trainer.restore(step, &path)?,
                None => log(format!(
                    "--resume_from_checkpoint {arg}: no checkpoint in {}; starting fresh",
                    trainer.config.output_dir.display()
                )),
            }
        }
        Ok(trainer)
    }

    /// The memory and time estimate (CUDA runs only).
    pub fn estimate(&self) -> Option<Estimate> {
        self.estimate
    }

    /// The optimizer step the run continues from (0 unless resumed).
    pub fn start_step(&self) -> u64 {
        self.start_step
    }

    /// The LoRA parameters by name (fp32, on the training device).
    pub fn lora_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    fn restore(&mut self, step: u64, path: &Path) -> Result<()> {
        let state_path = path.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(io_error(&state_path))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: state_path.clone(),
            problem: format!("not a trainer state: {e}"),
        })?;
        if state.step != step || state.seed != self.config.seed {
            return Err(Error::Checkpoint {
                path: state_path,
                problem: format!(
                    "records step {} and seed {}, expected step {step} and --seed {}",
                    state.step, state.seed, self.config.seed
                ),
            });
        }
        let params_path = path.join(PARAMS_FILE);
        let saved = Tensor::read_safetensors(&params_path)?;
        tch::no_grad(|| -> Result<()> {
            for (name, param) in &mut self.params {
                let value = saved
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| Error::Checkpoint {
                        path: params_path.clone(),
                        problem: format!("has no `{name}` (another --rank or model?)"),
                    })?;
                if value.size() != param.size() {
                    return Err(Error::Checkpoint {
                        path: params_path.clone(),
                        problem: format!(
                            "`{name}` has shape {:?}, the model needs {:?}",
                            value.size(),
                            param.size()
                        ),
                    });
                }
                param.f_copy_(value)?;
            }
            Ok(())
        })?;
        if let Some(copies) = &self.copies {
            copies.refresh()?;
        }
        self.optimizer.load(path.join(OPTIMIZER_FILE))?;
        let _ = self.acc.skipped.fill_(state.skipped_steps);
        let _ = self.acc.window_loss.fill_(state.window_loss);
        let _ = self.acc.window_steps.fill_(state.window_steps);
        self.loss_history = state.loss_history;
        self.start_step = step;
        log(format!("resumed from {} at step {step}", path.display()));
        Ok(())
    }

    /// Trains from the start (or resumed) step to `--max_train_steps`, then writes the outputs.
    ///
    /// # Errors
    /// Step, checkpoint and output errors; [`Error::TooManyNonFinite`] when too many steps were skipped.
    pub fn run(&mut self) -> Result<RunSummary> {
        let config = self.config.clone();
        if let Some(estimate) = &self.estimate {
            log(estimate.to_string());
        }
        let logs = config.output_dir.join("logs");
        let mut metrics = MetricsLog::open(&logs.join("metrics.jsonl"), Some(self.start_step))?;
        let mut events = if self.start_step > 0 {
            EventWriter::create_resumed(&logs, self.start_step)?
        } else {
            EventWriter::create(&logs)?
        };
        let progress =
            indicatif::ProgressBar::new(config.max_train_steps).with_position(self.start_step);
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        if self.device.is_cuda() {
            torch_cuda::reset_peak_memory_stats(self.device_index());
        }
        let accumulation = u64::from(config.gradient_accumulation_steps);
        let started = Instant::now();
        let mut skipped_total = 0;
        // Which items every remaining micro-step trains on, on the device: each micro-step's inputs
        // are then a device-to-device row copy, outside any captured graph.
        if let Latents::Cached(_) = &self.latents {
            let micro_steps: Vec<u64> =
                (self.start_step * accumulation..config.max_train_steps * accumulation).collect();
            self.inputs.set_plan(
                micro_steps.first().copied().unwrap_or(0),
                &self.planned_items(&micro_steps),
            )?;
        }
        let mut graphs: Option<StepGraphs> = None;
        for step in self.start_step..config.max_train_steps {
            // `--profile_step N`: step N (0-based N-1) timed, step N+1 recorded by the profiler.
            let profiling = config
                .profile_step
                .and_then(|n| (step + 1).checked_sub(n))
                .filter(|&k| k <= 1);
            let mut probe = match profiling {
                Some(k) => Some(StepProbe::begin(
                    self.device,
                    k == 1,
                    &config.output_dir,
                    step + 1,
                )?),
                None => None,
            };
            let lr = self.schedule.lr_at(step);
            self.optimizer.set_learning_rate(0, lr)?;
            if config.cuda_graph && graphs.is_none() && step >= self.start_step + GRAPH_WARMUP_STEPS
            {
                graphs = Some(self.capture_graphs()?);
                log_above(
                    &progress,
                    "captured the micro-step and the optimizer step as CUDA graphs",
                );
            }
            for micro in 0..accumulation {
                let index = step * accumulation + micro;
                self.prepare_micro_step(index)?;
                match graphs
                    .as_ref()
                    .and_then(|g| g.micro_steps.get(micro as usize))
                {
                    Some(graph) => timed_launch(&mut probe, || graph.replay())?,
                    None => self.micro_step(micro)?,
                }
            }
            match &graphs {
                Some(graphs) => timed_launch(&mut probe, || graphs.optimizer_step.replay())?,
                None => self.optimizer_step(true)?,
            }
            if let Some(probe) = probe {
                log_above(&progress, probe.end(graphs.is_some())?);
            }
            let done = step + 1;
            progress.inc(1);
            if done % config.logging_steps == 0 || done == config.max_train_steps {
                skipped_total = self.log_window(done, lr, &mut metrics, &mut events, &progress)?;
                if skipped_total > config.max_nonfinite_steps {
                    progress.abandon();
                    return Err(Error::TooManyNonFinite {
                        step: done,
                        skipped: skipped_total,
                        limit: config.max_nonfinite_steps,
                    });
                }
            }
            if done % config.checkpointing_steps == 0 {
                let path = self.save_checkpoint(done)?;
                log_above(&progress, format!("saved {}", path.display()));
            }
            if done % config.validation_steps == 0 && done < config.max_train_steps {
                self.validate(done)?;
            }
        }
        progress.finish();
        let steps_run = config.max_train_steps.saturating_sub(self.start_step);
        let seconds_per_step = started.elapsed().as_secs_f64() / steps_run.max(1) as f64;
        let peak_memory_gib = self
            .device
            .is_cuda()
            .then(|| torch_cuda::memory_stats(self.device_index()))
            .flatten()
            .map(|s| s.peak_allocated_gib());
        events.flush()?;
        let (lora_file, kohya_file) =
            self.write_outputs(seconds_per_step, peak_memory_gib, skipped_total)?;
        Ok(RunSummary {
            steps_run,
            skipped_steps: skipped_total,
            loss_history: self.loss_history.clone(),
            lora_file,
            kohya_file,
            seconds_per_step,
            peak_memory_gib,
        })
    }

    fn device_index(&self) -> usize {
        match self.device {
            Device::Cuda(index) => index,
            _ => 0,
        }
    }

    /// The dataset items of each of `micro_steps` (the loader's plan for the seed).
    fn planned_items(&self, micro_steps: &[u64]) -> Vec<Vec<usize>> {
        micro_steps
            .iter()
            .map(|&k| {
                self.loader
                    .step_keys(k)
                    .1
                    .iter()
                    .map(|key| key.item)
                    .collect()
            })
            .collect()
    }

    /// What a micro-step needs before its device work: the generator re-seeded from
    /// `(seed, micro-step)` and the batch's item indices in the persistent input tensor.
    fn prepare_micro_step(&mut self, index: u64) -> Result<()> {
        tch::manual_seed(micro_step_seed(self.config.seed, index));
        match &self.latents {
            Latents::Cached(_) => self.inputs.select(index),
            Latents::Fresh { .. } => {
                let batch = self.loader.batch(index)?;
                self.inputs
                    .set_items(&batch.samples.iter().map(|s| s.item).collect::<Vec<_>>())?;
                self.fresh_batch = Some(batch);
                Ok(())
            }
        }
    }

    /// The device work of micro-step `micro` of an accumulation (captured as a graph with
    /// `--cuda_graph`).
    fn micro_step(&mut self, micro: u64) -> Result<()> {
        self.micro_step_work()?;
        if let Some(copies) = &self.copies {
            // Into the masters' gradients (written by the first micro-step, added by the others);
            // the copies' own gradients are dropped, so the next backward hands its products over
            // instead of adding them to zeros.
            copies.collect_grads(micro > 0)?;
            if self.device.is_cuda() && torch_cuda::shim_compiled() {
                torch_cuda::foreach::clear_grads(copies.leaves()).map_err(Error::CudaGraph)?;
            } else {
                copies.zero_leaf_grads()?;
            }
        }
        Ok(())
    }

    /// Forward, loss and backward of one micro-step.
    fn micro_step_work(&mut self) -> Result<()> {
        match &self.latents {
            Latents::Cached(cached) => {
                let batch = LatentBatch::Cached {
                    mean: &cached.mean,
                    std: &cached.std,
                    time_ids: &cached.time_ids,
                };
                micro_step(
                    &self.unet,
                    &self.ddpm,
                    &self.text,
                    &batch,
                    &self.inputs,
                    &self.settings,
                    &mut self.acc,
                )
            }
            Latents::Fresh { vae, .. } => {
                let Some(batch) = self.fresh_batch.take() else {
                    return Err(Error::InvalidOption {
                        option: "--cache_latents",
                        problem: "no batch was loaded for this micro-step".into(),
                    });
                };
                let pixels = batch.pixels.to_device(self.device);
                let latents = tch::no_grad(|| vae.encode(&pixels))?.sample();
                let rows: Vec<[f64; 6]> = batch.samples.iter().map(time_ids_of).collect();
                let time_ids = add_time_ids_tensor(&rows, Kind::Float, self.device);
                let fresh = LatentBatch::Fresh {
                    latents: &latents,
                    time_ids: &time_ids,
                };
                micro_step(
                    &self.unet,
                    &self.ddpm,
                    &self.text,
                    &fresh,
                    &self.inputs,
                    &self.settings,
                    &mut self.acc,
                )
            }
        }
    }

    /// The trainable LoRA tensors (handles sharing their storage).
    fn param_tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.shallow_clone()).collect()
    }

    /// The device work of an optimizer step (captured as a graph with `--cuda_graph`).
    fn optimizer_step(&mut self, zero_grads: bool) -> Result<()> {
        let params = self.param_tensors();
        // With copies the first micro-step overwrites the gradients: nothing to zero.
        optimizer_step(
            &mut self.optimizer,
            &params,
            &self.settings,
            &mut self.acc,
            zero_grads && self.copies.is_none(),
        )?;
        if let Some(copies) = &self.copies {
            copies.refresh()?;
        }
        Ok(())
    }

    /// Records each micro-step of an accumulation and the optimizer step as CUDA graphs (one memory
    /// pool), after the eager warm-up steps have created every gradient buffer and chosen every
    /// kernel. Capturing runs nothing: the replays do the work, on the same persistent tensors.
    fn capture_graphs(&mut self) -> Result<StepGraphs> {
        let device = self.device_index();
        // Gradients dropped before the first capture: its replays write them afresh (where the
        // eager step adds into zeroed ones), the later micro-steps add, and the optimizer graph
        // needs no zeroing pass. With compute copies this holds already: the masters' gradients
        // are views of one buffer the first micro-step overwrites, and the copies' gradients are
        // dropped after every micro-step.
        if self.copies.is_none() {
            torch_cuda::foreach::clear_grads(&self.param_tensors()).map_err(Error::CudaGraph)?;
        }
        let mut micro_steps: Vec<CudaGraph> = Vec::new();
        for micro in 0..u64::from(self.config.gradient_accumulation_steps) {
            // All graphs share the first one's memory pool (they replay in capture order).
            let (graph, recorded) =
                CudaGraph::capture(device, micro_steps.first(), CaptureMode::Global, || {
                    self.micro_step(micro)
                })
                .map_err(Error::CudaGraph)?;
            recorded?;
            micro_steps.push(graph);
        }
        let (optimizer_step, recorded) =
            CudaGraph::capture(device, micro_steps.first(), CaptureMode::Global, || {
                self.optimizer_step(false)
            })
            .map_err(Error::CudaGraph)?;
        recorded?;
        Ok(StepGraphs {
            micro_steps,
            optimizer_step,
        })
    }

    /// Reads the device-side window sums (the only host synchronisation of the loop), logs them and
    /// starts a new window. Returns the number of skipped steps so far.
    fn log_window(
        &mut self,
        step: u64,
        lr: f64,
        metrics: &mut MetricsLog,
        events: &mut EventWriter,
        progress: &indicatif::ProgressBar,
    ) -> Result<u64> {
        let window_loss = self.acc.window_loss.double_value(&[]);
        let window_steps = self.acc.window_steps.double_value(&[]);
        let skipped = self.acc.skipped.double_value(&[]) as u64;
        let grad_norm = self.acc.grad_norm.double_value(&[]);
        let _ = self.acc.window_loss.zero_();
        let _ = self.acc.window_steps.zero_();
        let loss = (window_steps > 0.0).then(|| window_loss / window_steps);
        let memory = self
            .device
            .is_cuda()
            .then(|| torch_cuda::memory_stats(self.device_index()))
            .flatten();
        if let Some(loss) = loss {
            self.loss_history.push((step, loss));
            events.add_scalar("train/loss", step as i64, loss as f32)?;
        }
        events.add_scalar("train/lr", step as i64, lr as f32)?;
        events.add_scalar("train/grad_norm", step as i64, grad_norm as f32)?;
        events.add_scalar("train/skipped_steps", step as i64, skipped as f32)?;
        let record = serde_json::json!({
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped_steps": skipped,
            "peak_memory_gib": memory.map(|m| m.peak_allocated_gib()),
            "elapsed_s": progress.elapsed().as_secs_f64(),
        });
        metrics.write(&record)?;
        let loss_text = loss.map_or_else(|| "n/a".to_owned(), |l| format!("{l:.4}"));
        let memory_text = memory.map_or_else(String::new, |m| {
            format!(" mem {:.2} GiB", m.peak_allocated_gib())
        });
        progress.set_message(format!(
            "loss {loss_text} lr {lr:.2e}{memory_text}{}",
            if skipped > 0 {
                format!(" skipped {skipped}")
            } else {
                String::new()
            }
        ));
        Ok(skipped)
    }

    /// Fails if a LoRA parameter is not finite (a host read; only at save points).
    fn check_finite(&self, what: &str) -> Result<()> {
        for (name, param) in &self.params {
            if !bool::try_from(param.isfinite().all())? {
                return Err(Error::NonFiniteLora {
                    what: what.to_owned(),
                    parameter: name.clone(),
                });
            }
        }
        Ok(())
    }

    fn lora_state(&mut self) -> Result<LoraState> {
        let mut state = LoraState::new();
        state.extract(&mut self.unet, Component::Unet, ADAPTER)?;
        Ok(state)
    }

    fn save_checkpoint(&mut self, step: u64) -> Result<PathBuf> {
        self.check_finite(&format!("checkpoint-{step}"))?;
        let state = TrainerState {
            step,
            micro_steps: step * u64::from(self.config.gradient_accumulation_steps),
            seed: self.config.seed,
            rng: "libtorch's generator re-seeded from (seed, micro-step) before every micro-step"
                .into(),
            next_learning_rate: self.schedule.lr_at(step),
            skipped_steps: self.acc.skipped.double_value(&[]),
            window_loss: self.acc.window_loss.double_value(&[]),
            window_steps: self.acc.window_steps.double_value(&[]),
            loss_history: self.loss_history.clone(),
        };
        let lora = self.lora_state()?;
        let config_toml = self.config.to_toml()?;
        let named: Vec<(&str, Tensor)> = self
            .params
            .iter()
            .map(|(n, p)| (n.as_str(), p.detach().to_device(Device::Cpu)))
            .collect();
        let optimizer = &self.optimizer;
        let path = self.store.save(step, |dir| -> Result<()> {
            let write = |name: &str, bytes: &[u8]| {
                std::fs::write(dir.join(name), bytes).map_err(io_error(&dir.join(name)))
            };
            Tensor::write_safetensors(&named, dir.join(PARAMS_FILE))?;
            optimizer.save(dir.join(OPTIMIZER_FILE))?;
            lora::format::write(
                dir.join(LORA_FILE),
                &lora,
                Format::Diffusers,
                &WriteOptions::default(),
            )?;
            write(
                STATE_FILE,
                serde_json::to_string_pretty(&state)
                    .map_err(|e| Error::Checkpoint {
                        path: dir.join(STATE_FILE),
                        problem: e.to_string(),
                    })?
                    .as_bytes(),
            )?;
            write(CONFIG_FILE, config_toml.as_bytes())?;
            if let Ok(delay) = std::env::var("TRAINER_TEST_SLOW_CHECKPOINT_MS") {
                // Fault-injection hook for the crash tests: widens the window in which a kill lands
                // mid-write. Never set in normal use.
                std::thread::sleep(std::time::Duration::from_millis(delay.parse().unwrap_or(0)));
            }
            Ok(())
        })?;
        if let Some(limit) = self.config.checkpoints_total_limit {
            for removed in self.store.prune(limit as usize)? {
                log(format!(
                    "removed checkpoint-{removed} (--checkpoints_total_limit {limit})"
                ));
            }
        }
        Ok(path)
    }

    /// Loads the VAE for decoding (kept when latents are encoded live).
    fn with_vae<T>(&self, f: impl FnOnce(&AutoencoderKL) -> Result<T>) -> Result<T> {
        match &self.latents {
            Latents::Fresh { vae, .. } => f(vae),
            Latents::Cached(_) => {
                let (mut vae, _store) = AutoencoderKL::from_pretrained_variant(
                    self.model.root.join("vae"),
                    self.model.variant.as_deref(),
                    self.device,
                    Kind::Float,
                    Upcast::Always,
                )?;
                vae.set_tiling(Some(VaeTiling::default()))?;
                let out = f(&vae);
                drop((vae, _store));
                free_device_cache(self.device);
                out
            }
        }
    }

    /// Denoises validation latents with the UNet being trained, through the same sampler as
    /// [`sdxl_model::pipeline::Pipeline`] uses for final inference.
    fn validation_latents(&self, validation: &Validation, seed: u64) -> Result<Tensor> {
        let denoiser = Denoiser {
            unet: &self.unet,
            scheduler_config: &self.scheduler_config,
            vae_scale_factor: self.vae_config.downscale_factor(),
            device: self.device,
            kind: self.kind,
        };
        let options = GenerateOptions {
            prompts: vec![validation.prompt.clone()],
            guidance_scale: self.config.validation_guidance_scale,
            steps: self.config.validation_inference_steps as usize,
            height: i64::from(self.config.resolution),
            width: i64::from(self.config.resolution),
            images_per_prompt: i64::from(self.config.num_validation_images),
            seed,
            ..GenerateOptions::default()
        };
        Ok(tch::no_grad(|| {
            denoiser.denoise(&validation.positive, &validation.negative, &options)
        })?)
    }

    /// Decodes each batch of latents into one row of images, loading the VAE once for all of them.
    fn decode_rows(&self, batches: &[Tensor]) -> Result<Vec<image::RgbImage>> {
        self.with_vae(|vae| {
            batches
                .iter()
                .map(|latents| {
                    let images = decode_images(vae, latents)?;
                    let row = (0..images.len())
                        .map(|i| images.to_rgb(i))
                        .collect::<sdxl_model::Result<Vec<_>>>()?;
                    Ok(grid_row(&row)?)
                })
                .collect()
        })
    }

    fn validate(&mut self, step: u64) -> Result<()> {
        let Some(validation) = &self.validation else {
            return Ok(());
        };
        let latents = self.validation_latents(validation, self.config.seed)?;
        let rows = self.decode_rows(std::slice::from_ref(&latents))?;
        let folder = self.config.output_dir.join("validation");
        std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
        let path = folder.join(format!("step-{step:06}.png"));
        if let Some(row) = rows.first() {
            save_png(row, &path)?;
        }
        Ok(())
    }

    fn write_outputs(
        &mut self,
        seconds_per_step: f64,
        peak_memory_gib: Option<f64>,
        skipped: u64,
    ) -> Result<(PathBuf, PathBuf)> {
        self.check_finite("the final LoRA")?;
        let out = self.config.output_dir.clone();
        let lora = self.lora_state()?;
        // The metadata key lora files share for the training config holds JSON.
        let config_json = serde_json::to_string(&self.config).map_err(|e| Error::Checkpoint {
            path: out.join(LORA_FILE),
            problem: format!("config as JSON: {e}"),
        })?;
        let mut options = WriteOptions::default();
        options
            .extra_metadata
            .insert(TRAINING_CONFIG_KEY.to_owned(), config_json);
        let lora_file = out.join(LORA_FILE);
        lora::format::write(&lora_file, &lora, Format::Diffusers, &options)?;
        // kohya names with SGM block names: what A1111 and ComfyUI load.
        let renames = BlockRenames::new(sgm_unet_table(self.unet.config()));
        let mut kohya_options = WriteOptions {
            block_renames: Some(&renames),
            ..WriteOptions::default()
        };
        for (key, value) in [
            ("ss_network_module", "networks.lora".to_owned()),
            ("ss_network_dim", self.config.rank.to_string()),
            (
                "ss_network_alpha",
                self.config
                    .lora_alpha
                    .unwrap_or(f64::from(self.config.rank))
                    .to_string(),
            ),
            ("ss_base_model_version", "sdxl_base_v1-0".to_owned()),
            (
                "ss_resolution",
                format!("({0}, {0})", self.config.resolution),
            ),
            (
                "ss_max_train_steps",
                self.config.max_train_steps.to_string(),
            ),
            ("ss_learning_rate", self.config.learning_rate.to_string()),
            ("ss_seed", self.config.seed.to_string()),
            (
                "ss_training_comment",
                format!(
                    "trained with sdxl-lora from {}",
                    self.config.pretrained_model_name_or_path
                ),
            ),
        ] {
            kohya_options.extra_metadata.insert(key.to_owned(), value);
        }
        let kohya_file = out.join(KOHYA_FILE);
        lora::format::write(&kohya_file, &lora, Format::Kohya, &kohya_options)?;

        if !self.loss_history.is_empty() {
            loss_curve_png(&out.join("loss.png"), &self.loss_history, "training loss")?;
        }
        let grid = self.compare()?;
        if let Some(grid) = &grid {
            save_png(grid, out.join("base_vs_lora.png"))?;
        }
        self.write_model_card(seconds_per_step, peak_memory_gib, skipped, grid.is_some())?;
        Ok((lora_file, kohya_file))
    }

    /// The base model's images (LoRA off) above the fine-tuned ones, same seeds and prompt.
    fn compare(&mut self) -> Result<Option<image::RgbImage>> {
        let Some(validation) = self.validation.take() else {
            return Ok(None);
        };
        let result = (|| -> Result<image::RgbImage> {
            lora::set_enabled(&mut self.unet, ADAPTER, false)?;
            let base = self.validation_latents(&validation, self.config.seed);
            lora::set_enabled(&mut self.unet, ADAPTER, true)?;
            let tuned = self.validation_latents(&validation, self.config.seed)?;
            Ok(grid_column(&self.decode_rows(&[base?, tuned])?)?)
        })();
        self.validation = Some(validation);
        result.map(Some)
    }

    fn write_model_card(
        &self,
        seconds_per_step: f64,
        peak_memory_gib: Option<f64>,
        skipped: u64,
        has_grid: bool,
    ) -> Result<()> {
        let out = &self.config.output_dir;
        let final_loss = self.loss_history.last().map(|(_, l)| *l);
        let card = serde_json::json!({
            "base_model": self.config.pretrained_model_name_or_path,
            "instance_prompt": self.config.instance_prompt,
            "lora_file": LORA_FILE,
            "kohya_file": KOHYA_FILE,
            "steps": self.config.max_train_steps,
            "final_loss": final_loss,
            "skipped_steps": skipped,
            "seconds_per_step": seconds_per_step,
            "peak_memory_gib": peak_memory_gib,
            "config": self.config,
        });
        let json = serde_json::to_string_pretty(&card).map_err(|e| Error::Checkpoint {
            path: out.join("model_card.json"),
            problem: e.to_string(),
        })?;
        write_atomic(&out.join("model_card.json"), json.as_bytes())?;
        let prompt = self
            .config
            .instance_prompt
            .as_deref()
            .unwrap_or("(dataset captions)");
        let markdown = format!(
            "---\nbase_model: {base}\nlibrary_name: diffusers\ntags:\n- stable-diffusion-xl\n- lora\n- text-to-image\ninstance_prompt: {prompt}\n---\n\n\
             # SDXL LoRA\n\nLoRA (rank {rank}) for `{base}` trained on `{data}` for {steps} steps at {res} px \
             (batch {batch} × accumulation {accum}, learning rate {lr:e}, {opt}).\n\n\
             Trigger prompt: `{prompt}`.\n\n\
             - `{LORA_FILE}`: diffusers format (`pipe.load_lora_weights(\"{out}\")`).\n\
             - `{KOHYA_FILE}`: kohya format for A1111 and ComfyUI.\n\
             - final training loss: {loss}; steps skipped for non-finite values: {skipped}.\n{grid}\n\
             ## Training configuration\n\n```toml\n{config}```\n",
            base = self.config.pretrained_model_name_or_path,
            rank = self.config.rank,
            data = self.config.dataset_name,
            steps = self.config.max_train_steps,
            res = self.config.resolution,
            batch = self.config.train_batch_size,
            accum = self.config.gradient_accumulation_steps,
            lr = self.config.learning_rate,
            opt = if self.config.use_8bit_adam {
                "8-bit AdamW"
            } else {
                "AdamW"
            },
            out = out.display(),
            loss = final_loss.map_or_else(|| "n/a".into(), |l| format!("{l:.4}")),
            grid = if has_grid {
                "\n![base (top) vs LoRA (bottom)](base_vs_lora.png)\n"
            } else {
                ""
            },
            config = self.config.to_toml()?,
        );
        write_atomic(&out.join("README.md"), markdown.as_bytes())
    }
}
