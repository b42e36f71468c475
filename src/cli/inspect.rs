//! `sdxl-lora inspect FILE`: what a LoRA file holds, read from its safetensors header and (for the
//! alphas) its scalar tensors: the layout (diffusers, peft or kohya), the base model its metadata
//! names, the kinds of layer it adapts, the modules and ranks per component, the alphas and every
//! metadata entry.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use lora::format;

/// The arguments of `inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The LoRA file (.safetensors, any layout `sdxl-lora` reads).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The suffixes of a LoRA's down (A) matrix in the layouts we read.
const DOWN_SUFFIXES: [&str; 4] = [
    ".lora_A.weight",
    ".lora.down.weight",
    ".lora_linear_layer.down.weight",
    ".lora_down.weight",
];

/// Layer names of SDXL's UNet and CLIP text encoders, longest first, as kohya's flattened module
/// names end.
const KOHYA_TARGETS: [&str; 19] = [
    "ff_net_0_proj",
    "conv_shortcut",
    "time_emb_proj",
    "to_out_0",
    "out_proj",
    "proj_out",
    "proj_in",
    "ff_net_2",
    "q_proj",
    "k_proj",
    "v_proj",
    "conv1",
    "conv2",
    "to_q",
    "to_k",
    "to_v",
    "fc1",
    "fc2",
    "conv",
];

/// The metadata entries that name a base model, in the order they are trusted.
const BASE_MODEL_KEYS: [&str; 4] = [
    "modelspec.architecture",
    "ss_base_model_version",
    "ss_sd_model_name",
    "base_model_name_or_path",
];

/// A tensor's dtype (as safetensors spells it: `BF16`, `F32`, …) and shape.
pub type TensorInfo = (String, Vec<i64>);

/// The tensors (name → dtype and shape) and the `__metadata__` of the safetensors file `path`, from
/// its header only.
pub fn header(
    path: &Path,
) -> anyhow::Result<(BTreeMap<String, TensorInfo>, BTreeMap<String, String>)> {
    let mut file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut size = [0u8; 8];
    file.read_exact(&mut size)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let size = u64::from_le_bytes(size);
    anyhow::ensure!(
        size <= 100 << 20,
        "{}: a header of {size} bytes is not a safetensors header",
        path.display()
    );
    let mut bytes = vec![0u8; size as usize];
    file.read_exact(&mut bytes)
        .with_context(|| format!("{}: the header is cut short", path.display()))?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: the header is not JSON", path.display()))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for (key, value) in json {
        if key == "__metadata__" {
            for (k, v) in value.as_object().into_iter().flatten() {
                let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                metadata.insert(k.clone(), text);
            }
        } else {
            let dtype = value["dtype"].as_str().unwrap_or_default().to_owned();
            let shape = value["shape"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_i64)
                .collect();
            tensors.insert(key, (dtype, shape));
        }
    }
    Ok((tensors, metadata))
}

/// The kind of layer module `module` is (`to_q`, `to_out.0`, `fc1`, …).
fn target(module: &str) -> String {
    if !module.contains('.') {
        // kohya: `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`
        return KOHYA_TARGETS
            .iter()
            .find(|t| module.ends_with(&format!("_{t}")))
            .map_or_else(
                || module.rsplit('_').next().unwrap_or(module).to_owned(),
                |t| (*t).to_owned(),
            );
    }
    let mut parts = module.rsplit('.');
    let last = parts.next().unwrap_or(module);
    match parts.next() {
        Some(before) if last.chars().all(|c| c.is_ascii_digit()) => format!("{before}.{last}"),
        _ => last.to_owned(),
    }
}

/// The base model the metadata names, if any (kohya's, ModelSpec's or peft's entries; the adapter
/// configuration diffusers stores as JSON).
fn base_model(metadata: &BTreeMap<String, String>) -> Option<String> {
    let named = BASE_MODEL_KEYS
        .iter()
        .find_map(|k| metadata.get(*k).map(|v| format!("{v} ({k})")));
    named.or_else(|| {
        let config = metadata.get(format::ADAPTER_METADATA_KEY)?;
        let json: serde_json::Value = serde_json::from_str(config).ok()?;
        let name = json.get("base_model_name_or_path")?.as_str()?;
        Some(format!("{name} ({})", format::ADAPTER_METADATA_KEY))
    })
}

/// The report `inspect` prints for `path`.
pub fn report(path: &Path) -> anyhow::Result<String> {
    let summary = format::summary(path)?;
    let (tensors, metadata) = header(path)?;
    let mut targets: BTreeMap<String, usize> = BTreeMap::new();
    for name in tensors.keys() {
        if let Some(module) = DOWN_SUFFIXES.iter().find_map(|s| name.strip_suffix(s)) {
            *targets.entry(target(module)).or_default() += 1;
        }
    }
    let mut lines = summary.lines();
    let mut text = format!("{}\n", lines.next().unwrap_or_default());
    text += &format!(
        "  base model: {}\n",
        base_model(&metadata).unwrap_or_else(|| "not named in the metadata".into())
    );
    let listed: Vec<String> = targets.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
    text += &format!("  targets: {}\n", listed.join(", "));
    for line in lines {
        text += line;
        text.push('\n');
    }
    Ok(text)
}

/// Prints [`report`] of `args.file`.
pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    print!("{}", report(&args.file)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_of_each_layout() {
        assert_eq!(
            target("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            "to_q"
        );
        assert_eq!(
            target("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
            "to_out.0"
        );
        assert_eq!(
            target("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"),
            "to_out_0"
        );
        assert_eq!(
            target("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
            "q_proj"
        );
        assert_eq!(
            target("lora_te2_text_model_encoder_layers_0_mlp_fc1"),
            "fc1"
        );
    }

    #[test]
    fn base_model_from_kohya_then_peft_metadata() {
        let mut metadata = BTreeMap::new();
        assert_eq!(base_model(&metadata), None);
        metadata.insert(
            format::ADAPTER_METADATA_KEY.to_owned(),
            r#"{"base_model_name_or_path": "stabilityai/sdxl"}"#.to_owned(),
        );
        assert_eq!(
            base_model(&metadata).as_deref(),
            Some("stabilityai/sdxl (lora_adapter_metadata)")
        );
        metadata.insert("ss_base_model_version".into(), "sdxl_base_v1-0".into());
        assert_eq!(
            base_model(&metadata).as_deref(),
            Some("sdxl_base_v1-0 (ss_base_model_version)")
        );
    }
}
