//! `sdxl-lora convert` (and `lora_convert convert`): writes a LoRA file in another layout
//! (diffusers, peft, kohya).
//!
//! Reading a kohya file needs the model's module paths: pass the model file of each component
//! the LoRA adapts (`--unet tiny-sdxl/unet/diffusion_pytorch_model.safetensors`, …). UNet names in
//! SGM block spelling (`lora_unet_input_blocks_4_1_…`, what kohya's trainer and ours write) are read
//! with the table of the UNet's `config.json` beside the first `--unet` file, or with `--sgm`, a
//! JSON list of `[diffusers prefix, SGM prefix]` pairs; with `--sgm`, `--to kohya` also writes them.
//!
//! `OUT` may not be `IN` (under any spelling: `./`, a symbolic or hard link): the input is never
//! overwritten.
//!
//! A kohya file gets the base-model entries kohya's trainer writes for an SDXL LoRA
//! (`ss_base_model_version`, `modelspec.architecture`, …; see docs/FORMATS.md) when the LoRA is known
//! to be SDXL's: `--sdxl`, or `--sgm`, or a second text encoder's adapters in the file. `ss_*` and
//! `modelspec.*` entries of the input file are kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use lora::Component;
use lora::format::{self, BlockRenames, Format, ModuleNames, ReadOptions, WriteOptions};
use sdxl_model::unet::{UNetConfig, sgm_unet_table};
use trainer::kohya_metadata::sdxl_lora_base_metadata;

use super::UsageError;

/// The arguments of `convert`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The LoRA file to read.
    #[arg(value_name = "IN")]
    input: PathBuf,
    /// The file to write.
    #[arg(value_name = "OUT")]
    output: PathBuf,
    /// The layout to write: diffusers, peft or kohya.
    #[arg(long = "to", value_name = "FORMAT")]
    target: Format,
    /// A JSON list of [diffusers prefix, SGM prefix] pairs: kohya files may use SGM UNet block names, and --to kohya writes them.
    #[arg(long, value_name = "RENAMES.json")]
    sgm: Option<PathBuf>,
    /// The UNet's model file, for the module paths a kohya file needs (repeat for shards).
    #[arg(long, value_name = "MODEL.safetensors")]
    unet: Vec<PathBuf>,
    /// The first text encoder's model file (repeat for shards).
    #[arg(long = "text-encoder", value_name = "MODEL.safetensors")]
    text_encoder: Vec<PathBuf>,
    /// The second text encoder's model file (repeat for shards).
    #[arg(long = "text-encoder-2", value_name = "MODEL.safetensors")]
    text_encoder_2: Vec<PathBuf>,
    /// The LoRA is for SDXL 1.0: a kohya file gets kohya's SDXL base-model metadata.
    #[arg(long)]
    sdxl: bool,
    /// The resolution the LoRA was trained at (modelspec.resolution of a kohya file).
    #[arg(long, value_name = "PIXELS", default_value_t = 1024)]
    resolution: u32,
}

/// Whether `output` names the file `input` names (`./`, `..`, symbolic and hard links included).
fn same_file(input: &Path, output: &Path) -> bool {
    let (Ok(input_meta), Ok(output_meta)) = (std::fs::metadata(input), std::fs::metadata(output))
    else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if (input_meta.dev(), input_meta.ino()) == (output_meta.dev(), output_meta.ino()) {
            return true;
        }
    }
    let _ = (input_meta, output_meta);
    matches!(
        (input.canonicalize(), output.canonicalize()),
        (Ok(a), Ok(b)) if a == b
    )
}

/// The SGM block names of the UNet whose `config.json` sits beside `unet_file` (a diffusers
/// `unet/` folder), if there is one.
fn sgm_names_beside(unet_file: &Path) -> anyhow::Result<Option<BlockRenames>> {
    let config = unet_file.with_file_name("config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let config = UNetConfig::from_file(&config)
        .with_context(|| format!("--unet: reading {}", config.display()))?;
    Ok(Some(BlockRenames::new(sgm_unet_table(&config))))
}

/// Writes `args.input` in the layout `args.target`; a [`UsageError`] when the output is the input.
pub fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    if same_file(&args.input, &args.output) {
        anyhow::bail!(UsageError(format!(
            "OUT: {} is the input file {}; it would be overwritten (write to another file)",
            args.output.display(),
            args.input.display()
        )));
    }
    let renames = args
        .sgm
        .as_deref()
        .map(BlockRenames::from_json_file)
        .transpose()?;
    let mut names = ModuleNames::new();
    if renames.is_none()
        && let Some(first) = args.unet.first()
        && let Some(sgm) = sgm_names_beside(first)?
    {
        names.set_block_renames(sgm);
    }
    for (component, files) in [
        (Component::Unet, &args.unet),
        (Component::TextEncoder, &args.text_encoder),
        (Component::TextEncoder2, &args.text_encoder_2),
    ] {
        for file in files {
            names.add_model_file(component, file)?;
        }
    }
    let options = ReadOptions::default()
        .with_module_names((!names.is_empty()).then_some(&names))
        .with_block_renames(renames.as_ref());
    let file = format::read(&args.input, options)?;
    let sdxl = args.sdxl
        || renames.is_some()
        || file
            .state
            .component(Component::TextEncoder2)
            .next()
            .is_some();
    let mut extra_metadata = BTreeMap::new();
    if args.target == Format::Kohya {
        // The input's training and ModelSpec entries stay; kohya's SDXL base entries fill the rest.
        extra_metadata.extend(
            file.metadata
                .iter()
                .filter(|(k, _)| k.starts_with("ss_") || k.starts_with("modelspec."))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        if sdxl {
            let title = args
                .output
                .file_stem()
                .map_or_else(|| "lora".into(), |s| s.to_string_lossy().into_owned());
            let resolution = (args.resolution, args.resolution);
            for (key, value) in sdxl_lora_base_metadata(&title, resolution, SystemTime::now(), None)
            {
                extra_metadata.entry(key).or_insert(value);
            }
        }
    }
    let write_options = WriteOptions::default()
        .with_block_renames(renames.as_ref())
        .with_extra_metadata(extra_metadata);
    format::write(&args.output, &file.state, args.target, &write_options)?;
    println!(
        "{} ({}, {} modules) → {} ({})",
        args.input.display(),
        file.format,
        file.state.modules.len(),
        args.output.display(),
        args.target
    );
    Ok(())
}
