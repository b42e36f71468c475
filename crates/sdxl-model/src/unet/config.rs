//! The UNet's configuration: diffusers' `unet/config.json` as read from disk, and the validated, typed
//! form the model is built from.
//!
//! Follows the constructor of diffusers' `UNet2DConditionModel` (`models/unets/unet_2d_condition.py`):
//! the serde struct's fields are its `config.json` keys with its defaults; [`UNetConfig::from_json`]
//! accepts the subset SDXL-style UNets use and rejects everything else with an error naming the key.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// A config value that diffusers accepts either once for all levels or once per level.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerLevel<T> {
    /// The same value at every level.
    All(T),
    /// One value per level, in down-block order.
    Each(Vec<T>),
}

impl<T: Clone> PerLevel<T> {
    fn expand(&self, field: &'static str, levels: usize) -> Result<Vec<T>> {
        match self {
            Self::All(value) => Ok(vec![value.clone(); levels]),
            Self::Each(values) if values.len() == levels => Ok(values.clone()),
            Self::Each(values) => Err(Error::InvalidConfig {
                field,
                reason: format!("has {} entries for {levels} down blocks", values.len()),
            }),
        }
    }
}

/// `unet/config.json` of a diffusers `UNet2DConditionModel`, key for key. Absent keys take diffusers'
/// defaults; keys this crate does not read (such as `_class_name`) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
#[serde(default)]
#[allow(missing_docs)] // the fields are diffusers' config keys; their meaning is diffusers' documentation
pub struct UNetConfigJson {
    pub sample_size: Option<i64>,
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerLevel<bool>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: PerLevel<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<i64>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerLevel<i64>,
    pub transformer_layers_per_block: PerLevel<i64>,
    pub reverse_transformer_layers_per_block: Option<Vec<i64>>,
    pub encoder_hid_dim: Option<i64>,
    pub encoder_hid_dim_type: Option<String>,
    pub attention_head_dim: PerLevel<i64>,
    pub num_attention_heads: Option<PerLevel<i64>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<i64>,
    pub num_class_embeds: Option<i64>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<i64>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<i64>,
    pub conv_in_kernel: i64,
    pub conv_out_kernel: i64,
    pub projection_class_embeddings_input_dim: Option<i64>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
}

impl Default for UNetConfigJson {
    /// The defaults of `UNet2DConditionModel.__init__` (an SD 1.x-shaped UNet).
    fn default() -> Self {
        let strings = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_owned()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerLevel::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerLevel::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".to_owned(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerLevel::All(1280),
            transformer_layers_per_block: PerLevel::All(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerLevel::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".to_owned(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".to_owned(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".to_owned(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
        }
    }
}

/// The kind of one down block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockKind {
    /// `DownBlock2D`: ResNet blocks only.
    Plain,
    /// `CrossAttnDownBlock2D`: each ResNet block followed by a `Transformer2DModel`.
    CrossAttn,
}

/// The kind of one up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockKind {
    /// `UpBlock2D`: ResNet blocks only.
    Plain,
    /// `CrossAttnUpBlock2D`: each ResNet block followed by a `Transformer2DModel`.
    CrossAttn,
}

/// The `text_time` additional conditioning of SDXL: pooled text embeddings plus sinusoidal embeddings
/// of the six micro-conditioning numbers (`add_time_proj`, `add_embedding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TextTimeConfig {
    /// Width of the sinusoidal embedding of each time id (`addition_time_embed_dim`).
    pub time_embed_dim: i64,
    /// Input width of `add_embedding`: pooled text width + time ids × `time_embed_dim`
    /// (`projection_class_embeddings_input_dim`).
    pub projection_input_dim: i64,
}

/// One level of the UNet as the down path sees it; the up path visits the levels in reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Channels of the level's blocks (`block_out_channels[i]`).
    pub channels: i64,
    /// The down block's kind.
    pub down: DownBlockKind,
    /// Transformer layers per `Transformer2DModel` of the down block (`transformer_layers_per_block[i]`).
    pub down_transformer_layers: i64,
    /// Attention heads at this level (what diffusers' `attention_head_dim` holds for SDXL).
    pub heads: i64,
}

/// A validated UNet configuration, the input of [`super::UNet2DConditionModel::new`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct UNetConfig {
    /// Channels of the noisy latent.
    pub in_channels: i64,
    /// Channels of the prediction.
    pub out_channels: i64,
    /// The default latent side (`sample_size`), informative only.
    pub sample_size: Option<i64>,
    /// Whether the timestep embedding is laid out `[cos, sin]` (true) or `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// The `downscale_freq_shift` of the timestep embedding.
    pub freq_shift: f64,
    /// The levels, top (full resolution) first.
    pub levels: Vec<Level>,
    /// Up block kinds, deepest level first (diffusers' `up_block_types`).
    pub up_blocks: Vec<UpBlockKind>,
    /// Transformer layers of the up blocks, deepest level first.
    pub up_transformer_layers: Vec<i64>,
    /// Transformer layers of the mid block's `Transformer2DModel`.
    pub mid_transformer_layers: i64,
    /// ResNet blocks per down block; up blocks have one more.
    pub layers_per_block: i64,
    /// Groups of every group norm.
    pub norm_num_groups: i64,
    /// Epsilon of the ResNet and output group norms and the transformer layer norms.
    pub norm_eps: f64,
    /// Width of the text encoder states the cross-attention reads.
    pub cross_attention_dim: i64,
    /// Linear (true) or 1×1 convolution `proj_in` / `proj_out` in the transformers.
    pub use_linear_projection: bool,
    /// SDXL's pooled-text + time-ids conditioning, if the UNet has it.
    pub text_time: Option<TextTimeConfig>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

fn require<T: PartialEq + std::fmt::Debug>(
    field: &'static str,
    actual: &T,
    supported: &T,
) -> Result<()> {
    if actual == supported {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{actual:?} is not supported (only {supported:?})"),
        ))
    }
}

impl UNetConfig {
    /// Reads and validates a diffusers `unet/config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::ConfigJson`] when the file cannot be read or parsed,
    /// [`Error::InvalidConfig`] naming the key when a value is unsupported.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let json: UNetConfigJson = crate::config_file::read_config_json(path.as_ref())?;
        Self::from_json(&json)
    }

    /// Validates a parsed config.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the key of the first unsupported or inconsistent value.
    pub fn from_json(json: &UNetConfigJson) -> Result<Self> {
        // Features SDXL does not use must have their neutral values.
        require("center_input_sample", &json.center_input_sample, &false)?;
        require("act_fn", &json.act_fn.as_str(), &"silu")?;
        require("dropout", &json.dropout, &0.0)?;
        require("downsample_padding", &json.downsample_padding, &1)?;
        require("mid_block_scale_factor", &json.mid_block_scale_factor, &1.0)?;
        require(
            "mid_block_type",
            &json.mid_block_type.as_deref(),
            &Some("UNetMidBlock2DCrossAttn"),
        )?;
        require("encoder_hid_dim", &json.encoder_hid_dim, &None)?;
        require("encoder_hid_dim_type", &json.encoder_hid_dim_type, &None)?;
        require("num_attention_heads", &json.num_attention_heads, &None)?;
        require("dual_cross_attention", &json.dual_cross_attention, &false)?;
        require("class_embed_type", &json.class_embed_type, &None)?;
        require("num_class_embeds", &json.num_class_embeds, &None)?;
        require("upcast_attention", &json.upcast_attention, &false)?;
        require(
            "resnet_time_scale_shift",
            &json.resnet_time_scale_shift.as_str(),
            &"default",
        )?;
        require("resnet_skip_time_act", &json.resnet_skip_time_act, &false)?;
        require(
            "resnet_out_scale_factor",
            &json.resnet_out_scale_factor,
            &1.0,
        )?;
        require(
            "time_embedding_type",
            &json.time_embedding_type.as_str(),
            &"positional",
        )?;
        require("time_embedding_dim", &json.time_embedding_dim, &None)?;
        require("time_embedding_act_fn", &json.time_embedding_act_fn, &None)?;
        require("timestep_post_act", &json.timestep_post_act, &None)?;
        require("time_cond_proj_dim", &json.time_cond_proj_dim, &None)?;
        require("conv_in_kernel", &json.conv_in_kernel, &3)?;
        require("conv_out_kernel", &json.conv_out_kernel, &3)?;
        require("attention_type", &json.attention_type.as_str(), &"default")?;
        require(
            "class_embeddings_concat",
            &json.class_embeddings_concat,
            &false,
        )?;
        require("cross_attention_norm", &json.cross_attention_norm, &None)?;
        if json.mid_block_only_cross_attention == Some(true) {
            return Err(invalid(
                "mid_block_only_cross_attention",
                "true is not supported",
            ));
        }

        let levels = json.block_out_channels.len();
        if levels == 0 {
            return Err(invalid("block_out_channels", "is empty"));
        }
        if json.down_block_types.len() != levels || json.up_block_types.len() != levels {
            return Err(invalid(
                "down_block_types",
                format!(
                    "{} down and {} up block types for {levels} entries of block_out_channels",
                    json.down_block_types.len(),
                    json.up_block_types.len()
                ),
            ));
        }
        let down: Vec<DownBlockKind> = json
            .down_block_types
            .iter()
            .map(|name| match name.as_str() {
                "DownBlock2D" => Ok(DownBlockKind::Plain),
                "CrossAttnDownBlock2D" => Ok(DownBlockKind::CrossAttn),
                other => Err(invalid(
                    "down_block_types",
                    format!("`{other}` is not supported"),
                )),
            })
            .collect::<Result<_>>()?;
        let up_blocks: Vec<UpBlockKind> = json
            .up_block_types
            .iter()
            .map(|name| match name.as_str() {
                "UpBlock2D" => Ok(UpBlockKind::Plain),
                "CrossAttnUpBlock2D" => Ok(UpBlockKind::CrossAttn),
                other => Err(invalid(
                    "up_block_types",
                    format!("`{other}` is not supported"),
                )),
            })
            .collect::<Result<_>>()?;
        if json
            .only_cross_attention
            .expand("only_cross_attention", levels)?
            .contains(&true)
        {
            return Err(invalid("only_cross_attention", "true is not supported"));
        }
        let layers = json.layers_per_block.expand("layers_per_block", levels)?;
        let layers_per_block = layers[0];
        if layers.iter().any(|&n| n != layers_per_block) || layers_per_block < 1 {
            return Err(invalid(
                "layers_per_block",
                format!("{layers:?}: one positive value for all levels is supported"),
            ));
        }
        let cross = json
            .cross_attention_dim
            .expand("cross_attention_dim", levels)?;
        let cross_attention_dim = cross[0];
        if cross.iter().any(|&d| d != cross_attention_dim) || cross_attention_dim < 1 {
            return Err(invalid(
                "cross_attention_dim",
                format!("{cross:?}: one positive value for all levels is supported"),
            ));
        }
        let transformer_layers = json
            .transformer_layers_per_block
            .expand("transformer_layers_per_block", levels)?;
        if transformer_layers.iter().any(|&n| n < 1) {
            return Err(invalid(
                "transformer_layers_per_block",
                format!("{transformer_layers:?} has a value below 1"),
            ));
        }
        let up_transformer_layers = match &json.reverse_transformer_layers_per_block {
            None => transformer_layers.iter().rev().copied().collect(),
            Some(list) if list.len() == levels && list.iter().all(|&n| n >= 1) => list.clone(),
            Some(list) => {
                return Err(invalid(
                    "reverse_transformer_layers_per_block",
                    format!("{list:?} does not fit {levels} levels"),
                ));
            }
        };
        // diffusers reads the head *count* from `attention_head_dim` (a historic misnomer it keeps for
        // compatibility), so the per-head width is channels / heads.
        let heads = json
            .attention_head_dim
            .expand("attention_head_dim", levels)?;
        let groups = json
            .norm_num_groups
            .ok_or_else(|| invalid("norm_num_groups", "null is not supported"))?;
        let mut level_configs = Vec::with_capacity(levels);
        for i in 0..levels {
            let channels = json.block_out_channels[i];
            if channels < 1 || groups < 1 || channels % groups != 0 {
                return Err(invalid(
                    "block_out_channels",
                    format!("{channels} channels are not a multiple of {groups} norm groups"),
                ));
            }
            if heads[i] < 1 || channels % heads[i] != 0 {
                return Err(invalid(
                    "attention_head_dim",
                    format!("{} heads do not divide {channels} channels", heads[i]),
                ));
            }
            level_configs.push(Level {
                channels,
                down: down[i],
                down_transformer_layers: transformer_layers[i],
                heads: heads[i],
            });
        }
        let text_time = match json.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let time_embed_dim = json
                    .addition_time_embed_dim
                    .filter(|&d| d > 0 && d % 2 == 0)
                    .ok_or_else(|| {
                        invalid(
                            "addition_time_embed_dim",
                            "must be a positive even number with `text_time`",
                        )
                    })?;
                let projection_input_dim = json
                    .projection_class_embeddings_input_dim
                    .filter(|&d| d > 0)
                    .ok_or_else(|| {
                        invalid(
                            "projection_class_embeddings_input_dim",
                            "must be positive with `text_time`",
                        )
                    })?;
                Some(TextTimeConfig {
                    time_embed_dim,
                    projection_input_dim,
                })
            }
            Some(other) => {
                return Err(invalid(
                    "addition_embed_type",
                    format!("`{other}` is not supported"),
                ));
            }
        };
        if json.in_channels < 1 || json.out_channels < 1 {
            return Err(invalid(
                "in_channels",
                "in_channels and out_channels must be positive",
            ));
        }
        if json.norm_eps <= 0.0 {
            return Err(invalid("norm_eps", "must be positive"));
        }
        if level_configs[0].channels % 2 != 0 {
            return Err(invalid(
                "block_out_channels",
                "the first entry (the timestep embedding width) must be even",
            ));
        }
        Ok(Self {
            in_channels: json.in_channels,
            out_channels: json.out_channels,
            sample_size: json.sample_size,
            flip_sin_to_cos: json.flip_sin_to_cos,
            freq_shift: json.freq_shift,
            mid_transformer_layers: transformer_layers[levels - 1],
            levels: level_configs,
            up_blocks,
            up_transformer_layers,
            layers_per_block,
            norm_num_groups: groups,
            norm_eps: json.norm_eps,
            cross_attention_dim,
            use_linear_projection: json.use_linear_projection,
            text_time,
        })
    }

    /// `stabilityai/stable-diffusion-xl-base-1.0` `unet/config.json` (values and sources in
    /// `docs/FORMATS.md`, section 2): levels 320/640/1280 with `DownBlock2D` then two
    /// `CrossAttnDownBlock2D`, transformer depths 1/2/10 (mid 10), 5/10/20 heads of 64 channels, context
    /// width 2048, linear projections, `text_time` conditioning with 256-wide time-id embeddings and a
    /// 2816-wide `add_embedding` input.
    pub fn sdxl_base() -> Self {
        Self::from_levels(
            [
                (320, DownBlockKind::Plain, 1, 5),
                (640, DownBlockKind::CrossAttn, 2, 10),
                (1280, DownBlockKind::CrossAttn, 10, 20),
            ],
            2,
            32,
            2048,
            true,
            Some(TextTimeConfig {
                time_embed_dim: 256,
                projection_input_dim: 2816,
            }),
            Some(128),
        )
    }

    /// The UNet of `tests/fixtures/tiny-sdxl/unet` (`TINY_UNET_A` of `tools/fixtures/generate.py`): SDXL's
    /// block layout at 16/32/32 channels, transformer depths 1/1/2 (varying by level), linear projections.
    pub fn tiny_sdxl() -> Self {
        Self::from_levels(
            [
                (16, DownBlockKind::Plain, 1, 2),
                (32, DownBlockKind::CrossAttn, 1, 2),
                (32, DownBlockKind::CrossAttn, 2, 4),
            ],
            2,
            4,
            32,
            true,
            Some(TextTimeConfig {
                time_embed_dim: 8,
                projection_input_dim: 80,
            }),
            Some(16),
        )
    }

    /// The UNet of `tests/fixtures/unet-tiny-b` (`TINY_UNET_B`): two levels with the cross-attention block
    /// first, two transformer layers, 1×1 convolution projections.
    pub fn tiny_b() -> Self {
        Self::from_levels(
            [
                (16, DownBlockKind::CrossAttn, 2, 4),
                (32, DownBlockKind::Plain, 2, 4),
            ],
            1,
            4,
            24,
            false,
            Some(TextTimeConfig {
                time_embed_dim: 4,
                projection_input_dim: 40,
            }),
            Some(8),
        )
    }

    /// A preset from per-level `(channels, down kind, transformer layers, heads)`, with diffusers'
    /// mirrored up path and defaults elsewhere.
    fn from_levels<const N: usize>(
        levels: [(i64, DownBlockKind, i64, i64); N],
        layers_per_block: i64,
        norm_num_groups: i64,
        cross_attention_dim: i64,
        use_linear_projection: bool,
        text_time: Option<TextTimeConfig>,
        sample_size: Option<i64>,
    ) -> Self {
        let levels: Vec<Level> = levels
            .iter()
            .map(|&(channels, down, down_transformer_layers, heads)| Level {
                channels,
                down,
                down_transformer_layers,
                heads,
            })
            .collect();
        let up_blocks = levels
            .iter()
            .rev()
            .map(|l| match l.down {
                DownBlockKind::Plain => UpBlockKind::Plain,
                DownBlockKind::CrossAttn => UpBlockKind::CrossAttn,
            })
            .collect();
        Self {
            in_channels: 4,
            out_channels: 4,
            sample_size,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            up_transformer_layers: levels
                .iter()
                .rev()
                .map(|l| l.down_transformer_layers)
                .collect(),
            mid_transformer_layers: levels.last().map_or(1, |l| l.down_transformer_layers),
            levels,
            up_blocks,
            layers_per_block,
            norm_num_groups,
            norm_eps: 1e-5,
            cross_attention_dim,
            use_linear_projection,
            text_time,
        }
    }

    /// Width of the timestep embedding the ResNet blocks receive (4 × the first level's channels).
    pub fn time_embed_dim(&self) -> i64 {
        self.levels[0].channels * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> std::path::PathBuf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(path);
        assert!(
            path.exists(),
            "missing fixture {}: regenerate it with tools/fixtures/regenerate.sh",
            path.display()
        );
        path
    }

    #[test]
    fn fixture_configs_parse_to_the_presets() {
        assert_eq!(
            UNetConfig::from_file(fixture("tiny-sdxl/unet/config.json")).unwrap(),
            UNetConfig::tiny_sdxl()
        );
        assert_eq!(
            UNetConfig::from_file(fixture("unet-tiny-b/config.json")).unwrap(),
            UNetConfig::tiny_b()
        );
    }

    #[test]
    fn sdxl_base_json_parses_to_the_preset() {
        // The keys of the hub's SDXL base `unet/config.json` that differ from diffusers' defaults.
        let json = r#"{
            "_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "use_linear_projection": true
        }"#;
        let parsed: UNetConfigJson = serde_json::from_str(json).unwrap();
        let config = UNetConfig::from_json(&parsed).unwrap();
        assert_eq!(config, UNetConfig::sdxl_base());
        assert_eq!(config.time_embed_dim(), 1280);
        assert_eq!(config.up_transformer_layers, [10, 2, 1]);
    }

    #[test]
    fn unsupported_values_are_errors_naming_the_key() {
        let base = || UNetConfigJson {
            addition_embed_type: None,
            ..UNetConfigJson::default()
        };
        let cases: Vec<(UNetConfigJson, &str)> = vec![
            (
                UNetConfigJson {
                    down_block_types: vec!["AttnDownBlock2D".into(); 4],
                    ..base()
                },
                "`AttnDownBlock2D`",
            ),
            (
                UNetConfigJson {
                    addition_embed_type: Some("text".into()),
                    ..base()
                },
                "addition_embed_type",
            ),
            (
                UNetConfigJson {
                    addition_embed_type: Some("text_time".into()),
                    ..base()
                },
                "addition_time_embed_dim",
            ),
            (
                UNetConfigJson {
                    attention_head_dim: PerLevel::Each(vec![8, 8]),
                    ..base()
                },
                "2 entries for 4",
            ),
            (
                UNetConfigJson {
                    attention_head_dim: PerLevel::All(7),
                    ..base()
                },
                "attention_head_dim",
            ),
            (
                UNetConfigJson {
                    norm_num_groups: Some(48),
                    ..base()
                },
                "48 norm groups",
            ),
            (
                UNetConfigJson {
                    time_cond_proj_dim: Some(4),
                    ..base()
                },
                "time_cond_proj_dim",
            ),
            (
                UNetConfigJson {
                    up_block_types: vec![],
                    ..base()
                },
                "down_block_types",
            ),
        ];
        for (json, needle) in cases {
            let msg = UNetConfig::from_json(&json).unwrap_err().to_string();
            assert!(msg.contains(needle), "{needle} not in: {msg}");
        }
        // diffusers' defaults describe an SD 1.x UNet, which is valid.
        assert!(UNetConfig::from_json(&base()).is_ok());
        let dir = std::env::temp_dir().join(format!("unet-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("config.json");
        std::fs::write(&bad, "{\"in_channels\": \"four\"}").unwrap();
        let msg = UNetConfig::from_file(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("config.json") && msg.contains("in_channels")
                || msg.contains("invalid type"),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
