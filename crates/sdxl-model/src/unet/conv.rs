//! The UNet's 2-D convolution, `torch.nn.Conv2d` (diffusers' `nn.Conv2d` layers: `conv_in`,
//! `conv1`/`conv2`/`conv_shortcut` of the ResNet blocks, the samplers' `conv`, `conv_out`), with the
//! option to store its frozen weight in fp8.
//!
//! The fp8 storage is the linear layers' ([`lora::fp8`]): `float8_e4m3fn` with one fp32 scale per
//! tensor, widened to the compute type just before the convolution.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::Result;

/// A convolution with weight `[out, in, k, k]` and bias `[out]`, named `weight` / `bias` under its
/// path as in PyTorch.
#[derive(Debug)]
pub struct Conv2d {
    /// The weight as stored (`float8_e4m3fn` after [`Conv2d::quantize_fp8`]).
    pub weight: Tensor,
    /// The bias, `[out]`.
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    /// `(scale, compute kind)` when the weight is stored in fp8.
    fp8: Option<(Tensor, Kind)>,
}

impl Conv2d {
    /// A `kernel × kernel` convolution created under `path` (PyTorch's default initialisation;
    /// loading weights overwrites it).
    pub fn new(
        path: &nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Self {
        let conv = nn::conv2d(
            path,
            in_channels,
            out_channels,
            kernel,
            nn::ConvConfig {
                stride,
                padding,
                ..Default::default()
            },
        );
        Self {
            weight: conv.ws,
            bias: conv.bs,
            stride,
            padding,
            fp8: None,
        }
    }

    /// Whether the weight is stored in fp8.
    pub fn is_fp8(&self) -> bool {
        self.fp8.is_some()
    }

    /// The bytes the weight occupies (with its fp8 scale), bias excluded.
    pub fn weight_bytes(&self) -> i64 {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        bytes(&self.weight) + self.fp8.as_ref().map_or(0, |(scale, _)| bytes(scale))
    }

    /// Stores the weight as `float8_e4m3fn` with one fp32 scale, computed in its current type. The
    /// weight tensor's data is replaced in place, so its variable store frees the full-precision
    /// bytes; the weight stops requiring gradients. Already fp8: nothing happens.
    ///
    /// # Errors
    /// Only libtorch errors.
    pub fn quantize_fp8(&mut self) -> Result<()> {
        if self.fp8.is_some() {
            return Ok(());
        }
        let compute_kind = self.weight.kind();
        let (quantized, scale) = lora::fp8::quantize_e4m3(&self.weight)?;
        let _ = self.weight.f_requires_grad_(false)?;
        self.weight.set_data(&quantized);
        self.fp8 = Some((scale, compute_kind));
        Ok(())
    }
}

impl Module for Conv2d {
    /// # Shapes
    /// `[B, in, H, W]` → `[B, out, H', W']`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let widened;
        let weight = match &self.fp8 {
            None => &self.weight,
            Some((scale, kind)) => {
                widened = self.weight.to_kind(*kind) * scale;
                &widened
            }
        };
        xs.conv2d(
            weight,
            self.bias.as_ref(),
            [self.stride],
            [self.padding],
            [1],
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn fp8_convolution_frees_the_store_and_stays_close() {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut conv = Conv2d::new(&(vs.root() / "conv1"), 8, 16, 3, 2, 1);
        let reference = nn::conv2d(
            &(vs.root() / "ref"),
            8,
            16,
            3,
            nn::ConvConfig {
                stride: 2,
                padding: 1,
                ..Default::default()
            },
        );
        tch::no_grad(|| {
            reference.ws.shallow_clone().copy_(&conv.weight);
            reference
                .bs
                .as_ref()
                .unwrap()
                .shallow_clone()
                .copy_(conv.bias.as_ref().unwrap());
        });
        let x = Tensor::randn([2, 8, 9, 7], (Kind::Float, Device::Cpu));
        let expected = x.apply(&reference);
        assert!(x.apply(&conv).allclose(&expected, 1e-5, 1e-6, false));
        conv.quantize_fp8().unwrap();
        assert_eq!(vs.variables()["conv1.weight"].kind(), Kind::Float8e4m3fn);
        assert_eq!(conv.weight_bytes(), 16 * 8 * 9 + 4);
        let y = x.apply(&conv);
        assert_eq!(y.size(), [2, 16, 5, 4]);
        let error = (&y - &expected).norm().double_value(&[]) / expected.norm().double_value(&[]);
        assert!(error > 0.0 && error < 0.04, "{error}");
    }
}
