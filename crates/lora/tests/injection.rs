//! Injection by module-path patterns on a generic module tree, what it reports and trains, and the
//! property that gradients reach only the adapter tensors.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::{Tree, max_abs_diff, rel_error, tree_depth};
use lora::{Error, HasLinears, Init, Linear, LoraConfig, inject, trainable_variables};
use proptest::prelude::*;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use test_support::{check, f32_bound};

const PATHS: [&str; 6] = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "mid_block.attentions.0.proj_out",
];

/// A tree of linear layers with the given widths (`widths[i] → widths[i + 1]`) in a base store.
fn tree(base: &nn::VarStore, widths: &[i64]) -> Tree {
    let layers = PATHS
        .iter()
        .zip(widths.windows(2))
        .map(|(path, w)| {
            let linear = Linear::new(&lora::module_path(&base.root(), path), w[0], w[1], true);
            ((*path).to_owned(), linear)
        })
        .collect();
    Tree { layers }
}

#[test]
fn injects_default_attention_targets_with_patterns_and_starts_at_the_base_output() {
    tch::manual_seed(7);
    let base = nn::VarStore::new(Device::Cpu);
    let mut model = tree(&base, &[6, 8, 8, 5, 7, 4, 3]);
    let x = Tensor::randn([2, 6], (Kind::Float, Device::Cpu));
    let before = model.forward(&x);
    let adapters = nn::VarStore::new(Device::Cpu);
    let mut config = LoraConfig::unet_attention(4);
    config.targets.push("ff.net.9".into());
    config.rank_pattern.insert("to_k".into(), 2);
    config.alpha_pattern.insert("attn1.to_k".into(), 8.0);
    config.alpha_pattern.insert("to_k".into(), 1.0);
    let report = inject(&mut model, &adapters.root(), "default", &config).unwrap();
    let adapted: Vec<(&str, i64, f64)> = report
        .adapted
        .iter()
        .map(|(p, r, a)| (p.as_str(), *r, *a))
        .collect();
    assert_eq!(
        adapted,
        vec![
            (PATHS[0], 4, 4.0),
            (PATHS[1], 2, 8.0),
            (PATHS[2], 4, 4.0),
            (PATHS[3], 4, 4.0)
        ]
    );
    assert_eq!(report.unmatched_targets, vec!["ff.net.9".to_owned()]);
    // B = 0: the adapted model computes the base model.
    assert_eq!(max_abs_diff(&model.forward(&x), &before), 0.0);
    // The adapter store holds exactly A and B of each adapted layer, under peft's names.
    let names: Vec<String> = adapters.variables().into_keys().collect();
    assert_eq!(names.len(), 8);
    assert!(names.contains(&format!("{}.lora_A.weight", PATHS[1])));
    assert_eq!(
        adapters.variables()[&format!("{}.lora_A.weight", PATHS[1])].size(),
        [2, 8]
    );
    let trainable = trainable_variables(&mut model);
    assert_eq!(trainable.len(), 8);
    assert!(trainable.keys().all(|k| k.contains(".default.lora_")));
    // Base weights are frozen; a second injection with the same name is refused.
    model.for_each_linear(&mut |_, l| assert!(!l.weight().requires_grad()));
    assert!(matches!(
        inject(&mut model, &adapters.root(), "default", &config),
        Err(Error::DuplicateAdapter { .. })
    ));
    config.targets = vec!["nothing".into()];
    assert!(matches!(
        inject(&mut model, &adapters.root(), "other", &config),
        Err(Error::NoTargetMatched { .. })
    ));
    config.targets = vec!["to_q".into()];
    config.rank = 0;
    assert!(matches!(
        inject(&mut model, &adapters.root(), "other", &config),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn initialisations_follow_peft() {
    tch::manual_seed(8);
    let base = nn::VarStore::new(Device::Cpu);
    let mut model = tree(&base, &[400, 300, 8, 8, 8, 8, 8]);
    let adapters = nn::VarStore::new(Device::Cpu);
    let mut config = LoraConfig::with_targets(16, &["to_q"]);
    config.init = Init::KaimingUniform;
    inject(&mut model, &adapters.root(), "kaiming", &config).unwrap();
    config.init = Init::Gaussian;
    inject(&mut model, &adapters.root(), "gaussian", &config).unwrap();
    let layer = &model.layers[0].1;
    let kaiming = &layer.adapter("kaiming").unwrap().down;
    let bound = 1.0 / 400f64.sqrt();
    assert!(kaiming.abs().max().double_value(&[]) <= bound);
    assert!(kaiming.abs().max().double_value(&[]) > 0.95 * bound);
    let std = layer
        .adapter("gaussian")
        .unwrap()
        .down
        .std(true)
        .double_value(&[]);
    assert!((std - 1.0 / 16.0).abs() < 0.003, "{std}");
    assert_eq!(
        layer
            .adapter("gaussian")
            .unwrap()
            .up
            .abs()
            .max()
            .double_value(&[]),
        0.0
    );
}

#[test]
fn dora_injection_starts_at_the_base_output_with_weight_norm_magnitudes() {
    tch::manual_seed(9);
    let base = nn::VarStore::new(Device::Cpu);
    let mut model = tree(&base, &[6, 8, 8, 5, 7, 4, 3]);
    let x = Tensor::randn([3, 6], (Kind::Float, Device::Cpu));
    let before = model.forward(&x);
    let adapters = nn::VarStore::new(Device::Cpu);
    let mut config = LoraConfig::unet_attention(2);
    config.use_dora = true;
    inject(&mut model, &adapters.root(), "dora", &config).unwrap();
    assert!(max_abs_diff(&model.forward(&x), &before) < 1e-6);
    let layer = &model.layers[0].1;
    let magnitude = layer.adapter("dora").unwrap().magnitude.as_ref().unwrap();
    assert!(max_abs_diff(magnitude, &layer.weight().norm_scalaropt_dim(2, [1], false)) < 1e-6);
    assert_eq!(trainable_variables(&mut model).len(), 12);
}

/// Runs one backward pass of a squared-output loss with random, non-zero B (so that A gets a
/// gradient too) and reports which tensors received gradients.
fn gradients_after_one_step(
    widths: &[i64],
    rank: i64,
    dora: bool,
    seed: i64,
) -> (Tree, nn::VarStore) {
    tch::manual_seed(seed);
    let base = nn::VarStore::new(Device::Cpu); // trainable by default: injection must freeze the linears
    let mut model = tree(&base, widths);
    let adapters = nn::VarStore::new(Device::Cpu);
    let mut config = LoraConfig::with_targets(rank, &["to_q", "to_v", "to_out.0", "proj_out"]);
    config.use_dora = dora;
    config.dropout = 0.1;
    inject(&mut model, &adapters.root(), "train", &config).unwrap();
    lora::set_training(&mut model, true);
    tch::no_grad(|| {
        for (_, mut tensor) in adapters.variables() {
            if tensor.dim() == 2 && tensor.abs().max().double_value(&[]) == 0.0 {
                tensor.copy_(&(Tensor::randn(tensor.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    let x = Tensor::randn([4, widths[0]], (Kind::Float, Device::Cpu));
    model.forward(&x).square().sum(Kind::Float).backward();
    (model, adapters)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn gradients_flow_only_into_adapter_tensors(
        widths in proptest::collection::vec(1i64..12, 7),
        rank in 1i64..6,
        dora in any::<bool>(),
        seed in 0i64..1000,
    ) {
        let (mut model, adapters) = gradients_after_one_step(&widths, rank, dora, seed);
        let mut checked = 0;
        model.for_each_linear(&mut |path, layer| {
            assert!(!layer.weight().grad().defined(), "{path}: base weight got a gradient");
            assert!(layer.bias().is_none_or(|b| !b.grad().defined()), "{path}: bias got a gradient");
            for adapter in layer.adapters() {
                for tensor in adapter.parameters() {
                    assert!(tensor.requires_grad() && tensor.grad().defined(), "{path}: adapter tensor without gradient");
                    checked += 1;
                }
            }
        });
        let expected = if dora { 12 } else { 8 };
        prop_assert_eq!(checked, expected);
        prop_assert_eq!(adapters.trainable_variables().len(), expected);
        // An optimizer over trainable_variables() moves only the adapters.
        let base_before: Vec<Tensor> = model.layers.iter().map(|(_, l)| l.weight().copy()).collect();
        let mut optimizer = nn::Sgd::default().build(&adapters, 0.1).unwrap();
        optimizer.step();
        for ((_, layer), before) in model.layers.iter().zip(&base_before) {
            prop_assert!(layer.weight().equal(before));
        }
    }
}

#[test]
fn adapter_sets_of_one_name_take_turns_on_one_model() {
    tch::manual_seed(11);
    let base = nn::VarStore::new(Device::Cpu);
    let mut model = tree(&base, &[6, 8, 8, 5, 7, 4, 3]);
    let x = Tensor::randn([2, 6], (Kind::Float, Device::Cpu));
    let plain = model.forward(&x);
    // Two runs' adapters, both called "default", with non-zero B so that each changes the output.
    let (first_store, second_store) = (
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
    );
    let mut set = |store: &nn::VarStore, rank: i64, value: f64| {
        inject(
            &mut model,
            &store.root(),
            "default",
            &LoraConfig::unet_attention(rank),
        )
        .unwrap();
        tch::no_grad(|| {
            for (name, tensor) in trainable_variables(&mut model) {
                if name.ends_with("lora_B") {
                    let _ = tensor.shallow_clone().fill_(value);
                }
            }
        });
        let out = model.forward(&x);
        (lora::detach(&mut model, "default").unwrap(), out)
    };
    let (first, first_out) = set(&first_store, 4, 0.1);
    let (second, second_out) = set(&second_store, 2, -0.2);
    assert_eq!((first.len(), second.len()), (4, 4));
    assert!(max_abs_diff(&first_out, &second_out) > 1e-3);
    // Detached, the model is the plain one; attached, each set gives its own output. The same
    // products again, but not always bit for bit: with other tests running beside this one,
    // libtorch's plain CPU kernels (ATEN_CPU_CAPABILITY=default) were seen to round a product
    // differently (1.4e-6 in one run of 60), so within the rounding bound of the tree's depth,
    // thousands of times below what a set changes.
    let bound = f32_bound(tree_depth(&model));
    check("detached", rel_error(&model.forward(&x), &plain), bound);
    lora::attach(&mut model, second).unwrap();
    check(
        "second attached",
        rel_error(&model.forward(&x), &second_out),
        bound,
    );
    let second = lora::detach(&mut model, "default").unwrap();
    lora::attach(&mut model, first).unwrap();
    check(
        "first attached",
        rel_error(&model.forward(&x), &first_out),
        bound,
    );
    // A set on top of another of the same name is refused; an unknown name is named.
    assert!(matches!(
        lora::attach(&mut model, second),
        Err(Error::DuplicateAdapter { .. })
    ));
    assert!(matches!(
        lora::detach(&mut model, "other"),
        Err(Error::UnknownAdapter { .. })
    ));
}
