//! The VAE inside an SGM / LDM single-file checkpoint (`first_stage_model.` + LDM names).
//!
//! Follows diffusers `loaders/single_file_utils.py` (`convert_ldm_vae_checkpoint` and its helpers),
//! run backwards: for every diffusers variable, the LDM key it comes from.
//!
//! - `encoder.down_blocks.{i}.resnets.{j}` ↔ `encoder.down.{i}.block.{j}`, the downsampler ↔
//!   `encoder.down.{i}.downsample.conv`;
//! - `decoder.up_blocks.{i}` ↔ `decoder.up.{levels − 1 − i}` (LDM counts up blocks from the latent
//!   side's far end), the upsampler ↔ `…upsample.conv`;
//! - `mid_block.resnets.{0,1}` ↔ `mid.block_{1,2}`; `mid_block.attentions.0.{group_norm, to_q, to_k,
//!   to_v, to_out.0}` ↔ `mid.attn_1.{norm, q, k, v, proj_out}`, whose weights LDM stores as 1×1
//!   convolutions `[C, C, 1, 1]`;
//! - `conv_shortcut` ↔ `nin_shortcut`, `conv_norm_out` ↔ `norm_out`; the rest keeps its name.

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind};

use super::{AutoencoderKL, AutoencoderKLConfig, Upcast};
use crate::Result;
use crate::mapped_load::{Source, load_mapped};
use crate::weights::TensorFile;

/// Where SGM / LDM checkpoints keep the VAE.
pub const VAE_PREFIX: &str = "first_stage_model.";

/// The LDM key (relative to [`VAE_PREFIX`]) of diffusers variable `name` in a VAE of `levels` levels.
fn ldm_source(name: &str, levels: usize) -> Option<Source> {
    let (coder, rest) = name.split_once('.')?;
    if !matches!(coder, "encoder" | "decoder") {
        // quant_conv, post_quant_conv
        return Some(Source::Same(name.to_owned()));
    }
    let parts: Vec<&str> = rest.split('.').collect();
    let renamed = match parts.as_slice() {
        ["conv_norm_out", param] => format!("norm_out.{param}"),
        ["down_blocks", i, "resnets", j, tail @ ..] => {
            format!("down.{i}.block.{j}.{}", resnet_tail(tail))
        }
        ["down_blocks", i, "downsamplers", "0", "conv", param] => {
            format!("down.{i}.downsample.conv.{param}")
        }
        ["up_blocks", i, "resnets", j, tail @ ..] => format!(
            "up.{}.block.{j}.{}",
            reversed(i, levels)?,
            resnet_tail(tail)
        ),
        ["up_blocks", i, "upsamplers", "0", "conv", param] => {
            format!("up.{}.upsample.conv.{param}", reversed(i, levels)?)
        }
        ["mid_block", "resnets", j, tail @ ..] => {
            format!(
                "mid.block_{}.{}",
                j.parse::<usize>().ok()? + 1,
                resnet_tail(tail)
            )
        }
        ["mid_block", "attentions", "0", module @ .., param] => {
            let ldm = match module {
                ["group_norm"] => "norm",
                ["to_q"] => "q",
                ["to_k"] => "k",
                ["to_v"] => "v",
                ["to_out", "0"] => "proj_out",
                _ => return None,
            };
            let key = format!("{coder}.mid.attn_1.{ldm}.{param}");
            return Some(if ldm != "norm" && *param == "weight" {
                Source::PointwiseConv(key)
            } else {
                Source::Same(key)
            });
        }
        _ => rest.to_owned(),
    };
    Some(Source::Same(format!("{coder}.{renamed}")))
}

fn resnet_tail(tail: &[&str]) -> String {
    tail.join(".").replace("conv_shortcut", "nin_shortcut")
}

fn reversed(index: &str, levels: usize) -> Option<usize> {
    levels.checked_sub(index.parse::<usize>().ok()? + 1)
}

/// Loads the VAE of a single-file checkpoint (its config does not travel with the file: SDXL 1.0's
/// is [`AutoencoderKLConfig::sdxl`]), with the weights' element type chosen as in
/// [`AutoencoderKL::from_pretrained`].
///
/// # Errors
/// [`crate::Error::Load`] naming missing, unused (under [`VAE_PREFIX`]) and mis-shaped keys.
pub fn load_vae(
    file: &TensorFile,
    config: &AutoencoderKLConfig,
    device: Device,
    kind: Kind,
    upcast: Upcast,
) -> Result<(AutoencoderKL, VarStore)> {
    let mut vs = VarStore::new(device);
    let model = AutoencoderKL::new(&vs.root(), config)?;
    let levels = config.block_out_channels.len();
    load_mapped(&vs, file, VAE_PREFIX, &[], |name| ldm_source(name, levels))?;
    vs.set_kind(super::weight_kind_for(config, kind, upcast));
    Ok((model, vs))
}

/// [`load_vae`] from a path.
///
/// # Errors
/// As [`TensorFile::open`] and [`load_vae`].
pub fn load_vae_file(
    path: impl AsRef<Path>,
    config: &AutoencoderKLConfig,
    device: Device,
    kind: Kind,
    upcast: Upcast,
) -> Result<(AutoencoderKL, VarStore)> {
    load_vae(&TensorFile::open(path)?, config, device, kind, upcast)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldm_names_follow_diffusers_converter() {
        let same = |s: &str| Some(Source::Same(s.to_owned()));
        let cases = [
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                same("encoder.down.1.block.0.nin_shortcut.weight"),
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                same("encoder.down.0.downsample.conv.bias"),
            ),
            (
                "decoder.up_blocks.0.resnets.2.norm1.weight",
                same("decoder.up.3.block.2.norm1.weight"),
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                same("decoder.up.1.upsample.conv.weight"),
            ),
            (
                "decoder.mid_block.resnets.1.conv2.weight",
                same("decoder.mid.block_2.conv2.weight"),
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                Some(Source::PointwiseConv(
                    "encoder.mid.attn_1.proj_out.weight".into(),
                )),
            ),
            (
                "encoder.mid_block.attentions.0.to_q.bias",
                same("encoder.mid.attn_1.q.bias"),
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.weight",
                same("decoder.mid.attn_1.norm.weight"),
            ),
            ("encoder.conv_norm_out.bias", same("encoder.norm_out.bias")),
            ("decoder.conv_in.weight", same("decoder.conv_in.weight")),
            ("post_quant_conv.weight", same("post_quant_conv.weight")),
        ];
        for (name, expected) in cases {
            assert_eq!(ldm_source(name, 4), expected, "{name}");
        }
        assert_eq!(
            ldm_source("decoder.up_blocks.4.resnets.0.conv1.weight", 4),
            None
        );
    }
}
