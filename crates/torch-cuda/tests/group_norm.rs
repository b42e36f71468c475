//! The channels-last group norm (`torch_cuda::group_norm`): NVRTC compiles every kernel variant on
//! any machine; on a GPU its forward and backward, with and without SiLU, in fp32, bf16 and fp16, are
//! held against an fp64 reference of the same inputs with a bound taken from libtorch's own error
//! (libtorch's NCHW group norm and SiLU in the same type, same inputs), repeat bit for bit, and replay
//! in a CUDA graph as they ran eagerly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use tch::{Device, Kind, Tensor};
use torch_cuda::group_norm::{compile_check, group_norm, is_channels_last, to_channels_last};

#[test]
fn nvrtc_compiles_every_variant() {
    if !torch_cuda::shim_compiled() {
        println!("no CUDA shim in this build: nothing to compile");
        return;
    }
    // Hopper (the benchmarks' H100/H200) and Ampere; every type and vector width.
    for arch in [80, 90] {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            for vec in [1, 2, 4, 8] {
                compile_check(arch, kind, vec)
                    .unwrap_or_else(|e| panic!("sm_{arch} {kind:?} VEC={vec}: {e}"));
            }
        }
    }
    let err = compile_check(90, Kind::BFloat16, 3).unwrap_err();
    assert!(err.to_string().contains("vector width 3"), "{err}");
}

/// libtorch's NCHW group norm (+ SiLU) of `x`, as the model computes without the kernels.
fn reference(x: &Tensor, w: &Tensor, b: &Tensor, groups: i64, silu: bool) -> Tensor {
    let y = x
        .contiguous()
        .group_norm(groups, Some(w), Some(b), 1e-5, false);
    if silu { y.silu() } else { y }
}

struct Case {
    shape: [i64; 4],
    groups: i64,
    kind: Kind,
    silu: bool,
}

/// Values and gradients of one case: ours, libtorch's in the same type, fp64 from the same inputs.
fn check(case: &Case) {
    let device = Device::Cuda(0);
    let [n, c, h, w] = case.shape;
    tch::manual_seed(7);
    // An offset and a spread per channel, as activations have, so that the statistics matter.
    let offset = Tensor::randn([1, c, 1, 1], (Kind::Float, device)) * 2.0;
    let x0 = (Tensor::randn([n, c, h, w], (Kind::Float, device)) * 1.5 + offset).to_kind(case.kind);
    let w0 = (Tensor::randn([c], (Kind::Float, device)) * 0.5 + 1.0).to_kind(case.kind);
    let b0 = (Tensor::randn([c], (Kind::Float, device)) * 0.2).to_kind(case.kind);
    let dy = Tensor::randn([n, c, h, w], (Kind::Float, device)).to_kind(case.kind);
    let label = format!(
        "{:?} {:?} groups {} silu {}",
        case.shape, case.kind, case.groups, case.silu
    );

    let ours_f = |x: &Tensor, wt: &Tensor, bt: &Tensor| {
        group_norm(x, wt, bt, case.groups, 1e-5, case.silu)
            .unwrap_or_else(|e| panic!("{label}: {e}"))
    };
    let theirs_f =
        |x: &Tensor, wt: &Tensor, bt: &Tensor| reference(x, wt, bt, case.groups, case.silu);
    let gold_f = |x: &Tensor, wt: &Tensor, bt: &Tensor| {
        reference(
            &x.to_kind(Kind::Double),
            &wt.to_kind(Kind::Double),
            &bt.to_kind(Kind::Double),
            case.groups,
            case.silu,
        )
    };
    let backward_of = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
                       layout: fn(&Tensor) -> Tensor,
                       grad: &Tensor| {
        let x = layout(&x0).detach().set_requires_grad(true);
        let wt = w0.detach().set_requires_grad(true);
        let bt = b0.detach().set_requires_grad(true);
        let y = f(&x, &wt, &bt);
        Tensor::run_backward(
            &[&(y * grad).sum(Kind::Double)],
            &[&x, &wt, &bt],
            false,
            false,
        )
    };
    let ours_y = ours_f(&to_channels_last(&x0), &w0, &b0);
    assert!(
        is_channels_last(&ours_y),
        "{label}: the result is not channels-last"
    );
    assert_eq!(ours_y.kind(), case.kind);
    let theirs_y = theirs_f(&x0, &w0, &b0);
    let gold_y = gold_f(&x0, &w0, &b0);
    let err = |a: &Tensor, gold: &Tensor| {
        (a.to_kind(Kind::Double) - gold)
            .abs()
            .max()
            .double_value(&[])
    };
    let scale = |gold: &Tensor| gold.abs().max().double_value(&[]).max(1e-30);
    // Ours within twice libtorch's own error of the fp64 value plus one rounding of the largest value.
    let ulp = match case.kind {
        Kind::BFloat16 => 2f64.powi(-8),
        Kind::Half => 2f64.powi(-11),
        _ => 2f64.powi(-24) * 64.0,
    };
    let bound = |theirs: f64, gold: &Tensor| 2.0 * theirs + ulp * scale(gold);
    let (e_ours, e_theirs) = (err(&ours_y, &gold_y), err(&theirs_y, &gold_y));
    assert!(
        e_ours <= bound(e_theirs, &gold_y),
        "{label}: forward error {e_ours:e} > bound (libtorch {e_theirs:e})"
    );
    println!("{label}: forward max error ours {e_ours:.3e}, libtorch {e_theirs:.3e}");

    // Gradients: the upstream gradient dy in the same type for ours and libtorch, fp64 for the gold.
    let ours_g = backward_of(&ours_f, to_channels_last, &dy);
    let theirs_g = backward_of(&theirs_f, |t| t.shallow_clone(), &dy);
    let gold_g = backward_of(&gold_f, |t| t.shallow_clone(), &dy);
    for (i, name) in ["x", "weight", "bias"].iter().enumerate() {
        let (e_ours, e_theirs) = (err(&ours_g[i], &gold_g[i]), err(&theirs_g[i], &gold_g[i]));
        assert_eq!(ours_g[i].kind(), case.kind, "{label}: d{name} type");
        assert!(
            e_ours <= bound(e_theirs, &gold_g[i]),
            "{label}: d{name} error {e_ours:e} > bound (libtorch {e_theirs:e})"
        );
        println!("{label}: d{name} max error ours {e_ours:.3e}, libtorch {e_theirs:.3e}");
    }

    // Fixed-order reductions: a second run is bit-identical.
    let again = ours_f(&to_channels_last(&x0), &w0, &b0);
    assert!(again.equal(&ours_y), "{label}: a second forward differs");
    let again_g = backward_of(&ours_f, to_channels_last, &dy);
    for i in 0..3 {
        assert!(
            again_g[i].equal(&ours_g[i]),
            "{label}: a second backward differs"
        );
    }
}

#[test]
fn forward_and_backward_match_libtorch_within_its_own_error() {
    if !test_support::cuda() {
        return;
    }
    let cases = [
        // SDXL's UNet at 512 px, batch 2: 320 channels (10 per group), 1280 (40), 2560 (80), 1920 (60).
        Case {
            shape: [2, 320, 64, 64],
            groups: 32,
            kind: Kind::BFloat16,
            silu: true,
        },
        Case {
            shape: [2, 2560, 16, 16],
            groups: 32,
            kind: Kind::BFloat16,
            silu: true,
        },
        Case {
            shape: [2, 1920, 32, 32],
            groups: 32,
            kind: Kind::BFloat16,
            silu: false,
        },
        Case {
            shape: [2, 1280, 16, 16],
            groups: 32,
            kind: Kind::Half,
            silu: true,
        },
        Case {
            shape: [1, 640, 32, 32],
            groups: 32,
            kind: Kind::Float,
            silu: true,
        },
        // Odd sizes: rows that do not fill the last chunk, one channel per group.
        Case {
            shape: [3, 96, 33, 17],
            groups: 96,
            kind: Kind::BFloat16,
            silu: false,
        },
        Case {
            shape: [1, 128, 7, 5],
            groups: 32,
            kind: Kind::Float,
            silu: false,
        },
    ];
    for case in &cases {
        check(case);
    }
}

#[test]
fn a_captured_graph_replays_what_ran_eagerly() {
    if !test_support::cuda() {
        return;
    }
    let device = Device::Cuda(0);
    tch::manual_seed(3);
    let mut x = to_channels_last(&Tensor::randn([2, 640, 32, 32], (Kind::BFloat16, device)));
    let w = Tensor::randn([640], (Kind::BFloat16, device));
    let b = Tensor::randn([640], (Kind::BFloat16, device));
    let eager = group_norm(&x, &w, &b, 32, 1e-5, true).unwrap();
    let (graph, out) =
        torch_cuda::CudaGraph::capture(0, None, torch_cuda::CaptureMode::Global, || {
            group_norm(&x, &w, &b, 32, 1e-5, true)
        })
        .unwrap();
    let out = out.unwrap();
    graph.replay().unwrap();
    assert!(
        out.equal(&eager),
        "the replayed result differs from the eager one"
    );
    // New input values in the captured tensor's storage: the replay follows them.
    let x2 = Tensor::randn([2, 640, 32, 32], (Kind::BFloat16, device));
    tch::no_grad(|| x.copy_(&x2));
    graph.replay().unwrap();
    let expected = group_norm(&x, &w, &b, 32, 1e-5, true).unwrap();
    assert!(
        out.equal(&expected),
        "the replay did not follow the new input"
    );
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    if !test_support::cuda() {
        return;
    }
    let device = Device::Cuda(0);
    let x = Tensor::zeros([1, 30, 4, 4], (Kind::BFloat16, device));
    let w = Tensor::ones([30], (Kind::BFloat16, device));
    let err = group_norm(&x, &w, &w, 32, 1e-5, false).unwrap_err();
    assert!(
        err.to_string().contains("32 groups do not divide 30"),
        "{err}"
    );
    let x = Tensor::zeros([1, 32, 4, 4], (Kind::Int, device));
    let w = Tensor::ones([32], (Kind::Int, device));
    assert!(group_norm(&x, &w, &w, 32, 1e-5, false).is_err());
}
