//! `sdxl-lora estimate`: the memory and time a training configuration needs on a CUDA device — the
//! trainer's own estimate (`trainer::estimate`), printed before a run's step 1 — computed without
//! loading any weight: the UNet's parameter count and the shapes of the layers the LoRA adapts come
//! from its safetensors header, the latent size from the VAE's `config.json`. With `--vram_gib G` it
//! also says which of the usual memory settings (gradient checkpointing, batch size) fit in G GiB.
//!
//! The model must be a local diffusers folder (`--pretrained_model_name_or_path DIR`, a hub snapshot
//! included): a hub name would need a download. The text encoders' share of `--train_text_encoder`
//! is not counted (the trainer's estimate counts it once the encoders are loaded).

use std::path::{Path, PathBuf};

use anyhow::Context;
use sdxl_model::vae::AutoencoderKLConfig;
use trainer::TrainConfig;
use trainer::config::OptimizerKind;
use trainer::estimate::{
    EstimateInput, OptimizerTable, estimate as run_estimate, optimizer_seconds_per_tensor,
};

use super::UsageError;
use super::inspect::header;

/// The help of `estimate`: its own flag, then the training flags it reads.
pub fn help(name: &str) -> String {
    format!(
        "Prints the memory and time a training configuration needs on a CUDA device, without loading weights.

Usage: {name} [--vram_gib GIB] [--preset tiny] [--config FILE.toml] [--sweep FILE.toml] [--FLAG VALUE ...]

  --vram_gib <GIB>
      Say which settings (gradient checkpointing, batch size) fit in this much device memory (default: none)
  --sweep <path>
      Estimate each variant of a sweep file and the sweep in one process (the weights once, every variant's LoRA and optimizer)
  --sweep_execution <sequential|batched>
      With --sweep: the activations of the largest variant (sequential) or of the summed batch (batched) (default: the file's, else sequential)

The model must be a local diffusers folder (--pretrained_model_name_or_path DIR).
Training flags, as `sdxl-lora train` reads them:
{}",
        super::train::help("sdxl-lora train")
    )
}

/// `--vram_gib G` or `--vram_gib=G`, taken out of `args`.
fn take_vram(args: &mut Vec<String>) -> anyhow::Result<Option<f64>> {
    let Some(value) = super::take_flag(args, "--vram_gib", "a number of GiB")? else {
        return Ok(None);
    };
    match value.parse::<f64>() {
        Ok(g) if g.is_finite() && g > 0.0 => Ok(Some(g)),
        _ => anyhow::bail!(UsageError(format!(
            "--vram_gib: `{value}` is not a positive number of GiB"
        ))),
    }
}

/// The UNet's weight files in the diffusers folder `root` (the variant's, else the plain ones;
/// every shard).
fn unet_files(root: &Path, variant: Option<&str>) -> anyhow::Result<Vec<PathBuf>> {
    let unet = root.join("unet");
    let stem = "diffusion_pytorch_model";
    let names = |v: Option<&str>| -> Vec<PathBuf> {
        let prefix = match v {
            Some(v) => format!("{stem}.{v}"),
            None => stem.to_owned(),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&unet)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n == format!("{prefix}.safetensors")
                        || (n.starts_with(&format!("{prefix}-")) && n.ends_with(".safetensors"))
                })
            })
            .collect();
        files.sort();
        files
    };
    let files = variant.map(|v| names(Some(v))).filter(|f| !f.is_empty());
    let files = files.unwrap_or_else(|| names(None));
    anyhow::ensure!(
        !files.is_empty(),
        "--pretrained_model_name_or_path: {} holds no {stem}*.safetensors",
        unet.display()
    );
    Ok(files)
}

/// The UNet's (name, shape, bytes per element) from its weight files' headers.
fn unet_tensors(config: &TrainConfig) -> anyhow::Result<Vec<(String, Vec<i64>, i64)>> {
    let root = Path::new(&config.pretrained_model_name_or_path);
    if !root.is_dir() {
        anyhow::bail!(UsageError(format!(
            "--pretrained_model_name_or_path: `{}` is not a local folder; estimate reads the UNet's \
             header and loads nothing (give the diffusers folder, a hub snapshot's path included)",
            root.display()
        )));
    }
    let mut tensors = Vec::new();
    for file in unet_files(root, config.variant.as_deref())? {
        for (name, (dtype, shape)) in header(&file)?.0 {
            let bytes = match dtype.as_str() {
                "F64" | "I64" => 8,
                "F32" | "I32" => 4,
                "F8_E4M3" | "F8_E5M2" | "U8" | "I8" | "BOOL" => 1,
                _ => 2,
            };
            tensors.push((name, shape, bytes));
        }
    }
    Ok(tensors)
}

/// The shapes of the LoRA's trainable tensors (down and up of each adapted layer).
fn lora_shapes(
    config: &TrainConfig,
    tensors: &[(String, Vec<i64>, i64)],
) -> anyhow::Result<Vec<Vec<i64>>> {
    let lora = config.lora_config()?;
    let mut shapes = Vec::new();
    for (name, shape, _) in tensors {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !lora.targets_module(module) {
            continue;
        }
        match shape.as_slice() {
            [out, inp] => {
                let (rank, _) = lora.rank_and_alpha(module);
                shapes.extend([vec![rank, *inp], vec![*out, rank]]);
            }
            [out, inp, kh, kw] => {
                let (rank, _) = lora.layer_rank_and_alpha(module, kh * kw > 1);
                shapes.extend([vec![rank, *inp, *kh, *kw], vec![*out, rank, 1, 1]]);
            }
            _ => {}
        }
    }
    anyhow::ensure!(
        !shapes.is_empty(),
        "--target_modules: `{}` matches no layer of the UNet",
        config.target_modules
    );
    Ok(shapes)
}

/// What the estimate is computed from, for `config` with the UNet's `tensors`.
fn input(
    config: &TrainConfig,
    tensors: &[(String, Vec<i64>, i64)],
    latent: i64,
) -> anyhow::Result<(EstimateInput, OptimizerTable)> {
    let weight_bytes = if config.mixed_precision.kind() == tch::Kind::Float {
        4
    } else {
        2
    };
    let unet_params: i64 = tensors
        .iter()
        .map(|(_, s, _)| s.iter().product::<i64>())
        .sum();
    let stored_weight_bytes = if config.fp8_base_weights {
        tensors
            .iter()
            .map(|(_, s, _)| s.iter().product::<i64>())
            .sum()
    } else {
        unet_params * weight_bytes
    };
    let shapes = lora_shapes(config, tensors)?;
    let lora_params: i64 = shapes.iter().map(|s| s.iter().product::<i64>()).sum();
    let setup = config.optimizer_setup()?;
    let extra = |kind| optimizer_seconds_per_tensor(kind) * shapes.len() as f64;
    let state =
        |c: optim8bit::OptimizerConfig| shapes.iter().map(|s| c.state_bytes(s)).sum::<i64>();
    let input = EstimateInput {
        unet_params,
        weight_bytes,
        stored_weight_bytes,
        lora_params,
        optimizer_state_bytes: state(setup.config),
        ema_bytes: if config.use_ema { lora_params * 4 } else { 0 },
        optimizer_extra_seconds: extra(setup.kind),
        batch: i64::from(config.train_batch_size),
        latent_pixels: latent * latent,
        accumulation: i64::from(config.gradient_accumulation_steps),
        steps: config.max_train_steps,
        checkpointing: config.gradient_checkpointing,
        cuda_graph: config.cuda_graph,
        fp8_products: config.fp8_compute,
        text_encoder_weight_bytes: 0,
        text_encoder_activation_bytes: 0,
    };
    let choices: Vec<_> = OptimizerKind::ALL
        .into_iter()
        .map(|kind| {
            let chosen = kind == setup.kind;
            let c = if chosen {
                setup.config
            } else {
                config.optimizer_setup_for(kind).config
            };
            (kind.name(), state(c), extra(kind), chosen)
        })
        .collect();
    Ok((input, OptimizerTable::new(&input, &choices)))
}

/// The report of `estimate --sweep FILE`: each variant's estimate, then the sweep's
/// ([`trainer::estimate::sweep_estimate`]: the weights once, every variant's LoRA and optimizer).
fn sweep_report(
    args: Vec<String>,
    path: &Path,
    execution: Option<trainer::config::SweepExecution>,
) -> anyhow::Result<String> {
    let mut file = trainer::config::SweepFile::read(path)?;
    if let Some(execution) = execution {
        file = file.with_execution(execution);
    }
    let base = super::train::config_over_sweep(args, Some(&file))?;
    let tensors = unet_tensors(&base)?;
    let vae = Path::new(&base.pretrained_model_name_or_path).join("vae/config.json");
    let vae = AutoencoderKLConfig::from_file(&vae).with_context(|| format!("{}", vae.display()))?;
    let latent = i64::from(base.resolution) / vae.downscale_factor();
    let mut text = format!(
        "{} at {} px, {} steps, a sweep of {} variants\n",
        base.pretrained_model_name_or_path,
        base.resolution,
        base.max_train_steps,
        file.variants().len()
    );
    let mut estimates = Vec::new();
    for (name, config) in file.variant_configs(&base)? {
        let (input, _) = input(&config, &tensors, latent)?;
        let estimate = run_estimate(&input);
        text += &format!("  {name}: rank {}, {estimate}\n", config.rank);
        estimates.push(estimate);
    }
    let total = match file.execution() {
        trainer::config::SweepExecution::Sequential => {
            trainer::estimate::sweep_estimate(&estimates)
        }
        trainer::config::SweepExecution::Batched => {
            trainer::estimate::batched_sweep_estimate(&estimates)
        }
    };
    if let Some(total) = total {
        text += &match file.execution() {
            trainer::config::SweepExecution::Batched => format!(
                "the sweep in one process, batched (the activations of the summed batch): {total}\n"
            ),
            _ => format!("the sweep in one process: {total}\n"),
        };
    }
    Ok(text)
}

/// The report `estimate` prints for the training command line `args`.
pub fn report(mut args: Vec<String>) -> anyhow::Result<String> {
    let vram = take_vram(&mut args)?;
    let execution = super::train::take_sweep_execution(&mut args)?;
    if let Some(path) = super::take_flag(&mut args, "--sweep", "a sweep file (TOML)")? {
        if vram.is_some() {
            anyhow::bail!(UsageError(
                "--vram_gib: not with --sweep (its table varies one run's settings)".into()
            ));
        }
        return sweep_report(args, Path::new(&path), execution);
    }
    if execution.is_some() {
        anyhow::bail!(UsageError("--sweep_execution: only with --sweep".into()));
    }
    let config = super::train::config(args)?;
    let tensors = unet_tensors(&config)?;
    let vae = Path::new(&config.pretrained_model_name_or_path).join("vae/config.json");
    let vae = AutoencoderKLConfig::from_file(&vae).with_context(|| format!("{}", vae.display()))?;
    let latent = i64::from(config.resolution) / vae.downscale_factor();
    let (input, table) = input(&config, &tensors, latent)?;
    let mut text = format!(
        "{} at {} px, batch {} × accumulation {}, {} steps, rank {}, {} LoRA tensors\n{}\n{table}\n",
        config.pretrained_model_name_or_path,
        config.resolution,
        input.batch,
        input.accumulation,
        input.steps,
        config.rank,
        lora_shapes(&config, &tensors)?.len(),
        run_estimate(&input)
    );
    if config.train_text_encoder {
        text += "note: --train_text_encoder's encoders are not counted here\n";
    }
    if let Some(gib) = vram {
        text += &format!("settings within {gib} GiB (peak GiB, s/step):\n");
        for checkpointing in [false, true] {
            for batch in [1, 2, 4, 8] {
                let e = run_estimate(&EstimateInput {
                    checkpointing,
                    batch,
                    ..input
                });
                text += &format!(
                    "  --train_batch_size {batch}{}: {:.3} GiB, {:.2} s/step — {}\n",
                    if checkpointing {
                        " --gradient_checkpointing"
                    } else {
                        ""
                    },
                    e.peak_gib,
                    e.seconds_per_step,
                    if e.peak_gib <= gib {
                        "fits"
                    } else {
                        "does not fit"
                    }
                );
            }
        }
    }
    Ok(text)
}

/// Prints [`report`] for the training command line `args`.
pub fn estimate(args: Vec<String>) -> anyhow::Result<()> {
    print!("{}", report(args)?);
    Ok(())
}
