//! The differentiable fp8 product (`torch_cuda::fp8::linear`) on a GPU: at the SDXL UNet's shapes its
//! forward stays within the input's e4m3 rounding of the widened product, its input gradient is the
//! widened layer's, and it replays in a CUDA graph as it ran eagerly; its input quantization by our
//! own kernels (compiled here by NVRTC for every variant) equals libtorch's operations bit for bit. GPUs without fp8 tensor cores
//! (compute capability below 8.9) refuse it with libtorch's reason. The CPU tests are in `src/fp8.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use tch::{Device, Kind, Tensor};
use torch_cuda::fp8::{Backward, Format, compile_check, linear, quantize};

/// A weight `[out, in]` in e4m3 with its per-tensor scale (amax / 448), and its widened value.
fn fp8_weight(out: i64, width: i64, kind: Kind, device: Device) -> (Tensor, Tensor, Tensor) {
    let w = Tensor::randn([out, width], (Kind::Float, device)) * 0.02;
    let scale = w.abs().max() / 448.0;
    let quantized = (&w / &scale)
        .clamp(-448.0, 448.0)
        .to_kind(Kind::Float8e4m3fn);
    let widened = quantized.to_kind(kind) * &scale;
    (quantized, scale, widened)
}

/// Whether the first GPU has fp8 tensor cores; prints why the test stops when it has none.
fn fp8_gpu() -> bool {
    if !test_support::cuda() {
        return false;
    }
    let capability = torch_cuda::compute_capability(0);
    if capability.is_none_or(|c| c < (8, 9)) {
        let (weight, scale, _) = fp8_weight(16, 16, Kind::BFloat16, Device::Cuda(0));
        let x = Tensor::zeros([2, 16], (Kind::BFloat16, Device::Cuda(0)));
        let err = linear(&x, &weight, &scale, None, Backward::Widened).unwrap_err();
        println!("compute capability {capability:?}: refused as expected ({err})");
        return false;
    }
    true
}

#[test]
fn nvrtc_compiles_every_quantization_variant() {
    if !torch_cuda::shim_compiled() {
        println!("no CUDA shim in this build: nothing to compile");
        return;
    }
    for arch in [89, 90] {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            for vec in [1, 2, 4, 8] {
                compile_check(arch, kind, vec)
                    .unwrap_or_else(|e| panic!("sm_{arch} {kind:?} VEC={vec}: {e}"));
            }
        }
    }
    let err = compile_check(90, Kind::BFloat16, 3).unwrap_err();
    assert!(err.to_string().contains("vector width 3"), "{err}");
    let err = compile_check(90, Kind::Int8, 1).unwrap_err();
    assert!(err.to_string().contains("Int8"), "{err}");
}

/// The CUDA kernels' quantization against libtorch's operations on the same input with the kernels'
/// scale: every value bit for bit, the scale `max(amax, 1e-12) / 448` exactly; at sizes that take
/// every vector width, with zeros, values in e4m3's subnormal range, and a NaN.
#[test]
fn the_quantization_kernels_equal_libtorchs_operations() {
    if !test_support::cuda() {
        return;
    }
    let device = Device::Cuda(0);
    for (kind, format) in [
        (Kind::BFloat16, Format::E4m3),
        (Kind::Half, Format::E4m3),
        (Kind::Float, Format::E4m3),
        (Kind::BFloat16, Format::E5m2),
        (Kind::Half, Format::E5m2),
    ] {
        let (top, fp8) = match format {
            Format::E4m3 => (448.0, Kind::Float8e4m3fn),
            Format::E5m2 => (57344.0, Kind::Float8e5m2),
        };
        for numel in [2 * 1024 * 640, 77 * 2048, 6 * 3, 7] {
            tch::manual_seed(9);
            // Magnitudes over ten orders (some deep in e4m3's subnormal range after scaling), a few zeros.
            let x = (Tensor::randn([numel], (Kind::Float, device))
                * (Tensor::rand([numel], (Kind::Float, device)) * 20.0 - 12.0).exp2()
                * Tensor::rand([numel], (Kind::Float, device)).gt(0.05))
            .to_kind(kind);
            let (values, scale) = quantize(&x, format).unwrap();
            let amax = x.abs().max().to_kind(Kind::Float).double_value(&[]) as f32;
            assert_eq!(
                scale.double_value(&[]) as f32,
                amax.max(1e-12) / top as f32,
                "{kind:?} {format:?} {numel}: the scale"
            );
            let expected = (&x / &scale).clamp(-top, top).to_kind(fp8);
            let (ours, theirs) = (
                values.view_dtype(Kind::Uint8),
                expected.view_dtype(Kind::Uint8),
            );
            let mismatch = ours.ne_tensor(&theirs);
            let differ = mismatch.sum(Kind::Int64).int64_value(&[]);
            if differ != 0 {
                // The first few that differ: the input, its quotient by the scale, both bytes.
                let at = mismatch
                    .nonzero()
                    .flatten(0, -1)
                    .narrow(0, 0, differ.min(4));
                let show = |t: &Tensor| {
                    format!(
                        "{:?}",
                        Vec::<f64>::try_from(t.index_select(0, &at).to_kind(Kind::Double)).unwrap()
                    )
                };
                panic!(
                    "{kind:?} {format:?} {numel}: {differ} values differ; at {:?}: x {}, x / scale {}, ours {}, libtorch's {}",
                    Vec::<i64>::try_from(&at).unwrap(),
                    show(&x),
                    show(&(x.to_kind(Kind::Float) / &scale)),
                    show(&ours),
                    show(&theirs),
                );
            }
        }
        // A NaN makes the scale NaN, as libtorch's max does.
        let x = Tensor::ones([64], (kind, device));
        let _ = x.get(5).fill_(f64::NAN);
        let (_, scale) = quantize(&x, format).unwrap();
        assert!(scale.double_value(&[]).is_nan(), "{kind:?}: NaN lost");
        // All zeros: the floored scale, zeros out.
        let (values, scale) = quantize(&Tensor::zeros([32], (kind, device)), format).unwrap();
        assert_eq!(scale.double_value(&[]) as f32, 1e-12f32 / top as f32);
        assert_eq!(
            values
                .to_kind(Kind::Float)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }
}

#[test]
fn forward_within_the_inputs_rounding_and_backward_the_widened_layers_at_unet_shapes() {
    if !fp8_gpu() {
        return;
    }
    let device = Device::Cuda(0);
    // The seed recipe's attention projections at 64² and 32² tokens (batch 2), a feed-forward
    // projection, and the time embedding's two rows.
    for (rows, width, out) in [
        (2 * 4096, 640, 640),
        (2 * 1024, 1280, 1280),
        (2 * 1024, 1280, 10240),
        (2, 320, 1280),
    ] {
        for kind in [Kind::BFloat16, Kind::Half] {
            tch::manual_seed(5);
            let (weight, scale, widened) = fp8_weight(out, width, kind, device);
            let bias = (Tensor::randn([out], (Kind::Float, device)) * 0.1).to_kind(kind);
            let x = Tensor::randn([rows, width], (Kind::Float, device)).to_kind(kind);
            let upstream = Tensor::randn([rows, out], (Kind::Float, device)).to_kind(kind);

            let leaf = x.detach().set_requires_grad(true);
            let y = linear(&leaf, &weight, &scale, Some(&bias), Backward::Widened).unwrap();
            (&y * &upstream).sum(Kind::Float).backward();
            let widened_leaf = x.detach().set_requires_grad(true);
            let widened_y = widened_leaf.linear(&widened, Some(&bias));
            (&widened_y * &upstream).sum(Kind::Float).backward();

            // Forward: the input's rounding (2⁻⁴ of each |x| plus a subnormal half-step) times |W|,
            // the output's rounding in `kind`, and Hopper's fast fp8 accumulation (2⁻¹⁰ of Σ|x||W|).
            let (x32, w32) = (x.to_kind(Kind::Float), widened.to_kind(Kind::Float));
            let exact = x32.linear(&w32, Some(&bias.to_kind(Kind::Float)));
            let x_scale = x32.abs().max().double_value(&[]) / 448.0;
            let magnitude = x32.abs().linear::<Tensor>(&w32.abs(), None);
            let bound = &magnitude * (0.0625 + 2f64.powi(-10))
                + w32.abs().sum_dim_intlist(1, false, Kind::Float) * (x_scale * 2f64.powi(-10))
                + exact.abs() * 2f64.powi(-7)
                + 1e-5;
            let error = (y.to_kind(Kind::Float) - &exact).abs();
            let ratio = (&error / &bound).max().double_value(&[]);
            println!(
                "{rows}x{width}->{out} {kind:?}: largest error / bound {ratio:.3}, mean relative error {:.3e}",
                (error.sum(Kind::Float) / exact.abs().sum(Kind::Float)).double_value(&[])
            );
            assert!(
                ratio <= 1.0,
                "{rows}x{width}->{out} {kind:?}: past the bound"
            );

            // Backward: the widened layer's product, up to cuBLAS's choice of algorithm.
            let (ours, theirs) = (leaf.grad(), widened_leaf.grad());
            let scale_of = theirs.abs().max().double_value(&[]);
            let worst = (ours.to_kind(Kind::Float) - theirs.to_kind(Kind::Float))
                .abs()
                .max()
                .double_value(&[]);
            let differ = ours.ne_tensor(&theirs).sum(Kind::Int64).int64_value(&[]);
            println!(
                "  input gradient: {differ} values differ, largest by {worst:.3e} (of {scale_of:.3e})"
            );
            assert!(worst <= scale_of * 2f64.powi(-7), "the input's gradient");
        }
    }
}

/// `Backward::Fp8` at the UNet's shapes: the input's gradient within e5m2's rounding of the output
/// gradient (2⁻³ of each value plus a subnormal half-step) times |W| of the widened layer's, plus the
/// product's accumulation and output rounding.
#[test]
fn the_fp8_backward_stays_within_the_gradients_rounding_at_unet_shapes() {
    if !fp8_gpu() {
        return;
    }
    let device = Device::Cuda(0);
    for (rows, width, out) in [
        (2 * 4096, 640, 640),
        (2 * 1024, 1280, 1280),
        (2 * 1024, 5120, 1280),
    ] {
        for kind in [Kind::BFloat16, Kind::Half] {
            tch::manual_seed(6);
            let (weight, scale, widened) = fp8_weight(out, width, kind, device);
            let x = Tensor::randn([rows, width], (Kind::Float, device)).to_kind(kind);
            let upstream = (Tensor::randn([rows, out], (Kind::Float, device)) * 1e-3).to_kind(kind);
            let leaf = x.detach().set_requires_grad(true);
            let y = linear(&leaf, &weight, &scale, None, Backward::Fp8).unwrap();
            (&y * &upstream).sum(Kind::Float).backward();
            let grad = leaf.grad().to_kind(Kind::Float);
            let (g32, w32) = (upstream.to_kind(Kind::Float), widened.to_kind(Kind::Float));
            let exact = g32.matmul(&w32);
            let (_, grad_scale) = quantize(&upstream, Format::E5m2).unwrap();
            let magnitude = g32.abs().matmul(&w32.abs());
            let bound = &magnitude * (0.125 + 2f64.powi(-7))
                + w32.abs().sum_dim_intlist(0, false, Kind::Float)
                    * (grad_scale.double_value(&[]) * 2f64.powi(-17))
                + 1e-9;
            let error = (&grad - &exact).abs();
            let ratio = (&error / &bound).max().double_value(&[]);
            println!(
                "{rows}x{width}->{out} {kind:?} fp8 backward: largest error / bound {ratio:.3}, mean relative error {:.3e}",
                (error.sum(Kind::Float) / exact.abs().sum(Kind::Float)).double_value(&[])
            );
            assert!(
                ratio <= 1.0,
                "{rows}x{width}->{out} {kind:?}: past the bound"
            );
        }
    }
}

#[test]
fn a_captured_graph_replays_what_ran_eagerly() {
    if !fp8_gpu() {
        return;
    }
    let device = Device::Cuda(0);
    tch::manual_seed(3);
    let (weight, scale, _) = fp8_weight(1280, 640, Kind::BFloat16, device);
    let mut x = Tensor::randn([2, 1024, 640], (Kind::BFloat16, device));
    let eager = linear(&x, &weight, &scale, None, Backward::Widened).unwrap();
    let (graph, out) =
        torch_cuda::CudaGraph::capture(0, None, torch_cuda::CaptureMode::Global, || {
            linear(&x, &weight, &scale, None, Backward::Widened)
        })
        .unwrap();
    let out = out.unwrap();
    graph.replay().unwrap();
    assert!(
        out.equal(&eager),
        "the replayed result differs from the eager one"
    );
    // New input values (and a new largest magnitude, so a new scale) in the captured storage.
    let x2 = Tensor::randn([2, 1024, 640], (Kind::BFloat16, device)) * 3.0;
    tch::no_grad(|| x.copy_(&x2));
    graph.replay().unwrap();
    assert!(
        out.equal(&linear(&x, &weight, &scale, None, Backward::Widened).unwrap()),
        "the replay did not follow the new input"
    );
}
