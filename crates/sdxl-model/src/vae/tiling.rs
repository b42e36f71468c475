//! Tiled VAE encode and decode: overlapping tiles, each through the whole encoder or decoder, blended
//! linearly across the overlap.
//!
//! Follows diffusers `AutoencoderKL._tiled_encode` / `tiled_decode` and their `blend_v` / `blend_h`
//! exactly (same tile grid, same blend weights, same in-place order), so our tiled output equals
//! diffusers' tiled output, not only the untiled one up to seams.

use tch::{Kind, Tensor};

use super::AutoencoderKL;
use crate::Result;

/// Tile size and overlap of tiled VAE encode/decode.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct VaeTiling {
    /// Tile side in pixels; `None` uses the config's `sample_size` (1024 for SDXL), as diffusers does.
    pub sample_tile: Option<i64>,
    /// Fraction of a tile shared with its neighbour (diffusers: 0.25).
    pub overlap: f64,
}

impl Default for VaeTiling {
    fn default() -> Self {
        Self {
            sample_tile: None,
            overlap: 0.25,
        }
    }
}

impl VaeTiling {
    /// Sets the `sample_tile` field (the tile side in pixels).
    #[must_use]
    pub fn with_sample_tile(mut self, pixels: i64) -> Self {
        self.sample_tile = Some(pixels);
        self
    }

    /// Sets the `overlap` field.
    #[must_use]
    pub fn with_overlap(mut self, overlap: f64) -> Self {
        self.overlap = overlap;
        self
    }

    pub(super) fn validate(&self, config: &super::AutoencoderKLConfig) -> crate::Result<()> {
        if !(0.0..1.0).contains(&self.overlap) {
            return Err(crate::Error::InvalidSetting {
                setting: "VAE tile overlap",
                value: self.overlap.to_string(),
                expected: "a fraction in [0, 1)",
            });
        }
        let factor = config.downscale_factor();
        if let Some(tile) = self.sample_tile.filter(|&t| t <= 0 || t % factor != 0) {
            return Err(crate::Error::InvalidSetting {
                setting: "VAE tile size",
                value: tile.to_string(),
                expected: "a positive multiple of the VAE's downscale factor (8 for SDXL)",
            });
        }
        Ok(())
    }

    pub(super) fn sample_tile(&self, config: &super::AutoencoderKLConfig) -> i64 {
        self.sample_tile
            .unwrap_or_else(|| config.sample_size())
            .max(config.downscale_factor())
    }

    pub(super) fn latent_tile(&self, config: &super::AutoencoderKLConfig) -> i64 {
        self.sample_tile(config) / config.downscale_factor()
    }

    /// Tiled encoder moments.
    ///
    /// # Shapes
    /// `[batch, in_channels, H, W]` → `[batch, 2·latent_channels, H/f, W/f]`.
    pub(super) fn encode(&self, vae: &AutoencoderKL, images: &Tensor) -> Result<Tensor> {
        let input_tile = self.sample_tile(vae.config());
        let output_tile = self.latent_tile(vae.config());
        self.run(images, input_tile, output_tile, |tile| {
            vae.encode_tile(tile)
        })
    }

    /// Tiled decode.
    ///
    /// # Shapes
    /// `[batch, latent_channels, h, w]` → `[batch, out_channels, f·h, f·w]`.
    pub(super) fn decode(&self, vae: &AutoencoderKL, latents: &Tensor) -> Result<Tensor> {
        let input_tile = self.latent_tile(vae.config());
        let output_tile = self.sample_tile(vae.config());
        self.run(latents, input_tile, output_tile, |tile| {
            vae.decode_tile(tile)
        })
    }

    /// Runs `step` on tiles of `input_tile` that start every `input_tile · (1 − overlap)` positions,
    /// blends each output tile into its upper and left neighbours over `output_tile · overlap`
    /// positions and keeps the first `output_tile − blend` rows and columns of each.
    fn run(
        &self,
        xs: &Tensor,
        input_tile: i64,
        output_tile: i64,
        step: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (_, _, height, width) = xs.size4()?;
        // diffusers truncates with int(); the stride is at least one so the loop always advances.
        let stride = ((input_tile as f64 * (1.0 - self.overlap)) as i64).max(1);
        let blend = (output_tile as f64 * self.overlap) as i64;
        let keep = output_tile - blend;
        let starts = |len: i64| (0..len).step_by(stride as usize).collect::<Vec<i64>>();

        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for &top in &starts(height) {
            let mut row = Vec::new();
            for &left in &starts(width) {
                let tile = xs.narrow(2, top, input_tile.min(height - top)).narrow(
                    3,
                    left,
                    input_tile.min(width - left),
                );
                row.push(step(&tile)?);
            }
            rows.push(row);
        }
        // Blend in the order diffusers does: each tile is blended with the already blended tile above
        // and to its left, and replaces itself, so later neighbours see the blended version.
        let mut result_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            for j in 0..rows[i].len() {
                let mut tile = rows[i][j].shallow_clone();
                if i > 0 {
                    tile = blend_edge(&rows[i - 1][j], &tile, blend, 2);
                }
                if j > 0 {
                    tile = blend_edge(&rows[i][j - 1], &tile, blend, 3);
                }
                rows[i][j] = tile;
            }
            let kept: Vec<Tensor> = rows[i]
                .iter()
                .map(|tile| {
                    let (_, _, h, w) = tile.size4()?;
                    Ok(tile.narrow(2, 0, keep.min(h)).narrow(3, 0, keep.min(w)))
                })
                .collect::<Result<_>>()?;
            result_rows.push(Tensor::cat(&kept, 3));
        }
        Ok(Tensor::cat(&result_rows, 2))
    }
}

/// `b` with its first `extent` positions along `dim` faded in from the last `extent` of `a`:
/// `a[-extent + k] · (1 − k/extent) + b[k] · k/extent` (diffusers `blend_v` for dim 2, `blend_h` for 3).
fn blend_edge(a: &Tensor, b: &Tensor, extent: i64, dim: i64) -> Tensor {
    let extent = extent
        .min(a.size()[dim as usize])
        .min(b.size()[dim as usize]);
    if extent <= 0 {
        return b.shallow_clone();
    }
    // Weights are rounded from f64, as Python's float factors are, so the blend matches bit for bit.
    let mut shape = vec![1i64; 4];
    shape[dim as usize] = extent;
    let ramp = Tensor::arange(extent, (Kind::Double, b.device())) / extent as f64;
    let weight_b = ramp.to_kind(b.kind()).view(shape.as_slice());
    let weight_a = (ramp.ones_like() - &ramp)
        .to_kind(b.kind())
        .view(shape.as_slice());
    let a_edge = a.narrow(dim, a.size()[dim as usize] - extent, extent);
    let b_len = b.size()[dim as usize];
    let faded = a_edge * weight_a + b.narrow(dim, 0, extent) * weight_b;
    Tensor::cat(&[faded, b.narrow(dim, extent, b_len - extent)], dim)
}
