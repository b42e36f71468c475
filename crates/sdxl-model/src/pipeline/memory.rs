//! What generating images of a given size costs in memory, estimated from the options and the
//! models' configs before any tensor of that size is made, so that an absurd `width × height` is
//! refused with the estimate in the error rather than failing inside libtorch's allocator.
//!
//! The estimate is a lower bound of the peak: the largest tensors that must coexist, not everything
//! the allocator holds. The UNet keeps at least two activations of its first block (input and
//! output of a ResNet: `block_out_channels[0]` channels at the latent size) for every row of its
//! batch (doubled by classifier-free guidance); the VAE decoder two activations of its widest block at
//! the full image size (`block_out_channels[1]` channels, the up block before the last), on one
//! tile when tiling is on; and the decoded images as fp32 and bytes.

use tch::Kind;

use super::GenerateOptions;
use crate::vae::AutoencoderKLConfig;
use crate::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// Estimates above this many bytes are refused: 192 GiB, the memory of the largest single
/// accelerator sold today (and more than a workstation's RAM).
pub const MAX_GENERATION_BYTES: f64 = 192.0 * GIB;

/// Estimates above this many bytes are worth a warning (hours of work at SDXL's speed, and more
/// memory than most GPUs have).
pub const LARGE_GENERATION_BYTES: f64 = 16.0 * GIB;

/// A lower bound of the memory one generation call needs, in bytes by part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationMemory {
    /// The latents and the UNet's first-block activations.
    pub unet: f64,
    /// The VAE decoder's widest activations (one tile's with tiling) and the decoded images.
    pub vae: f64,
    /// Images × pixels, for the message.
    pub pixels: f64,
}

impl GenerationMemory {
    /// The estimate for `options`: a UNet whose first block has `unet_channels` channels computing
    /// in `kind`, a VAE of `vae` decoding in `vae_kind`, `tile` pixels per side when tiling.
    pub fn estimate(
        options: &GenerateOptions,
        unet_channels: i64,
        (vae, vae_kind): (&AutoencoderKLConfig, Kind),
        kind: Kind,
        tile: Option<i64>,
    ) -> Self {
        // f64 throughout: sizes come from the user and may overflow any integer product.
        let images = options.prompts.len().max(1) as f64 * options.images_per_prompt.max(1) as f64;
        let (height, width) = (options.height.max(0) as f64, options.width.max(0) as f64);
        let factor = vae.downscale_factor() as f64;
        let latent_pixels = (height / factor) * (width / factor);
        let rows = if options.guidance_scale > 1.0 {
            2.0 * images
        } else {
            images
        };
        let elt = kind.elt_size_in_bytes() as f64;
        let unet = images * 4.0 * latent_pixels * 4.0
            + rows * 2.0 * unet_channels as f64 * latent_pixels * elt;
        let widest = vae.block_out_channels.get(1).copied().unwrap_or(1) as f64;
        let decoded_pixels = match tile {
            Some(side) => (side as f64 * side as f64).min(height * width),
            None => height * width,
        };
        let images_bytes = images * height * width * 3.0 * (4.0 + 1.0);
        let vae_bytes =
            images * 2.0 * widest * decoded_pixels * vae_kind.elt_size_in_bytes() as f64
                + images_bytes;
        Self {
            unet,
            vae: vae_bytes,
            pixels: images * height * width,
        }
    }

    /// The total, in bytes.
    pub fn bytes(&self) -> f64 {
        self.unet + self.vae
    }

    /// The total, in GiB.
    pub fn gib(&self) -> f64 {
        self.bytes() / GIB
    }

    /// Refuses an estimate above [`MAX_GENERATION_BYTES`].
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for `width × height`, with the estimate.
    pub fn check(&self, options: &GenerateOptions) -> Result<()> {
        if self.bytes() > MAX_GENERATION_BYTES || !self.bytes().is_finite() {
            return Err(Error::InvalidSetting {
                setting: "width × height",
                value: format!(
                    "{}×{} ({:.3e} GiB at the least: UNet {:.3e}, VAE decode {:.3e})",
                    options.width,
                    options.height,
                    self.gib(),
                    self.unet / GIB,
                    self.vae / GIB
                ),
                expected: "a size whose generation fits in 192 GiB (VAE tiling lowers the decode's share)",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(side: i64) -> GenerateOptions {
        GenerateOptions {
            prompts: vec!["a fox".into()],
            width: side,
            height: side,
            ..GenerateOptions::default()
        }
    }

    #[test]
    fn sdxl_sizes_from_native_to_absurd() {
        let vae = AutoencoderKLConfig::sdxl();
        let estimate = |side, tile| {
            GenerationMemory::estimate(
                &options(side),
                320,
                (&vae, Kind::Float),
                Kind::BFloat16,
                tile,
            )
        };
        // 1024²: 2 rows × 2 × 320 × 128² bf16 = 40 MiB in the UNet; 2 × 256 × 1024² fp32 = 2 GiB
        // in the VAE, plus the image.
        let native = estimate(1024, None);
        let expected_vae = 2.0 * 256.0 * 1024.0 * 1024.0 * 4.0 + 1024.0 * 1024.0 * 15.0;
        assert_eq!(native.vae, expected_vae);
        native.check(&options(1024)).unwrap();
        assert!(native.bytes() < LARGE_GENERATION_BYTES);
        // 8192² passes, but is worth a warning; tiling bounds the decode's activations.
        let huge = estimate(8192, None);
        huge.check(&options(8192)).unwrap();
        assert!(huge.bytes() > LARGE_GENERATION_BYTES);
        assert!(estimate(8192, Some(1024)).vae < huge.vae / 10.0);
        for side in [100_000, 10_000_000, i64::MAX / 2] {
            let message = estimate(side, None)
                .check(&options(side))
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with(&format!("width × height: `{side}×{side} (")),
                "{message}"
            );
        }
    }
}
