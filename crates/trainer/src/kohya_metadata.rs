//! The header of the kohya-layout LoRA file (what ComfyUI and A1111 load): kohya's `ss_*` training
//! entries as sd-scripts' `train_network.py` writes them, and Stability AI's ModelSpec entries
//! (`modelspec.*`) as sd-scripts' `library/sai_model_spec.py` builds them for an SDXL LoRA
//! (sd-scripts `48d368fa`; docs/FORMATS.md lists every key with its source). The training hashes
//! `sshs_*` are added by the lora crate's writer, over the final `ss_*` entries.
//!
//! Only what this trainer knows is written: no value is guessed, and entries of kohya's that have
//! no counterpart here (its dataset JSON, bucket info, tag frequencies) are left out.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use lora::{LoraState, ModuleLora};
use optim8bit::OptimizerConfig;
use serde_json::json;

use crate::config::MixedPrecision;
use crate::config::TrainConfig;

/// `ss_base_model_version` of SDXL 1.0 base (sd-scripts `sdxl_train_util.MODEL_VERSION_SDXL_BASE_V1_0`).
pub const SDXL_BASE_MODEL_VERSION: &str = "sdxl_base_v1-0";
/// `modelspec.architecture` of an SDXL LoRA (`ARCH_SD_XL_V1_BASE` + `/lora`).
pub const SDXL_LORA_ARCHITECTURE: &str = "stable-diffusion-xl-v1-base/lora";
/// `modelspec.implementation` of an SDXL LoRA (`IMPL_STABILITY_AI`: SGM names).
pub const SDXL_LORA_IMPLEMENTATION: &str = "https://github.com/Stability-AI/generative-models";
/// `modelspec.sai_model_spec`: the ModelSpec version sd-scripts writes.
pub const MODELSPEC_VERSION: &str = "1.0.1";
/// `ss_network_module` of a plain LoRA / LoCon file (`networks.lora`).
pub const NETWORK_MODULE: &str = "networks.lora";

/// What a run knows besides its config when it writes a LoRA file.
#[derive(Debug, Clone, Copy)]
pub struct RunFacts {
    /// Optimizer steps done when the file is written.
    pub steps: u64,
    /// Batches (micro-steps) in one pass over the data.
    pub batches_per_epoch: u64,
    /// When training started (`ss_training_started_at`).
    pub started_at: SystemTime,
    /// When the file is written (`ss_training_finished_at`, `modelspec.date`).
    pub written_at: SystemTime,
    /// Whether the model predicts v (`modelspec.prediction_type` `v`) rather than ε.
    pub v_prediction: bool,
}

/// The base-model entries of an SDXL LoRA that need no run: `ss_base_model_version`, `ss_v2` and
/// the ModelSpec MUST entries plus the date and, when known, the prediction type. `title` is the
/// file's title (kohya: `--metadata_title`, else `--output_name`).
pub fn sdxl_lora_base_metadata(
    title: &str,
    resolution: (u32, u32),
    written_at: SystemTime,
    v_prediction: Option<bool>,
) -> BTreeMap<String, String> {
    let mut entries = BTreeMap::from([
        ("ss_base_model_version", SDXL_BASE_MODEL_VERSION.to_owned()),
        ("ss_v2", "False".to_owned()),
        ("modelspec.sai_model_spec", MODELSPEC_VERSION.to_owned()),
        ("modelspec.architecture", SDXL_LORA_ARCHITECTURE.to_owned()),
        (
            "modelspec.implementation",
            SDXL_LORA_IMPLEMENTATION.to_owned(),
        ),
        ("modelspec.title", title.to_owned()),
        (
            "modelspec.resolution",
            format!("{}x{}", resolution.0, resolution.1),
        ),
        ("modelspec.date", iso_date(written_at)),
    ]);
    if let Some(v) = v_prediction {
        entries.insert(
            "modelspec.prediction_type",
            if v { "v" } else { "epsilon" }.to_owned(),
        );
    }
    entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// Every header entry of the kohya file a run writes (`ss_*` and `modelspec.*`), for the adapters
/// in `state`.
pub fn kohya_metadata(
    config: &TrainConfig,
    state: &LoraState,
    run: &RunFacts,
) -> BTreeMap<String, String> {
    let title = output_name(config);
    let resolution = (config.resolution, config.resolution);
    let mut entries =
        sdxl_lora_base_metadata(&title, resolution, run.written_at, Some(run.v_prediction));
    let accumulation = u64::from(config.gradient_accumulation_steps.max(1));
    let steps_per_epoch = run.batches_per_epoch.div_ceil(accumulation).max(1);
    let network = network_entries(config, state);
    let python_bool = |b: bool| if b { "True" } else { "False" }.to_owned();
    let training = [
        ("ss_output_name", title),
        ("ss_training_started_at", unix_seconds(run.started_at)),
        ("ss_training_finished_at", unix_seconds(run.written_at)),
        ("ss_learning_rate", python_float(config.learning_rate)),
        ("ss_unet_lr", python_float(config.learning_rate)),
        (
            "ss_num_batches_per_epoch",
            run.batches_per_epoch.to_string(),
        ),
        (
            "ss_num_epochs",
            config.max_train_steps.div_ceil(steps_per_epoch).to_string(),
        ),
        ("ss_epoch", run.steps.div_ceil(steps_per_epoch).to_string()),
        ("ss_steps", run.steps.to_string()),
        ("ss_max_train_steps", config.max_train_steps.to_string()),
        (
            "ss_batch_size_per_device",
            config.train_batch_size.to_string(),
        ),
        (
            "ss_gradient_accumulation_steps",
            config.gradient_accumulation_steps.to_string(),
        ),
        (
            "ss_gradient_checkpointing",
            python_bool(config.gradient_checkpointing),
        ),
        ("ss_lr_scheduler", config.lr_scheduler.to_string()),
        ("ss_lr_warmup_steps", config.lr_warmup_steps.to_string()),
        ("ss_optimizer", optimizer_name(config)),
        ("ss_max_grad_norm", python_float(config.max_grad_norm)),
        (
            "ss_mixed_precision",
            mixed_precision(config.mixed_precision),
        ),
        ("ss_seed", config.seed.to_string()),
        ("ss_resolution", format!("({0}, {0})", config.resolution)),
        ("ss_noise_offset", python_float(config.noise_offset)),
        (
            "ss_min_snr_gamma",
            config.snr_gamma.map_or("None".into(), python_float),
        ),
        (
            "ss_zero_terminal_snr",
            python_bool(config.zero_terminal_snr),
        ),
        (
            "ss_network_train_unet_only",
            python_bool(!config.train_text_encoder),
        ),
        ("ss_cache_latents", python_bool(config.cache_latents)),
        ("ss_fp8_base", python_bool(config.fp8_base_weights)),
        (
            "ss_sd_model_name",
            config.pretrained_model_name_or_path.clone(),
        ),
        (
            "ss_training_comment",
            "trained with sdxl-lora (Rust, libtorch)".to_owned(),
        ),
    ];
    entries.extend(training.into_iter().map(|(k, v)| (k.to_owned(), v)));
    if config.train_text_encoder {
        // --text_encoder_lr 0 trains the encoders at --learning_rate (as diffusers' script).
        let rate = if config.text_encoder_lr > 0.0 {
            config.text_encoder_lr
        } else {
            config.learning_rate
        };
        entries.insert("ss_text_encoder_lr".into(), python_float(rate));
    }
    entries.extend(network);
    entries
}

/// `ss_network_module`, `ss_network_dim`, `ss_network_alpha` and, for LoCon and DoRA,
/// `ss_network_args` (kohya's `--network_args` as JSON: `conv_dim`, `conv_alpha`, `dora_wd`).
fn network_entries(config: &TrainConfig, state: &LoraState) -> Vec<(String, String)> {
    let mut alpha = config.lora_alpha.unwrap_or(f64::from(config.rank));
    if config.use_rslora {
        // kohya has no rsLoRA: the file's alphas give the same scale (alpha · √rank), and so does this.
        alpha *= f64::from(config.rank).sqrt();
    }
    let mut entries = vec![
        ("ss_network_module".to_owned(), NETWORK_MODULE.to_owned()),
        ("ss_network_dim".to_owned(), config.rank.to_string()),
        ("ss_network_alpha".to_owned(), python_float(alpha)),
    ];
    let mut args = serde_json::Map::new();
    // kohya's conv_dim / conv_alpha are those of the 3x3 convolutions (1x1 ones take the network's).
    let conv: Vec<&ModuleLora> = state
        .modules
        .values()
        .filter(|m| m.down.dim() == 4 && m.down.size()[2] > 1)
        .collect();
    if let Some(first) = conv.first() {
        args.insert("conv_dim".into(), json!(first.rank().to_string()));
        args.insert("conv_alpha".into(), json!(python_float(first.alpha)));
    }
    if state.modules.values().any(|m| m.magnitude.is_some()) {
        args.insert("dora_wd".into(), json!("True"));
    }
    if !args.is_empty() {
        entries.push((
            "ss_network_args".to_owned(),
            serde_json::Value::Object(args).to_string(),
        ));
    }
    entries
}

/// The run's name: the output folder's last component (kohya's `--output_name`).
pub fn output_name(config: &TrainConfig) -> String {
    config
        .output_dir
        .file_name()
        .map_or_else(|| "lora".to_owned(), |n| n.to_string_lossy().into_owned())
}

/// kohya's `ss_optimizer`: the reference's module and class, then the settings passed to it
/// (kohya writes `module.Class(key=value,…)`, values as Python's `str`).
fn optimizer_name(config: &TrainConfig) -> String {
    let setup = match config.optimizer_setup() {
        Ok(setup) => setup,
        // A validated config always has one; name the problem rather than a wrong optimizer.
        Err(e) => return format!("unknown ({e})"),
    };
    let py_bool = |b: bool| if b { "True" } else { "False" };
    let wd = python_float(config.adam_weight_decay);
    let betas = |b1: f64, b2: f64| format!("betas=({}, {})", python_float(b1), python_float(b2));
    let args = match setup.config {
        OptimizerConfig::AdamW(c) => format!(
            "{},weight_decay={wd},eps={}",
            betas(c.beta1, c.beta2),
            python_float(c.eps)
        ),
        OptimizerConfig::Lion(c) => format!("{},weight_decay={wd}", betas(c.beta1, c.beta2)),
        OptimizerConfig::Prodigy(c) => format!(
            "{},beta3={},weight_decay={wd},eps={},decouple={},use_bias_correction={},\
             safeguard_warmup={},d_coef={}",
            betas(c.beta1, c.beta2),
            c.beta3.map_or_else(|| "None".to_owned(), python_float),
            python_float(c.eps),
            py_bool(c.decouple),
            py_bool(c.use_bias_correction),
            py_bool(c.safeguard_warmup),
            python_float(c.d_coef)
        ),
        OptimizerConfig::Adafactor(c) => format!(
            "relative_step={},scale_parameter={},warmup_init={},weight_decay={wd}",
            py_bool(c.relative_step),
            py_bool(c.scale_parameter),
            py_bool(c.warmup_init)
        ),
        // A later optimizer of optim8bit: its class alone, until its arguments are listed here.
        _ => String::new(),
    };
    format!("{}({args})", setup.kind.python_class())
}

fn mixed_precision(precision: MixedPrecision) -> String {
    match precision {
        MixedPrecision::No => "no",
        MixedPrecision::Bf16 => "bf16",
        MixedPrecision::Fp16 => "fp16",
    }
    .to_owned()
}

/// A float as Python's `str` writes it (`4.0`, `0.0001`, `1e-08`), since kohya's entries are
/// `str(value)`.
pub fn python_float(value: f64) -> String {
    if value.is_finite() && value == value.trunc() && value.abs() < 1e16 {
        return format!("{value:.1}");
    }
    let abs = value.abs();
    if value.is_finite() && !(1e-4..1e16).contains(&abs) {
        // Python: shortest round-trip digits, exponent with a sign and at least two digits.
        let text = format!("{value:e}");
        if let Some((mantissa, exponent)) = text.split_once('e') {
            let (sign, digits) = match exponent.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exponent),
            };
            return format!("{mantissa}e{sign}{digits:0>2}");
        }
    }
    format!("{value}")
}

fn unix_seconds(time: SystemTime) -> String {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    format!("{seconds:.6}")
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC (kohya: `datetime.fromtimestamp(int(ts)).isoformat()`, the
/// machine's local time).
pub fn iso_date(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn floats_read_as_python_writes_them() {
        for (value, python) in [
            (4.0, "4.0"),
            (0.0001, "0.0001"),
            (1e-4, "0.0001"),
            (5e-5, "5e-05"),
            (1e-8, "1e-08"),
            (0.999, "0.999"),
            (0.0, "0.0"),
            (1.5, "1.5"),
        ] {
            assert_eq!(python_float(value), python, "{value}");
        }
    }

    /// `ss_optimizer` as kohya's train_util writes it: `module.Class(key=value,…)`.
    #[test]
    fn ss_optimizer_names_each_optimizer_as_kohya() {
        use crate::config::OptimizerKind;
        let name = |optimizer, args: Option<&str>| {
            optimizer_name(&TrainConfig {
                optimizer: Some(optimizer),
                optimizer_args: args.map(str::to_owned),
                ..TrainConfig::default()
            })
        };
        assert_eq!(
            name(OptimizerKind::AdamW8bit, None),
            "bitsandbytes.optim.adamw.AdamW8bit(betas=(0.9, 0.999),weight_decay=0.0001,eps=1e-08)"
        );
        assert_eq!(
            name(OptimizerKind::AdamW, None),
            "torch.optim.adamw.AdamW(betas=(0.9, 0.999),weight_decay=0.0001,eps=1e-08)"
        );
        assert_eq!(
            name(OptimizerKind::Lion, None),
            "lion_pytorch.lion_pytorch.Lion(betas=(0.9, 0.99),weight_decay=0.0001)"
        );
        assert_eq!(
            name(OptimizerKind::Prodigy, Some("d_coef=2")),
            "prodigyopt.prodigy.Prodigy(betas=(0.9, 0.999),beta3=None,weight_decay=0.0001,\
             eps=1e-08,decouple=True,use_bias_correction=True,safeguard_warmup=True,d_coef=2.0)"
        );
        assert_eq!(
            name(OptimizerKind::Adafactor, Some("relative_step=False")),
            "transformers.optimization.Adafactor(relative_step=False,scale_parameter=True,\
             warmup_init=False,weight_decay=0.0001)"
        );
    }

    #[test]
    fn dates_are_iso_8601() {
        assert_eq!(iso_date(UNIX_EPOCH), "1970-01-01T00:00:00");
        // 2024-02-29 12:34:56 UTC, a leap day.
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(iso_date(leap), "2024-02-29T12:34:56");
    }

    #[test]
    fn base_entries_name_sdxl_lora() {
        let entries = sdxl_lora_base_metadata("my-lora", (1024, 1024), UNIX_EPOCH, Some(true));
        assert_eq!(entries["ss_base_model_version"], "sdxl_base_v1-0");
        assert_eq!(
            entries["modelspec.architecture"],
            "stable-diffusion-xl-v1-base/lora"
        );
        assert_eq!(entries["modelspec.resolution"], "1024x1024");
        assert_eq!(entries["modelspec.prediction_type"], "v");
        let unknown = sdxl_lora_base_metadata("x", (512, 512), UNIX_EPOCH, None);
        assert!(!unknown.contains_key("modelspec.prediction_type"));
    }
}
