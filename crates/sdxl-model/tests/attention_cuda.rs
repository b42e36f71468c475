//! cuDNN's fused attention (`AttentionBackend::Cudnn`, `--attention cudnn`) against flash attention
//! (`Flash`) on a GPU, at the UNet's shapes in bf16: forward and the three input gradients within
//! bf16's rounding (both accumulate in fp32), and libtorch's backend order as before afterwards (the
//! order libtorch settles at its first attention: `torch_cuda::sdp::priority` has it settle first).
//! Skipped without CUDA (`SDXL_REQUIRE_CUDA=1` makes that a failure).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use sdxl_model::attention::{AttentionBackend, attention};
use tch::{Device, Kind, Tensor};

#[test]
fn cudnn_attention_agrees_with_flash_attention_on_cuda() {
    if !test_support::cuda() {
        return;
    }
    let device = Device::Cuda(0);
    let before = torch_cuda::sdp::priority().unwrap();
    println!("libtorch's attention order on this GPU: {before:?}");
    // 64² tokens of 10 heads of 64 (self-attention at 1024 px), and 32² tokens against 77 text tokens.
    for (lq, lk) in [(4096, 4096), (1024, 77)] {
        tch::manual_seed(8);
        let opts = (Kind::BFloat16, device);
        let (q, k, v) = (
            Tensor::randn([2, lq, 640], opts),
            Tensor::randn([2, lk, 640], opts),
            Tensor::randn([2, lk, 640], opts),
        );
        let upstream = Tensor::randn([2, lq, 640], opts);
        let run = |backend| {
            let leaves: Vec<Tensor> = [&q, &k, &v]
                .iter()
                .map(|t| t.detach().set_requires_grad(true))
                .collect();
            let out = attention(&leaves[0], &leaves[1], &leaves[2], 10, backend).unwrap();
            (&out * &upstream).sum(Kind::Float).backward();
            let mut all = vec![out.detach()];
            all.extend(leaves.iter().map(Tensor::grad));
            all
        };
        let (flash, cudnn) = (run(AttentionBackend::Flash), run(AttentionBackend::Cudnn));
        for (name, (a, b)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(flash.iter().zip(&cudnn))
        {
            let scale = a.abs().max().to_kind(Kind::Float).double_value(&[]);
            let diff = (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
                .abs()
                .max()
                .double_value(&[]);
            let differ = a.ne_tensor(b).sum(Kind::Int64).int64_value(&[]);
            println!(
                "{lq}x{lk} {name}: cuDNN vs flash {differ} values differ, max |delta| {diff:.3e} (largest {scale:.3e})"
            );
            assert!(diff <= scale * 2f64.powi(-6), "{lq}x{lk} {name}");
        }
    }
    assert_eq!(torch_cuda::sdp::priority().unwrap(), before);
}
