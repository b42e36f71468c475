//! What the model-wide operations (injection, merging, the state) need of a layer that carries
//! adapters, so that they treat linear layers and convolutions alike.

use std::sync::Arc;

use tch::{Device, Tensor};

use crate::Result;
use crate::adapter::Adapter;
use crate::conv::Conv2d;
use crate::linear::{HasLinears, Linear};
use crate::randomness::Randomness;
use crate::rows::RowAdapter;

/// The shape of an adaptable layer's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerShape {
    pub(crate) in_features: i64,
    pub(crate) out_features: i64,
    /// `[kh, kw]` for a convolution, `None` for a linear layer.
    pub(crate) kernel: Option<[i64; 2]>,
}

impl LayerShape {
    /// A convolution whose kernel is larger than 1×1 (kohya's `conv_dim` applies to these).
    pub(crate) fn is_spatial_conv(&self) -> bool {
        self.kernel.is_some_and(|k| k != [1, 1])
    }

    /// The shapes of `A` and `B` of rank `rank`.
    pub(crate) fn adapter_shapes(&self, rank: i64) -> (Vec<i64>, Vec<i64>) {
        match self.kernel {
            None => (vec![rank, self.in_features], vec![self.out_features, rank]),
            Some([kh, kw]) => (
                vec![rank, self.in_features, kh, kw],
                vec![self.out_features, rank, 1, 1],
            ),
        }
    }

    /// `A`'s fan-in: the inputs each of its outputs reads.
    pub(crate) fn fan_in(&self) -> i64 {
        self.in_features * self.kernel.map_or(1, |[kh, kw]| kh * kw)
    }
}

/// A layer that carries adapters: [`Linear`] or [`Conv2d`].
pub(crate) trait AdaptedLayer {
    fn shape(&self) -> LayerShape;
    fn device(&self) -> Device;
    /// The base weight's value in the compute type.
    fn base_value(&self) -> Tensor;
    /// Stops gradients to the base weight and bias.
    fn freeze_base(&mut self);
    fn adapters(&self) -> &[Adapter];
    fn adapter_mut(&mut self, name: &str) -> Option<&mut Adapter>;
    fn add_adapter(&mut self, module: &str, adapter: Adapter) -> Result<()>;
    fn remove_adapter(&mut self, module: &str, name: &str) -> Result<Adapter>;
    fn set_adapter_enabled(&mut self, module: &str, name: &str, enabled: bool) -> Result<()>;
    fn set_training(&mut self, training: bool);
    fn set_randomness(&mut self, randomness: Option<Arc<dyn Randomness>>);
    fn merge(&mut self, module: &str, names: Option<&[&str]>) -> Result<()>;
    fn unmerge(&mut self, module: &str) -> Result<()>;
    /// The adapters applied to some rows only ([`crate::attach_rows`]), by first row.
    fn row_adapters(&self) -> &[RowAdapter];
    fn row_adapters_mut(&mut self) -> &mut Vec<RowAdapter>;

    fn adapter(&self, name: &str) -> Option<&Adapter> {
        self.adapters().iter().find(|a| a.name == name)
    }
}

fn freeze(weight: &Tensor, bias: Option<&Tensor>) {
    let _ = weight.set_requires_grad(false);
    if let Some(bias) = bias {
        let _ = bias.set_requires_grad(false);
    }
}

impl AdaptedLayer for Linear {
    fn shape(&self) -> LayerShape {
        LayerShape {
            in_features: self.in_features(),
            out_features: self.out_features(),
            kernel: None,
        }
    }
    fn device(&self) -> Device {
        self.weight.device()
    }
    fn base_value(&self) -> Tensor {
        self.base_weight()
    }
    fn freeze_base(&mut self) {
        freeze(&self.weight, self.bias.as_ref());
    }
    fn adapters(&self) -> &[Adapter] {
        Linear::adapters(self)
    }
    fn adapter_mut(&mut self, name: &str) -> Option<&mut Adapter> {
        Linear::adapter_mut(self, name)
    }
    fn add_adapter(&mut self, module: &str, adapter: Adapter) -> Result<()> {
        Linear::add_adapter(self, module, adapter)
    }
    fn remove_adapter(&mut self, module: &str, name: &str) -> Result<Adapter> {
        Linear::remove_adapter(self, module, name)
    }
    fn set_adapter_enabled(&mut self, module: &str, name: &str, enabled: bool) -> Result<()> {
        Linear::set_adapter_enabled(self, module, name, enabled)
    }
    fn set_training(&mut self, training: bool) {
        Linear::set_training(self, training);
    }
    fn set_randomness(&mut self, randomness: Option<Arc<dyn Randomness>>) {
        Linear::set_randomness(self, randomness);
    }
    fn merge(&mut self, module: &str, names: Option<&[&str]>) -> Result<()> {
        Linear::merge(self, module, names)
    }
    fn unmerge(&mut self, module: &str) -> Result<()> {
        Linear::unmerge(self, module)
    }
    fn row_adapters(&self) -> &[RowAdapter] {
        &self.row_adapters
    }
    fn row_adapters_mut(&mut self) -> &mut Vec<RowAdapter> {
        &mut self.row_adapters
    }
}

impl AdaptedLayer for Conv2d {
    fn shape(&self) -> LayerShape {
        LayerShape {
            in_features: self.in_channels(),
            out_features: self.out_channels(),
            kernel: Some(self.kernel_size()),
        }
    }
    fn device(&self) -> Device {
        Conv2d::device(self)
    }
    fn base_value(&self) -> Tensor {
        self.base_weight()
    }
    fn freeze_base(&mut self) {
        freeze(&self.weight, self.bias.as_ref());
    }
    fn adapters(&self) -> &[Adapter] {
        Conv2d::adapters(self)
    }
    fn adapter_mut(&mut self, name: &str) -> Option<&mut Adapter> {
        Conv2d::adapter_mut(self, name)
    }
    fn add_adapter(&mut self, module: &str, adapter: Adapter) -> Result<()> {
        Conv2d::add_adapter(self, module, adapter)
    }
    fn remove_adapter(&mut self, module: &str, name: &str) -> Result<Adapter> {
        Conv2d::remove_adapter(self, module, name)
    }
    fn set_adapter_enabled(&mut self, module: &str, name: &str, enabled: bool) -> Result<()> {
        Conv2d::set_adapter_enabled(self, module, name, enabled)
    }
    fn set_training(&mut self, training: bool) {
        Conv2d::set_training(self, training);
    }
    fn set_randomness(&mut self, randomness: Option<Arc<dyn Randomness>>) {
        Conv2d::set_randomness(self, randomness);
    }
    fn merge(&mut self, module: &str, names: Option<&[&str]>) -> Result<()> {
        Conv2d::merge(self, module, names)
    }
    fn unmerge(&mut self, module: &str) -> Result<()> {
        Conv2d::unmerge(self, module)
    }
    fn row_adapters(&self) -> &[RowAdapter] {
        &self.row_adapters
    }
    fn row_adapters_mut(&mut self) -> &mut Vec<RowAdapter> {
        &mut self.row_adapters
    }
}

/// Calls `f` with every linear layer of `model`, then every convolution, with its path.
pub(crate) fn for_each_layer(
    model: &mut dyn HasLinears,
    f: &mut dyn FnMut(&str, &mut dyn AdaptedLayer),
) {
    model.for_each_linear(&mut |module, linear| f(module, linear));
    model.for_each_conv(&mut |module, conv| f(module, conv));
}
