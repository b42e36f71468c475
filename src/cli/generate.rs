//! `sdxl-lora generate` (and the `generate` example): text to image with an SDXL diffusers folder,
//! optionally with LoRAs stacked at chosen weights; `--compare` writes one grid, the base model's
//! image on the left and the image with every LoRA on the right, for the same prompts and seeds.
//!
//! `--lora FILE[:WEIGHT]` may be repeated; each LoRA is attached as adapter `lora<n>` (its index from
//! 0) at its weight, and the adapters add up (diffusers' `set_adapters(names, adapter_weights)`).
//! The weight is the text after the last `:` when that text is a number (A1111's and kohya's
//! `name:weight`); otherwise the whole argument is the path, so a path with a `:` in it still works.
//! A LoRA without a weight gets `--lora_scale` (1 by default). A weight of NaN or infinity is refused.
//!
//! `--seed` takes a comma-separated list: every prompt is generated once per seed. The model's load
//! time is printed on its own line.
//!
//! `--lora_weights 0,0.5,1` writes one labelled grid instead (A1111's X/Y plot): a column per weight,
//! which multiplies every LoRA's own weight (0 = the base model), a row per seed (and prompt and image);
//! the LoRAs load once and only their multipliers change between columns.
//!
//! `--prompt` may be repeated; each prompt gets `--num_images_per_prompt` images (1 by default; one
//! grid row each with `--compare`), all in one batch from one generator (diffusers'), or `--num_images`
//! images, image j from seed + j with a generator of its own, `--batch_size` at a time (A1111's: the
//! images do not depend on the batch size). Without `--compare` the images go to `--out` with `-<n>` before
//! the extension when there are several. `--negative_prompt` and `--guidance_scale` are diffusers'
//! spellings of `--negative` and `--guidance`.
//! Runs on CUDA when available, else on the CPU. Prints the wall time of each `generate` call
//! (prompt encoding, denoising loop and VAE decode, synchronised) and, on CUDA, the caching
//! allocator's peak (PyTorch's `torch.cuda.max_memory_allocated()`); `--warmup` runs one generation
//! of each batch shape first so that the timed ones exclude kernel selection. A progress bar counts the denoising steps on
//! a terminal (not with `--quiet`, nor when stderr is not a terminal). Each image's PNG carries A1111's
//! generation parameters in a `parameters` text chunk ([`super::infotext`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use sdxl_model::pipeline::{
    GenerateOptions, LARGE_GENERATION_BYTES, OnStep, Pipeline, RgbImage, labeled_grid,
    save_png_with_text,
};
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::schedulers::SchedulerKind;
use sdxl_model::vae::{Upcast, VaeTiling};
use tch::{Device, Kind};

use super::infotext::Infotext;
use super::{Precision, UsageError};

/// Text to image with an SDXL diffusers folder, optionally with LoRAs stacked at chosen weights.
#[derive(Parser, Debug)]
#[command(name = "generate")]
pub struct GenerateArgs {
    /// A diffusers SDXL folder (unet/, vae/, text_encoder/, text_encoder_2/, tokenizers, scheduler/).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A prompt; repeat for more images (one per prompt).
    #[arg(
        long = "prompt",
        value_name = "TEXT",
        required = true,
        allow_hyphen_values = true
    )]
    prompts: Vec<String>,
    /// A negative prompt; give one per --prompt, or none for SDXL's zero negative conditioning.
    #[arg(
        long = "negative",
        visible_alias = "negative_prompt",
        value_name = "TEXT",
        allow_hyphen_values = true
    )]
    negatives: Vec<String>,
    /// Denoising steps.
    #[arg(long, value_name = "N", default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (off at 1 or below).
    #[arg(
        long,
        visible_alias = "guidance_scale",
        value_name = "SCALE",
        default_value_t = GenerateOptions::default().guidance_scale
    )]
    guidance: f64,
    /// Images per prompt in one batch drawn from one generator (diffusers' `num_images_per_prompt`:
    /// each image depends on the count). See --num_images for images that do not.
    #[arg(
        long = "num_images_per_prompt",
        value_name = "N",
        default_value_t = GenerateOptions::default().images_per_prompt,
        conflicts_with = "num_images"
    )]
    num_images_per_prompt: i64,
    /// Images per prompt and seed, as A1111 makes them: image j from seed + j (its own generator),
    /// whatever --batch_size.
    #[arg(long = "num_images", value_name = "N")]
    num_images: Option<i64>,
    /// With --num_images: how many of a prompt's images go through the UNet together (more is
    /// faster and needs more memory; the images are the same). 1 by default.
    #[arg(long = "batch_size", value_name = "B")]
    batch_size: Option<i64>,
    /// Image width in pixels (a multiple of 8).
    #[arg(long, value_name = "PX", default_value_t = GenerateOptions::default().width)]
    width: i64,
    /// Image height in pixels (a multiple of 8).
    #[arg(long, value_name = "PX", default_value_t = GenerateOptions::default().height)]
    height: i64,
    /// Seed of the initial noise (as torch.Generator().manual_seed); several, comma-separated
    /// (`--seed 1,2,3`), generate every prompt once per seed.
    #[arg(
        long = "seed",
        value_name = "N[,N…]",
        value_delimiter = ',',
        default_value = "0"
    )]
    seeds: Vec<u64>,
    /// Sampler: euler, euler_a, ddim, dpm++2m or dpm++2m_karras (or a diffusers class name).
    #[arg(long, value_name = "NAME", default_value = GenerateOptions::default().scheduler.short_name())]
    scheduler: SchedulerKind,
    /// Precision of the models on CUDA (the CPU always computes in f32).
    #[arg(long, value_enum, value_name = "KIND", default_value_t = Precision::Bf16)]
    kind: Precision,
    /// Decode with the VAE in fp32, whatever the VAE's config says.
    #[arg(long = "vae_fp32")]
    vae_fp32: bool,
    /// Decode the VAE in tiles (for large images).
    #[arg(long)]
    tile: bool,
    /// A LoRA file (diffusers, peft or kohya layout) to apply, with its weight after a colon
    /// (`style.safetensors:0.7`); repeat to stack several. None by default.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]", value_parser = parse_lora)]
    loras: Vec<LoraArg>,
    /// The weight of each --lora given without one.
    #[arg(long = "lora_scale", value_name = "SCALE", default_value_t = 1.0)]
    lora_scale: f64,
    /// Write one grid: the base model's image left, the LoRAs' right, a row per prompt (needs --lora).
    #[arg(long)]
    compare: bool,
    /// Write one labelled grid (A1111's X/Y plot): a column per weight, a row per seed (and prompt
    /// and image); each --lora runs at this weight times its own (0 = the base model). Needs --lora.
    #[arg(
        long = "lora_weights",
        value_name = "W,…",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    lora_weights: Vec<f64>,
    /// Capture the denoising step's UNet call as a CUDA graph after the first step and replay it (CUDA only).
    #[arg(long = "cuda_graph")]
    cuda_graph: bool,
    /// The UNet's attention: `fused` (libtorch's fused kernels in its own order), `flash` or `cudnn`
    /// (flash attention or cuDNN's tried first on CUDA), `plain`, `sliced` or `sliced:<auto|max|rows>`.
    #[arg(long, value_name = "BACKEND", default_value = "fused")]
    attention: sdxl_model::attention::AttentionBackend,
    /// Run the UNet's feature maps channels-last (CUDA only): cuDNN's NHWC convolutions and the
    /// channels-last group norm kernels, compiled at first use.
    #[arg(long = "channels_last")]
    channels_last: bool,
    /// Store the UNet's base weights in fp8 (every linear layer and convolution; each still computes in
    /// --kind): about half the UNet's memory, not faster.
    #[arg(long)]
    fp8: bool,
    /// With --fp8: the linear layers multiply in fp8 (their input quantized to e4m3 with one scale
    /// per call, fp32 accumulation) on fp8 tensor cores (compute capability 8.9 or newer) instead
    /// of widening their weights; needs --kind bf16 or f16.
    #[arg(long = "fp8_compute", requires = "fp8")]
    fp8_compute: bool,
    /// Run one untimed generation first (one per batch shape: also the last, smaller batch of
    /// --num_images), so that the timed ones exclude kernel selection.
    #[arg(long)]
    warmup: bool,
    /// Batch throughput mode: for each batch size B (comma-separated, e.g. 1,4,8), one warm-up and one
    /// timed generation of B images per prompt, printing images/s; no image is written.
    #[arg(long, value_name = "B,…", value_delimiter = ',')]
    throughput: Vec<i64>,
    /// Output PNG; several images get `-<n>` before the extension.
    #[arg(long, value_name = "FILE", default_value = "output.png")]
    out: PathBuf,
}

/// One `--lora FILE[:WEIGHT]`: the file and the weight given after it, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraArg {
    /// The LoRA file.
    pub path: PathBuf,
    /// The weight after the last `:`, when one was given.
    pub weight: Option<f64>,
}

/// Splits `FILE[:WEIGHT]`: the text after the last `:` is the weight when it parses as a number (and
/// something comes before it), else the whole text is the path. A weight that parses to NaN or
/// infinity is an error.
pub fn parse_lora(text: &str) -> Result<LoraArg, String> {
    let whole = || LoraArg {
        path: PathBuf::from(text),
        weight: None,
    };
    let Some((path, weight)) = text.rsplit_once(':') else {
        return Ok(whole());
    };
    match weight.trim().parse::<f64>() {
        Ok(w) if path.is_empty() => Err(format!("no file before the weight {w}")),
        Ok(w) if !w.is_finite() => Err(format!("the weight {weight} is not a finite number")),
        Ok(w) => Ok(LoraArg {
            path: PathBuf::from(path),
            weight: Some(w),
        }),
        Err(_) => Ok(whole()),
    }
}

/// The denoising steps' progress bar: hidden with `--quiet` (no info events), and by indicatif when
/// stderr is not a terminal.
fn step_bar(steps: u64) -> indicatif::ProgressBar {
    if !tracing::enabled!(tracing::Level::INFO) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta}",
    ) {
        bar.set_style(style);
    }
    bar
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

/// Values clap parses but that have no meaning, each a usage error naming its flag.
fn check_numbers(args: &GenerateArgs) -> anyhow::Result<()> {
    for (flag, value) in [("--width", args.width), ("--height", args.height)] {
        if value <= 0 || value % 8 != 0 {
            anyhow::bail!(UsageError(format!(
                "{flag}: {value} is not a positive multiple of 8"
            )));
        }
    }
    if args.num_images_per_prompt < 1 {
        anyhow::bail!(UsageError(format!(
            "--num_images_per_prompt: {} is not at least 1",
            args.num_images_per_prompt
        )));
    }
    for (flag, value) in [
        ("--num_images", args.num_images),
        ("--batch_size", args.batch_size),
    ] {
        if let Some(value) = value.filter(|&v| v < 1) {
            anyhow::bail!(UsageError(format!("{flag}: {value} is not at least 1")));
        }
    }
    if args.batch_size.is_some() && args.num_images.is_none() {
        anyhow::bail!(UsageError(
            "--batch_size needs --num_images (the images it batches)".into()
        ));
    }
    if let Some(&weight) = args.lora_weights.iter().find(|w| !w.is_finite()) {
        anyhow::bail!(UsageError(format!(
            "--lora_weights: {weight} is not a finite number"
        )));
    }
    if !args.lora_weights.is_empty() {
        if args.loras.is_empty() {
            anyhow::bail!(UsageError(
                "--lora_weights needs --lora (the LoRAs it scales)".into()
            ));
        }
        if args.compare {
            anyhow::bail!(UsageError(
                "--lora_weights writes its own grid (weight 0 is the base model); it cannot be \
                 combined with --compare"
                    .into()
            ));
        }
    }
    if !args.throughput.is_empty() {
        for (flag, given) in [
            ("--lora_weights", !args.lora_weights.is_empty()),
            ("--num_images", args.num_images.is_some()),
        ] {
            if given {
                anyhow::bail!(UsageError(format!(
                    "--throughput writes no image; it cannot be combined with {flag}"
                )));
            }
        }
    }
    if let Some(&batch) = args.throughput.iter().find(|&&b| b < 1) {
        anyhow::bail!(UsageError(format!(
            "--throughput: batch size {batch} is not at least 1"
        )));
    }
    if !args.throughput.is_empty() && args.compare {
        anyhow::bail!(UsageError(
            "--throughput writes no image; it cannot be combined with --compare".into()
        ));
    }
    if args.steps == 0 {
        anyhow::bail!(UsageError("--steps: must be at least 1".into()));
    }
    for (flag, value) in [
        ("--guidance", args.guidance),
        ("--lora_scale", args.lora_scale),
    ] {
        if !value.is_finite() {
            anyhow::bail!(UsageError(format!(
                "{flag}: {value} is not a finite number"
            )));
        }
    }
    Ok(())
}

/// Runs `generate` with `args`; a [`UsageError`] for values that contradict each other.
pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    if !args.negatives.is_empty() && args.negatives.len() != args.prompts.len() {
        anyhow::bail!(UsageError(format!(
            "--negative: {} given for {} prompts (give one per prompt or none)",
            args.negatives.len(),
            args.prompts.len()
        )));
    }
    if args.compare && args.loras.is_empty() {
        anyhow::bail!(UsageError("--compare needs --lora".into()));
    }
    check_numbers(&args)?;
    let progress = std::sync::Arc::new(step_bar(args.steps as u64));
    let bar = std::sync::Arc::clone(&progress);
    let prompts = Prompts {
        positive: args.prompts.clone(),
        negative: (!args.negatives.is_empty()).then(|| args.negatives.clone()),
    };
    // With --num_images each call generates one prompt's images, --batch_size at a time.
    let images = args
        .num_images
        .map(|count| (count, args.batch_size.unwrap_or(1).min(count)));
    let (first_prompts, first_negatives, per_call) = match images {
        Some((_, batch)) => (prompts.positive[..1].to_vec(), prompts.negatives(0), batch),
        None => (
            prompts.positive.clone(),
            prompts.negative.clone(),
            args.num_images_per_prompt,
        ),
    };
    let options = GenerateOptions::default()
        .with_negative_prompts(first_negatives)
        .with_prompts(first_prompts)
        .with_steps(args.steps)
        .with_guidance_scale(args.guidance)
        .with_images_per_prompt(per_call)
        .with_width(args.width)
        .with_height(args.height)
        .with_seed(args.seeds.first().copied().unwrap_or_default())
        .with_scheduler(args.scheduler)
        .with_cuda_graph(args.cuda_graph)
        .with_on_step(Some(OnStep::new(move |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })));
    let mut kind = Kind::from(args.kind);
    let device = Device::cuda_if_available();
    if device == Device::Cpu && kind != Kind::Float {
        kind = Kind::Float; // half-precision convolutions are slow or missing on the CPU
    }
    let upcast = if args.vae_fp32 {
        Upcast::Always
    } else {
        Upcast::FromConfig
    };
    let loading = Instant::now();
    let load_options = LoadOptions::default()
        .device(device)
        .kind(kind)
        .vae_upcast(upcast);
    let mut pipe = Pipeline::from_pretrained(&args.model, &load_options)
        .with_context(|| format!("loading {}", args.model.display()))?
        .model;
    synchronize(device);
    println!(
        "loaded {} in {:.3} s",
        args.model.display(),
        loading.elapsed().as_secs_f64()
    );
    if args.tile {
        pipe.set_vae_tiling(Some(VaeTiling::default()))?;
    }
    if args.channels_last && device.is_cuda() {
        pipe.unet_mut().set_channels_last(true);
    }
    pipe.unet_mut().set_attention_backend(args.attention);
    if args.fp8 {
        let [linears, convs] = pipe.quantize_unet_fp8()?;
        println!("UNet linear layers: {linears}");
        println!("UNet convolutions: {convs}");
        if args.fp8_compute {
            let layers = pipe
                .set_fp8_products(sdxl_model::unet::fp8_products(
                    torch_cuda::fp8::Backward::Widened,
                ))
                .context("--fp8_compute")?;
            println!("UNet linear layers multiplying in fp8: {layers}");
        }
    }
    // Before any tensor of the requested size exists: refuse what cannot fit, warn of what is slow.
    let estimate = pipe.memory_estimate(&options);
    let sizes = || format!("--width {} --height {}", options.width, options.height);
    estimate.check(&options).with_context(sizes)?;
    if estimate.bytes() > LARGE_GENERATION_BYTES {
        eprintln!(
            "warning: {}: {:.0} megapixels need at least {:.1} GiB and about {:.0}× the work of one \
             1024×1024 image{}",
            sizes(),
            estimate.pixels / 1e6,
            estimate.gib(),
            estimate.pixels / (1024.0 * 1024.0),
            if args.tile {
                ""
            } else {
                " (--tile bounds the decode's memory)"
            }
        );
    }
    if !args.throughput.is_empty() {
        load_loras(&mut pipe, &args.loras, args.lora_scale)?;
        return throughput(&pipe, options, &args.throughput, &progress);
    }
    let timed = |pipe: &Pipeline,
                 options: &GenerateOptions,
                 what: &str|
     -> anyhow::Result<sdxl_model::pipeline::Images> {
        let (images, seconds, peak) = timed_generation(pipe, options, &progress, what)?;
        println!(
            "{what}: {} image(s) {}x{} px, {} {} steps, {kind:?}: {seconds:.3} s{peak}",
            images.len(),
            options.width,
            options.height,
            options.scheduler.short_name(),
            options.steps,
        );
        Ok(images)
    };
    let mut options = options;
    let plan = Plan {
        prompts: &prompts,
        seeds: &args.seeds,
        images,
    };
    let run = |pipe: &Pipeline, options: &mut GenerateOptions, what: &str| {
        plan.run(options, |options, label| {
            timed(pipe, options, &format!("{what}{label}"))
        })
    };
    if args.warmup {
        timed(&pipe, &options, "warm-up")?;
        // A last, smaller batch of --num_images is a shape of its own (and a graph of its own).
        if let Some((count, batch)) = images.filter(|&(count, batch)| count % batch != 0) {
            options.images_per_prompt = count % batch;
            timed(
                &pipe,
                &options,
                &format!("warm-up (last batch of {})", count % batch),
            )?;
            options.images_per_prompt = batch;
        }
    }
    let model = args.model.file_name().unwrap_or_default().to_string_lossy();
    if !args.lora_weights.is_empty() {
        let loaded = load_loras(&mut pipe, &args.loras, args.lora_scale)?;
        let mut columns = Vec::new();
        for &weight in &args.lora_weights {
            for (index, (_, own, _)) in loaded.iter().enumerate() {
                pipe.set_lora_multiplier(&format!("lora{index}"), weight * own)?;
            }
            columns.push(run(&pipe, &mut options, &format!("LoRA x{weight}"))?);
        }
        let axis = Axis {
            labels: args
                .lora_weights
                .iter()
                .map(|w| format!("LoRA x{w}"))
                .collect(),
            kind: "LoRA weight",
            values: args.lora_weights.iter().map(f64::to_string).collect(),
        };
        let (rows, columns) = write_grid(
            &columns, &axis, &prompts, &options, &model, &loaded, &args.out,
        )?;
        println!(
            "wrote {} ({rows} row(s) x {columns} LoRA weight(s))",
            args.out.display()
        );
        return Ok(());
    }
    let mut bases = Vec::new();
    if args.compare {
        bases = run(&pipe, &mut options, "base")?;
    }
    let loaded = load_loras(&mut pipe, &args.loras, args.lora_scale)?;
    let what = if args.loras.is_empty() {
        "generate"
    } else {
        "with LoRA"
    };
    let outputs = run(&pipe, &mut options, what)?;
    if args.compare {
        // The base model's images are the LoRAs at weight 0: A1111's X/Y plot over the LoRA weight.
        let axis = Axis {
            labels: vec!["base".to_owned(), "LoRA".to_owned()],
            kind: "LoRA weight",
            values: vec!["0".to_owned(), "1".to_owned()],
        };
        write_grid(
            &[bases, outputs],
            &axis,
            &prompts,
            &options,
            &model,
            &loaded,
            &args.out,
        )?;
        println!("wrote {} (base left, LoRAs right)", args.out.display());
        return Ok(());
    }
    for (index, cell) in outputs.iter().enumerate() {
        let parameters = infotext(&options, &prompts, cell, &model, &loaded, &[]).render();
        let path = numbered(&args.out, index, outputs.len());
        save_png_with_text(&cell.image, &path, &[("parameters", &parameters)])?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The prompts as given, and their negatives if any.
struct Prompts {
    positive: Vec<String>,
    negative: Option<Vec<String>>,
}

impl Prompts {
    /// Prompt `index`'s negative, as a list of one.
    fn negatives(&self, index: usize) -> Option<Vec<String>> {
        self.negative
            .as_ref()
            .map(|negatives| vec![negatives[index].clone()])
    }
}

/// One generated image: its prompt's index, its seed, its place in its batch (A1111's `Batch size`,
/// `Batch pos`) and its pixels.
struct Cell {
    prompt: usize,
    seed: u64,
    batch: (i64, i64),
    image: RgbImage,
}

/// Which images a run makes: every prompt for every seed, either `--num_images_per_prompt` images in
/// one call per seed (one generator), or (`images`: count and batch size) each prompt's images in
/// calls of the batch size, image j from seed + j.
struct Plan<'a> {
    prompts: &'a Prompts,
    seeds: &'a [u64],
    images: Option<(i64, i64)>,
}

impl Plan<'_> {
    /// Generates every image with `generate(options, label)` (the label tells the call apart in the
    /// timing lines), seed by seed, then prompt by prompt, then image by image.
    fn run(
        &self,
        options: &mut GenerateOptions,
        mut generate: impl FnMut(&GenerateOptions, &str) -> anyhow::Result<sdxl_model::pipeline::Images>,
    ) -> anyhow::Result<Vec<Cell>> {
        let mut cells = Vec::new();
        let several_seeds = self.seeds.len() > 1;
        for &seed in self.seeds {
            options.seed = seed;
            let Some((count, batch)) = self.images else {
                let label = if several_seeds {
                    format!(" (seed {seed})")
                } else {
                    String::new()
                };
                let images = generate(options, &label)?;
                let per_prompt = options.images_per_prompt;
                for i in 0..images.len() {
                    cells.push(Cell {
                        prompt: i / per_prompt as usize,
                        seed,
                        batch: (per_prompt, i as i64 % per_prompt),
                        image: images.to_rgb(i)?,
                    });
                }
                continue;
            };
            for (p, prompt) in self.prompts.positive.iter().enumerate() {
                options.prompts = vec![prompt.clone()];
                options.negative_prompts = self.prompts.negatives(p);
                for start in (0..count).step_by(batch as usize) {
                    let size = batch.min(count - start);
                    let seeds: Vec<u64> = (start..start + size)
                        .map(|j| seed.wrapping_add(j as u64))
                        .collect();
                    options.images_per_prompt = size;
                    options.image_seeds = Some(seeds.clone());
                    let prompt_label = if self.prompts.positive.len() > 1 {
                        format!("prompt {p}, ")
                    } else {
                        String::new()
                    };
                    let label = match seeds.as_slice() {
                        [one] => format!(" ({prompt_label}seed {one})"),
                        [first, .., last] => format!(" ({prompt_label}seeds {first}-{last})"),
                        [] => String::new(),
                    };
                    let images = generate(options, &label)?;
                    for (i, &seed) in seeds.iter().enumerate() {
                        cells.push(Cell {
                            prompt: p,
                            seed,
                            batch: (size, i as i64),
                            image: images.to_rgb(i)?,
                        });
                    }
                }
            }
        }
        Ok(cells)
    }
}

/// The columns of a labelled grid: a label above each, and A1111's X/Y plot axis they stand for.
struct Axis {
    labels: Vec<String>,
    kind: &'static str,
    values: Vec<String>,
}

/// `--lora_weights` and `--compare`: one PNG, `columns[c]` under `axis.labels[c]`, a row per image
/// right of its label (its seed; its prompt when there are several; its place in the batch when one
/// seed made several), with A1111's X/Y plot parameters. Returns the rows and columns written.
fn write_grid(
    columns: &[Vec<Cell>],
    axis: &Axis,
    prompts: &Prompts,
    options: &GenerateOptions,
    model: &str,
    loaded: &[(String, f64, String)],
    out: &Path,
) -> anyhow::Result<(usize, usize)> {
    let Some(first_column) = columns.first() else {
        anyhow::bail!("a grid without columns");
    };
    let several_prompts = prompts.positive.len() > 1;
    let row_labels: Vec<String> = first_column
        .iter()
        .map(|cell| {
            let mut label = format!("seed {}", cell.seed);
            let shares_seed = first_column
                .iter()
                .filter(|other| (other.seed, other.prompt) == (cell.seed, cell.prompt))
                .count()
                > 1;
            if shares_seed {
                label.push_str(&format!(" #{}", cell.batch.1));
            }
            if several_prompts {
                let prompt = &prompts.positive[cell.prompt];
                let short: String = prompt.chars().take(32).collect();
                let more = if short.len() < prompt.len() {
                    "..."
                } else {
                    ""
                };
                label.push_str(&format!(" {short}{more}"));
            }
            label
        })
        .collect();
    let rows: Vec<Vec<RgbImage>> = (0..first_column.len())
        .map(|r| {
            columns
                .iter()
                .map(|column| column[r].image.clone())
                .collect()
        })
        .collect();
    let grid = labeled_grid(&rows, &axis.labels, &row_labels)?;
    let list = |values: Vec<String>| values.join(", ");
    let mut seeds: Vec<u64> = first_column.iter().map(|cell| cell.seed).collect();
    seeds.dedup();
    let mut extra = vec![
        ("Script", "X/Y/Z plot".to_owned()),
        ("X Type", axis.kind.to_owned()),
        ("X Values", list(axis.values.clone())),
        ("Y Type", "Seed".to_owned()),
        (
            "Y Values",
            list(seeds.iter().map(|s| s.to_string()).collect()),
        ),
    ];
    if several_prompts {
        extra.push(("Prompts", list(prompts.positive.clone())));
    }
    let parameters = infotext(options, prompts, &first_column[0], model, loaded, &extra).render();
    save_png_with_text(&grid, out, &[("parameters", &parameters)])?;
    Ok((rows.len(), columns.len()))
}

/// The A1111 parameters of `cell`, generated with `options`' settings.
fn infotext<'a>(
    options: &'a GenerateOptions,
    prompts: &'a Prompts,
    cell: &Cell,
    model: &'a str,
    loras: &'a [(String, f64, String)],
    extra: &'a [(&'a str, String)],
) -> Infotext<'a> {
    Infotext {
        prompt: &prompts.positive[cell.prompt],
        negative: prompts
            .negative
            .as_deref()
            .and_then(|n| n.get(cell.prompt))
            .map(String::as_str),
        steps: options.steps,
        scheduler: options.scheduler,
        guidance: options.guidance_scale,
        seed: cell.seed,
        size: (options.width, options.height),
        model,
        loras,
        batch: cell.batch,
        extra,
    }
}

/// Waits for the GPU's queue (nothing on the CPU).
fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// `--throughput`: for each batch size, `batch` images per prompt, one warm-up generation (kernel
/// selection and, with `--cuda_graph`, the capture for this shape) and one timed one (prompt encoding,
/// denoising, decode; synchronised), printed as images per second.
fn throughput(
    pipe: &Pipeline,
    mut options: GenerateOptions,
    batches: &[i64],
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    for &batch in batches {
        options.images_per_prompt = batch;
        let context = || format!("--throughput: batch {batch}");
        timed_generation(pipe, &options, progress, &format!("batch {batch} warm-up"))
            .with_context(context)?;
        let (images, seconds, peak) =
            timed_generation(pipe, &options, progress, &format!("batch {batch} timed"))
                .with_context(context)?;
        let count = images.len();
        println!(
            "batch {batch}: {count} image(s) {}x{} px, {} {} steps: {seconds:.3} s, {:.3} images/s, \
             {:.3} s per image{peak}",
            options.width,
            options.height,
            options.scheduler.short_name(),
            options.steps,
            count as f64 / seconds,
            seconds / count as f64,
        );
    }
    Ok(())
}

/// One generation with `options` under the progress bar labelled `what`, synchronised and timed:
/// the images, the seconds, and on CUDA the allocator's peak as `, peak … GiB allocated` (else empty).
fn timed_generation(
    pipe: &Pipeline,
    options: &GenerateOptions,
    progress: &indicatif::ProgressBar,
    what: &str,
) -> sdxl_model::Result<(sdxl_model::pipeline::Images, f64, String)> {
    let device = pipe.denoiser().device;
    synchronize(device);
    torch_cuda::reset_peak_memory_stats(0);
    let start = Instant::now();
    progress.set_message(what.to_owned());
    progress.reset();
    let images = pipe.generate(options);
    progress.finish_and_clear();
    let images = images?;
    synchronize(device);
    let seconds = start.elapsed().as_secs_f64();
    let peak = torch_cuda::memory_stats(0)
        .map(|s| format!(", peak {:.2} GiB allocated", s.peak_allocated_gib()))
        .unwrap_or_default();
    Ok((images, seconds, peak))
}

/// Reads each LoRA and attaches it as adapter `lora<n>` at its weight (`default_weight` when none was
/// given), printing one line per LoRA.
fn load_loras(
    pipe: &mut Pipeline,
    loras: &[LoraArg],
    default_weight: f64,
) -> anyhow::Result<Vec<(String, f64, String)>> {
    let mut loaded = Vec::new();
    if loras.is_empty() {
        return Ok(loaded);
    }
    let names = pipe.lora_module_names();
    for (index, lora) in loras.iter().enumerate() {
        let path = &lora.path;
        let file = lora::format::read(
            path,
            lora::format::ReadOptions::default()
                .with_module_names(Some(&names))
                .with_block_renames(None),
        )
        .with_context(|| format!("--lora {}", path.display()))?;
        let name = format!("lora{index}");
        let weight = lora.weight.unwrap_or(default_weight);
        let layers = pipe
            .load_lora(&file.state, &name)
            .with_context(|| format!("--lora {}", path.display()))?;
        pipe.set_lora_multiplier(&name, weight)?;
        println!(
            "{}: {:?} LoRA on {layers} layers as adapter {name}, weight {weight}",
            path.display(),
            file.format
        );
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let hash = lora::format::hashes::file_model_hash(path)?;
        loaded.push((stem.into_owned(), weight, hash));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::{LoraArg, parse_lora};
    use std::path::PathBuf;

    fn lora(path: &str, weight: Option<f64>) -> LoraArg {
        LoraArg {
            path: PathBuf::from(path),
            weight,
        }
    }

    #[test]
    fn a_number_after_the_last_colon_is_the_weight_else_all_is_the_path() {
        for (text, expected) in [
            ("style.safetensors", lora("style.safetensors", None)),
            (
                "style.safetensors:0.7",
                lora("style.safetensors", Some(0.7)),
            ),
            (
                "style.safetensors:-1",
                lora("style.safetensors", Some(-1.0)),
            ),
            (
                "style.safetensors:1e-1",
                lora("style.safetensors", Some(0.1)),
            ),
            (
                "a:b/style.safetensors:.5",
                lora("a:b/style.safetensors", Some(0.5)),
            ),
            (
                r"C:\loras\style.safetensors",
                lora(r"C:\loras\style.safetensors", None),
            ),
            (
                r"C:\loras\style.safetensors:2",
                lora(r"C:\loras\style.safetensors", Some(2.0)),
            ),
            ("x.safetensors:abc", lora("x.safetensors:abc", None)),
            ("x.safetensors:", lora("x.safetensors:", None)),
            ("dir:2/x.safetensors", lora("dir:2/x.safetensors", None)),
        ] {
            assert_eq!(parse_lora(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn nan_and_infinite_weights_and_a_missing_file_are_refused() {
        for text in [
            "x.safetensors:nan",
            "x.safetensors:inf",
            "x.safetensors:-infinity",
            ":0.5",
        ] {
            let error = parse_lora(text).unwrap_err();
            assert!(
                error.contains("finite") || error.contains("no file"),
                "{text}: {error}"
            );
        }
    }
}
