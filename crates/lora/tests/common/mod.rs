//! A generic module tree for the lora tests, and the fixtures made by peft / diffusers for it.

#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity
)]

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use test_support::{fixtures_dir, max_rel_error as rel_error};

use lora::format::BlockRenames;
use lora::{Component, HasLinears, Linear};
use tch::Tensor;
use tch::nn::Module;

/// Linear layers at diffusers-like module paths, applied in order with tanh in between: the Rust
/// twin of `LoraMirror` in tools/fixtures/generate.py.
pub struct Tree {
    pub layers: Vec<(String, Linear)>,
}

impl HasLinears for Tree {
    fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (path, layer) in &mut self.layers {
            f(path, layer);
        }
    }
}

impl Tree {
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = xs.shallow_clone();
        for (n, (_, layer)) in self.layers.iter().enumerate() {
            h = layer.forward(&h);
            if n + 1 < self.layers.len() {
                h = h.tanh();
            }
        }
        h
    }
}

/// A file of `tests/fixtures/lora`, which must exist: a missing one fails the test naming it.
pub fn lora_fixture(name: &str) -> PathBuf {
    let path = fixtures_dir().join("lora").join(name);
    assert!(
        path.exists(),
        "missing fixture {}: regenerate it with `tools/fixtures/regenerate.sh --only lora` \
         (see tools/fixtures/README.md)",
        path.display()
    );
    path
}

pub fn component_named(name: &str) -> Component {
    Component::ALL
        .into_iter()
        .find(|c| c.diffusers_prefix() == name)
        .unwrap()
}

/// The mirror fixture: the three trees with their base weights, and every other tensor by key
/// (`input.<component>`, `base_output.<component>`, `expected_<lora>.<component>`).
pub fn mirror() -> (BTreeMap<Component, Tree>, BTreeMap<String, Tensor>) {
    let tensors: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(lora_fixture("mirror.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    // base.<component>.<index>.<path>.<weight|bias>
    let mut layers: BTreeMap<(Component, String), (String, Option<Tensor>, Option<Tensor>)> =
        BTreeMap::new();
    for (key, tensor) in &tensors {
        let Some(rest) = key.strip_prefix("base.") else {
            continue;
        };
        let (component, rest) = rest.split_once('.').unwrap();
        let (index, rest) = rest.split_once('.').unwrap();
        let (path, leaf) = rest.rsplit_once('.').unwrap();
        let entry = layers
            .entry((component_named(component), index.to_owned()))
            .or_insert_with(|| (path.to_owned(), None, None));
        match leaf {
            "weight" => entry.1 = Some(tensor.copy()),
            "bias" => entry.2 = Some(tensor.copy()),
            other => panic!("unexpected {other}"),
        }
    }
    let mut trees: BTreeMap<Component, Tree> = BTreeMap::new();
    for ((component, _), (path, weight, bias)) in layers {
        trees
            .entry(component)
            .or_insert_with(|| Tree { layers: Vec::new() })
            .layers
            .push((path, Linear::from_tensors(weight.unwrap(), bias)));
    }
    (trees, tensors)
}

/// The SGM names of the mirror's UNet blocks (what sdxl-model lends for the real UNet).
pub fn sgm_renames() -> BlockRenames {
    BlockRenames::new(
        [
            ("down_blocks.1.attentions.0", "input_blocks.4.1"),
            ("mid_block.attentions.0", "middle_block.1"),
            ("up_blocks.0.attentions.1", "output_blocks.1.1"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned())),
    )
}

/// `max |a - b|`.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// The depth (`test_support::depth`) of a forward pass through `tree` with adapters: per layer the
/// base product (`in` terms and the bias), the LoRA path (the down-projection of `in` terms, the
/// up-projection of at most `in` terms, the scale, the sum; DoRA's weight norm of `in` terms and
/// its rescaling) and the tanh.
pub fn tree_depth(tree: &Tree) -> f64 {
    use test_support::depth;
    tree.layers
        .iter()
        .map(|(_, layer)| {
            let inputs = layer.weight().size()[1];
            depth::linear(inputs)
                + 2.0 * depth::sum(inputs)
                + 2.0
                + depth::sum(inputs)
                + 2.0
                + depth::ACTIVATION
        })
        .sum()
}
