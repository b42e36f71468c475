use super::*;
use crate::conv::Conv2d;
use crate::linear::Linear;
use tch::Device;
use tch::nn::Module;

/// A linear layer `[.., 8] → [.., 6]` and a 3×3 convolution 4 → 5 channels, both with bias.
struct Net {
    lin: Linear,
    conv: Conv2d,
}

impl HasLinears for Net {
    fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        f("lin", &mut self.lin);
    }
    fn for_each_conv(&mut self, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        f("conv", &mut self.conv);
    }
}

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn net() -> Net {
    Net {
        lin: Linear::from_tensors(randn(&[6, 8]), Some(randn(&[6]))),
        conv: Conv2d::from_tensors(randn(&[5, 4, 3, 3]), Some(randn(&[5])), 1, 1),
    }
}

/// A fresh copy of `net`'s base weights, without adapters.
fn base_copy(net: &Net) -> Net {
    Net {
        lin: Linear::from_tensors(
            net.lin.weight.copy(),
            net.lin.bias.as_ref().map(Tensor::copy),
        ),
        conv: Conv2d::from_tensors(
            net.conv.weight.copy(),
            net.conv.bias.as_ref().map(Tensor::copy),
            1,
            1,
        ),
    }
}

/// A trainable adapter of `rank` with the given shapes (`B` non-zero, so its gradient reaches `A`).
fn adapter(down: &[i64], up: &[i64], alpha: f64) -> Adapter {
    Adapter::new(
        "default",
        randn(down).set_requires_grad(true),
        randn(up).set_requires_grad(true),
        alpha,
    )
}

/// A copy of `a` with fresh leaves of the same values.
fn twin(a: &Adapter) -> Adapter {
    Adapter::new(
        "default",
        a.down.detach().copy().set_requires_grad(true),
        a.up.detach().copy().set_requires_grad(true),
        a.alpha,
    )
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Three adapter sets of ranks 2, 4 and 3 on rows 0..2, 2..5 and 7..9 of a batch of 10 (rows 5..7
/// have none); the second has no adapter on the convolution.
struct Sets {
    rows: Vec<Range<i64>>,
    lin: Vec<Adapter>,
    conv: Vec<Option<Adapter>>,
}

fn sets() -> Sets {
    let ranks = [2, 4, 3];
    Sets {
        rows: vec![0..2, 2..5, 7..9],
        lin: ranks
            .iter()
            .map(|&r| adapter(&[r, 8], &[6, r], 2.0 * r as f64 + 1.0))
            .collect(),
        conv: ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| (i != 1).then(|| adapter(&[r, 4, 3, 3], &[5, r, 1, 1], 1.5)))
            .collect(),
    }
}

/// Attaches the sets to `net` as row adapters (through `detach`, as a caller does).
fn attach_sets(net: &mut Net, sets: &Sets) {
    for (i, rows) in sets.rows.iter().enumerate() {
        net.lin
            .add_adapter("lin", twin_shared(&sets.lin[i]))
            .unwrap();
        if let Some(conv) = &sets.conv[i] {
            net.conv.add_adapter("conv", twin_shared(conv)).unwrap();
        }
        let mut detached = crate::detach(net, "default").unwrap();
        attach_rows(net, rows.clone(), &mut detached).unwrap();
        assert!(detached.is_empty());
    }
}

/// An adapter sharing `a`'s tensors (so gradients reach `a`'s leaves).
fn twin_shared(a: &Adapter) -> Adapter {
    Adapter::new(
        "default",
        a.down.shallow_clone(),
        a.up.shallow_clone(),
        a.alpha,
    )
}

fn grads(a: &Adapter) -> (Tensor, Tensor) {
    (a.down.grad().copy(), a.up.grad().copy())
}

#[test]
fn each_set_computes_and_trains_on_its_own_rows_only() {
    tch::manual_seed(7);
    let mut batched = net();
    let sets = sets();
    attach_sets(&mut batched, &sets);
    let x = randn(&[10, 3, 8]);
    let image = randn(&[10, 4, 6, 5]);
    let (w_lin, w_conv) = (randn(&[10, 3, 6]), randn(&[10, 5, 6, 5]));
    let (y, z) = (batched.lin.forward(&x), batched.conv.forward(&image));
    ((&y * &w_lin).sum(Kind::Float) + (&z * &w_conv).sum(Kind::Float)).backward();

    // Each slice against its adapter alone on a copy of the base layer, fed only those rows.
    let plain = base_copy(&batched);
    for (i, rows) in sets.rows.iter().enumerate() {
        let (start, len) = (rows.start, rows.end - rows.start);
        let mut alone = base_copy(&batched);
        let lin = twin(&sets.lin[i]);
        alone.lin.add_adapter("lin", twin_shared(&lin)).unwrap();
        let conv = sets.conv[i].as_ref().map(twin);
        if let Some(conv) = &conv {
            alone.conv.add_adapter("conv", twin_shared(conv)).unwrap();
        }
        let ya = alone.lin.forward(&x.narrow(0, start, len));
        let za = alone.conv.forward(&image.narrow(0, start, len));
        ((&ya * w_lin.narrow(0, start, len)).sum(Kind::Float)
            + (&za * w_conv.narrow(0, start, len)).sum(Kind::Float))
        .backward();
        assert!(
            max_diff(&y.narrow(0, start, len), &ya) < 1e-5,
            "set {i} linear"
        );
        assert!(
            max_diff(&z.narrow(0, start, len), &za) < 1e-5,
            "set {i} conv"
        );
        let (down, up) = grads(&sets.lin[i]);
        let (down_a, up_a) = grads(&lin);
        assert!(max_diff(&down, &down_a) < 1e-4 * (1.0 + down_a.abs().max().double_value(&[])));
        assert!(max_diff(&up, &up_a) < 1e-4 * (1.0 + up_a.abs().max().double_value(&[])));
        match (&sets.conv[i], &conv) {
            (Some(set), Some(conv)) => {
                let (down, up) = grads(set);
                let (down_a, up_a) = grads(conv);
                let tol = 1e-4 * (1.0 + down_a.abs().max().double_value(&[]));
                assert!(max_diff(&down, &down_a) < tol, "set {i} conv A gradient");
                assert!(max_diff(&up, &up_a) < 1e-4 * (1.0 + up_a.abs().max().double_value(&[])));
            }
            _ => {
                // No adapter of this set on the convolution: its rows get the base output only.
                let base = plain.conv.forward(&image.narrow(0, start, len));
                assert_eq!(max_diff(&z.narrow(0, start, len), &base), 0.0);
            }
        }
    }
    // Rows no set covers: the base output, bit for bit.
    assert_eq!(
        max_diff(&y.narrow(0, 5, 2), &plain.lin.forward(&x.narrow(0, 5, 2))),
        0.0
    );
    assert_eq!(
        max_diff(&y.narrow(0, 9, 1), &plain.lin.forward(&x.narrow(0, 9, 1))),
        0.0
    );
}

#[test]
fn a_non_finite_set_does_not_reach_the_others() {
    tch::manual_seed(8);
    let mut batched = net();
    let sets = sets();
    attach_sets(&mut batched, &sets);
    let x = randn(&[10, 3, 8]);
    let image = randn(&[10, 4, 6, 5]);
    let finite = |model: &Net, x: &Tensor, image: &Tensor| {
        let (y, z) = (model.lin.forward(x), model.conv.forward(image));
        (y.sum(Kind::Float) + z.sum(Kind::Float)).backward();
        (y, z)
    };
    let (y, z) = finite(&batched, &x, &image);
    let before: Vec<_> = [0, 2].iter().map(|&i| grads(&sets.lin[i])).collect();
    let before_conv = grads(sets.conv[2].as_ref().unwrap());
    for a in sets.lin.iter().chain(sets.conv.iter().flatten()) {
        let _ = a.down.grad().zero_();
        let _ = a.up.grad().zero_();
    }
    // Set 1's rows become NaN: its own outputs and gradients do, nobody else's.
    let poisoned_x = x.copy();
    let _ = poisoned_x.narrow(0, 2, 3).fill_(f64::NAN);
    let poisoned_image = image.copy();
    let _ = poisoned_image.narrow(0, 2, 3).fill_(f64::NAN);
    let (y2, z2) = finite(&batched, &poisoned_x, &poisoned_image);
    for (start, len) in [(0, 2), (5, 5)] {
        assert_eq!(
            max_diff(&y.narrow(0, start, len), &y2.narrow(0, start, len)),
            0.0
        );
        assert_eq!(
            max_diff(&z.narrow(0, start, len), &z2.narrow(0, start, len)),
            0.0
        );
    }
    assert!(y2.narrow(0, 2, 3).isnan().all().int64_value(&[]) == 1);
    for (k, &i) in [0, 2].iter().enumerate() {
        let (down, up) = grads(&sets.lin[i]);
        assert!(
            down.equal(&before[k].0) && up.equal(&before[k].1),
            "set {i}"
        );
    }
    let (down, up) = grads(sets.conv[2].as_ref().unwrap());
    assert!(down.equal(&before_conv.0) && up.equal(&before_conv.1));
    assert!(grads(&sets.lin[1]).0.isnan().any().int64_value(&[]) == 1);
}

#[test]
fn detach_rows_gives_the_set_back_and_the_layer_computes_as_before() {
    tch::manual_seed(9);
    let mut model = net();
    let x = randn(&[4, 8]);
    let base = model.lin.forward(&x);
    let sets = sets();
    model
        .lin
        .add_adapter("lin", twin_shared(&sets.lin[0]))
        .unwrap();
    let mut detached = crate::detach(&mut model, "default").unwrap();
    attach_rows(&mut model, 1..3, &mut detached).unwrap();
    assert!(crate::packing::fused_forward(&[&model.lin], &x).is_none());
    let back = detach_rows(&mut model, 1..3).unwrap();
    assert_eq!(back.len(), 1);
    assert!(model.lin.forward(&x).equal(&base));
    crate::attach(&mut model, back).unwrap();
    assert_eq!(model.lin.adapters().len(), 1);
    assert!(matches!(
        detach_rows(&mut model, 1..3),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn refuses_overlaps_empty_rows_dora_dropout_and_misfits_attaching_nothing() {
    tch::manual_seed(10);
    let mut model = net();
    let sets = sets();
    let detach_one = |model: &mut Net, a: Adapter| {
        model.lin.add_adapter("lin", a).unwrap();
        crate::detach(model, "default").unwrap()
    };
    let mut first = detach_one(&mut model, twin_shared(&sets.lin[0]));
    attach_rows(&mut model, 0..2, &mut first).unwrap();
    let mut second = detach_one(&mut model, twin_shared(&sets.lin[1]));
    let overlap = attach_rows(&mut model, 1..4, &mut second).unwrap_err();
    assert!(overlap.to_string().contains("overlap"), "{overlap}");
    assert_eq!(second.len(), 1, "a refused set is kept whole");
    let empty = attach_rows(&mut model, 3..3, &mut second).unwrap_err();
    assert!(empty.to_string().contains("empty"), "{empty}");
    let mut dora = twin(&sets.lin[1]);
    dora.magnitude = Some(Tensor::ones([6], (Kind::Float, Device::Cpu)));
    let mut dora = detach_one(&mut model, dora);
    let error = attach_rows(&mut model, 2..4, &mut dora).unwrap_err();
    assert!(error.to_string().contains("DoRA"), "{error}");
    let mut dropped = twin(&sets.lin[1]);
    dropped.dropout = 0.1;
    let mut dropped = detach_one(&mut model, dropped);
    let error = attach_rows(&mut model, 2..4, &mut dropped).unwrap_err();
    assert!(error.to_string().contains("dropout"), "{error}");
    let mut misfit = DetachedAdapters::default();
    misfit
        .adapters
        .push(("lin".into(), adapter(&[2, 5], &[6, 2], 2.0)));
    assert!(matches!(
        attach_rows(&mut model, 2..4, &mut misfit),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut elsewhere = DetachedAdapters::default();
    elsewhere
        .adapters
        .push(("nowhere".into(), adapter(&[2, 8], &[6, 2], 2.0)));
    assert!(matches!(
        attach_rows(&mut model, 2..4, &mut elsewhere),
        Err(Error::ModulesNotInModel { .. })
    ));
    assert_eq!(
        model.lin.row_adapters.len(),
        1,
        "nothing refused was attached"
    );
    attach_rows(&mut model, 2..4, &mut second).unwrap();
    assert_eq!(
        model
            .lin
            .row_adapters
            .iter()
            .map(|r| r.rows.clone())
            .collect::<Vec<_>>(),
        vec![0..2, 2..4]
    );
}
