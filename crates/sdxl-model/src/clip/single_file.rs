//! The text encoders inside an SGM / A1111 single-file SDXL checkpoint.
//!
//! Follows diffusers `loaders/single_file_utils.py` (`convert_ldm_clip_checkpoint`,
//! `convert_open_clip_checkpoint`) and SGM's `FrozenCLIPEmbedder` / `FrozenOpenCLIPEmbedder2`:
//!
//! - CLIP-L lives under `conditioner.embedders.0.transformer.` with transformers' own names;
//! - OpenCLIP bigG lives under `conditioner.embedders.1.model.` with open_clip's names: fused
//!   `attn.in_proj_{weight,bias}` (q, k, v stacked), `ln_1/ln_2`, `mlp.c_fc/c_proj`, `ln_final`,
//!   `positional_embedding`, and `text_projection` stored as `[hidden, projection]` (applied as `x @ P`,
//!   the transpose of transformers' weight).
//!
//! Keys of other models in the file (`model.diffusion_model.`, `first_stage_model.`) are ignored;
//! under the encoder's prefix every tensor must be used except the buffers `position_ids` and
//! `logit_scale`, which the text model has no use for.

use tch::nn::VarStore;
use tch::{Device, Kind};

use super::{ClipTextConfig, ClipTextModel};
use crate::Result;
use crate::mapped_load::{Source, load_mapped};
use crate::weights::TensorFile;

/// Where SGM keeps CLIP-L.
pub const CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Where SGM keeps OpenCLIP bigG.
pub const BIG_G_PREFIX: &str = "conditioner.embedders.1.model.";

/// The open_clip key holding transformers variable `name` (relative to the model root).
fn open_clip_source(name: &str) -> Option<Source> {
    let fixed = match name {
        "text_model.embeddings.token_embedding.weight" => Some("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight" => Some("positional_embedding"),
        "text_model.final_layer_norm.weight" => Some("ln_final.weight"),
        "text_model.final_layer_norm.bias" => Some("ln_final.bias"),
        _ => None,
    };
    if let Some(key) = fixed {
        return Some(Source::Same(key.into()));
    }
    if name == "text_projection.weight" {
        return Some(Source::Transposed("text_projection".into()));
    }
    let rest = name.strip_prefix("text_model.encoder.layers.")?;
    let (layer, inner) = rest.split_once('.')?;
    let block = format!("transformer.resblocks.{layer}.");
    let (module, param) = inner.rsplit_once('.')?;
    let part = match module {
        "self_attn.q_proj" => Some(0),
        "self_attn.k_proj" => Some(1),
        "self_attn.v_proj" => Some(2),
        _ => None,
    };
    if let Some(part) = part {
        return Some(Source::FusedPart(
            format!("{block}attn.in_proj_{param}"),
            part,
        ));
    }
    let renamed = match module {
        "self_attn.out_proj" => "attn.out_proj",
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return None,
    };
    Some(Source::Same(format!("{block}{renamed}.{param}")))
}

/// Loads SDXL's CLIP-L text encoder from a single-file checkpoint.
///
/// # Errors
/// [`crate::Error::Load`] naming missing, unused (under [`CLIP_L_PREFIX`]) and mis-shaped keys.
pub fn load_clip_l(
    file: &TensorFile,
    config: &ClipTextConfig,
    device: Device,
    kind: Kind,
) -> Result<(ClipTextModel, VarStore)> {
    load(
        file,
        config,
        false,
        device,
        kind,
        CLIP_L_PREFIX,
        &["text_model.embeddings.position_ids"],
        |name| Some(Source::Same(name.to_owned())),
    )
}

/// Loads SDXL's OpenCLIP bigG text encoder (with its projection) from a single-file checkpoint.
///
/// # Errors
/// [`crate::Error::Load`] naming missing, unused (under [`BIG_G_PREFIX`]) and mis-shaped keys.
pub fn load_open_clip_big_g(
    file: &TensorFile,
    config: &ClipTextConfig,
    device: Device,
    kind: Kind,
) -> Result<(ClipTextModel, VarStore)> {
    load(
        file,
        config,
        true,
        device,
        kind,
        BIG_G_PREFIX,
        &["logit_scale"],
        open_clip_source,
    )
}

#[allow(clippy::too_many_arguments)]
fn load(
    file: &TensorFile,
    config: &ClipTextConfig,
    with_projection: bool,
    device: Device,
    kind: Kind,
    prefix: &str,
    ignored: &[&str],
    source_of: impl Fn(&str) -> Option<Source>,
) -> Result<(ClipTextModel, VarStore)> {
    let mut vs = VarStore::new(device);
    // An empty store only changes the kind new variables are created in: each tensor of the file is
    // converted to `kind` on its own and no fp32 copy of the encoder exists (bigG is 2.8 GB in fp32).
    vs.set_kind(kind);
    let model = ClipTextModel::new(&vs.root(), config, with_projection)?;
    load_mapped(&vs, file, prefix, ignored, source_of)?;
    Ok((model, vs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_clip_names_follow_the_sgm_layout() {
        let cases = [
            (
                "text_model.encoder.layers.3.self_attn.k_proj.weight",
                Source::FusedPart("transformer.resblocks.3.attn.in_proj_weight".into(), 1),
            ),
            (
                "text_model.encoder.layers.0.self_attn.v_proj.bias",
                Source::FusedPart("transformer.resblocks.0.attn.in_proj_bias".into(), 2),
            ),
            (
                "text_model.encoder.layers.12.self_attn.out_proj.weight",
                Source::Same("transformer.resblocks.12.attn.out_proj.weight".into()),
            ),
            (
                "text_model.encoder.layers.1.mlp.fc2.bias",
                Source::Same("transformer.resblocks.1.mlp.c_proj.bias".into()),
            ),
            (
                "text_model.encoder.layers.1.layer_norm1.weight",
                Source::Same("transformer.resblocks.1.ln_1.weight".into()),
            ),
            (
                "text_model.embeddings.position_embedding.weight",
                Source::Same("positional_embedding".into()),
            ),
            (
                "text_projection.weight",
                Source::Transposed("text_projection".into()),
            ),
        ];
        for (name, expected) in cases {
            assert_eq!(open_clip_source(name), Some(expected), "{name}");
        }
        assert_eq!(
            open_clip_source("text_model.encoder.layers.1.unknown.weight"),
            None
        );
    }
}
