//! The fused GEGLU (`torch_cuda::geglu`): NVRTC compiles every kernel variant on any machine; on a
//! GPU its forward and backward in fp32, bf16 and fp16 equal libtorch's chunk + GELU + product
//! (values and the projection's gradient), repeat bit for bit, and replay in a CUDA graph as they
//! ran eagerly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use tch::{Device, Kind, Tensor};
use torch_cuda::geglu::{compile_check, geglu, geglu_reference};

#[test]
fn nvrtc_compiles_every_variant() {
    if !torch_cuda::shim_compiled() {
        println!("no CUDA shim in this build: nothing to compile");
        return;
    }
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

/// The largest difference in units of the type's last place (relative to the reference value, at
/// least the smallest normal), and how many values differ at all.
fn ulps(ours: &Tensor, reference: &Tensor, kind: Kind) -> (f64, i64) {
    let eps = match kind {
        Kind::BFloat16 => 2f64.powi(-7),
        Kind::Half => 2f64.powi(-10),
        _ => 2f64.powi(-23),
    };
    let (a, b) = (ours.to_kind(Kind::Double), reference.to_kind(Kind::Double));
    let scale = b.abs().clamp_min(1e-30) * eps;
    let worst = ((&a - &b).abs() / scale).max().double_value(&[]);
    let differ = a.ne_tensor(&b).sum(Kind::Int64).int64_value(&[]);
    (worst, differ)
}

#[test]
fn forward_and_backward_equal_libtorchs_ops() {
    if !test_support::cuda() {
        return;
    }
    let device = Device::Cuda(0);
    for kind in [Kind::BFloat16, Kind::Half, Kind::Float] {
        // The UNet's widths (inner 2560 and 5120), an odd row count and an inner width that only
        // takes vectors of 2.
        for shape in [[2, 1024, 5120], [1, 77, 10240], [3, 5, 18]] {
            tch::manual_seed(11);
            let proj = (Tensor::randn(shape, (Kind::Float, device)) * 2.0).to_kind(kind);
            let dout = Tensor::randn([shape[0], shape[1], shape[2] / 2], (Kind::Float, device))
                .to_kind(kind);
            let run = |fused: bool| {
                let p = proj.detach().set_requires_grad(true);
                let y = if fused {
                    geglu(&p).unwrap()
                } else {
                    geglu_reference(&p)
                };
                // d(sum(y · dout))/dy = dout exactly (dout holds values of y's type).
                (&y * &dout).sum(Kind::Float).backward();
                (y.detach(), p.grad())
            };
            let (y, dp) = run(true);
            let (y_ref, dp_ref) = run(false);
            assert_eq!(y.size(), y_ref.size());
            assert_eq!(dp.size(), dp_ref.size());
            let (fwd_ulps, fwd_differ) = ulps(&y, &y_ref, kind);
            let (bwd_ulps, bwd_differ) = ulps(&dp, &dp_ref, kind);
            println!(
                "{shape:?} {kind:?}: forward {fwd_differ} of {} differ (at most {fwd_ulps:.2} ulp), \
                 backward {bwd_differ} of {} (at most {bwd_ulps:.2} ulp)",
                y.numel(),
                dp.numel()
            );
            // libtorch's arithmetic with the same roundings: equal, or at most one rounding apart
            // where the two compilers' erf/exp differ in the last bit.
            assert!(fwd_ulps <= 1.0 && bwd_ulps <= 1.0, "{shape:?} {kind:?}");
            // The same bits again.
            let (y2, dp2) = run(true);
            assert!(
                y2.equal(&y) && dp2.equal(&dp),
                "{shape:?} {kind:?}: not repeatable"
            );
        }
    }
}

#[test]
fn a_captured_graph_replays_what_ran_eagerly() {
    if !test_support::cuda() {
        return;
    }
    let device = Device::Cuda(0);
    tch::manual_seed(3);
    let mut proj = Tensor::randn([2, 64, 2560], (Kind::BFloat16, device));
    let eager = geglu(&proj).unwrap();
    let (graph, out) =
        torch_cuda::CudaGraph::capture(0, None, torch_cuda::CaptureMode::Global, || geglu(&proj))
            .unwrap();
    let out = out.unwrap();
    graph.replay().unwrap();
    assert!(
        out.equal(&eager),
        "the replayed result differs from the eager one"
    );
    // New input values in the captured tensor's storage: the replay follows them.
    let proj2 = Tensor::randn([2, 64, 2560], (Kind::BFloat16, device));
    tch::no_grad(|| proj.copy_(&proj2));
    graph.replay().unwrap();
    assert!(
        out.equal(&geglu(&proj).unwrap()),
        "the replay did not follow the new input"
    );
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    if !test_support::cuda() {
        return;
    }
    let device = Device::Cuda(0);
    let odd = Tensor::zeros([2, 7], (Kind::BFloat16, device));
    let err = geglu(&odd).unwrap_err();
    assert!(err.to_string().contains("even"), "{err}");
    let ints = Tensor::zeros([2, 8], (Kind::Int64, device));
    let err = geglu(&ints).unwrap_err();
    assert!(err.to_string().contains("unsupported type"), "{err}");
    let cpu = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
    assert!(geglu(&cpu).is_err());
}
