//! The UNet's ResNet block and its down/up samplers.
//!
//! Follows diffusers' `models/resnet.py` (`ResnetBlock2D` with the default time-embedding norm),
//! `models/downsampling.py` (`Downsample2D` with a strided convolution) and `models/upsampling.py`
//! (`Upsample2D`: nearest-neighbour interpolation then a convolution).

use tch::Tensor;
use tch::nn::{self, Module};

use lora::{Conv2d, Linear};

use crate::norm::GroupNorm;

/// A 3×3 (or 1×1) convolution created under `path` with the given stride and padding.
pub(crate) fn conv2d(
    path: &nn::Path,
    in_channels: i64,
    out_channels: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
) -> Conv2d {
    Conv2d::new(path, in_channels, out_channels, kernel, stride, padding)
}

/// A group norm with affine parameters created under `path`.
pub(crate) fn group_norm(path: nn::Path, groups: i64, channels: i64, eps: f64) -> GroupNorm {
    GroupNorm::new(path, groups, channels, eps)
}

/// `ResnetBlock2D`: two norm–SiLU–conv stages with the projected time embedding added in between,
/// plus a 1×1 `conv_shortcut` on the residual path when the channel count changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// `time_emb_proj`: the time embedding projected to this block's channels.
    pub(crate) time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// Creates the block's variables under `path`.
    pub fn new(
        path: &nn::Path,
        in_channels: i64,
        out_channels: i64,
        temb_channels: i64,
        groups: i64,
        eps: f64,
    ) -> Self {
        Self {
            norm1: group_norm(path / "norm1", groups, in_channels, eps),
            conv1: conv2d(&(path / "conv1"), in_channels, out_channels, 3, 1, 1),
            time_emb_proj: Linear::new(
                &(path / "time_emb_proj"),
                temb_channels,
                out_channels,
                true,
            ),
            norm2: group_norm(path / "norm2", groups, out_channels, eps),
            conv2: conv2d(&(path / "conv2"), out_channels, out_channels, 3, 1, 1),
            conv_shortcut: (in_channels != out_channels).then(|| {
                conv2d(
                    &(path / "conv_shortcut"),
                    in_channels,
                    out_channels,
                    1,
                    1,
                    0,
                )
            }),
        }
    }

    /// The block's output.
    ///
    /// # Shapes
    /// `xs` `[B, in, H, W]`, `temb` `[B, temb_channels]` → `[B, out, H, W]`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Tensor {
        // One op per statement, so each intermediate is freed once the next exists (the temporaries
        // of a chained expression live until the end of the statement); this matters without autograd.
        // Norm and SiLU in one op where the channels-last kernels run (crate::norm).
        let mut h = self.norm1.forward_silu(xs);
        h = h.apply(&self.conv1);
        let t = self
            .time_emb_proj
            .forward(&temb.silu())
            .unsqueeze(-1)
            .unsqueeze(-1);
        h = &h + &t; // out of place, as before; `+=` would be libtorch's in-place add_
        h = self.norm2.forward_silu(&h);
        h = h.apply(&self.conv2);
        match &self.conv_shortcut {
            Some(conv) => xs.apply(conv) + h,
            None => xs + h,
        }
    }

    /// Calls `f` with `prefix.time_emb_proj`.
    pub fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        f(&format!("{prefix}.time_emb_proj"), &mut self.time_emb_proj);
    }

    /// Calls `f` with `prefix.conv1`, `prefix.conv2` and `prefix.conv_shortcut` (if any).
    pub fn for_each_conv(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        f(&format!("{prefix}.conv1"), &mut self.conv1);
        f(&format!("{prefix}.conv2"), &mut self.conv2);
        if let Some(conv) = &mut self.conv_shortcut {
            f(&format!("{prefix}.conv_shortcut"), conv);
        }
    }
}

/// `Downsample2D`: a 3×3 convolution with stride 2 and padding 1 (`conv`).
#[derive(Debug)]
pub struct Downsample2D {
    /// `conv`.
    pub(crate) conv: Conv2d,
}

impl Downsample2D {
    /// Creates `conv` under `path`.
    pub fn new(path: &nn::Path, channels: i64) -> Self {
        Self {
            conv: conv2d(&(path / "conv"), channels, channels, 3, 2, 1),
        }
    }
}

impl Module for Downsample2D {
    /// # Shapes
    /// `[B, C, H, W]` → `[B, C, ⌈H/2⌉, ⌈W/2⌉]`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.conv)
    }
}

/// `Upsample2D`: nearest-neighbour interpolation, then a 3×3 convolution (`conv`).
#[derive(Debug)]
pub struct Upsample2D {
    /// `conv`.
    pub(crate) conv: Conv2d,
}

impl Upsample2D {
    /// Creates `conv` under `path`.
    pub fn new(path: &nn::Path, channels: i64) -> Self {
        Self {
            conv: conv2d(&(path / "conv"), channels, channels, 3, 1, 1),
        }
    }

    /// Upsamples to `size` (the spatial size of the skip connection this output meets, which is
    /// twice the input size unless the down path rounded an odd size up).
    ///
    /// # Shapes
    /// `[B, C, H, W]` → `[B, C, size[0], size[1]]`.
    pub fn forward(&self, xs: &Tensor, size: [i64; 2]) -> Tensor {
        xs.upsample_nearest2d(size, None, None).apply(&self.conv)
    }
}
