//! The diffusers ↔ SGM (Stability's `generative-models`, A1111, ComfyUI) naming of the UNet.
//!
//! Follows diffusers' `scripts/convert_diffusers_to_original_sdxl.py` (`unet_conversion_map*`),
//! generalised from SDXL's fixed numbers to any [`UNetConfig`]: with `L` ResNet blocks per down block,
//! down block `i`'s layer `j` is `input_blocks.{(L+1)·i + j + 1}`, its downsampler
//! `input_blocks.{(L+1)·(i+1)}.0.op`, up block `i`'s layer `j` is `output_blocks.{(L+1)·i + j}`, and its
//! upsampler sits after the layer's ResNet (`.1`) or after its transformer (`.2`). Transformer internals
//! keep their names; ResNet internals are renamed. `docs/FORMATS.md` (section 1) gives the naming with
//! its upstream sources; the tests compare the table with upstream converters' names for two UNet shapes.
//!
//! The table is public so that LoRA files in kohya's SGM spelling can be mapped by the `lora` crate,
//! which knows nothing of SDXL.

use super::config::{DownBlockKind, UNetConfig, UpBlockKind};

/// The key prefix of the UNet in an SGM single-file checkpoint.
pub const SGM_UNET_PREFIX: &str = "model.diffusion_model.";

/// diffusers `ResnetBlock2D` attribute → SGM `ResBlock` attribute.
const RESNET_RENAMES: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// `(diffusers module path, SGM module path)` pairs for every module of a UNet with `config`, without
/// [`SGM_UNET_PREFIX`]. ResNet blocks are listed by their inner modules (`...resnets.0.norm1` ↔
/// `...in_layers.0`), transformers as a whole (their inner names agree), so a module path is renamed by
/// replacing its longest listed prefix (see [`to_sgm`]).
pub fn sgm_unet_table(config: &UNetConfig) -> Vec<(String, String)> {
    let mut table: Vec<(String, String)> = [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_in", "input_blocks.0.0"),
        ("mid_block.attentions.0", "middle_block.1"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ]
    .iter()
    .map(|(d, s)| ((*d).to_owned(), (*s).to_owned()))
    .collect();
    let mut resnet = |diffusers: String, sgm: String| {
        for (d, s) in RESNET_RENAMES {
            table.push((format!("{diffusers}.{d}"), format!("{sgm}.{s}")));
        }
    };
    resnet("mid_block.resnets.0".into(), "middle_block.0".into());
    resnet("mid_block.resnets.1".into(), "middle_block.2".into());
    let per_block = config.layers_per_block as usize + 1;
    let levels = config.levels.len();
    for i in 0..levels {
        for j in 0..per_block - 1 {
            resnet(
                format!("down_blocks.{i}.resnets.{j}"),
                format!("input_blocks.{}.0", per_block * i + j + 1),
            );
        }
    }
    for i in 0..levels {
        for j in 0..per_block {
            resnet(
                format!("up_blocks.{i}.resnets.{j}"),
                format!("output_blocks.{}.0", per_block * i + j),
            );
        }
    }
    for (i, level) in config.levels.iter().enumerate() {
        if level.down == DownBlockKind::CrossAttn {
            for j in 0..per_block - 1 {
                table.push((
                    format!("down_blocks.{i}.attentions.{j}"),
                    format!("input_blocks.{}.1", per_block * i + j + 1),
                ));
            }
        }
        if i + 1 < levels {
            table.push((
                format!("down_blocks.{i}.downsamplers.0.conv"),
                format!("input_blocks.{}.0.op", per_block * (i + 1)),
            ));
        }
    }
    for (i, kind) in config.up_blocks.iter().enumerate() {
        if *kind == UpBlockKind::CrossAttn {
            for j in 0..per_block {
                table.push((
                    format!("up_blocks.{i}.attentions.{j}"),
                    format!("output_blocks.{}.1", per_block * i + j),
                ));
            }
        }
        if i + 1 < levels {
            let slot = if *kind == UpBlockKind::CrossAttn {
                2
            } else {
                1
            };
            table.push((
                format!("up_blocks.{i}.upsamplers.0.conv"),
                format!(
                    "output_blocks.{}.{slot}.conv",
                    per_block * i + per_block - 1
                ),
            ));
        }
    }
    table
}

/// `path` (a diffusers module path or tensor key) with its longest prefix in `table` replaced by the
/// SGM spelling; `None` when no entry matches at a `.` boundary.
pub fn to_sgm(table: &[(String, String)], path: &str) -> Option<String> {
    table
        .iter()
        .filter(|(from, _)| {
            path == from
                || path
                    .strip_prefix(from.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        })
        .max_by_key(|(from, _)| from.len())
        .map(|(from, to)| format!("{to}{}", &path[from.len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_base_entries_match_the_reference_table() {
        let table = sgm_unet_table(&UNetConfig::sdxl_base());
        let cases = [
            // diffusers' convert_diffusers_to_original_sdxl.py (docs/FORMATS.md, section 1).
            ("time_embedding.linear_1.weight", "time_embed.0.weight"),
            ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
            ("conv_in.weight", "input_blocks.0.0.weight"),
            (
                "down_blocks.0.resnets.1.conv1.weight",
                "input_blocks.2.0.in_layers.2.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight",
                "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
            ),
            (
                "down_blocks.1.downsamplers.0.conv.bias",
                "input_blocks.6.0.op.bias",
            ),
            (
                "down_blocks.2.attentions.1.proj_out.weight",
                "input_blocks.8.1.proj_out.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.norm.weight",
                "middle_block.1.norm.weight",
            ),
            (
                "up_blocks.0.resnets.2.norm2.bias",
                "output_blocks.2.0.out_layers.0.bias",
            ),
            (
                "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2.weight",
                "output_blocks.2.1.transformer_blocks.9.ff.net.2.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.2.conv.weight",
            ),
            (
                "up_blocks.1.attentions.0.proj_in.weight",
                "output_blocks.3.1.proj_in.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.2.resnets.2.conv2.weight",
                "output_blocks.8.0.out_layers.3.weight",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (diffusers, sgm) in cases {
            assert_eq!(
                to_sgm(&table, diffusers).as_deref(),
                Some(sgm),
                "{diffusers}"
            );
        }
        // Module paths (what LoRA files name) map the same way, and nothing maps twice.
        assert_eq!(
            to_sgm(&table, "down_blocks.1.attentions.0").as_deref(),
            Some("input_blocks.4.1")
        );
        assert_eq!(
            to_sgm(&table, "up_blocks.2.attentions.0.proj_in"),
            None,
            "UpBlock2D has no attentions"
        );
        assert_eq!(to_sgm(&table, "conv_in_extra.weight"), None);
        let targets: std::collections::BTreeSet<&String> = table.iter().map(|(_, s)| s).collect();
        assert_eq!(targets.len(), table.len());
    }
}
