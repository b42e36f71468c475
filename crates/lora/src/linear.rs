//! A linear layer that can carry adapters.
//!
//! Every linear layer of the models in this workspace is a [`Linear`], so LoRA/DoRA adapters can be
//! attached to any of them by module path. Models expose their linear layers through
//! [`HasLinears`]; injection, merging and the file formats work on that alone and know nothing of
//! the model they adapt.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// `y = x Wᵀ + b`, the equivalent of `torch.nn.Linear` (weight `[out, in]`, optional bias `[out]`).
///
/// The variables are created under the given path as `weight` and `bias`, so a model's variable
/// names equal the keys of a diffusers / transformers safetensors file.
#[derive(Debug)]
pub struct Linear {
    /// The base weight, `[out_features, in_features]`.
    pub weight: Tensor,
    /// The base bias, `[out_features]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Creates the variables `weight` (and `bias`) under `path`, initialised as PyTorch does
    /// (uniform in ±1/√in); loading weights overwrites them.
    pub fn new(path: &nn::Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let weight = path.var("weight", &[out_features, in_features], nn::Init::Uniform { lo: -bound, up: bound });
        let bias = bias.then(|| path.var("bias", &[out_features], nn::Init::Uniform { lo: -bound, up: bound }));
        Self { weight, bias }
    }

    /// The input width.
    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    /// The output width.
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// The element type of the base weight (the type the layer computes in).
    pub fn kind(&self) -> Kind {
        self.weight.kind()
    }
}

impl Module for Linear {
    /// # Shapes
    /// `[..., in_features]` → `[..., out_features]`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, self.bias.as_ref())
    }
}

/// A module tree that lets callers visit its linear layers by module path.
///
/// Paths are the dotted attribute paths of the reference implementation relative to the model's
/// root (e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` in a diffusers UNet),
/// i.e. the safetensors key of the layer's weight without the trailing `.weight`.
pub trait HasLinears {
    /// Calls `f` once for every linear layer, in a fixed order, with its path.
    fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn computes_x_wt_plus_b_with_torch_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let layer = Linear::new(&(vs.root() / "to_out" / 0), 3, 2, true);
        let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
        assert_eq!(names, ["to_out.0.bias", "to_out.0.weight"].map(String::from).into());
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3]);
        let expected = x.matmul(&layer.weight.tr()) + layer.bias.as_ref().unwrap();
        assert!(layer.forward(&x).allclose(&expected, 1e-6, 1e-6, false));
        assert_eq!((layer.in_features(), layer.out_features()), (3, 2));
    }
}
