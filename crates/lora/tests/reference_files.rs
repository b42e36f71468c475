//! LoRA files written by diffusers and peft (tests/fixtures/lora, see tools/fixtures/generate.py
//! `gen_lora`) load into our layers and give peft's outputs; our own files round-trip bit-exactly;
//! merging matches the side path and unmerging restores the base weights.

#![allow(clippy::unwrap_used, clippy::panic, clippy::type_complexity)]

mod common;

use std::collections::BTreeMap;

use common::{Tree, lora_fixture, max_abs_diff, mirror, rel_error, sgm_renames, tree_depth};
use lora::format::{self, Format, ModuleNames, ReadOptions, WriteOptions};
use lora::{Component, LoraState};
use tch::Tensor;
use test_support::{check, f32_bound};

fn module_names(trees: &mut BTreeMap<Component, Tree>) -> ModuleNames {
    let mut names = ModuleNames::new();
    for (component, tree) in trees.iter_mut() {
        names.add_model(*component, tree);
    }
    names
}

fn read(file: &str, trees: &mut BTreeMap<Component, Tree>) -> format::LoraFile {
    let names = module_names(trees);
    let renames = sgm_renames();
    let options = ReadOptions::default()
        .with_module_names(Some(&names))
        .with_block_renames(Some(&renames));
    format::read(lora_fixture(file), options).unwrap()
}

/// Applies `state` to every tree and compares each output with `expected_<golden>.<component>`.
/// Returns the worst relative error.
fn check_outputs(
    state: &LoraState,
    golden: &str,
    trees: &mut BTreeMap<Component, Tree>,
    tensors: &BTreeMap<String, Tensor>,
) -> f64 {
    let mut worst = 0.0f64;
    let mut checked = 0;
    for (component, tree) in trees.iter_mut() {
        let Some(expected) = tensors.get(&format!("expected_{golden}.{component}")) else {
            continue;
        };
        let applied = state.apply(tree, *component, "test", false).unwrap();
        assert!(applied > 0, "{golden}: nothing applied to {component}");
        let input = &tensors[&format!("input.{component}")];
        let error = rel_error(&tree.forward(input), expected);
        // float32 roundings through the layers and their adapters (docs/NUMERICS.md).
        check(
            &format!("LoRA {golden} {component} vs peft"),
            error,
            f32_bound(tree_depth(tree)),
        );
        // And the LoRA really changes the output.
        assert!(rel_error(&tensors[&format!("base_output.{component}")], expected) > 1e-3);
        tree.for_each_linear_remove("test");
        worst = worst.max(error);
        checked += 1;
    }
    assert!(checked > 0, "no golden outputs for {golden}");
    worst
}

trait RemoveAdapter {
    fn for_each_linear_remove(&mut self, name: &str);
}

impl RemoveAdapter for Tree {
    fn for_each_linear_remove(&mut self, name: &str) {
        for (path, layer) in &mut self.layers {
            if layer.adapter(name).is_some() {
                layer.remove_adapter(path, name).unwrap();
            }
        }
    }
}

#[test]
fn diffusers_file_from_save_lora_weights_gives_peft_outputs() {
    let (mut trees, tensors) = mirror();
    let file = read("diffusers.safetensors", &mut trees);
    assert_eq!(file.format, Format::Diffusers);
    // alpha = rank everywhere (no metadata), including the rank-2 `to_k` modules.
    assert!(
        file.state
            .modules
            .values()
            .all(|m| m.alpha == m.rank() as f64)
    );
    assert!(file.state.modules.values().any(|m| m.rank() == 2));
    let error = check_outputs(&file.state, "diffusers", &mut trees, &tensors);
    println!("diffusers file: worst relative error {error:e}");
}

#[test]
fn kohya_file_converted_by_diffusers_gives_the_same_outputs() {
    let (mut trees, tensors) = mirror();
    let file = read("kohya_by_diffusers.safetensors", &mut trees);
    assert_eq!(file.format, Format::Kohya);
    assert_eq!(file.state.components(), Component::ALL.to_vec());
    let error = check_outputs(&file.state, "diffusers", &mut trees, &tensors);
    println!("kohya file by diffusers: worst relative error {error:e}");
}

#[test]
fn peft_file_with_alpha_patterns_and_rslora_gives_peft_outputs() {
    let (mut trees, tensors) = mirror();
    let file = read("peft.safetensors", &mut trees);
    assert_eq!(file.format, Format::Peft);
    let to_v = &file.state.modules[&(
        Component::Unet,
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v".into(),
    )];
    assert_eq!(to_v.alpha, 1.5);
    assert!(
        file.state
            .component(Component::TextEncoder2)
            .all(|(_, m)| m.scaling == lora::Scaling::RankStabilized)
    );
    let error = check_outputs(&file.state, "peft", &mut trees, &tensors);
    println!("peft file: worst relative error {error:e}");
}

#[test]
fn dora_file_gives_peft_dora_outputs() {
    let (mut trees, tensors) = mirror();
    let file = read("dora.safetensors", &mut trees);
    assert!(file.state.modules.values().all(|m| m.magnitude.is_some()));
    let error = check_outputs(&file.state, "dora", &mut trees, &tensors);
    println!("DoRA file: worst relative error {error:e}");
}

fn assert_same_state(a: &LoraState, b: &LoraState, what: &str) {
    assert_eq!(
        a.modules.keys().collect::<Vec<_>>(),
        b.modules.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (key, x) in &a.modules {
        let y = &b.modules[key];
        assert!(
            x.down.equal(&y.down) && x.up.equal(&y.up),
            "{what} {key:?}: matrices differ"
        );
        assert_eq!(x.down.kind(), y.down.kind(), "{what} {key:?}");
        match (&x.magnitude, &y.magnitude) {
            (Some(m), Some(n)) => assert!(m.equal(n), "{what} {key:?}: magnitude differs"),
            (None, None) => {}
            _ => panic!("{what} {key:?}: magnitude lost"),
        }
        let (sx, sy) = (
            x.scaling.factor(x.rank(), x.alpha),
            y.scaling.factor(y.rank(), y.alpha),
        );
        assert!(
            (sx - sy).abs() <= 1e-6 * sx.abs(),
            "{what} {key:?}: scale {sx} became {sy}"
        );
        if x.scaling == y.scaling {
            assert_eq!(x.alpha, y.alpha, "{what} {key:?}");
        }
    }
    assert_eq!(a.training_config, b.training_config, "{what}");
}

#[test]
fn our_files_round_trip_bit_exactly_in_every_format() {
    let (mut trees, tensors) = mirror();
    let dir = std::env::temp_dir().join(format!("lora-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let names = module_names(&mut trees);
    let renames = sgm_renames();
    let read_options = ReadOptions::default()
        .with_module_names(Some(&names))
        .with_block_renames(Some(&renames));
    for (source, golden) in [
        ("diffusers.safetensors", "diffusers"),
        ("peft.safetensors", "peft"),
        ("dora.safetensors", "dora"),
    ] {
        let mut state = format::read(lora_fixture(source), read_options)
            .unwrap()
            .state;
        state.training_config =
            Some(serde_json::json!({"learning_rate": 1e-4, "rank": 4, "source": source}));
        let sgm = WriteOptions::default().with_block_renames(Some(&renames));
        for (format, options, label) in [
            (Format::Diffusers, WriteOptions::default(), "diffusers"),
            (Format::Peft, WriteOptions::default(), "peft"),
            (Format::Kohya, WriteOptions::default(), "kohya"),
            (Format::Kohya, sgm.clone(), "kohya-sgm"),
        ] {
            let path = dir.join(format!("{golden}-as-{label}.safetensors"));
            format::write(&path, &state, format, &options).unwrap();
            let back = format::read(&path, read_options).unwrap();
            assert_eq!(back.format, format, "{source} as {label}");
            assert_same_state(&state, &back.state, &format!("{source} as {label}"));
            if label == "kohya-sgm" {
                let keys: Vec<String> = Tensor::read_safetensors(&path)
                    .unwrap()
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                assert!(
                    keys.iter().any(|k| k.starts_with(
                        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q."
                    )),
                    "{keys:?}"
                );
                assert!(
                    !keys.iter().any(|k| k.starts_with("lora_unet_down_blocks")),
                    "{keys:?}"
                );
            }
            check_outputs(&back.state, golden, &mut trees, &tensors);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merged_output_equals_side_path_and_unmerge_restores_base_weights() {
    let (mut trees, tensors) = mirror();
    let peft = read("peft.safetensors", &mut trees).state;
    let dora = read("dora.safetensors", &mut trees).state;
    let diffusers = read("diffusers.safetensors", &mut trees).state;
    let mut worst = (0.0f64, 0.0f64);
    for (component, tree) in trees.iter_mut() {
        let originals: Vec<Tensor> = tree.layers.iter().map(|(_, l)| l.weight().copy()).collect();
        // Several LoRAs at once with per-LoRA multipliers, one of them DoRA.
        peft.apply(tree, *component, "peft", false).unwrap();
        diffusers
            .apply(tree, *component, "diffusers", false)
            .unwrap();
        lora::set_multiplier(tree, "diffusers", 0.6).unwrap();
        if dora.components().contains(component) {
            dora.apply(tree, *component, "dora", false).unwrap();
        }
        let input = &tensors[&format!("input.{component}")];
        let side_path = tree.forward(input);
        lora::merge(tree, None).unwrap();
        assert!(
            tree.layers
                .iter()
                .flat_map(|(_, l)| l.adapters())
                .all(|a| a.is_merged())
        );
        let merged = tree.forward(input);
        let merged_weights: Vec<f64> = tree
            .layers
            .iter()
            .map(|(_, l)| l.weight().abs().max().double_value(&[]))
            .collect();
        let merge_error = rel_error(&merged, &side_path);
        // Both paths round through the layers; merging adds the delta's product (rank terms) and
        // one addition per weight.
        let bound = f32_bound(tree_depth(tree));
        check(
            &format!("LoRA merged vs side path ({component})"),
            merge_error,
            bound,
        );
        lora::unmerge(tree).unwrap();
        for (((path, layer), original), merged_max) in
            tree.layers.iter().zip(&originals).zip(&merged_weights)
        {
            // Merging computes W + Δ (DoRA also the row norms of `in` terms and a rescaling), and
            // unmerging undoes it: about `in` + 6 roundings of values up to the larger of the
            // original and merged weights.
            let scale = original.abs().max().double_value(&[]).max(*merged_max);
            let depth = test_support::depth::sum(original.size()[1]) + 6.0;
            let diff = max_abs_diff(layer.weight(), original);
            assert!(
                diff <= f32_bound(depth) * scale,
                "{component}.{path}: unmerge left {diff:e}"
            );
            worst.1 = worst.1.max(diff);
        }
        check(
            &format!("LoRA unmerged vs side path ({component})"),
            rel_error(&tree.forward(input), &side_path),
            bound,
        );
        // Disabling every adapter gives the base model back.
        for name in ["peft", "diffusers"] {
            lora::set_enabled(tree, name, false).unwrap();
        }
        if dora.components().contains(component) {
            lora::set_enabled(tree, "dora", false).unwrap();
        }
        check(
            &format!("LoRA disabled vs the base model ({component})"),
            rel_error(
                &tree.forward(input),
                &tensors[&format!("base_output.{component}")],
            ),
            bound,
        );
        worst.0 = worst.0.max(merge_error);
    }
    println!(
        "merge: worst relative error {:e}; unmerge: worst weight difference {:e}",
        worst.0, worst.1
    );
}
