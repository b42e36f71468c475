//! The training configuration: one struct whose field names are the flags of diffusers'
//! `train_dreambooth_lora_sdxl.py` (`--pretrained_model_name_or_path`, `--train_batch_size`, …),
//! read from a TOML file with the same keys and overridden by command-line flags.
//!
//! The defaults are the seed recipe: SDXL base, the first 75 images of
//! `lambdalabs/naruto-blip-captions` with every caption replaced by "Naruto style anime character",
//! 512 px, batch 2 × accumulation 2, bf16, 8-bit AdamW at 1e-4 (constant), LoRA rank 4 on the UNet's
//! `to_q`, `to_k`, `to_v`, `to_out.0`, 1200 optimizer steps.
//!
//! ```
//! use trainer::TrainConfig;
//! use trainer::config::OptimizerKind;
//! let args = ["--max_train_steps", "10", "--use_8bit_adam=false", "--instance_prompt", "a photo of sks dog"];
//! let config = TrainConfig::from_args(args.iter().map(|s| s.to_string()))?;
//! assert_eq!(config.max_train_steps, 10);
//! assert_eq!(config.optimizer_kind()?, OptimizerKind::AdamW);
//! assert_eq!(config.train_batch_size, 2); // the seed recipe's default
//! # Ok::<(), trainer::Error>(())
//! ```

mod ema;
mod flags;
pub mod kohya;
mod lora_targets;
mod optimizer;
mod optimizer_args;
mod paths;
pub mod sweep;
mod validate;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use flags::need;
pub use flags::{Attention, FlagValue, MixedPrecision};
pub use optimizer::{OptimizerKind, OptimizerSetup};
pub use paths::is_hub_id;
pub use sweep::{SweepExecution, SweepFile, SweepVariant};
pub use validate::MAX_RESOLUTION;

use crate::lr_scheduler::SchedulerKind;
use crate::{Error, Result};

/// Declares [`TrainConfig`] once: its fields (= flag names = TOML keys), their defaults and their help.
macro_rules! train_config {
    ($( $(#[doc = $doc:literal])+ $(#[serde($($serde:tt)*)])? $field:ident : $ty:ty = $default:expr ),* $(,)?) => {
        /// Everything a training run needs; see the module documentation.
        ///
        /// `#[non_exhaustive]`: outside this crate, start from [`TrainConfig::default`] (or
        /// [`TrainConfig::tiny_demo`], a file, flags) and change fields with the `with_<field>`
        /// setters or by assignment; a new flag is then no breaking change.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        #[non_exhaustive]
        pub struct TrainConfig {
            $( $(#[doc = $doc])+ $(#[serde($($serde)*)])? pub $field: $ty, )*
        }

        impl Default for TrainConfig {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        pastey::paste! {
            /// One builder-style setter per field: `with_<field>(value)` sets `--<field>`.
            impl TrainConfig {
                $(
                    #[doc = concat!("Sets `", stringify!($field), "` (`--", stringify!($field), "`) and returns the configuration.")]
                    #[must_use]
                    pub fn [<with_ $field>](mut self, value: $ty) -> Self {
                        self.$field = value;
                        self
                    }
                )*
            }
        }

        impl TrainConfig {
            /// Every flag's name (without `--`), for the typo suggestion of an unknown one.
            const FLAG_NAMES: &'static [&'static str] = &[$( stringify!($field) ),*];

            fn is_switch(name: &str) -> Option<bool> {
                match name {
                    $( stringify!($field) => Some(<$ty as FlagValue>::IS_SWITCH), )*
                    _ => None,
                }
            }

            fn set_flag(&mut self, name: &str, value: Option<&str>) -> Result<()> {
                if name == "resume_from_checkpoint" && value.is_some_and(str::is_empty) {
                    // An empty value would clear the option and start afresh: never silently.
                    return Err(Error::InvalidOption {
                        option: "--resume_from_checkpoint",
                        problem: "is empty: give `latest` or a checkpoint-<step> folder (or leave the flag out to start a new run)".into(),
                    });
                }
                match name {
                    $( stringify!($field) => {
                        self.$field = <$ty as FlagValue>::parse_flag(concat!("--", stringify!($field)), value)?;
                    } )*
                    _ => return Err(unknown_flag(name, Self::FLAG_NAMES)),
                }
                Ok(())
            }

            /// One line per flag: name, value kind, default and description.
            pub fn flags_help() -> String {
                let defaults = Self::default();
                let mut help = String::new();
                $(
                    let doc = [$($doc),+].join(" ");
                    help.push_str(&format!(
                        "  --{} {}\n      {} (default: {})\n",
                        stringify!($field),
                        <$ty as FlagValue>::HINT,
                        doc.trim(),
                        describe(&defaults.$field),
                    ));
                )*
                help
            }
        }
    };
}

/// The TOML parser's message on one line, after the line and column it points at (its own
/// `Display` draws the line with a caret under it, over several lines).
fn one_line_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before.len() - line_start + 1;
            // The line itself names the key of a value of the wrong type.
            let source: String = text[line_start..]
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .chars()
                .take(80)
                .collect();
            format!("line {line}, column {column} (`{source}`): {message}")
        }
        None => message,
    }
}

fn describe<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "?".into())
}

/// "unknown flag", with the closest of the `known` flags when it looks like a typo (the measure of
/// the kohya config's unknown keys).
fn unknown_flag(name: &str, known: &[&str]) -> Error {
    let best = known
        .iter()
        .map(|flag| (kohya::edit_distance(name, flag), *flag))
        .min()
        .filter(|&(distance, flag)| distance <= 2.max(flag.len() / 4));
    let hint = best.map_or_else(String::new, |(_, flag)| {
        format!(" (did you mean `--{flag}`?)")
    });
    Error::InvalidOption {
        option: "command line",
        problem: format!("unknown flag `--{name}`{hint}"),
    }
}

train_config! {
    /// A diffusers SDXL folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`), a hub model id, or a single-file SGM checkpoint (`model.safetensors`, or a hub file as `https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>` or `<owner>/<repo>/<file>.safetensors`).
    pretrained_model_name_or_path: String = "stabilityai/stable-diffusion-xl-base-1.0".into(),
    /// With a single-file --pretrained_model_name_or_path: a diffusers folder or hub model id whose `config.json` files describe its components (diffusers' `from_single_file(config=…)`); unset: SDXL base's configs.
    single_file_config: Option<String> = None,
    /// Hub revision of the model.
    revision: String = "main".into(),
    /// Weight-file variant, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`.
    #[serde(with = "flags::none_as_text")]
    variant: Option<String> = Some("fp16".into()),
    /// A kohya dataset config file (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`); replaces --dataset_name and takes the resolution, batch size, bucket, flip and crop settings from the file.
    dataset_config: Option<PathBuf> = None,
    /// A hub dataset id, or a local folder (parquet files, an imagefolder with metadata.jsonl, or images with .txt captions).
    dataset_name: String = "lambdalabs/naruto-blip-captions".into(),
    /// The image column of a parquet dataset.
    image_column: String = "image".into(),
    /// The caption column, used when no instance prompt is given.
    caption_column: String = "text".into(),
    /// Train on the first N rows only.
    #[serde(with = "flags::none_as_text")]
    max_train_samples: Option<u64> = Some(75),
    /// One prompt for every image, replacing the captions (DreamBooth).
    #[serde(with = "flags::none_as_text")]
    instance_prompt: Option<String> = Some("Naruto style anime character".into()),
    /// DreamBooth's prior preservation: train on class images too, their loss weighted by --prior_loss_weight (needs --class_data_dir and --class_prompt).
    with_prior_preservation: bool = false,
    /// Folder of class images for --with_prior_preservation; when it holds fewer than --num_class_images, the missing ones are generated into it from --class_prompt.
    class_data_dir: Option<PathBuf> = None,
    /// The prompt of the class images, e.g. "a photo of a dog" (to generate them and to train on them).
    class_prompt: Option<String> = None,
    /// Class images wanted in --class_data_dir (the missing ones are generated with the base model at its default size, guidance 5).
    num_class_images: u64 = 100,
    /// Sampler steps of generated class images (not a flag of diffusers' script, which uses the pipeline's default, 50).
    class_inference_steps: u32 = 50,
    /// Weight of the class images' loss (the prior-preservation loss).
    prior_loss_weight: f64 = 1.0,
    /// Images per batch when generating class images.
    sample_batch_size: u32 = 4,
    /// Caption files' extension in a folder dataset (kohya's default is `.caption`).
    caption_extension: String = ".txt".into(),
    /// Probability of training a sample on the empty prompt instead of its caption, drawn each step (kohya's caption_dropout_rate, diffusers' proportion_empty_prompts).
    caption_dropout_rate: f64 = 0.0,
    /// Shuffle the caption's tags (split at --caption_separator) each step, keeping the first --keep_tokens in place.
    shuffle_caption: bool = false,
    /// Leading tags that --shuffle_caption and --caption_tag_dropout_rate never move or drop.
    keep_tokens: u32 = 0,
    /// A marker in captions: tags before it stay in place, tags after it move (kohya's keep_tokens_separator, e.g. `|||`).
    keep_tokens_separator: Option<String> = None,
    /// What separates a caption's tags.
    caption_separator: String = ",".into(),
    /// Probability of dropping each movable tag, drawn each step.
    caption_tag_dropout_rate: f64 = 0.0,
    /// Text put before every caption (kohya's caption_prefix).
    caption_prefix: Option<String> = None,
    /// Text put after every caption (kohya's caption_suffix).
    caption_suffix: Option<String> = None,
    /// Square training resolution in pixels (a multiple of 8).
    resolution: u32 = 512,
    /// kohya's aspect-ratio buckets: each image trains at the bucket (sides multiples of --bucket_reso_steps, area about --resolution²) nearest its aspect ratio; batches never mix buckets.
    enable_bucket: bool = false,
    /// Smallest bucket side (kohya's default).
    min_bucket_reso: u32 = 256,
    /// Largest bucket side (kohya's default; SDXL users often set 2048).
    max_bucket_reso: u32 = 1024,
    /// Bucket sides are multiples of this (SDXL needs a multiple of 32).
    bucket_reso_steps: u32 = 64,
    /// One bucket per image size, never enlarging an image (kohya's --bucket_no_upscale).
    bucket_no_upscale: bool = false,
    /// Centre crops (else a random crop per step, which needs --cache_latents false).
    center_crop: bool = true,
    /// Mirror images at random each step.
    random_flip: bool = false,
    /// Refuse images smaller than their target size (the run stops naming the row) instead of resizing them up, as diffusers' scripts do.
    no_upscale: bool = false,
    /// Leave out rows that cannot be used (undecodable, a bad path, no caption, too small under --no_upscale) and list them at the start and at the end of the run, instead of stopping at the first.
    skip_bad_images: bool = false,
    /// Encode every image once with the VAE and free the VAE before training (with --random_flip, both mirror images).
    cache_latents: bool = true,
    /// Keep the cached latents on disk, keyed by image content, size, crop, flip and the VAE's weights, so the next run reuses them (needs --cache_latents).
    cache_latents_to_disk: bool = false,
    /// Where --cache_latents_to_disk keeps latents; default: `latents/` in $SDXL_LORA_CACHE, else $XDG_CACHE_HOME/sdxl-lora-rs, else ~/.cache/sdxl-lora-rs.
    latents_cache_dir: Option<PathBuf> = None,
    /// Samples per micro-step.
    train_batch_size: u32 = 2,
    /// Data-parallel processes to start on this machine (torchrun's --nproc-per-node, accelerate's --num_processes): the trainer runs itself that many times with torchrun's variables set; --train_batch_size is per process, so the global batch is their product (docs/TRAINING.md, "Multi-GPU"). Under torchrun the trainer records the world size here.
    nproc_per_node: u32 = 1,
    /// Minutes a collective of a multi-process run waits for the other processes before the run stops, naming the ranks that did not answer (kohya's --ddp_timeout; 30 as accelerate's default).
    ddp_timeout: f64 = 30.0,
    /// Micro-steps per optimizer step.
    gradient_accumulation_steps: u32 = 2,
    /// Optimizer steps.
    max_train_steps: u64 = 1200,
    /// Peak learning rate.
    learning_rate: f64 = 1e-4,
    /// Multiply the learning rate by batch size × accumulation steps × processes (diffusers' --scale_lr).
    scale_lr: bool = false,
    /// Learning-rate schedule.
    lr_scheduler: SchedulerKind = SchedulerKind::Constant,
    /// Linear warm-up steps.
    lr_warmup_steps: u64 = 0,
    /// Cycles of cosine_with_restarts (and the cosine wave count of cosine).
    lr_num_cycles: f64 = 1.0,
    /// Power of the polynomial schedule.
    lr_power: f64 = 1.0,
    /// LoRA rank.
    rank: u32 = 4,
    /// LoRA alpha (scale = alpha / rank); default: the rank, as diffusers.
    lora_alpha: Option<f64> = None,
    /// Train LoRA on both text encoders too (q_proj, k_proj, v_proj, out_proj; same rank and alpha): they stay on the device and encode every micro-step (diffusers' train_dreambooth_lora_sdxl.py).
    train_text_encoder: bool = false,
    /// Learning rate of the text encoders' LoRA with --train_text_encoder (0: --learning_rate), scheduled as the UNet's.
    text_encoder_lr: f64 = 5e-6,
    /// Decoupled weight decay of the text encoders' LoRA with --train_text_encoder.
    adam_weight_decay_text_encoder: f64 = 1e-3,
    /// UNet layers that get a LoRA: a preset, `attn` (to_q, to_k, to_v, to_out.0, as diffusers' scripts) or `kohya` (every linear layer of the transformer blocks, as kohya's networks/lora.py), or comma-separated diffusers module names matched as dotted suffixes (e.g. `to_q,to_k,ff.net.2`).
    target_modules: String = "attn".into(),
    /// LoCon: also adapt the ResNet blocks and samplers as kohya's conv_dim does: 3×3 convolutions at this rank, the blocks' conv_shortcut and time_emb_proj at --rank; off when unset.
    conv_rank: Option<u32> = None,
    /// Alpha of the --conv_rank layers (kohya's conv_alpha); default: the conv rank (scale 1, as --lora_alpha's default; kohya's default is 1).
    conv_alpha: Option<f64> = None,
    /// DoRA (peft's use_dora): a trainable magnitude per output row of each adapted layer (per output channel of a convolution).
    use_dora: bool = false,
    /// Dropout probability on each LoRA's input while training (peft's lora_dropout).
    lora_dropout: f64 = 0.0,
    /// rsLoRA (peft's use_rslora): scale by alpha / √rank instead of alpha / rank.
    use_rslora: bool = false,
    /// The optimizer: `AdamW`, `AdamW8bit`, `Prodigy`, `Adafactor`, `Lion` or `Lion8bit`, any case (kohya's --optimizer_type is the same flag); default: AdamW8bit, or AdamW with --use_8bit_adam false. See docs/TRAINING.md for how the flags below apply to each.
    #[serde(alias = "optimizer_type")]
    optimizer: Option<OptimizerKind> = None,
    /// 8-bit block-quantized AdamW states (bitsandbytes AdamW8bit), diffusers' flag: without --optimizer it picks AdamW8bit (true, also when unset) or AdamW (false); with --optimizer AdamW, true means AdamW8bit; true with another optimizer is an error.
    use_8bit_adam: Option<bool> = None,
    /// β₁ of AdamW, Prodigy, Lion and Lion8bit.
    adam_beta1: f64 = 0.9,
    /// β₂ of AdamW, Prodigy, Lion and Lion8bit; default: the optimizer's own (0.999; Lion and Lion8bit 0.99).
    adam_beta2: Option<f64> = None,
    /// Decoupled weight decay (every optimizer).
    adam_weight_decay: f64 = 1e-4,
    /// ε of AdamW and Prodigy.
    adam_epsilon: f64 = 1e-8,
    /// Prodigy's β₃ (decay of its step-size estimate's sums); default: √β₂.
    prodigy_beta3: Option<f64> = None,
    /// Prodigy's AdamW-style decoupled weight decay (else added to the gradient).
    prodigy_decouple: bool = true,
    /// Prodigy's Adam bias correction (diffusers' default; prodigyopt's is false).
    prodigy_use_bias_correction: bool = true,
    /// Prodigy's safeguard against a too large step size during warm-up (diffusers' default; prodigyopt's is false).
    prodigy_safeguard_warmup: bool = true,
    /// Factor on Prodigy's step-size estimate (prodigyopt's d_coef; kohya users pass it in --optimizer_args).
    prodigy_d_coef: f64 = 1.0,
    /// Adafactor's time-dependent step size min(1e-2, 1/√t), instead of --learning_rate (transformers' relative_step; LoRA recipes usually turn it off).
    adafactor_relative_step: bool = true,
    /// Adafactor scales the step by each parameter's RMS (transformers' scale_parameter).
    adafactor_scale_parameter: bool = true,
    /// With --adafactor_relative_step: step size min(1e-6·t, 1/√t) (transformers' warmup_init).
    adafactor_warmup_init: bool = false,
    /// kohya's --optimizer_args: the optimizer's own settings as `key=value` Python literals, space-separated (one quoted value or several words), e.g. `relative_step=False scale_parameter=False warmup_init=False` for Adafactor, `d_coef=2 use_bias_correction=True` for Prodigy, `betas=0.9,0.99` (every optimizer but Adafactor); they override the flags; an unknown key is an error.
    optimizer_args: Option<String> = None,
    /// Gradient-norm clipping threshold.
    max_grad_norm: f64 = 1.0,
    /// Keep diffusers' EMAModel average of every weight the optimizer updates (the LoRA, DoRA magnitudes, the text encoders' LoRA), updated after each optimizer step: the LoRA files and validation images use the average, checkpoints keep the raw weights too (diffusers' train_text_to_image_sdxl.py --use_ema).
    use_ema: bool = false,
    /// The EMA's largest decay (EMAModel's `decay`; diffusers' train_unconditional.py calls it --ema_max_decay).
    ema_decay: f64 = 0.9999,
    /// The EMA's smallest decay once it averages (EMAModel's `min_decay`).
    ema_min_decay: f64 = 0.0,
    /// Optimizer steps during which the EMA copies the weights before it averages (EMAModel's `update_after_step`).
    ema_update_after_step: u64 = 0,
    /// The EMA's warm-up decay 1 − (1 + step/--ema_inv_gamma)^(−--ema_power) instead of (1 + step)/(10 + step) (EMAModel's `use_ema_warmup`).
    ema_use_warmup: bool = false,
    /// Inverse multiplicative factor of the EMA warm-up (EMAModel's `inv_gamma`).
    ema_inv_gamma: f64 = 1.0,
    /// Exponent of the EMA warm-up (EMAModel's `power`).
    ema_power: f64 = 2.0 / 3.0,
    /// Precision of the frozen model.
    mixed_precision: MixedPrecision = MixedPrecision::Bf16,
    /// Recompute activations in the backward pass (less memory, more time).
    gradient_checkpointing: bool = false,
    /// Store the frozen UNet's linear and convolution weights in fp8 (e4m3, one scale per tensor), computed in the training precision; saves memory with --gradient_checkpointing.
    fp8_base_weights: bool = false,
    /// Multiply the fp8 base weights in fp8 (fp8 tensor cores, compute capability 8.9 or newer; needs --fp8_base_weights and --mixed_precision bf16 or fp16): each linear layer's input is quantized per call to e4m3 (its largest magnitude / 448), gradients flow back through the widened weight, and autograd keeps no widened copy of the weights.
    fp8_compute: bool = false,
    /// With --fp8_compute, compute the input gradients of those layers in fp8 too: each output gradient quantized per call to e5m2 (its largest magnitude / 57344; 2 mantissa bits), times the e4m3 weight, transposed per call (transformer-engine's recipe for gradients).
    fp8_gradients: bool = false,
    /// Capture the micro-step and the optimizer step as CUDA graphs after two eager steps (CUDA, cached latents).
    cuda_graph: bool = false,
    /// Let cuDNN time its convolution algorithms on first use and keep the fastest (PyTorch's `torch.backends.cudnn.benchmark`); the timing runs in the warm-up steps, before any graph capture.
    cudnn_benchmark: bool = false,
    /// Run the UNet's feature maps channels-last on CUDA (PyTorch's `torch.channels_last`): cuDNN's NHWC convolutions without layout transposes, and group norms (with their SiLU) from the channels-last kernels of torch-cuda, compiled at first use by NVRTC; no effect on the CPU.
    channels_last: bool = false,
    /// UNet attention implementation.
    attention: Attention = Attention::Fused,
    /// Min-SNR-γ loss weighting (5.0 is the paper's value); off when unset.
    snr_gamma: Option<f64> = None,
    /// Offset-noise strength.
    noise_offset: f64 = 0.0,
    /// `epsilon` or `v_prediction`; default: the model's scheduler config (v_prediction for a single file carrying a `v_pred` key).
    prediction_type: Option<String> = None,
    /// Rescale the noise schedule to zero terminal SNR (diffusers' `rescale_betas_zero_snr`; needs v_prediction); validation and class images then sample with "trailing" timesteps. On by default for a single file carrying a `ztsnr` key.
    zero_terminal_snr: bool = false,
    /// Save a checkpoint every N optimizer steps.
    checkpointing_steps: u64 = 500,
    /// Keep at most N checkpoints.
    checkpoints_total_limit: Option<u64> = None,
    /// `latest` or a checkpoint-N folder to continue from.
    resume_from_checkpoint: Option<String> = None,
    /// Prompt for validation images; none when unset.
    validation_prompt: Option<String> = None,
    /// Validation images every N optimizer steps (and at the end).
    validation_steps: u64 = 200,
    /// Validation images per validation.
    num_validation_images: u32 = 2,
    /// Sampler steps of validation images and of the final comparison.
    validation_inference_steps: u32 = 25,
    /// Classifier-free guidance scale of validation images.
    validation_guidance_scale: f64 = 5.0,
    /// diffusers' `guidance_rescale` of validation and class images (0.7 in the zero-terminal-SNR paper); default: 0.7 with --zero_terminal_snr, else 0.
    validation_guidance_rescale: Option<f64> = None,
    /// Seed of data order, noise, timesteps and validation images.
    seed: u64 = 0,
    /// Where checkpoints, logs, LoRA files and images go.
    output_dir: PathBuf = PathBuf::from("naruto-lora"),
    /// Start afresh in an --output_dir that holds another run (checkpoints, LoRA files, logs): that run is moved whole into `previous-run-<UTC time>/` inside it, never mixed with this one (the diffusers/kohya flag name; without it, and without --resume_from_checkpoint, such a folder is refused).
    overwrite_output_dir: bool = false,
    /// Read the loss on the host (progress bar, logs) every N optimizer steps.
    logging_steps: u64 = 10,
    /// Time optimizer step N (host enqueueing vs device completion; with CUDA graphs, the host's own work with each graph launched onto an idle device), record step N+1 with libtorch's profiler and write its Chrome trace to output_dir/profile/ (see tools/gpu/profile_summary.py); off when unset.
    profile_step: Option<u64> = None,
    /// Stop once more than N optimizer steps were skipped for a non-finite loss or gradient (counted at every --logging_steps); a run whose every step was skipped fails at its end whatever N is.
    max_nonfinite_steps: u64 = 10,
    /// `cuda`, `cuda:N`, `cpu`, or `auto` (CUDA when available).
    device: String = "auto".into(),
    /// Loader worker threads (0: one per core).
    dataloader_num_workers: u32 = 0,
}

impl TrainConfig {
    /// Reads a TOML file whose keys are the flag names (unknown keys are errors naming the file).
    ///
    /// # Errors
    /// [`Error::Io`] and [`Error::ConfigFile`].
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_owned(),
            problem: one_line_toml_error(&text, &e),
        })
    }

    /// `base` with the keys of TOML file `path` set (the file is first checked alone, so unknown
    /// keys and wrong types are errors naming it).
    ///
    /// # Errors
    /// As [`Self::from_toml_file`].
    pub fn from_toml_file_over(base: Self, path: &Path) -> Result<Self> {
        Self::from_toml_file(path)?;
        let bad = |problem: String| Error::ConfigFile {
            path: path.to_owned(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut keys: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        // kohya's spelling of --optimizer.
        if let Some(value) = keys.remove("optimizer_type") {
            keys.insert("optimizer".into(), value);
        }
        let mut merged: toml::Table =
            toml::from_str(&base.to_toml()?).map_err(|e| bad(e.to_string()))?;
        merged.extend(keys);
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.to_string()))
    }

    /// The config as TOML (what checkpoints and the model card record).
    ///
    /// # Errors
    /// [`Error::ConfigFile`] if a value cannot be expressed in TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::ConfigFile {
            path: PathBuf::from("<config>"),
            problem: e.to_string(),
        })
    }

    /// Defaults, then the file of `--config FILE` (anywhere on the line), then every other flag in
    /// order. Flags are `--name value` or `--name=value`; a boolean flag alone means true.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming the flag; the file's errors; then [`Self::validate`]'s.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Self> {
        Self::from_args_over(Self::default(), args)
    }

    /// As [`Self::from_args`], starting from `base` instead of the defaults (a preset): the keys of
    /// a `--config FILE` override `base` (the settings the file leaves out keep `base`'s values),
    /// then every other flag overrides both.
    ///
    /// # Errors
    /// As [`Self::from_args`].
    pub fn from_args_over(base: Self, args: impl IntoIterator<Item = String>) -> Result<Self> {
        let args: Vec<String> = args.into_iter().collect();
        let mut flags = Vec::new();
        let mut file = None;
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            let name = arg.strip_prefix("--").ok_or_else(|| Error::InvalidOption {
                option: "command line",
                problem: format!("`{arg}` is not a --flag"),
            })?;
            let (name, mut value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (name.to_owned(), None),
            };
            // kohya's spelling of --optimizer.
            let name = if name == "optimizer_type" {
                "optimizer".to_owned()
            } else {
                name
            };
            if value.is_none() {
                let next = args.get(i + 1).filter(|next| !next.starts_with("--"));
                let takes_value = match (name.as_str(), Self::is_switch(&name)) {
                    ("config", _) => true,
                    (_, Some(true)) => next.is_some_and(|n| bool::parse_flag("", Some(n)).is_ok()),
                    (_, Some(false)) => true,
                    (_, None) => return Err(unknown_flag(&name, Self::FLAG_NAMES)),
                };
                if takes_value {
                    value = next.cloned();
                    i += usize::from(value.is_some());
                }
                // kohya's --optimizer_args takes several words: every one up to the next flag.
                while name == "optimizer_args"
                    && let Some(more) = args.get(i + 1).filter(|a| !a.starts_with("--"))
                {
                    value = value.map(|v| format!("{v} {more}"));
                    i += 1;
                }
            }
            if name == "config" {
                file = Some(PathBuf::from(need("--config", value.as_deref())?));
            } else {
                flags.push((name, value));
            }
            i += 1;
        }
        let mut config = match file {
            Some(path) => Self::from_toml_file_over(base, &path)?,
            None => base,
        };
        for (name, value) in &flags {
            config.set_flag(name, value.as_deref())?;
        }
        config.validate()?;
        Ok(config)
    }

    /// The offline demo: a tiny SDXL-shaped model (`model`, a diffusers folder such as the repository's
    /// `tests/fixtures/tiny-sdxl`) on a small dataset (`dataset`, e.g. `examples/data/tiny-naruto`) at
    /// 64 px on the CPU in fp32, 100 steps of batch 2 × 2 with 8-bit AdamW at 1e-3, checkpoints every
    /// 25 steps, validation images every 50. Everything else is the seed recipe.
    pub fn tiny_demo(model: &Path, dataset: &Path, output_dir: &Path) -> Self {
        Self {
            pretrained_model_name_or_path: model.display().to_string(),
            dataset_name: dataset.display().to_string(),
            max_train_samples: None,
            resolution: 64,
            max_train_steps: 100,
            learning_rate: 1e-3,
            mixed_precision: MixedPrecision::No,
            checkpointing_steps: 25,
            logging_steps: 5,
            validation_prompt: Some("Naruto style anime character".into()),
            validation_steps: 50,
            validation_inference_steps: 10,
            output_dir: output_dir.to_owned(),
            device: "cpu".into(),
            ..Self::default()
        }
    }

    /// kohya's bucket settings of `--enable_bucket` and its companions.
    pub fn bucket_config(&self) -> data::BucketConfig {
        data::BucketConfig::new((self.resolution, self.resolution))
            .with_enable_bucket(self.enable_bucket)
            .with_min_bucket_reso(self.min_bucket_reso)
            .with_max_bucket_reso(self.max_bucket_reso)
            .with_bucket_reso_steps(self.bucket_reso_steps)
            .with_bucket_no_upscale(self.bucket_no_upscale)
    }

    /// The text encoders' initial learning rate: `--text_encoder_lr`, or the UNet's when it is 0
    /// (the script's `args.text_encoder_lr if args.text_encoder_lr else args.learning_rate`).
    pub fn text_encoder_learning_rate(&self) -> f64 {
        if self.text_encoder_lr == 0.0 {
            self.base_learning_rate()
        } else {
            self.text_encoder_lr
        }
    }

    /// The learning rate the optimizer starts from (`--scale_lr` multiplies by the samples per
    /// optimizer step over all processes, as diffusers' scripts do with `accelerator.num_processes`).
    pub fn base_learning_rate(&self) -> f64 {
        if self.scale_lr {
            self.learning_rate
                * f64::from(self.train_batch_size)
                * f64::from(self.gradient_accumulation_steps)
                * f64::from(self.nproc_per_node)
        } else {
            self.learning_rate
        }
    }
}

#[cfg(test)]
mod tests;
