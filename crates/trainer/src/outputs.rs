//! What a finished run leaves in `output_dir`: the LoRA in diffusers' format (with the training
//! config in its metadata; diffusers' `load_lora_weights`) and in kohya's (SGM block names, kohya's
//! `ss_*` and ModelSpec `modelspec.*` metadata, training hashes: what ComfyUI and A1111 load), the
//! loss curve, the base-vs-LoRA grid, and a model card (`README.md` with the hub's front matter, and
//! `model_card.json`). Every `checkpoint-N/` holds the same two LoRA files ([`write_lora_files`]).

use std::path::{Path, PathBuf};

use lora::LoraState;
use lora::format::{BlockRenames, Format, TRAINING_CONFIG_KEY, WriteOptions};
use sdxl_model::pipeline::save_png;
use sdxl_model::unet::{UNetConfig, sgm_unet_table};

use crate::checkpoint::write_atomic;
use crate::config::TrainConfig;
use crate::kohya_metadata::{RunFacts, kohya_metadata};
use crate::logs::plot::loss_curve_png;
use crate::model::TrainModel;
use crate::{Error, Result};

/// The diffusers-format LoRA (diffusers' `load_lora_weights`), in `output_dir` and in every
/// `checkpoint-N/`.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
/// The kohya-format LoRA (ComfyUI's and A1111's LoRA loaders), in `output_dir` and in every
/// `checkpoint-N/`.
pub const KOHYA_FILE: &str = "pytorch_lora_weights_kohya.safetensors";

/// The final comparison grid's file in the output folder: the base model's images above the LoRA's.
pub const COMPARISON_FILE: &str = "base_vs_lora.png";

/// What the run measured, for the model card.
#[derive(Debug, Clone, Copy)]
pub struct RunStats<'a> {
    /// Seconds per optimizer step in this process.
    pub seconds_per_step: f64,
    /// Peak allocated device memory, GiB (CUDA only).
    pub peak_memory_gib: Option<f64>,
    /// Steps skipped for non-finite values.
    pub skipped: u64,
    /// (step, mean loss) at every logging step.
    pub loss_history: &'a [(u64, f64)],
}

/// Writes every output of a finished run; returns the diffusers and kohya LoRA files.
///
/// # Errors
/// [`Error::NonFiniteLora`] (nothing is written then), and file errors naming the file.
pub fn write(
    config: &TrainConfig,
    model: &mut TrainModel,
    stats: &RunStats<'_>,
    run: &RunFacts,
    grid: Option<&image::RgbImage>,
) -> Result<(PathBuf, PathBuf)> {
    model.check_finite("the final LoRA")?;
    let out = &config.output_dir;
    let lora = model.lora_state()?;
    let unet_config = model.unet().config().clone();
    let files = write_lora_files(out, config, &lora, &unet_config, run)?;
    if !stats.loss_history.is_empty() {
        loss_curve_png(&out.join("loss.png"), stats.loss_history, "training loss")?;
    }
    if let Some(grid) = grid {
        save_png(grid, out.join(COMPARISON_FILE))?;
    }
    write_model_card(config, stats, grid.is_some())?;
    Ok(files)
}

/// Writes `lora` into `dir` twice, atomically: [`LORA_FILE`] in diffusers' layout with the training
/// config in its header, and [`KOHYA_FILE`] in kohya's layout with SGM block names and the header
/// of [`kohya_metadata`]. Returns both paths.
///
/// # Errors
/// File errors naming the file.
pub fn write_lora_files(
    dir: &Path,
    config: &TrainConfig,
    lora: &LoraState,
    unet_config: &UNetConfig,
    run: &RunFacts,
) -> Result<(PathBuf, PathBuf)> {
    // The metadata key lora files share for the training config holds JSON.
    let config_json = serde_json::to_string(config).map_err(|e| Error::Checkpoint {
        path: dir.join(LORA_FILE),
        problem: format!("config as JSON: {e}"),
    })?;
    let mut options = WriteOptions::default();
    options
        .extra_metadata
        .insert(TRAINING_CONFIG_KEY.to_owned(), config_json);
    let lora_file = dir.join(LORA_FILE);
    lora::format::write(&lora_file, lora, Format::Diffusers, &options)?;
    // kohya names with SGM block names: what kohya's own trainer writes for SDXL.
    let renames = BlockRenames::new(sgm_unet_table(unet_config));
    let kohya_options = WriteOptions::default()
        .with_block_renames(Some(&renames))
        .with_extra_metadata(kohya_metadata(config, lora, run));
    let kohya_file = dir.join(KOHYA_FILE);
    lora::format::write(&kohya_file, lora, Format::Kohya, &kohya_options)?;
    Ok((lora_file, kohya_file))
}

fn write_model_card(config: &TrainConfig, stats: &RunStats<'_>, has_grid: bool) -> Result<()> {
    let out = &config.output_dir;
    let final_loss = stats.loss_history.last().map(|(_, l)| *l);
    let card = serde_json::json!({
        "base_model": crate::model_files::base_model_name(&config.pretrained_model_name_or_path),
        "instance_prompt": config.instance_prompt,
        "lora_file": LORA_FILE,
        "kohya_file": KOHYA_FILE,
        "steps": config.max_train_steps,
        "train_text_encoder": config.train_text_encoder,
        "final_loss": final_loss,
        "skipped_steps": stats.skipped,
        "seconds_per_step": stats.seconds_per_step,
        "peak_memory_gib": stats.peak_memory_gib,
        "config": config,
    });
    let json = serde_json::to_string_pretty(&card).map_err(|e| Error::Checkpoint {
        path: out.join("model_card.json"),
        problem: e.to_string(),
    })?;
    write_atomic(&out.join("model_card.json"), json.as_bytes())?;
    let markdown = model_card_markdown(config, final_loss, stats.skipped, has_grid, out)?;
    write_atomic(&out.join("README.md"), markdown.as_bytes())
}

/// The licence the card states: SDXL 1.0's (CreativeML Open RAIL++-M), which a LoRA of it inherits.
const LICENSE: &str = "openrail++";

/// A YAML scalar: a JSON string is a YAML double-quoted scalar, whatever it holds (`:`, `#`, quotes).
fn yaml_text(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// The Hugging Face model card's metadata (YAML front matter, the fields `huggingface_hub.ModelCard`
/// and the hub read): base model, licence, tags, the trigger prompt, and a widget of the run's
/// validation images (each `validation/step-N.png`, then the base-vs-LoRA grid) with their prompt.
fn front_matter(config: &TrainConfig, has_grid: bool, out: &Path) -> String {
    let base = crate::model_files::base_model_name(&config.pretrained_model_name_or_path);
    let mut yaml = format!(
        "---\nbase_model: {}\nlibrary_name: diffusers\nlicense: {LICENSE}\ntags:\n- stable-diffusion-xl\n\
         - stable-diffusion-xl-diffusers\n- text-to-image\n- diffusers\n- lora\n- template:sd-lora\n",
        yaml_text(&base)
    );
    if let Some(prompt) = &config.instance_prompt {
        yaml += &format!("instance_prompt: {}\n", yaml_text(prompt));
    }
    let mut images: Vec<String> = std::fs::read_dir(out.join("validation"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with("step-") && n.ends_with(".png"))
        .map(|n| format!("validation/{n}"))
        .collect();
    images.sort();
    if has_grid {
        images.push(COMPARISON_FILE.to_owned());
    }
    let prompt = config
        .validation_prompt
        .as_ref()
        .or(config.instance_prompt.as_ref());
    if let (Some(prompt), false) = (prompt, images.is_empty()) {
        yaml += "widget:\n";
        for url in &images {
            yaml += &format!(
                "- text: {}\n  output:\n    url: {}\n",
                yaml_text(prompt),
                yaml_text(url)
            );
        }
    }
    yaml + "---\n"
}

fn model_card_markdown(
    config: &TrainConfig,
    final_loss: Option<f64>,
    skipped: u64,
    has_grid: bool,
    out: &Path,
) -> Result<String> {
    let prompt = config
        .instance_prompt
        .as_deref()
        .unwrap_or("(dataset captions)");
    let front = front_matter(config, has_grid, out);
    Ok(format!(
        "{front}\n\
         # SDXL LoRA\n\nLoRA (rank {rank}) for `{base}` trained on `{data}` for {steps} steps at {res} px \
         (batch {batch} × accumulation {accum}, learning rate {lr:e}, optimizer {opt}).\n\n\
         Trigger prompt: `{prompt}`.\n\n{text}\
         - `{KOHYA_FILE}`: for ComfyUI (`LoraLoader`: put it in `models/loras/`) and A1111 \
         (`models/Lora/`, then `<lora:{stem}:1>` in the prompt): kohya layout with SGM block names, \
         kohya's `ss_*` and ModelSpec metadata.\n\
         - `{LORA_FILE}`: for diffusers (`pipe.load_lora_weights(\"{out}\")`).\n\
         - `checkpoint-N/` folders hold both files as of step N.\n\
         - final training loss: {loss}; steps skipped for non-finite values: {skipped}.\n{grid}\n\
         ## Training configuration\n\n```toml\n{config_toml}```\n",
        base = crate::model_files::base_model_name(&config.pretrained_model_name_or_path),
        rank = config.rank,
        data = config.dataset_name,
        steps = config.max_train_steps,
        res = config.resolution,
        batch = config.train_batch_size,
        accum = config.gradient_accumulation_steps,
        lr = config.learning_rate,
        opt = config.optimizer_kind()?,
        out = out.display(),
        stem = KOHYA_FILE.trim_end_matches(".safetensors"),
        loss = final_loss.map_or_else(|| "n/a".into(), |l| format!("{l:.4}")),
        grid = if has_grid {
            "\n![base (top) vs LoRA (bottom)](base_vs_lora.png)\n"
        } else {
            ""
        },
        config_toml = config.to_toml()?,
        text = if config.train_text_encoder {
            format!(
                "LoRA for the text encoders was enabled: both were trained (learning rate {:e}).\n\n",
                config.text_encoder_learning_rate()
            )
        } else {
            String::new()
        },
    ))
}
