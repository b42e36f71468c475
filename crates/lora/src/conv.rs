//! A 2-D convolution that can carry LoRA adapters (LoCon).
//!
//! Follows peft's `lora.Conv2d` (`peft/tuners/lora/layer.py`) and kohya's `LoRAModule` on a
//! `Conv2d` (`networks/lora.py` of sd-scripts): `A` (`lora_A` / `lora_down`) is a convolution with the
//! base layer's kernel size, stride and padding from `in` to `r` channels, `B` (`lora_B` /
//! `lora_up`) a 1×1 convolution from `r` to `out` channels, and the layer computes
//! `base(x) + scale · B(A(dropout(x)))`. Merging folds `scale · B ⊗ A` (`[out, in, kh, kw]`) into the
//! base kernel. `docs/LORA.md` lists which convolutions of the UNet kohya adapts.
//!
//! DoRA follows peft's `_DoraConvNdLayer` (`peft/tuners/lora/dora.py`): one magnitude per output
//! channel, the norm taken over input channels and kernel taps.

use std::sync::Arc;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::adapter::Adapter;
use crate::fp8::tensor_bytes;
use crate::linear::{Fp8Weight, MergeRecord};
use crate::randomness::Randomness;
use crate::rows::{RowAdapter, apply_row_adapters};
use crate::{Error, Result};

/// `torch.nn.Conv2d` with a square kernel, dilation 1 and one group (weight `[out, in, k, k]`,
/// optional bias `[out]`), plus any number of LoRA adapters (peft's `lora.Conv2d`).
///
/// The variables are created under the given path as `weight` and `bias`, so a model's variable
/// names equal the keys of a diffusers safetensors file. A frozen base weight can be stored in fp8
/// ([`Conv2d::quantize_fp8`]), as [`crate::Linear`]'s.
#[derive(Debug)]
pub struct Conv2d {
    /// The base kernel `[out, in, k, k]` as stored (`float8_e4m3fn` after [`Conv2d::quantize_fp8`]).
    /// Private, as [`crate::Linear`]'s.
    pub(crate) weight: Tensor,
    /// The base bias, `[out]`.
    pub(crate) bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    adapters: Vec<Adapter>,
    /// What each merge did, newest last.
    merges: Vec<MergeRecord>,
    training: bool,
    /// Where dropout draws its masks (libtorch's default generator when `None`).
    randomness: Option<Arc<dyn Randomness>>,
    fp8: Option<Fp8Weight>,
    /// Adapters applied to some rows of the input only ([`crate::attach_rows`]), by first row.
    pub(crate) row_adapters: Vec<RowAdapter>,
}

impl Conv2d {
    /// A `kernel × kernel` convolution created under `path` with PyTorch's default initialisation
    /// (loading weights overwrites it).
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
        Self::from_tensors(conv.ws, conv.bs, stride, padding)
    }

    /// Wraps existing tensors (weight `[out, in, kh, kw]`, bias `[out]`) without adapters.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>, stride: i64, padding: i64) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
            adapters: Vec::new(),
            merges: Vec::new(),
            training: false,
            randomness: None,
            fp8: None,
            row_adapters: Vec::new(),
        }
    }

    /// The base kernel `[out, in, k, k]` as stored (`float8_e4m3fn` after
    /// [`Conv2d::quantize_fp8`]; [`Conv2d::base_weight`] gives its value then). It shares its
    /// storage with the variable store's `weight`: load weights through the store.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The base bias `[out]`, if the convolution has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The input channels.
    pub fn in_channels(&self) -> i64 {
        self.weight.size()[1]
    }

    /// The output channels.
    pub fn out_channels(&self) -> i64 {
        self.weight.size()[0]
    }

    /// The kernel's height and width.
    pub fn kernel_size(&self) -> [i64; 2] {
        let size = self.weight.size();
        [size[2], size[3]]
    }

    /// Whether the kernel is 1×1 (kohya gives such convolutions the linear layers' rank).
    pub fn is_pointwise(&self) -> bool {
        self.kernel_size() == [1, 1]
    }

    /// The stride.
    pub fn stride(&self) -> i64 {
        self.stride
    }

    /// The zero padding on each side.
    pub fn padding(&self) -> i64 {
        self.padding
    }

    /// The type the layer computes in: the kernel's element type, or for an fp8 kernel the type it
    /// is widened to.
    pub fn kind(&self) -> Kind {
        self.fp8
            .as_ref()
            .map_or_else(|| self.weight.kind(), |fp8| fp8.compute_kind)
    }

    /// The device of the base kernel.
    pub fn device(&self) -> Device {
        self.weight.device()
    }

    /// Whether the base kernel is stored in fp8.
    pub fn is_fp8(&self) -> bool {
        self.fp8.is_some()
    }

    /// The base kernel's value in the compute type (the tensor itself, or an fp8 kernel widened).
    /// Graph-capturable.
    pub fn base_weight(&self) -> Tensor {
        match &self.fp8 {
            None => self.weight.shallow_clone(),
            Some(fp8) => self.weight.to_kind(fp8.compute_kind) * &fp8.scale,
        }
    }

    /// The bytes the base kernel occupies (with its fp8 scale), bias excluded.
    pub fn base_weight_bytes(&self) -> i64 {
        tensor_bytes(&self.weight) + self.fp8.as_ref().map_or(0, |fp8| tensor_bytes(&fp8.scale))
    }

    /// Stores the base kernel as `float8_e4m3fn` with one fp32 scale, widened to `compute_kind`
    /// (default: its current type) in every forward, exactly as [`crate::Linear::quantize_fp8`]
    /// (same refusals: merged adapters, a non-float compute type; merging afterwards is refused).
    ///
    /// # Errors
    /// [`Error::QuantizeMerged`], [`Error::InvalidConfig`], libtorch errors.
    pub fn quantize_fp8(&mut self, module: &str, compute_kind: Option<Kind>) -> Result<()> {
        if self.fp8.is_none() {
            self.fp8 = Some(Fp8Weight::quantize(
                &mut self.weight,
                self.bias.as_mut(),
                !self.merges.is_empty(),
                module,
                compute_kind,
            )?);
        }
        Ok(())
    }

    /// Lays the base kernel out channels-last (`[out, in, kh, kw]` with NHWC strides, PyTorch's
    /// `weight.to(memory_format=torch.channels_last)`) or back to contiguous, in place: the variable
    /// store's tensor follows (the same tensor), values and shape are unchanged, and later loads and
    /// merges keep the layout. cuDNN then runs NHWC kernels for channels-last inputs without
    /// converting the kernel in every call.
    pub fn set_channels_last(&mut self, channels_last: bool) {
        let target = if channels_last {
            self.weight
                .permute([0, 2, 3, 1])
                .contiguous()
                .permute([0, 3, 1, 2])
        } else {
            self.weight.contiguous()
        };
        tch::no_grad(|| self.weight.set_data(&target));
    }

    /// The adapters, in the order they were added.
    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    /// The adapter called `name`, if any.
    pub fn adapter(&self, name: &str) -> Option<&Adapter> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// The adapter called `name` for changing its multiplier or dropout, if any.
    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut Adapter> {
        self.adapters.iter_mut().find(|a| a.name == name)
    }

    /// Attaches `adapter` after checking that its kernels fit: `A` `[r, in, kh, kw]` with this
    /// layer's kernel size, `B` `[out, r, 1, 1]`, a DoRA magnitude `[out]`. `module` names the layer
    /// in errors.
    ///
    /// # Errors
    /// [`Error::DuplicateAdapter`], [`Error::ShapeMismatch`].
    pub fn add_adapter(&mut self, module: &str, adapter: Adapter) -> Result<()> {
        if self.adapter(&adapter.name).is_some() {
            return Err(Error::DuplicateAdapter {
                module: module.to_owned(),
                adapter: adapter.name,
            });
        }
        let (down, up) = (adapter.down.size(), adapter.up.size());
        let [kh, kw] = self.kernel_size();
        let (in_channels, out_channels) = (self.in_channels(), self.out_channels());
        let fits = down.len() == 4
            && up.len() == 4
            && down[0] > 0
            && down[1..] == [in_channels, kh, kw]
            && up == [out_channels, down[0], 1, 1];
        if !fits {
            return Err(Error::ShapeMismatch {
                module: module.to_owned(),
                reason: format!(
                    "down {down:?} and up {up:?} do not fit a {kh}×{kw} convolution of \
                     {in_channels} → {out_channels} channels (need [r, {in_channels}, {kh}, {kw}] \
                     and [{out_channels}, r, 1, 1])"
                ),
            });
        }
        if let Some(magnitude) = &adapter.magnitude
            && magnitude.size() != [out_channels]
        {
            return Err(Error::ShapeMismatch {
                module: module.to_owned(),
                reason: format!(
                    "DoRA magnitude {:?} is not [{out_channels}]",
                    magnitude.size()
                ),
            });
        }
        self.adapters.push(adapter);
        Ok(())
    }

    fn index_of(&self, module: &str, name: &str) -> Result<usize> {
        self.adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::UnknownAdapter {
                module: module.to_owned(),
                adapter: name.to_owned(),
            })
    }

    /// Detaches and returns the adapter `name`, unmerging everything first if it is merged.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when there is none of that name.
    pub fn remove_adapter(&mut self, module: &str, name: &str) -> Result<Adapter> {
        let index = self.index_of(module, name)?;
        if self.adapters[index].merged {
            self.unmerge(module)?;
        }
        Ok(self.adapters.remove(index))
    }

    /// Switches adapter `name` on or off; switching off a merged adapter unmerges the layer first.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when there is none of that name.
    pub fn set_adapter_enabled(&mut self, module: &str, name: &str, enabled: bool) -> Result<()> {
        let index = self.index_of(module, name)?;
        if !enabled && self.adapters[index].merged {
            self.unmerge(module)?;
        }
        self.adapters[index].enabled = enabled;
        Ok(())
    }

    /// Training mode applies the adapters' dropout.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Where the adapters' dropout draws its masks: `randomness`, or libtorch's default generator
    /// (`None`, the default). See [`crate::set_randomness`].
    pub fn set_randomness(&mut self, randomness: Option<Arc<dyn Randomness>>) {
        self.randomness = randomness;
    }

    /// Folds the enabled, not yet merged adapters (all, or those named) into the base kernel,
    /// `W ← W + scale · B ⊗ A` (DoRA: `m / ‖W + ΔW‖ · (W + ΔW)` per output channel), computed in
    /// fp32 and stored in the kernel's type. Not for the training step: it reads back whether the
    /// result is finite.
    ///
    /// # Errors
    /// [`Error::NonFiniteMerge`] (kernel untouched), [`Error::UnknownAdapter`],
    /// [`Error::Fp8BaseWeight`].
    pub fn merge(&mut self, module: &str, names: Option<&[&str]>) -> Result<()> {
        if self.fp8.is_some() {
            return Err(Error::Fp8BaseWeight {
                module: module.to_owned(),
                operation: "merging an adapter",
            });
        }
        let indices: Vec<usize> = match names {
            Some(names) => names
                .iter()
                .map(|name| self.index_of(module, name))
                .collect::<Result<_>>()?,
            None => (0..self.adapters.len()).collect(),
        };
        for index in indices {
            let adapter = &self.adapters[index];
            if adapter.merged || !adapter.enabled {
                continue;
            }
            let delta = adapter.delta_weight_f32();
            let weight = self.weight.to_kind(Kind::Float);
            let (merged, dora_factor) = match &adapter.magnitude {
                None => (&weight + &delta, None),
                Some(magnitude) => {
                    // The norm is that of the kernel without any adapter merged, as in forward.
                    let norm = adapter.dora_weight_norm(&self.unmerged_weight_f32(), &delta);
                    let factor = (magnitude.to_kind(Kind::Float) / norm).view([-1, 1, 1, 1]);
                    ((&weight + &delta) * &factor, Some(factor))
                }
            };
            if merged.isfinite().all().f_int64_value(&[])? == 0 {
                return Err(Error::NonFiniteMerge {
                    module: module.to_owned(),
                    adapter: adapter.name.clone(),
                });
            }
            tch::no_grad(|| self.weight.f_copy_(&merged))?;
            self.adapters[index].merged = true;
            self.merges.push(MergeRecord {
                adapter: index,
                delta,
                dora_factor,
            });
        }
        Ok(())
    }

    /// Undoes every merge, newest first (up to fp32 rounding of the deltas).
    ///
    /// # Errors
    /// [`Error::Fp8BaseWeight`] when the kernel is stored in fp8, libtorch errors.
    pub fn unmerge(&mut self, module: &str) -> Result<()> {
        if self.fp8.is_some() {
            return Err(Error::Fp8BaseWeight {
                module: module.to_owned(),
                operation: "unmerging",
            });
        }
        while let Some(record) = self.merges.pop() {
            let restored = undo(&self.weight.to_kind(Kind::Float), &record);
            tch::no_grad(|| self.weight.f_copy_(&restored))?;
            self.adapters[record.adapter].merged = false;
        }
        Ok(())
    }

    /// The base kernel with every merge undone, in fp32 (the kernel itself is not changed).
    fn unmerged_weight_f32(&self) -> Tensor {
        let mut weight = self.weight.to_kind(Kind::Float);
        for record in self.merges.iter().rev() {
            weight = undo(&weight, record);
        }
        weight
    }

    fn conv(&self, xs: &Tensor, kernel: &Tensor, bias: Option<&Tensor>) -> Tensor {
        xs.conv2d(kernel, bias, [self.stride], [self.padding], [1], 1)
    }
}

fn undo(weight: &Tensor, record: &MergeRecord) -> Tensor {
    match &record.dora_factor {
        None => weight - &record.delta,
        Some(factor) => weight / factor - &record.delta,
    }
}

impl Module for Conv2d {
    /// `base(x) + Σ scale · B(A(dropout(x)))` over enabled, unmerged adapters (DoRA: peft's
    /// `_DoraConvNdLayer.forward`). An adapter computes in its own type (fp32), or in its
    /// [`compute_kind`](crate::Adapter::compute_kind) as peft under autocast (not DoRA); the sum is
    /// returned in the base output's type.
    ///
    /// # Shapes
    /// `[B, in, H, W]` → `[B, out, H', W']`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let result = self.forward_all_rows(xs);
        if self.row_adapters.is_empty() {
            return result;
        }
        apply_row_adapters(result, xs, &self.row_adapters, |result, xs, adapter| {
            let kind = adapter.compute_kind.unwrap_or_else(|| adapter.kind());
            let lora = self.plain_lora(&xs.to_kind(kind), adapter, kind);
            let scale = adapter.scale();
            if scale == 1.0 {
                lora + result
            } else {
                lora * scale + result
            }
        })
    }
}

impl Conv2d {
    /// `B(A(x))` of a plain LoRA adapter, unscaled, computed in `kind` (`x` already in it).
    fn plain_lora(&self, x: &Tensor, adapter: &Adapter, kind: Kind) -> Tensor {
        let hidden = self.conv(x, &adapter.down.to_kind(kind), None);
        hidden.conv2d::<Tensor>(&adapter.up.to_kind(kind), None, [1], [0], [1], 1)
    }

    /// The forward pass of the base kernel and the ordinary adapters, over every row.
    fn forward_all_rows(&self, xs: &Tensor) -> Tensor {
        let weight = self.base_weight();
        let base = self.conv(xs, &weight, self.bias.as_ref());
        let result_kind = base.kind();
        let mut result = base;
        for adapter in self.adapters.iter().filter(|a| a.enabled && !a.merged) {
            let autocast = adapter.compute_kind.filter(|_| adapter.magnitude.is_none());
            let kind = autocast.unwrap_or_else(|| adapter.kind());
            let x = xs.to_kind(kind);
            let dropout_active = self.training && adapter.dropout > 0.0;
            let dropped = if dropout_active {
                match &self.randomness {
                    Some(randomness) => randomness.dropout(&x, adapter.dropout),
                    None => x.dropout(adapter.dropout, true),
                }
            } else {
                x
            };
            let lora = self.plain_lora(&dropped, adapter, kind);
            let scale = adapter.scale();
            result = match &adapter.magnitude {
                // Out of place, so a bf16 base output is promoted to fp32 for the sum, as in peft.
                None if scale == 1.0 => lora + &result,
                None => lora * scale + &result,
                Some(magnitude) => {
                    let weight = weight.to_kind(kind);
                    let delta = adapter.delta_weight_f32().to_kind(kind).detach();
                    let norm = adapter.dora_weight_norm(&weight, &delta);
                    let magnitude_scale = (magnitude / norm).view([1, -1, 1, 1]);
                    // Without dropout the base output is reused (minus its bias); with dropout the
                    // base path is recomputed on the dropped input, as in peft.
                    let base_result = if dropout_active {
                        self.conv(&dropped, &weight, None)
                    } else {
                        match &self.bias {
                            Some(bias) => &result - bias.view([1, -1, 1, 1]),
                            None => result.shallow_clone(),
                        }
                    };
                    &result
                        + (&magnitude_scale - 1.0) * base_result
                        + magnitude_scale * lora * scale
                }
            };
        }
        result.to_kind(result_kind)
    }
}

#[cfg(test)]
#[path = "conv/tests.rs"]
mod tests;
