//! Text to image with an SDXL diffusers folder, optionally with a LoRA; `--compare` writes one grid,
//! the base model's image on the left and the LoRA's on the right, for the same prompts and seeds.
//!
//! ```sh
//! cargo run --release --example generate -- --model path/to/sdxl --prompt "a fox in the snow" \
//!     [--negative "blurry"] [--steps 30] [--guidance 5] [--width 1024 --height 1024] [--seed 0] \
//!     [--scheduler euler|euler_a|ddim|dpm++2m] [--kind bf16|f16|f32] [--vae_fp32] [--tile] \
//!     [--lora file.safetensors --lora_scale 1.0 [--compare]] [--out output.png]
//! ```
//!
//! `--prompt` may be repeated; each prompt gets one image (one grid row with `--compare`). Without
//! `--compare` the images go to `--out` with `-<n>` before the extension when there are several.
//! Runs on CUDA when available, else on the CPU. Prints the wall time of each `generate` call
//! (prompt encoding, denoising loop and VAE decode, synchronised) and, on CUDA, the caching
//! allocator's peak (PyTorch's `torch.cuda.max_memory_allocated()`); `--warmup` runs one generation
//! first so that the timed one excludes kernel selection.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use sdxl_model::pipeline::{GenerateOptions, Pipeline, grid_column, grid_row, save_png};
use sdxl_model::vae::{Upcast, VaeTiling};
use tch::{Device, Kind};

fn value(args: &mut impl Iterator<Item = String>, flag: &str) -> anyhow::Result<String> {
    args.next().with_context(|| format!("{flag} needs a value"))
}

fn numbered(out: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return out.to_owned();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    out.with_file_name(format!("{stem}-{index}.png"))
}

fn main() -> anyhow::Result<()> {
    let mut options = GenerateOptions {
        steps: 30,
        ..GenerateOptions::default()
    };
    let (mut model, mut lora, mut lora_scale, mut compare) = (None, None, 1.0f64, false);
    let (mut kind, mut vae_fp32, mut tile, mut out) =
        (Kind::BFloat16, false, false, PathBuf::from("output.png"));
    let (mut negatives, mut warmup) = (Vec::new(), false);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value(&mut args, &flag)?)),
            "--prompt" => options.prompts.push(value(&mut args, &flag)?),
            "--negative" => negatives.push(value(&mut args, &flag)?),
            "--steps" => options.steps = value(&mut args, &flag)?.parse().context("--steps")?,
            "--guidance" => {
                options.guidance_scale = value(&mut args, &flag)?.parse().context("--guidance")?
            }
            "--width" => options.width = value(&mut args, &flag)?.parse().context("--width")?,
            "--height" => options.height = value(&mut args, &flag)?.parse().context("--height")?,
            "--seed" => options.seed = value(&mut args, &flag)?.parse().context("--seed")?,
            "--scheduler" => options.scheduler = value(&mut args, &flag)?.parse()?,
            "--lora" => lora = Some(PathBuf::from(value(&mut args, &flag)?)),
            "--lora_scale" => {
                lora_scale = value(&mut args, &flag)?.parse().context("--lora_scale")?
            }
            "--compare" => compare = true,
            "--vae_fp32" => vae_fp32 = true,
            "--tile" => tile = true,
            "--warmup" => warmup = true,
            "--out" => out = PathBuf::from(value(&mut args, &flag)?),
            "--kind" => {
                kind = match value(&mut args, &flag)?.as_str() {
                    "bf16" => Kind::BFloat16,
                    "f16" => Kind::Half,
                    "f32" => Kind::Float,
                    other => bail!("--kind: `{other}` is not bf16, f16 or f32"),
                }
            }
            other => bail!("unknown argument `{other}` (see the header of examples/generate.rs)"),
        }
    }
    let model = model.context("--model <diffusers SDXL folder> is required")?;
    if options.prompts.is_empty() {
        bail!("give at least one --prompt");
    }
    if !negatives.is_empty() {
        if negatives.len() != options.prompts.len() {
            bail!(
                "--negative: {} given for {} prompts (give one per prompt or none)",
                negatives.len(),
                options.prompts.len()
            );
        }
        options.negative_prompts = Some(negatives);
    }
    if compare && lora.is_none() {
        bail!("--compare needs --lora");
    }
    let device = Device::cuda_if_available();
    if device == Device::Cpu && kind != Kind::Float {
        kind = Kind::Float; // half-precision convolutions are slow or missing on the CPU
    }
    let upcast = if vae_fp32 {
        Upcast::Always
    } else {
        Upcast::FromConfig
    };
    let mut pipe = Pipeline::from_pretrained(&model, device, kind, upcast)
        .with_context(|| format!("loading {}", model.display()))?;
    if tile {
        pipe.set_vae_tiling(Some(VaeTiling::default()))?;
    }
    let timed = |pipe: &Pipeline, what: &str| -> anyhow::Result<sdxl_model::pipeline::Images> {
        let sync = || {
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        };
        sync();
        torch_cuda::reset_peak_memory_stats(0);
        let start = Instant::now();
        let images = pipe.generate(&options)?;
        sync();
        let seconds = start.elapsed().as_secs_f64();
        let peak = torch_cuda::memory_stats(0)
            .map(|s| format!(", peak {:.2} GiB allocated", s.peak_allocated_gib()));
        println!(
            "{what}: {} image(s) {}x{} px, {} {} steps, {kind:?}: {seconds:.3} s{}",
            images.len(),
            options.width,
            options.height,
            options.scheduler.short_name(),
            options.steps,
            peak.unwrap_or_default()
        );
        Ok(images)
    };
    if warmup {
        timed(&pipe, "warm-up")?;
    }
    let base = compare.then(|| timed(&pipe, "base")).transpose()?;
    if let Some(path) = &lora {
        let names = pipe.lora_module_names();
        let file = lora::format::read(
            path,
            lora::format::ReadOptions {
                module_names: Some(&names),
                block_renames: None,
            },
        )
        .with_context(|| format!("reading {}", path.display()))?;
        let layers = pipe.load_lora(&file.state, "lora")?;
        pipe.set_lora_multiplier("lora", lora_scale)?;
        println!(
            "{}: {:?} LoRA on {layers} layers, scale {lora_scale}",
            path.display(),
            file.format
        );
    }
    let images = timed(
        &pipe,
        if lora.is_some() {
            "with LoRA"
        } else {
            "generate"
        },
    )?;
    match base {
        Some(base) => {
            let rows = (0..images.len())
                .map(|i| grid_row(&[base.to_rgb(i)?, images.to_rgb(i)?]))
                .collect::<sdxl_model::Result<Vec<_>>>()?;
            save_png(&grid_column(&rows)?, &out)?;
            println!("wrote {} (base left, LoRA right)", out.display());
        }
        None => {
            for i in 0..images.len() {
                let path = numbered(&out, i, images.len());
                images.save_png(i, &path)?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
