use super::*;
use tch::Device;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A 3×3, stride-2, padding-1 convolution of 4 → 6 channels with bias, and an input batch.
fn conv_and_input(seed: i64) -> (Conv2d, Tensor) {
    tch::manual_seed(seed);
    let conv = Conv2d::from_tensors(
        Tensor::randn([6, 4, 3, 3], (Kind::Float, Device::Cpu)),
        Some(Tensor::randn([6], (Kind::Float, Device::Cpu))),
        2,
        1,
    );
    (
        conv,
        Tensor::randn([2, 4, 7, 5], (Kind::Float, Device::Cpu)),
    )
}

fn random_adapter(name: &str, rank: i64, alpha: f64) -> Adapter {
    Adapter::new(
        name,
        Tensor::randn([rank, 4, 3, 3], (Kind::Float, Device::Cpu)),
        Tensor::randn([6, rank, 1, 1], (Kind::Float, Device::Cpu)),
        alpha,
    )
}

/// The adapted kernel `W + scale · Σ_r B[:, r] A[r]`, written out tap by tap.
fn adapted_kernel(conv: &Conv2d, adapter: &Adapter, scale: f64) -> Tensor {
    let up = adapter.up.squeeze_dim(3).squeeze_dim(2);
    let delta = Tensor::einsum("or,rikl->oikl", &[&up, &adapter.down], None::<i64>);
    &conv.weight + delta * scale
}

/// A few float32 roundings of the largest sum of magnitudes an output of `conv` (stride 2 and
/// padding 1) with these kernel deltas adds up: the values come from the shared generator
/// (whichever test drew last), so the bound scales with them.
fn rounding_bound(conv: &Conv2d, x: &Tensor, deltas: &[&Tensor]) -> f64 {
    let magnitude = deltas.iter().fold(conv.weight.abs(), |m, d| m + d.abs());
    let sums = x
        .abs()
        .conv2d(&magnitude, None::<Tensor>, [2], [1], [1], 1)
        .max()
        .double_value(&[]);
    let bias = conv
        .bias
        .as_ref()
        .map_or(0.0, |b| b.abs().max().double_value(&[]));
    64.0 * f64::from(f32::EPSILON) * (sums + bias)
}

#[test]
fn computes_torch_conv2d_with_torch_names() {
    let vs = nn::VarStore::new(Device::Cpu);
    let conv = Conv2d::new(&(vs.root() / "conv1"), 3, 5, 3, 1, 1);
    let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
    assert_eq!(
        names,
        ["conv1.bias", "conv1.weight"].map(String::from).into()
    );
    let x = Tensor::randn([1, 3, 4, 4], (Kind::Float, Device::Cpu));
    let expected = x.conv2d(&conv.weight, conv.bias.as_ref(), [1], [1], [1], 1);
    assert_eq!(max_diff(&conv.forward(&x), &expected), 0.0);
    assert_eq!(
        (conv.in_channels(), conv.out_channels(), conv.kernel_size()),
        (3, 5, [3, 3])
    );
    assert!(!conv.is_pointwise());
}

#[test]
fn locon_adds_the_scaled_kernel_product_and_can_be_switched_off() {
    let (mut conv, x) = conv_and_input(1);
    let base = conv.forward(&x);
    let adapter = random_adapter("a", 2, 6.0);
    let kernel = adapted_kernel(&conv, &adapter, 3.0);
    conv.add_adapter("m", adapter).unwrap();
    let expected = x.conv2d(&kernel, conv.bias.as_ref(), [2], [1], [1], 1);
    let bound = rounding_bound(&conv, &x, &[&(&kernel - &conv.weight)]);
    let y = conv.forward(&x);
    assert_eq!(y.size(), [2, 6, 4, 3]);
    assert!(
        max_diff(&y, &expected) <= bound,
        "{} > {bound}",
        max_diff(&y, &expected)
    );
    conv.set_adapter_enabled("m", "a", false).unwrap();
    assert_eq!(max_diff(&conv.forward(&x), &base), 0.0);
    conv.set_adapter_enabled("m", "a", true).unwrap();
    conv.adapter_mut("a").unwrap().scaling = crate::Scaling::RankStabilized;
    conv.adapter_mut("a").unwrap().multiplier = 0.5;
    let kernel = adapted_kernel(&conv, conv.adapter("a").unwrap(), 6.0 / 2f64.sqrt() * 0.5);
    let expected = x.conv2d(&kernel, conv.bias.as_ref(), [2], [1], [1], 1);
    let bound = rounding_bound(&conv, &x, &[&(&kernel - &conv.weight)]);
    assert!(max_diff(&conv.forward(&x), &expected) <= bound);
}

#[test]
fn merge_equals_side_path_and_unmerge_restores_the_kernel() {
    for dora in [false, true] {
        merge_and_unmerge(dora);
    }
}

fn merge_and_unmerge(dora: bool) {
    let (mut conv, x) = conv_and_input(2);
    let original = conv.weight.copy();
    let mut first = random_adapter("first", 2, 4.0);
    if dora {
        first.magnitude = Some(Tensor::rand([6], (Kind::Float, Device::Cpu)) + 0.5);
    }
    let second = random_adapter("second", 3, 1.0);
    // Error model: merging and unmerging round every weight a few times (the delta's product and
    // sum; DoRA's norm and rescale, undone by its inverse), so outputs differ by a few roundings of
    // the sums of |x| (|W| + Σ|ΔW|), the weight by a few roundings of the largest |W| + Σ|ΔW|.
    let deltas: Vec<Tensor> = [(&first, first.scale()), (&second, second.scale())]
        .into_iter()
        .map(|(adapter, scale)| adapted_kernel(&conv, adapter, scale) - &conv.weight)
        .collect();
    let bound = rounding_bound(&conv, &x, &deltas.iter().collect::<Vec<_>>());
    let weight_bound = 64.0
        * f64::from(f32::EPSILON)
        * deltas
            .iter()
            .fold(original.abs(), |m, d| m + d.abs())
            .max()
            .double_value(&[]);
    conv.add_adapter("m", first).unwrap();
    conv.add_adapter("m", second).unwrap();
    let side_path = conv.forward(&x);
    conv.merge("m", Some(&["first"])).unwrap();
    assert!(conv.adapter("first").unwrap().is_merged());
    assert!(!conv.adapter("second").unwrap().is_merged());
    assert!(max_diff(&conv.forward(&x), &side_path) <= bound);
    conv.merge("m", None).unwrap();
    assert!(max_diff(&conv.forward(&x), &side_path) <= bound);
    assert!(max_diff(&conv.weight, &original) > 0.1);
    conv.unmerge("m").unwrap();
    assert!(max_diff(&conv.weight, &original) <= weight_bound);
    assert!(max_diff(&conv.forward(&x), &side_path) <= bound);
    let removed = conv.remove_adapter("m", "first").unwrap();
    assert_eq!(removed.name, "first");
    assert!(matches!(
        conv.merge("m", Some(&["first"])),
        Err(Error::UnknownAdapter { .. })
    ));
}

#[test]
fn refuses_kernels_that_do_not_fit() {
    let (mut conv, _) = conv_and_input(3);
    let bad = [
        // A matrix instead of a kernel.
        (vec![2, 4], vec![6, 2]),
        // A 1×1 down kernel on a 3×3 layer.
        (vec![2, 4, 1, 1], vec![6, 2, 1, 1]),
        // A 3×3 up kernel.
        (vec![2, 4, 3, 3], vec![6, 2, 3, 3]),
        // Ranks that disagree.
        (vec![2, 4, 3, 3], vec![6, 3, 1, 1]),
    ];
    for (down, up) in bad {
        let adapter = Adapter::new(
            "a",
            Tensor::zeros(down.as_slice(), (Kind::Float, Device::Cpu)),
            Tensor::zeros(up.as_slice(), (Kind::Float, Device::Cpu)),
            1.0,
        );
        let error = conv.add_adapter("blocks.conv1", adapter).unwrap_err();
        assert!(
            matches!(error, Error::ShapeMismatch { ref module, .. } if module == "blocks.conv1"),
            "{down:?} {up:?}: {error}"
        );
    }
    let mut dora = random_adapter("a", 2, 2.0);
    dora.magnitude = Some(Tensor::ones([5], (Kind::Float, Device::Cpu)));
    let error = conv.add_adapter("blocks.conv1", dora).unwrap_err();
    assert!(error.to_string().contains("magnitude"), "{error}");
    conv.add_adapter("m", random_adapter("a", 2, 2.0)).unwrap();
    assert!(matches!(
        conv.add_adapter("m", random_adapter("a", 2, 2.0)),
        Err(Error::DuplicateAdapter { .. })
    ));
}

#[test]
fn dropout_applies_in_training_only() {
    // (That it draws peft's masks is tests/locon.rs's: the global generator is shared by the
    // tests of one binary, so exact draws are checked where a lock serialises them.)
    let (mut conv, x) = conv_and_input(4);
    let mut adapter = random_adapter("a", 2, 2.0);
    adapter.dropout = 0.5;
    conv.add_adapter("m", adapter).unwrap();
    let eval = conv.forward(&x);
    conv.set_training(true);
    assert!(max_diff(&conv.forward(&x), &eval) > 1e-3);
    conv.adapter_mut("a").unwrap().dropout = 0.0;
    assert_eq!(max_diff(&conv.forward(&x), &eval), 0.0);
    conv.set_training(false);
    conv.adapter_mut("a").unwrap().dropout = 0.5;
    assert_eq!(max_diff(&conv.forward(&x), &eval), 0.0);
}

#[test]
fn bf16_base_with_fp32_adapter_returns_bf16_and_autocast_computes_in_bf16() {
    let (conv, x) = conv_and_input(5);
    for compute in [None, Some(Kind::BFloat16)] {
        let mut half = Conv2d::from_tensors(
            conv.weight.to_kind(Kind::BFloat16),
            conv.bias.as_ref().map(|b| b.to_kind(Kind::BFloat16)),
            2,
            1,
        );
        let mut adapter = random_adapter("a", 2, 2.0);
        adapter.down = adapter.down.set_requires_grad(true);
        adapter.compute_kind = compute;
        let down = adapter.down.shallow_clone();
        half.add_adapter("m", adapter).unwrap();
        let xb = x.to_kind(Kind::BFloat16);
        let y = half.forward(&xb);
        assert_eq!(y.kind(), Kind::BFloat16);
        let a = half.adapter("a").unwrap();
        let reference = xb.to_kind(Kind::Float).conv2d(
            &adapted_kernel(&half, a, 1.0).to_kind(Kind::Float),
            None::<&Tensor>,
            [2],
            [1],
            [1],
            1,
        ) + half
            .bias
            .as_ref()
            .unwrap()
            .to_kind(Kind::Float)
            .view([1, 6, 1, 1]);
        // bf16 rounding of the base output, the sum and (under autocast) the adapter's products:
        // a few 2⁻⁸ steps of the largest output.
        let scale = reference.abs().max().double_value(&[]);
        let diff = max_diff(&y.to_kind(Kind::Float), &reference);
        assert!(
            diff <= 4.0 * scale / 256.0,
            "{compute:?}: {diff} of {scale}"
        );
        y.to_kind(Kind::Float).sum(Kind::Float).backward();
        assert_eq!(down.grad().kind(), Kind::Float);
    }
}

#[test]
fn fp8_kernel_frees_the_store_stays_close_and_refuses_merges() {
    tch::manual_seed(4);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut conv = Conv2d::new(&(vs.root() / "conv1"), 8, 16, 3, 2, 1);
    let x = Tensor::randn([2, 8, 9, 7], (Kind::Float, Device::Cpu));
    let expected = conv.forward(&x);
    conv.quantize_fp8("conv1", None).unwrap();
    assert_eq!(vs.variables()["conv1.weight"].kind(), Kind::Float8e4m3fn);
    assert_eq!(conv.base_weight_bytes(), 16 * 8 * 9 + 4);
    let y = conv.forward(&x);
    assert_eq!(y.size(), [2, 16, 5, 4]);
    // 3 mantissa bits: ≈ 2.5 % relative error per weight, less on a sum over 72 of them.
    let error = (&y - &expected).norm().double_value(&[]) / expected.norm().double_value(&[]);
    assert!(error > 0.0 && error < 0.04, "{error}");
    conv.add_adapter(
        "conv1",
        Adapter::new(
            "a",
            Tensor::randn([2, 8, 3, 3], (Kind::Float, Device::Cpu)),
            Tensor::zeros([16, 2, 1, 1], (Kind::Float, Device::Cpu)),
            2.0,
        ),
    )
    .unwrap();
    assert!(matches!(
        conv.merge("conv1", None),
        Err(Error::Fp8BaseWeight { ref module, .. }) if module == "conv1"
    ));
    vs.freeze();
    assert!(!conv.weight.requires_grad());
}
