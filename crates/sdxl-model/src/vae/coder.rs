//! The VAE's encoder (image → latent moments) and decoder (latents → image).
//!
//! Follows diffusers `models/autoencoders/vae.py` (`Encoder`, `Decoder`) with the SDXL choices fixed:
//! SiLU activations, `DownEncoderBlock2D` / `UpDecoderBlock2D` levels, a mid block with attention,
//! `double_z` (the encoder outputs mean and log-variance).

use tch::Tensor;
use tch::nn;

use super::AutoencoderKLConfig;
use super::blocks::{DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D, conv2d, silu};
use crate::attention::AttentionBackend;
use crate::norm::GroupNorm;

fn norm_out(path: nn::Path, groups: i64, channels: i64) -> GroupNorm {
    GroupNorm::new(path, groups, channels, 1e-6)
}

/// diffusers `Encoder`: `conv_in`, one `DownEncoderBlock2D` per level, the mid block, then norm, SiLU
/// and `conv_out` to `2 × latent_channels` moments.
#[derive(Debug)]
pub struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    /// Creates the variables under `path` (`encoder` in a diffusers file).
    pub fn new(path: &nn::Path, config: &AutoencoderKLConfig) -> Self {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let last = channels.len() - 1;
        let down_blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let cin = if i == 0 { channels[0] } else { channels[i - 1] };
                DownEncoderBlock2D::new(
                    &(path / "down_blocks" / i),
                    cin,
                    out,
                    config.layers_per_block,
                    groups,
                    i != last,
                )
            })
            .collect();
        Self {
            conv_in: conv2d(path / "conv_in", config.in_channels, channels[0], 3, 1, 1),
            down_blocks,
            mid_block: UNetMidBlock2D::new(
                &(path / "mid_block"),
                channels[last],
                groups,
                config.mid_block_add_attention,
            ),
            conv_norm_out: norm_out(path / "conv_norm_out", groups, channels[last]),
            conv_out: conv2d(
                path / "conv_out",
                channels[last],
                2 * config.latent_channels,
                3,
                1,
                1,
            ),
        }
    }

    pub(super) fn mid_block_mut(&mut self) -> &mut UNetMidBlock2D {
        &mut self.mid_block
    }

    pub(super) fn kind(&self) -> tch::Kind {
        self.conv_in.ws.kind()
    }

    pub(super) fn set_backend(&mut self, backend: AttentionBackend) {
        self.mid_block.set_backend(backend);
    }

    /// # Shapes
    /// `[batch, in_channels, h, w]` → `[batch, 2·latent_channels, h/f, w/f]` with `f = 2^(levels−1)`.
    pub fn forward(&self, images: &Tensor) -> crate::Result<Tensor> {
        let mut hidden = images.apply(&self.conv_in);
        for block in &self.down_blocks {
            hidden = hidden.apply(block);
        }
        hidden = self.mid_block.forward(&hidden)?;
        Ok(output_stage(hidden, &self.conv_norm_out, &self.conv_out))
    }
}

/// diffusers `Decoder`: `conv_in`, the mid block, one `UpDecoderBlock2D` per level (widths reversed,
/// `layers_per_block + 1` ResNet blocks each), then norm, SiLU and `conv_out`.
#[derive(Debug)]
pub struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    /// Creates the variables under `path` (`decoder` in a diffusers file).
    pub fn new(path: &nn::Path, config: &AutoencoderKLConfig) -> Self {
        let reversed: Vec<i64> = config.block_out_channels.iter().rev().copied().collect();
        let groups = config.norm_num_groups;
        let last = reversed.len() - 1;
        let up_blocks = reversed
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let cin = if i == 0 { reversed[0] } else { reversed[i - 1] };
                UpDecoderBlock2D::new(
                    &(path / "up_blocks" / i),
                    cin,
                    out,
                    config.layers_per_block + 1,
                    groups,
                    i != last,
                )
            })
            .collect();
        Self {
            conv_in: conv2d(
                path / "conv_in",
                config.latent_channels,
                reversed[0],
                3,
                1,
                1,
            ),
            mid_block: UNetMidBlock2D::new(
                &(path / "mid_block"),
                reversed[0],
                groups,
                config.mid_block_add_attention,
            ),
            up_blocks,
            conv_norm_out: norm_out(path / "conv_norm_out", groups, reversed[last]),
            conv_out: conv2d(
                path / "conv_out",
                reversed[last],
                config.out_channels,
                3,
                1,
                1,
            ),
        }
    }

    pub(super) fn mid_block_mut(&mut self) -> &mut UNetMidBlock2D {
        &mut self.mid_block
    }

    pub(super) fn set_backend(&mut self, backend: AttentionBackend) {
        self.mid_block.set_backend(backend);
    }

    /// # Shapes
    /// `[batch, latent_channels, h, w]` → `[batch, out_channels, h·f, w·f]` with `f = 2^(levels−1)`.
    pub fn forward(&self, latents: &Tensor) -> crate::Result<Tensor> {
        let mut hidden = latents.apply(&self.conv_in);
        hidden = self.mid_block.forward(&hidden)?;
        for block in &self.up_blocks {
            hidden = hidden.apply(block);
        }
        Ok(output_stage(hidden, &self.conv_norm_out, &self.conv_out))
    }
}

/// `conv_out(silu(conv_norm_out(x)))`, one op per statement so that each full-resolution
/// intermediate is freed as soon as the next one exists.
fn output_stage(hidden: Tensor, norm: &GroupNorm, conv: &nn::Conv2D) -> Tensor {
    let mut hidden = hidden.apply(norm);
    hidden = silu(hidden);
    hidden.apply(conv)
}
