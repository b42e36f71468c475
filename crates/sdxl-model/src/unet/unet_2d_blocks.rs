//! The UNet's down, mid and up blocks.
//!
//! Follows diffusers' `models/unets/unet_2d_blocks.py`: `DownBlock2D` / `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn` and `UpBlock2D` / `CrossAttnUpBlock2D`. The plain and cross-attention
//! variants differ only in whether a [`Transformer2DModel`] follows each ResNet block, so each pair is one
//! struct with its kind; the blocks hold the layers and their channel bookkeeping, and the UNet's forward
//! pass walks them (see `unet_2d_condition.rs`) so that every layer can be a checkpoint segment.

use tch::nn;

use lora::{Conv2d, Linear};

use super::config::{DownBlockKind, UNetConfig, UpBlockKind};
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use super::transformer_2d::{Transformer2DModel, TransformerSpec};

fn transformer_spec(
    config: &UNetConfig,
    channels: i64,
    heads: i64,
    layers: i64,
) -> TransformerSpec {
    TransformerSpec {
        channels,
        heads,
        layers,
        cross_attention_dim: config.cross_attention_dim,
        groups: config.norm_num_groups,
        norm_eps: config.norm_eps,
        use_linear_projection: config.use_linear_projection,
    }
}

/// `DownBlock2D` or `CrossAttnDownBlock2D` at level `index`.
#[derive(Debug)]
pub struct DownBlock {
    /// Plain or cross-attention.
    pub kind: DownBlockKind,
    /// `resnets`.
    pub(crate) resnets: Vec<ResnetBlock2D>,
    /// `attentions`, one per ResNet block (empty for `DownBlock2D`).
    pub(crate) attentions: Vec<Transformer2DModel>,
    /// `downsamplers.0`, on every level but the deepest.
    pub(crate) downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Creates down block `index` of `config` under `path` (`down_blocks.{index}`).
    pub fn new(path: &nn::Path, config: &UNetConfig, index: usize) -> Self {
        let level = config.levels[index];
        let in_channels = if index == 0 {
            level.channels
        } else {
            config.levels[index - 1].channels
        };
        let resnets = (0..config.layers_per_block)
            .map(|j| {
                let input = if j == 0 { in_channels } else { level.channels };
                ResnetBlock2D::new(
                    &(path / "resnets" / j),
                    input,
                    level.channels,
                    config.time_embed_dim(),
                    config.norm_num_groups,
                    config.norm_eps,
                )
            })
            .collect();
        let attentions = match level.down {
            DownBlockKind::Plain => Vec::new(),
            DownBlockKind::CrossAttn => (0..config.layers_per_block)
                .map(|j| {
                    Transformer2DModel::new(
                        &(path / "attentions" / j),
                        transformer_spec(
                            config,
                            level.channels,
                            level.heads,
                            level.down_transformer_layers,
                        ),
                    )
                })
                .collect(),
        };
        let is_deepest = index + 1 == config.levels.len();
        let downsampler =
            (!is_deepest).then(|| Downsample2D::new(&(path / "downsamplers" / 0), level.channels));
        Self {
            kind: level.down,
            resnets,
            attentions,
            downsampler,
        }
    }

    /// Calls `f` with every linear layer, paths under `prefix`.
    pub fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (j, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.for_each_linear(&format!("{prefix}.resnets.{j}"), f);
        }
        for (j, attention) in self.attentions.iter_mut().enumerate() {
            attention.for_each_linear(&format!("{prefix}.attentions.{j}"), f);
        }
    }
    /// Calls `f` with every convolution, paths under `prefix`.
    pub fn for_each_conv(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        for (j, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.for_each_conv(&format!("{prefix}.resnets.{j}"), f);
        }
        for (j, attention) in self.attentions.iter_mut().enumerate() {
            attention.for_each_conv(&format!("{prefix}.attentions.{j}"), f);
        }
        if let Some(sampler) = &mut self.downsampler {
            f(&format!("{prefix}.downsamplers.0.conv"), &mut sampler.conv);
        }
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, transformer, ResNet at the deepest level.
#[derive(Debug)]
pub struct MidBlock {
    /// `resnets.0` and `resnets.1`.
    pub(crate) resnets: [ResnetBlock2D; 2],
    /// `attentions.0`.
    pub(crate) attention: Transformer2DModel,
}

impl MidBlock {
    /// Creates the mid block of `config` under `path` (`mid_block`).
    pub fn new(path: &nn::Path, config: &UNetConfig) -> Self {
        let deepest = config.levels[config.levels.len() - 1];
        let c = deepest.channels;
        let resnet = |j: i64| {
            ResnetBlock2D::new(
                &(path / "resnets" / j),
                c,
                c,
                config.time_embed_dim(),
                config.norm_num_groups,
                config.norm_eps,
            )
        };
        Self {
            resnets: [resnet(0), resnet(1)],
            attention: Transformer2DModel::new(
                &(path / "attentions" / 0),
                transformer_spec(config, c, deepest.heads, config.mid_transformer_layers),
            ),
        }
    }

    /// Calls `f` with every linear layer, paths under `prefix`.
    pub fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.resnets[0].for_each_linear(&format!("{prefix}.resnets.0"), f);
        self.attention
            .for_each_linear(&format!("{prefix}.attentions.0"), f);
        self.resnets[1].for_each_linear(&format!("{prefix}.resnets.1"), f);
    }

    /// Calls `f` with every convolution, paths under `prefix`.
    pub fn for_each_conv(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        self.resnets[0].for_each_conv(&format!("{prefix}.resnets.0"), f);
        self.attention
            .for_each_conv(&format!("{prefix}.attentions.0"), f);
        self.resnets[1].for_each_conv(&format!("{prefix}.resnets.1"), f);
    }
}

/// `UpBlock2D` or `CrossAttnUpBlock2D`; up block `index` works at level `levels - 1 - index`.
#[derive(Debug)]
pub struct UpBlock {
    /// Plain or cross-attention.
    pub kind: UpBlockKind,
    /// `resnets`: one more than a down block has, each taking one skip connection.
    pub(crate) resnets: Vec<ResnetBlock2D>,
    /// `attentions`, one per ResNet block (empty for `UpBlock2D`).
    pub(crate) attentions: Vec<Transformer2DModel>,
    /// `upsamplers.0`, on every up block but the last.
    pub(crate) upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// Creates up block `index` of `config` under `path` (`up_blocks.{index}`).
    pub fn new(path: &nn::Path, config: &UNetConfig, index: usize) -> Self {
        let levels = config.levels.len();
        let level = config.levels[levels - 1 - index];
        let out_channels = level.channels;
        // Channels arriving from the block below (the mid block for the first up block).
        let prev_out_channels = config.levels[levels - index.max(1)].channels;
        // The last skip connection of this block comes from one level higher up.
        let skip_in_channels = config.levels[(levels - 1 - index).saturating_sub(1)].channels;
        let layers = config.layers_per_block + 1;
        let resnets = (0..layers)
            .map(|j| {
                let skip = if j == layers - 1 {
                    skip_in_channels
                } else {
                    out_channels
                };
                let input = if j == 0 {
                    prev_out_channels
                } else {
                    out_channels
                };
                ResnetBlock2D::new(
                    &(path / "resnets" / j),
                    input + skip,
                    out_channels,
                    config.time_embed_dim(),
                    config.norm_num_groups,
                    config.norm_eps,
                )
            })
            .collect();
        let kind = config.up_blocks[index];
        let attentions = match kind {
            UpBlockKind::Plain => Vec::new(),
            UpBlockKind::CrossAttn => (0..layers)
                .map(|j| {
                    Transformer2DModel::new(
                        &(path / "attentions" / j),
                        transformer_spec(
                            config,
                            out_channels,
                            level.heads,
                            config.up_transformer_layers[index],
                        ),
                    )
                })
                .collect(),
        };
        let is_last = index + 1 == levels;
        let upsampler =
            (!is_last).then(|| Upsample2D::new(&(path / "upsamplers" / 0), out_channels));
        Self {
            kind,
            resnets,
            attentions,
            upsampler,
        }
    }

    /// Calls `f` with every linear layer, paths under `prefix`.
    pub fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (j, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.for_each_linear(&format!("{prefix}.resnets.{j}"), f);
        }
        for (j, attention) in self.attentions.iter_mut().enumerate() {
            attention.for_each_linear(&format!("{prefix}.attentions.{j}"), f);
        }
    }
    /// Calls `f` with every convolution, paths under `prefix`.
    pub fn for_each_conv(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        for (j, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.for_each_conv(&format!("{prefix}.resnets.{j}"), f);
        }
        for (j, attention) in self.attentions.iter_mut().enumerate() {
            attention.for_each_conv(&format!("{prefix}.attentions.{j}"), f);
        }
        if let Some(sampler) = &mut self.upsampler {
            f(&format!("{prefix}.upsamplers.0.conv"), &mut sampler.conv);
        }
    }
}
