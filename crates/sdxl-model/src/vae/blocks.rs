//! The building blocks of the VAE's encoder and decoder.
//!
//! Follows diffusers `models/resnet.py` (`ResnetBlock2D` without a time embedding, `Downsample2D`,
//! `Upsample2D`), `models/attention_processor.py` (`Attention` as the VAE's mid block uses it: one
//! head over all channels, group norm in front, residual added) and `models/unets/unet_2d_blocks.py`
//! (`DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D`). The UNet's ResNet blocks carry a
//! time embedding; the VAE's never do, so it keeps its own small variant here.

use tch::Tensor;
use tch::nn::{self, Module};

use crate::attention::{AttentionBackend, attention};
use crate::norm::GroupNorm;

/// diffusers builds every VAE norm with this epsilon (`resnet_eps=1e-6`).
const VAE_NORM_EPS: f64 = 1e-6;

fn group_norm(path: nn::Path, groups: i64, channels: i64) -> GroupNorm {
    GroupNorm::new(path, groups, channels, VAE_NORM_EPS)
}

/// SiLU, in place when no gradient flows through `xs` (one full-resolution buffer fewer).
pub(crate) fn silu(mut xs: Tensor) -> Tensor {
    if xs.requires_grad() {
        xs.silu()
    } else {
        xs.silu_()
    }
}

/// A 3×3 convolution with padding 1 (or another kernel/stride/padding), weight and bias named as in torch.
pub(crate) fn conv2d(
    path: nn::Path,
    cin: i64,
    cout: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
) -> nn::Conv2D {
    nn::conv2d(
        path,
        cin,
        cout,
        kernel,
        nn::ConvConfig {
            stride,
            padding,
            ..Default::default()
        },
    )
}

/// diffusers `ResnetBlock2D` with `temb_channels=None`: two norm → SiLU → conv steps and a residual,
/// through a 1×1 `conv_shortcut` when the width changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: nn::Conv2D,
    norm2: GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock2D {
    /// Creates the block's variables under `path`.
    pub fn new(path: &nn::Path, in_channels: i64, out_channels: i64, groups: i64) -> Self {
        Self {
            norm1: group_norm(path / "norm1", groups, in_channels),
            conv1: conv2d(path / "conv1", in_channels, out_channels, 3, 1, 1),
            norm2: group_norm(path / "norm2", groups, out_channels),
            conv2: conv2d(path / "conv2", out_channels, out_channels, 3, 1, 1),
            conv_shortcut: (in_channels != out_channels)
                .then(|| conv2d(path / "conv_shortcut", in_channels, out_channels, 1, 1, 0)),
        }
    }
}

impl Module for ResnetBlock2D {
    /// # Shapes
    /// `[batch, in_channels, h, w]` → `[batch, out_channels, h, w]`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        // One op per statement: the temporaries of a chained expression all live until the end of
        // the statement, which would keep four extra activations of full resolution alive at once.
        let mut hidden = xs.apply(&self.norm1);
        hidden = silu(hidden);
        hidden = hidden.apply(&self.conv1);
        hidden = hidden.apply(&self.norm2);
        hidden = silu(hidden);
        hidden = hidden.apply(&self.conv2);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => xs.apply(conv),
            None => xs.shallow_clone(),
        };
        // output_scale_factor is 1 in every VAE config diffusers writes.
        shortcut + hidden
    }
}

/// The mid block's spatial self-attention: group norm, one head over all channels, output
/// projection, residual. Its linear layers are [`lora::Linear`] under diffusers' names.
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: lora::Linear,
    to_k: lora::Linear,
    to_v: lora::Linear,
    to_out: lora::Linear,
    backend: AttentionBackend,
}

impl VaeAttention {
    /// Creates the variables under `path` (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`).
    pub fn new(path: &nn::Path, channels: i64, groups: i64) -> Self {
        Self {
            group_norm: group_norm(path / "group_norm", groups, channels),
            to_q: lora::Linear::new(&(path / "to_q"), channels, channels, true),
            to_k: lora::Linear::new(&(path / "to_k"), channels, channels, true),
            to_v: lora::Linear::new(&(path / "to_v"), channels, channels, true),
            to_out: lora::Linear::new(&(path / "to_out" / 0), channels, channels, true),
            backend: AttentionBackend::Fused,
        }
    }

    /// Chooses the attention kernels.
    pub fn set_backend(&mut self, backend: AttentionBackend) {
        self.backend = backend;
    }

    /// # Shapes
    /// `[batch, channels, h, w]` → same.
    pub fn forward(&self, xs: &Tensor) -> crate::Result<Tensor> {
        let (batch, channels, height, width) = xs.size4()?;
        // Tokens are pixels: [batch, h·w, channels], normalised per group over all pixels.
        let tokens = xs
            .apply(&self.group_norm)
            .view([batch, channels, height * width])
            .transpose(1, 2);
        let query = tokens.apply(&self.to_q);
        let key = tokens.apply(&self.to_k);
        let value = tokens.apply(&self.to_v);
        let attended = attention(&query, &key, &value, 1, self.backend)?.apply(&self.to_out);
        let attended = attended
            .transpose(1, 2)
            .reshape([batch, channels, height, width]);
        Ok(attended + xs)
    }

    fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut lora::Linear)) {
        f(&format!("{prefix}to_q"), &mut self.to_q);
        f(&format!("{prefix}to_k"), &mut self.to_k);
        f(&format!("{prefix}to_v"), &mut self.to_v);
        f(&format!("{prefix}to_out.0"), &mut self.to_out);
    }
}

/// diffusers `UNetMidBlock2D` as the VAE uses it: resnet, attention (unless disabled by
/// `mid_block_add_attention`), resnet.
#[derive(Debug)]
pub struct UNetMidBlock2D {
    resnets: [ResnetBlock2D; 2],
    attention: Option<VaeAttention>,
}

impl UNetMidBlock2D {
    /// Creates the variables under `path`.
    pub fn new(path: &nn::Path, channels: i64, groups: i64, add_attention: bool) -> Self {
        Self {
            resnets: [
                ResnetBlock2D::new(&(path / "resnets" / 0), channels, channels, groups),
                ResnetBlock2D::new(&(path / "resnets" / 1), channels, channels, groups),
            ],
            attention: add_attention
                .then(|| VaeAttention::new(&(path / "attentions" / 0), channels, groups)),
        }
    }

    /// Chooses the attention kernels.
    pub fn set_backend(&mut self, backend: AttentionBackend) {
        if let Some(attention) = &mut self.attention {
            attention.set_backend(backend);
        }
    }

    /// # Shapes
    /// `[batch, channels, h, w]` → same.
    pub fn forward(&self, xs: &Tensor) -> crate::Result<Tensor> {
        let mut hidden = xs.apply(&self.resnets[0]);
        if let Some(attention) = &self.attention {
            hidden = attention.forward(&hidden)?;
        }
        Ok(hidden.apply(&self.resnets[1]))
    }

    /// Visits the attention's linear layers; `prefix` ends with a dot.
    pub fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut lora::Linear)) {
        if let Some(attention) = &mut self.attention {
            attention.for_each_linear(&format!("{prefix}attentions.0."), f);
        }
    }
}

/// diffusers `DownEncoderBlock2D`: ResNet blocks, then (except at the last level) a stride-2
/// convolution that halves the resolution.
#[derive(Debug)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<nn::Conv2D>,
}

impl DownEncoderBlock2D {
    /// Creates the variables under `path`.
    pub fn new(
        path: &nn::Path,
        in_channels: i64,
        out_channels: i64,
        layers: i64,
        groups: i64,
        downsample: bool,
    ) -> Self {
        let resnets = (0..layers)
            .map(|j| {
                let cin = if j == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(&(path / "resnets" / j), cin, out_channels, groups)
            })
            .collect();
        // `Downsample2D(padding=0)`: the padding is applied asymmetrically in forward instead.
        let downsampler = downsample.then(|| {
            conv2d(
                path / "downsamplers" / 0 / "conv",
                out_channels,
                out_channels,
                3,
                2,
                0,
            )
        });
        Self {
            resnets,
            downsampler,
        }
    }
}

impl Module for DownEncoderBlock2D {
    /// # Shapes
    /// `[batch, in, h, w]` → `[batch, out, h/2, w/2]` (rounded up), or `[batch, out, h, w]` at the last level.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            hidden = hidden.apply(resnet);
        }
        match &self.downsampler {
            // One column right and one row below, as diffusers pads before its unpadded stride-2 conv.
            Some(conv) => hidden.constant_pad_nd([0, 1, 0, 1]).apply(conv),
            None => hidden,
        }
    }
}

/// diffusers `UpDecoderBlock2D`: ResNet blocks, then (except at the last level) nearest 2×
/// upsampling followed by a 3×3 convolution.
#[derive(Debug)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<nn::Conv2D>,
}

impl UpDecoderBlock2D {
    /// Creates the variables under `path`.
    pub fn new(
        path: &nn::Path,
        in_channels: i64,
        out_channels: i64,
        layers: i64,
        groups: i64,
        upsample: bool,
    ) -> Self {
        let resnets = (0..layers)
            .map(|j| {
                let cin = if j == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(&(path / "resnets" / j), cin, out_channels, groups)
            })
            .collect();
        let upsampler = upsample.then(|| {
            conv2d(
                path / "upsamplers" / 0 / "conv",
                out_channels,
                out_channels,
                3,
                1,
                1,
            )
        });
        Self { resnets, upsampler }
    }
}

impl Module for UpDecoderBlock2D {
    /// # Shapes
    /// `[batch, in, h, w]` → `[batch, out, 2h, 2w]`, or `[batch, out, h, w]` at the last level.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            hidden = hidden.apply(resnet);
        }
        match &self.upsampler {
            Some(conv) => hidden
                .upsample_nearest2d_vec(None::<&[i64]>, &[2.0, 2.0][..])
                .apply(conv),
            None => hidden,
        }
    }
}
