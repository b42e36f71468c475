//! LoRA on convolutions (LoCon), rsLoRA and adapter dropout against peft (tests/fixtures/lora,
//! `gen_locon` of tools/fixtures/generate.py): the forward passes, the files diffusers writes for
//! convolution adapters, our own files in every layout, merging and injection with kohya's conv rank.

#![allow(clippy::unwrap_used, clippy::panic, clippy::type_complexity)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{Tree, lora_fixture, max_abs_diff, rel_error};
use lora::format::{self, BlockRenames, Format, ModuleNames, ReadOptions, WriteOptions};
use lora::{Adapter, Component, Conv2d, HasLinears, Linear, LoraConfig, LoraState, Scaling};
use tch::nn::{self, Module};
use tch::{Device, Tensor};
use test_support::{check, depth, f32_bound};

/// A generator of its own (`torch.Generator().manual_seed(seed)`) as the adapters' randomness:
/// the masks peft draws after `torch.manual_seed(seed)`, whatever other test threads draw from
/// libtorch's default generator meanwhile.
#[derive(Debug)]
struct Seeded(torch_cuda::rng::Generator);

impl lora::Randomness for Seeded {
    fn uniform(
        &self,
        shape: &[i64],
        lo: f64,
        hi: f64,
        kind: tch::Kind,
        _device: Device,
    ) -> lora::Result<Tensor> {
        self.0
            .uniform(shape, lo, hi, kind)
            .map_err(|e| lora::Error::Randomness(e.to_string()))
    }
    fn randn(&self, shape: &[i64], kind: tch::Kind, _device: Device) -> lora::Result<Tensor> {
        self.0
            .randn_on_device(shape, kind)
            .map_err(|e| lora::Error::Randomness(e.to_string()))
    }
    fn dropout(&self, xs: &Tensor, p: f64) -> Tensor {
        self.0.dropout(xs, p).unwrap()
    }
}

fn seeded(seed: u64) -> Option<Arc<dyn lora::Randomness>> {
    Some(Arc::new(Seeded(
        torch_cuda::rng::Generator::new(seed).unwrap(),
    )))
}

/// Convolutions at diffusers module paths, applied in order with tanh in between: the Rust twin of
/// `ConvMirror` in tools/fixtures/generate.py.
struct ConvTree {
    layers: Vec<(String, Conv2d)>,
}

impl HasLinears for ConvTree {
    fn for_each_linear(&mut self, _: &mut dyn FnMut(&str, &mut Linear)) {}
    fn for_each_conv(&mut self, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        for (path, layer) in &mut self.layers {
            f(path, layer);
        }
    }
}

impl ConvTree {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = xs.shallow_clone();
        for (n, (_, layer)) in self.layers.iter().enumerate() {
            h = layer.forward(&h);
            if n + 1 < self.layers.len() {
                h = h.tanh();
            }
        }
        h
    }

    /// Per layer: the base convolution (`in·k²` terms and the bias), the adapter's two
    /// convolutions (`in·k²` and `r ≤ in·k²` terms), the scale, the sum, and the tanh; for DoRA also
    /// the kernel's row norm (`in·k²` terms) and the rescaling.
    fn depth(&self) -> f64 {
        self.layers
            .iter()
            .map(|(_, conv)| {
                let [k, _] = conv.kernel_size();
                let terms = conv.in_channels() * k * k;
                2.0 * depth::conv(conv.in_channels(), k)
                    + 2.0 * depth::sum(terms)
                    + 7.0
                    + depth::ACTIVATION
            })
            .sum()
    }

    fn remove(&mut self, name: &str) {
        for (path, layer) in &mut self.layers {
            if layer.adapter(name).is_some() {
                layer.remove_adapter(path, name).unwrap();
            }
        }
    }
}

struct Fixture {
    conv: ConvTree,
    linear: Tree,
    tensors: BTreeMap<String, Tensor>,
}

/// `(stride, padding)` of each convolution of the fixture, from the file's `conv_layers` header.
fn strides() -> BTreeMap<String, (i64, i64)> {
    let bytes = std::fs::read(lora_fixture("locon.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let layers: Vec<(String, i64, i64, i64, i64, i64)> =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["conv_layers"]).unwrap();
    layers
        .into_iter()
        .map(|(path, _, _, _, stride, padding)| (path, (stride, padding)))
        .collect()
}

fn fixture() -> Fixture {
    let tensors: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(lora_fixture("locon.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let strides = strides();
    // base.<tree>.<index>.<path>.<weight|bias>, in index order.
    let mut layers: BTreeMap<(String, String), (String, Option<Tensor>, Option<Tensor>)> =
        BTreeMap::new();
    for (key, tensor) in &tensors {
        let Some(rest) = key.strip_prefix("base.") else {
            continue;
        };
        let (tree, rest) = rest.split_once('.').unwrap();
        let (index, rest) = rest.split_once('.').unwrap();
        let (path, leaf) = rest.rsplit_once('.').unwrap();
        let entry = layers
            .entry((tree.to_owned(), index.to_owned()))
            .or_insert_with(|| (path.to_owned(), None, None));
        match leaf {
            "weight" => entry.1 = Some(tensor.copy()),
            _ => entry.2 = Some(tensor.copy()),
        }
    }
    let (mut conv, mut linear) = (ConvTree { layers: vec![] }, Tree { layers: vec![] });
    for ((tree, _), (path, weight, bias)) in layers {
        let weight = weight.unwrap();
        if tree == "conv" {
            let (stride, padding) = strides[&path];
            conv.layers
                .push((path, Conv2d::from_tensors(weight, bias, stride, padding)));
        } else {
            linear
                .layers
                .push((path, Linear::from_tensors(weight, bias)));
        }
    }
    assert_eq!((conv.layers.len(), linear.layers.len()), (5, 2));
    Fixture {
        conv,
        linear,
        tensors,
    }
}

/// The adapter `kind` of the fixture (peft's state-dict tensors) as a [`LoraState`] of the UNet.
fn peft_state(
    tensors: &BTreeMap<String, Tensor>,
    kind: &str,
    alpha: impl Fn(&str) -> f64,
) -> LoraState {
    let prefix = format!("adapter_{kind}.");
    let mut state = LoraState::new();
    for (key, down) in tensors {
        let Some(module) = key
            .strip_prefix(&prefix)
            .and_then(|k| k.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let up = &tensors[&format!("{prefix}{module}.lora_B.weight")];
        // peft keeps a convolution's DoRA magnitude as `[1, out, 1, 1]`.
        let magnitude = tensors
            .get(&format!("{prefix}{module}.lora_magnitude_vector"))
            .map(|m| m.reshape([-1]));
        state.modules.insert(
            (Component::Unet, module.to_owned()),
            lora::ModuleLora {
                down: down.copy(),
                up: up.copy(),
                alpha: alpha(module),
                scaling: Scaling::Standard,
                magnitude,
            },
        );
    }
    assert!(!state.modules.is_empty(), "no adapter_{kind} tensors");
    state
}

/// Applies `state` with adapter dropout `dropout` (training mode when it is not 0) and compares the
/// output under `torch.manual_seed(1234)` (here a generator of its own seeded with 1234) with
/// `golden`.
fn check_conv(fx: &mut Fixture, state: &LoraState, golden: &str, dropout: f64) -> f64 {
    state
        .apply(&mut fx.conv, Component::Unet, "test", false)
        .unwrap();
    for (_, layer) in &mut fx.conv.layers {
        if let Some(adapter) = layer.adapter_mut("test") {
            adapter.dropout = dropout;
        }
    }
    lora::set_training(&mut fx.conv, dropout > 0.0);
    lora::set_randomness(&mut fx.conv, seeded(1234));
    let output = fx.conv.forward(&fx.tensors["input.conv"]);
    let expected = &fx.tensors[golden];
    let error = rel_error(&output, expected);
    check(
        &format!("LoCon {golden} vs peft"),
        error,
        f32_bound(fx.conv.depth()),
    );
    assert!(rel_error(&fx.tensors["base_output.conv"], expected) > 1e-3);
    lora::set_training(&mut fx.conv, false);
    fx.conv.remove("test");
    error
}

#[test]
fn locon_file_written_by_diffusers_gives_peft_outputs() {
    let mut fx = fixture();
    let mut names = ModuleNames::new();
    names.add_model(Component::Unet, &mut fx.conv);
    let options = ReadOptions::default()
        .with_module_names(Some(&names))
        .with_block_renames(None);
    let file = format::read(lora_fixture("locon-peft.safetensors"), options).unwrap();
    assert_eq!(file.format, Format::Peft);
    let shortcut = &file.state.modules[&(
        Component::Unet,
        "down_blocks.0.resnets.0.conv_shortcut".to_owned(),
    )];
    assert_eq!((shortcut.rank(), shortcut.alpha), (2, 1.5));
    assert_eq!(shortcut.down.size(), [2, 6, 1, 1]);
    assert!(file.state.modules.values().all(|m| m.is_conv()));
    // The same tensors as peft's state dict.
    let direct = peft_state(&fx.tensors, "locon", |m| {
        if m.ends_with("conv_shortcut") {
            1.5
        } else {
            6.0
        }
    });
    for (key, module) in &direct.modules {
        assert!(module.down.equal(&file.state.modules[key].down), "{key:?}");
    }
    let error = check_conv(&mut fx, &file.state, "expected_locon", 0.0);
    println!("LoCon (peft file): relative error {error:e}");
}

#[test]
fn rslora_on_convolutions_gives_peft_outputs() {
    let mut fx = fixture();
    let mut state = peft_state(&fx.tensors, "rslora", |_| 3.0);
    for module in state.modules.values_mut() {
        module.scaling = Scaling::RankStabilized;
    }
    assert_eq!(state.modules.len(), 2);
    let error = check_conv(&mut fx, &state, "expected_rslora", 0.0);
    println!("rsLoRA LoCon: relative error {error:e}");
}

#[test]
fn conv_dropout_draws_peft_masks_under_the_same_seed() {
    let mut fx = fixture();
    let state = peft_state(&fx.tensors, "dropout", |_| 2.0);
    // The dropout is the adapters', not the file's: set it after applying.
    let error_eval = check_conv(&mut fx, &state, "expected_dropout_eval", 0.0);
    state
        .apply(&mut fx.conv, Component::Unet, "test", false)
        .unwrap();
    for (_, layer) in &mut fx.conv.layers {
        layer.adapter_mut("test").unwrap().dropout = 0.3;
    }
    lora::set_training(&mut fx.conv, true);
    lora::set_randomness(&mut fx.conv, seeded(1234));
    let output = fx.conv.forward(&fx.tensors["input.conv"]);
    let error = rel_error(&output, &fx.tensors["expected_dropout"]);
    check("LoCon dropout vs peft", error, f32_bound(fx.conv.depth()));
    // The masks matter: the training output is far from the evaluation output.
    assert!(rel_error(&output, &fx.tensors["expected_dropout_eval"]) > 1e-2);
    println!("LoCon dropout: {error:e} (eval {error_eval:e})");
}

#[test]
fn linear_dropout_draws_peft_masks_under_the_same_seed() {
    let mut fx = fixture();
    let tensors = &fx.tensors;
    for (path, layer) in &mut fx.linear.layers {
        let key = |part: &str| format!("adapter_linear_dropout.{path}.{part}.weight");
        let mut adapter = Adapter::new(
            "test",
            tensors[&key("lora_A")].copy(),
            tensors[&key("lora_B")].copy(),
            4.0,
        );
        adapter.dropout = 0.4;
        layer.add_adapter(path, adapter).unwrap();
    }
    let bound = f32_bound(common::tree_depth(&fx.linear));
    let input = &tensors["input.linear"];
    check(
        "linear LoRA, evaluation",
        rel_error(
            &fx.linear.forward(input),
            &tensors["expected_linear_dropout_eval"],
        ),
        bound,
    );
    lora::set_training(&mut fx.linear, true);
    lora::set_randomness(&mut fx.linear, seeded(1234));
    let output = fx.linear.forward(input);
    check(
        "linear LoRA dropout vs peft",
        rel_error(&output, &tensors["expected_linear_dropout"]),
        bound,
    );
    assert!(rel_error(&output, &tensors["expected_linear_dropout_eval"]) > 1e-2);
}

#[test]
fn kohya_file_by_diffusers_places_conv_kernels_and_our_files_round_trip() {
    let mut fx = fixture();
    let mut names = ModuleNames::new();
    names.add_model(Component::Unet, &mut fx.conv);
    // kohya's SGM spelling of two of the layers (what sdxl-model lends for the real UNet).
    let renames = BlockRenames::new(
        [
            (
                "down_blocks.0.resnets.0.conv1",
                "input_blocks.1.0.in_layers.2",
            ),
            ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned())),
    );
    let options = ReadOptions::default()
        .with_module_names(Some(&names))
        .with_block_renames(Some(&renames));
    let file = format::read(
        lora_fixture("locon-kohya-by-diffusers.safetensors"),
        options,
    )
    .unwrap();
    assert_eq!(file.format, Format::Kohya);
    assert_eq!(file.state.modules.len(), 5);
    check_conv(&mut fx, &file.state, "expected_dropout_eval", 0.0);

    let dir = std::env::temp_dir().join(format!("locon-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let peft = format::read(lora_fixture("locon-peft.safetensors"), options)
        .unwrap()
        .state;
    let sgm = WriteOptions::default().with_block_renames(Some(&renames));
    for (format, write_options, label) in [
        (Format::Diffusers, WriteOptions::default(), "diffusers"),
        (Format::Peft, WriteOptions::default(), "peft"),
        (Format::Kohya, sgm, "kohya-sgm"),
    ] {
        let path = dir.join(format!("locon-{label}.safetensors"));
        format::write(&path, &peft, format, &write_options).unwrap();
        let back = format::read(&path, options).unwrap();
        assert_eq!(back.format, format);
        for (key, module) in &peft.modules {
            let other = &back.state.modules[key];
            assert!(
                module.down.equal(&other.down) && module.up.equal(&other.up),
                "{label} {key:?}"
            );
            assert_eq!(module.alpha, other.alpha, "{label} {key:?}");
        }
        if label == "kohya-sgm" {
            let keys: Vec<String> = Tensor::read_safetensors(&path)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            for key in [
                "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",
                "lora_unet_input_blocks_3_0_op.alpha",
                "lora_unet_down_blocks_0_resnets_0_conv_shortcut.lora_up.weight",
            ] {
                assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
            }
        }
        check_conv(&mut fx, &back.state, "expected_locon", 0.0);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merged_locon_equals_the_side_path_and_unmerges() {
    let mut fx = fixture();
    let state = peft_state(&fx.tensors, "locon", |m| {
        if m.ends_with("conv_shortcut") {
            1.5
        } else {
            6.0
        }
    });
    state
        .apply(&mut fx.conv, Component::Unet, "a", false)
        .unwrap();
    let originals: Vec<Tensor> = fx
        .conv
        .layers
        .iter()
        .map(|(_, l)| l.weight().copy())
        .collect();
    let input = &fx.tensors["input.conv"];
    let side_path = fx.conv.forward(input);
    lora::merge(&mut fx.conv, None).unwrap();
    assert!(
        fx.conv
            .layers
            .iter()
            .all(|(_, l)| l.adapter("a").unwrap().is_merged())
    );
    let merged_max: Vec<f64> = fx
        .conv
        .layers
        .iter()
        .map(|(_, l)| l.weight().abs().max().double_value(&[]))
        .collect();
    check(
        "LoCon merged vs side path",
        rel_error(&fx.conv.forward(input), &side_path),
        f32_bound(fx.conv.depth()),
    );
    lora::unmerge(&mut fx.conv).unwrap();
    for (((path, layer), original), merged) in
        fx.conv.layers.iter().zip(&originals).zip(&merged_max)
    {
        // W + Δ − Δ with Δ a sum of r products: r + 2 roundings of the larger of the two kernels.
        let scale = original.abs().max().double_value(&[]).max(*merged);
        let diff = max_abs_diff(layer.weight(), original);
        assert!(
            diff <= f32_bound(5.0) * scale,
            "{path}: unmerge left {diff:e}"
        );
    }
}

#[test]
fn injection_gives_spatial_convolutions_the_conv_rank_and_refuses_dora() {
    let mut fx = fixture();
    let before = fx.conv.forward(&fx.tensors["input.conv"]);
    let store = nn::VarStore::new(Device::Cpu);
    let mut config = LoraConfig::with_targets(4, &lora::UNET_RESNET_TARGETS);
    config.alpha = 1.0;
    config.conv_rank = Some(2);
    config.init = lora::Init::KaimingUniform;
    let report = lora::inject(&mut fx.conv, &store.root(), "default", &config).unwrap();
    let adapted: Vec<(&str, i64, f64)> = report
        .adapted
        .iter()
        .map(|(p, r, a)| (p.as_str(), *r, *a))
        .collect();
    assert_eq!(
        adapted,
        vec![
            ("down_blocks.0.resnets.0.conv1", 2, 2.0),
            ("down_blocks.0.resnets.0.conv2", 2, 2.0),
            // 1×1: the linear layers' rank and alpha, as in kohya.
            ("down_blocks.0.resnets.0.conv_shortcut", 4, 1.0),
            ("down_blocks.0.downsamplers.0.conv", 2, 2.0),
            ("up_blocks.0.upsamplers.0.conv", 2, 2.0),
        ]
    );
    assert_eq!(report.unmatched_targets, vec!["time_emb_proj".to_owned()]);
    let variables = store.variables();
    assert_eq!(
        variables["down_blocks.0.downsamplers.0.conv.lora_A.weight"].size(),
        [2, 5, 3, 3]
    );
    assert_eq!(
        variables["down_blocks.0.downsamplers.0.conv.lora_B.weight"].size(),
        [5, 2, 1, 1]
    );
    // kohya's init: A uniform in ±1/√(in·k²), B zero, so the model starts at the base output.
    let a = &variables["down_blocks.0.resnets.0.conv1.lora_A.weight"];
    assert!(a.abs().max().double_value(&[]) <= 1.0 / (4.0f64 * 9.0).sqrt());
    assert_eq!(
        max_abs_diff(&fx.conv.forward(&fx.tensors["input.conv"]), &before),
        0.0
    );
    assert_eq!(lora::trainable_variables(&mut fx.conv).len(), 10);
    fx.conv
        .layers
        .iter()
        .for_each(|(_, l)| assert!(!l.weight().requires_grad()));
    // A state extracted from the model holds the kernels.
    let mut state = LoraState::new();
    assert_eq!(
        state
            .extract(&mut fx.conv, Component::Unet, "default")
            .unwrap(),
        5
    );
    assert!(state.modules.values().all(|m| m.is_conv()));

    // DoRA on a convolution: the magnitude starts at the kernel's norms over input channels and
    // taps, so the model still computes the base output.
    let mut fx = fixture();
    let mut dora = LoraConfig::with_targets(4, &["conv2"]);
    dora.use_dora = true;
    lora::inject(&mut fx.conv, &store.root(), "dora", &dora).unwrap();
    let (_, conv2) = &fx.conv.layers[1];
    let norms = conv2
        .weight()
        .flatten(1, -1)
        .norm_scalaropt_dim(2, [1], false);
    let magnitude = conv2.adapter("dora").unwrap().magnitude.as_ref().unwrap();
    assert!(max_abs_diff(magnitude, &norms) < 1e-6);
    assert_eq!(
        max_abs_diff(&fx.conv.forward(&fx.tensors["input.conv"]), &before),
        0.0
    );
    let mut bad = LoraConfig::with_targets(4, &["conv2"]);
    bad.conv_alpha = Some(2.0);
    assert!(matches!(
        lora::inject(&mut fx.conv, &store.root(), "x", &bad),
        Err(lora::Error::InvalidConfig { ref field, .. }) if field == "conv_alpha"
    ));
    bad.conv_alpha = None;
    bad.conv_rank = Some(0);
    assert!(matches!(
        lora::inject(&mut fx.conv, &store.root(), "x", &bad),
        Err(lora::Error::InvalidConfig { ref field, .. }) if field == "conv_rank"
    ));
}

#[test]
fn dora_on_convolutions_gives_peft_outputs_with_and_without_dropout_and_round_trips() {
    let mut fx = fixture();
    let mut names = ModuleNames::new();
    names.add_model(Component::Unet, &mut fx.conv);
    let options = ReadOptions::default()
        .with_module_names(Some(&names))
        .with_block_renames(None);
    let file = format::read(lora_fixture("locon-dora-peft.safetensors"), options).unwrap();
    assert!(
        file.state
            .modules
            .values()
            .all(|m| m.magnitude.as_ref().is_some_and(|v| v.dim() == 1))
    );
    let error = check_conv(&mut fx, &file.state, "expected_dora", 0.0);
    println!("DoRA LoCon (peft file): relative error {error:e}");
    let with_dropout = peft_state(&fx.tensors, "dora_dropout", |_| 3.0);
    check_conv(&mut fx, &with_dropout, "expected_dora_dropout_eval", 0.0);
    let error = check_conv(&mut fx, &with_dropout, "expected_dora_dropout", 0.25);
    println!("DoRA LoCon with dropout: relative error {error:e}");

    // Our files keep a convolution's magnitude in each layout's shape and read back the same.
    let dir = std::env::temp_dir().join(format!("locon-dora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (format, shape) in [
        (Format::Peft, [1, 5, 1, 1]),
        (Format::Diffusers, [1, 5, 1, 1]),
        (Format::Kohya, [5, 1, 1, 1]),
    ] {
        let path = dir.join(format!("dora-{format}.safetensors"));
        format::write(&path, &file.state, format, &WriteOptions::default()).unwrap();
        let stored: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        let (_, magnitude) = stored
            .iter()
            .find(|(k, _)| {
                k.contains("downsamplers")
                    && (k.ends_with("lora_magnitude_vector") || k.ends_with("dora_scale"))
            })
            .unwrap();
        assert_eq!(magnitude.size(), shape, "{format}");
        let back = format::read(&path, options).unwrap().state;
        for (key, module) in &file.state.modules {
            let other = back.modules[key].magnitude.as_ref().unwrap();
            assert!(
                module.magnitude.as_ref().unwrap().equal(other),
                "{format} {key:?}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();

    // Merged DoRA equals its side path; unmerging restores the kernels.
    file.state
        .apply(&mut fx.conv, Component::Unet, "d", false)
        .unwrap();
    let originals: Vec<Tensor> = fx
        .conv
        .layers
        .iter()
        .map(|(_, l)| l.weight().copy())
        .collect();
    let input = &fx.tensors["input.conv"];
    let side_path = fx.conv.forward(input);
    lora::merge(&mut fx.conv, None).unwrap();
    check(
        "DoRA LoCon merged vs side path",
        rel_error(&fx.conv.forward(input), &side_path),
        f32_bound(fx.conv.depth()),
    );
    lora::unmerge(&mut fx.conv).unwrap();
    for ((path, layer), original) in fx.conv.layers.iter().zip(&originals) {
        let scale = original.abs().max().double_value(&[]);
        let diff = max_abs_diff(layer.weight(), original);
        // W·f/f and a sum of r products: a few roundings of kernels a few times the original.
        assert!(
            diff <= f32_bound(8.0) * 4.0 * scale,
            "{path}: unmerge left {diff:e}"
        );
    }
}
