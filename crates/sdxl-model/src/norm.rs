//! The group norm of the UNet and the VAE, with faster paths on CUDA.
//!
//! **Channels-last maps** (the UNet under [`crate::unet::UNet2DConditionModel::set_channels_last`]):
//! libtorch's CUDA group norm reads NCHW only, so it would copy each map to NCHW and return NCHW,
//! undoing the layout cuDNN's NHWC convolutions want. On CUDA such maps go through
//! [`torch_cuda::group_norm`] (kernels that read and write NHWC, with autograd, SiLU fused where
//! the model applies one: [`GroupNorm::forward_silu`]); where that is unavailable (no NVRTC, an
//! unsupported shape) libtorch's group norm runs instead.
//!
//! **The VAE's inference path**: libtorch's CUDA group norm reduces each (sample, group) with a
//! single thread block. The VAE's decoder normalizes few, huge groups (32 groups of 4 channels × 1024² pixels for a 1024 px tile),
//! so that reduction runs on 32 of the device's blocks and dominates the decode (docs/BENCHMARKS.md,
//! "GPU runs of 2026-12-01, second session", call J, finding 3). Without autograd on CUDA
//! this module takes the statistics with libtorch's general reduction instead (Welford, as the group
//! norm kernel, accumulated in fp32 and spread over the whole device) and applies them with
//! `batch_norm_elemt`, which normalizes in fp32 and writes the input's type. The statistics are
//! rounded to the input's type as libtorch's group norm rounds its own, so the result agrees with it to
//! that rounding. Only for half-precision inputs (bf16, fp16): in fp32 its statistics differ from
//! libtorch's in the last bits (another summation order), and through the full-size random-weight
//! VAE that grew into a visible difference from diffusers (docs/BENCHMARKS.md, "GPU runs of
//! 2026-12-01, third session", call O), so fp32 keeps libtorch's kernel and with it exact parity
//! (call P). With autograd, or on the CPU, libtorch's group norm runs.

use tch::nn::{self, Module};
use tch::{Kind, TchError, Tensor};

/// `torch.nn.GroupNorm` with affine weights (`weight` ones and `bias` zeros until loaded).
#[derive(Debug)]
pub struct GroupNorm {
    /// Per-channel scale, `[channels]`.
    pub weight: Tensor,
    /// Per-channel shift, `[channels]`.
    pub bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    /// Creates `weight` and `bias` under `path`.
    pub fn new(path: nn::Path, groups: i64, channels: i64, eps: f64) -> Self {
        Self {
            weight: path.ones("weight", &[channels]),
            bias: path.zeros("bias", &[channels]),
            groups,
            eps,
        }
    }

    /// The norm followed by SiLU (`silu(group_norm(xs))`), in one pass where the channels-last
    /// kernels run.
    ///
    /// # Shapes
    /// `[batch, channels, ...]` → the same.
    pub fn forward_silu(&self, xs: &Tensor) -> Tensor {
        self.norm(xs, true)
    }

    fn norm(&self, xs: &Tensor, silu: bool) -> Tensor {
        if xs.device().is_cuda() && xs.dim() == 4 && torch_cuda::group_norm::is_channels_last(xs) {
            // Falls back on anything the kernels do not take (no NVRTC, a shape they refuse).
            if let Ok(out) = torch_cuda::group_norm::group_norm(
                xs,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            ) {
                return out;
            }
        }
        let out = self.libtorch_norm(xs);
        if silu { out.silu() } else { out }
    }

    fn libtorch_norm(&self, xs: &Tensor) -> Tensor {
        // Inference: autograd is off (`no_grad`; a VarStore's weights require gradients even then), or
        // nothing here requires a gradient.
        let inference = torch_cuda::grad_enabled() == Some(false)
            || !(xs.requires_grad() || self.weight.requires_grad() || self.bias.requires_grad());
        if inference && xs.device().is_cuda() && matches!(xs.kind(), Kind::BFloat16 | Kind::Half) {
            // Falls back on anything the fast path does not take (e.g. a channel count the groups do
            // not divide, which libtorch's own check then reports).
            if let Ok(out) = group_norm_spread(xs, self.groups, &self.weight, &self.bias, self.eps)
            {
                return out;
            }
        }
        xs.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

impl Module for GroupNorm {
    /// # Shapes
    /// `[batch, channels, ...]` → the same.
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.norm(xs, false)
    }
}

/// Group norm from a device-wide Welford reduction per (sample, group) and `batch_norm_elemt`
/// (CUDA only: libtorch has no CPU kernel for the latter). No autograd.
///
/// # Shapes
/// `xs` `[n, c, ...]`, `weight` and `bias` `[c]` → `[n, c, ...]` in `xs`'s type.
pub fn group_norm_spread(
    xs: &Tensor,
    groups: i64,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor, TchError> {
    let size = xs.size();
    if size.len() < 2 || groups <= 0 || size[1] % groups != 0 {
        return Err(TchError::Shape(format!(
            "group norm of {size:?} in {groups} groups"
        )));
    }
    let (n, c) = (size[0], size[1]);
    let x = xs.f_contiguous()?;
    let (var, mean) =
        x.f_view([n * groups, -1])?
            .f_var_mean_correction(Some(&[1i64][..]), 0, false)?;
    // The statistics in fp32 (after the rounding to the input type that libtorch's group norm also
    // applies), one value per channel of every sample.
    let per_channel = |t: &Tensor| -> Result<Tensor, TchError> {
        t.f_view([n * groups, 1])?
            .f_expand([n * groups, c / groups], false)?
            .f_reshape([n * c])
    };
    let invstd = (var.f_to_kind(Kind::Float)? + eps).f_rsqrt()?;
    let mean = per_channel(&mean.f_to_kind(Kind::Float)?)?;
    let invstd = per_channel(&invstd)?;
    let weight = weight.f_to_kind(Kind::Float)?.f_repeat([n])?;
    let bias = bias.f_to_kind(Kind::Float)?.f_repeat([n])?;
    // One "batch" whose channels are the n·c (sample, channel) pairs.
    x.f_view([1, n * c, -1])?
        .f_batch_norm_elemt(Some(&weight), Some(&bias), &mean, &invstd, eps)?
        .f_view(size.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn the_spread_path_matches_libtorchs_group_norm_on_cuda_and_the_module_falls_back_elsewhere() {
        let device = Device::cuda_if_available();
        let vs = nn::VarStore::new(device);
        let norm = GroupNorm::new(vs.root() / "norm", 4, 8, 1e-6);
        tch::no_grad(|| {
            norm.weight
                .shallow_clone()
                .copy_(&(Tensor::rand([8], (Kind::Float, device)) + 0.5));
            norm.bias
                .shallow_clone()
                .copy_(&Tensor::randn([8], (Kind::Float, device)));
        });
        // Off-centre input, as activations are.
        let x = Tensor::randn([2, 8, 16, 12], (Kind::Float, device)) * 3.0 + 1.5;
        let reference = x.group_norm(4, Some(&norm.weight), Some(&norm.bias), 1e-6, false);
        assert!(
            norm.weight.requires_grad(),
            "VarStore weights are trainable"
        );
        // fp32 always takes libtorch's group norm.
        let out = tch::no_grad(|| norm.forward(&x));
        assert!(
            out.equal(&reference),
            "fp32 must keep libtorch's group norm"
        );
        if device.is_cuda() {
            let spread =
                tch::no_grad(|| group_norm_spread(&x, 4, &norm.weight, &norm.bias, 1e-6)).unwrap();
            assert!((&spread - &reference).abs().max().double_value(&[]) < 1e-5);
            // bf16: within the type's rounding of libtorch's own bf16 group norm.
            let xb = x.to_kind(Kind::BFloat16);
            let (wb, bb) = (
                norm.weight.to_kind(Kind::BFloat16),
                norm.bias.to_kind(Kind::BFloat16),
            );
            // Under no_grad the module takes the spread path for bf16, even with trainable weights.
            let bf16_norm = GroupNorm {
                weight: wb.shallow_clone(),
                bias: bb.shallow_clone(),
                groups: 4,
                eps: 1e-6,
            };
            let module_out = tch::no_grad(|| bf16_norm.forward(&xb));
            let spread_out = tch::no_grad(|| group_norm_spread(&xb, 4, &wb, &bb, 1e-6)).unwrap();
            assert!(
                module_out.equal(&spread_out),
                "the module did not take the spread path under no_grad"
            );
            let native = xb
                .group_norm(4, Some(&wb), Some(&bb), 1e-6, false)
                .to_kind(Kind::Float);
            let spread = group_norm_spread(&xb, 4, &wb, &bb, 1e-6).unwrap();
            assert_eq!(spread.kind(), Kind::BFloat16);
            let scale = native.abs().max().double_value(&[]);
            let diff = (spread.to_kind(Kind::Float) - &native)
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff <= 2e-2 * scale, "bf16: max |Δ| {diff} of {scale}");
        } else {
            assert!(
                group_norm_spread(&x, 4, &norm.weight, &norm.bias, 1e-6).is_err(),
                "no CPU kernel expected"
            );
        }
        // Groups that do not divide the channels: an error, not a panic.
        assert!(group_norm_spread(&x, 3, &norm.weight, &norm.bias, 1e-6).is_err());
    }
}
