//! The attention core shared by every model of the crate, with three interchangeable backends.
//!
//! Follows the processors of diffusers' `models/attention_processor.py`: `AttnProcessor2_0` (one fused
//! `scaled_dot_product_attention` call), `SlicedAttnProcessor` (the batch×heads axis cut into slices that
//! are computed one after another, trading speed for peak memory) and `AttnProcessor` (scores, softmax and
//! weighted sum as separate matmuls). All three compute `softmax(q kᵀ / √d) v` per head; they differ only
//! in how much memory the intermediate scores take and how fast the kernels are.
//!
//! The projections (`to_q`, `to_k`, ...) belong to the calling module; this file only sees the
//! projected, head-interleaved tensors, so the UNet's transformer blocks and the VAE's mid-block attention
//! use the same code.

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// How many rows of the batch×heads axis one slice of [`AttentionBackend::Sliced`] computes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SliceSize {
    /// Half the heads per slice (at least one), as diffusers' `set_attention_slice("auto")`: attention
    /// runs in two steps per sample.
    #[default]
    Auto,
    /// One row per slice: the smallest peak memory and the most kernel launches (diffusers' `"max"`).
    Max,
    /// This many rows per slice; must be positive.
    Rows(i64),
}

impl SliceSize {
    /// The rows per slice for an attention with `heads` heads.
    pub fn rows(self, heads: i64) -> i64 {
        match self {
            Self::Auto => (heads / 2).max(1),
            Self::Max => 1,
            Self::Rows(rows) => rows.max(1),
        }
    }
}

impl std::str::FromStr for SliceSize {
    type Err = Error;

    /// Parses `auto`, `max` or a positive number of rows.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "max" => Ok(Self::Max),
            _ => match s.parse::<i64>() {
                Ok(rows) if rows > 0 => Ok(Self::Rows(rows)),
                _ => Err(Error::InvalidSetting {
                    setting: "attention slice size",
                    value: s.to_owned(),
                    expected: "`auto`, `max` or a positive integer",
                }),
            },
        }
    }
}

/// Which kernels compute attention. Chosen at run time; all give the same result up to rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionBackend {
    /// libtorch's fused `scaled_dot_product_attention` in libtorch's own order: flash attention first
    /// on CUDA — except on Hopper and Blackwell GPUs with a cuDNN newer than 9.15.0, where libtorch
    /// itself tries cuDNN's attention first (`torch_cuda::sdp`).
    #[default]
    Fused,
    /// The same with flash attention tried first on CUDA (`torch_cuda::sdp::with_first`, PyTorch's
    /// `sdpa_kernel([SDPBackend.FLASH_ATTENTION], set_priority=True)`); libtorch falls back to the
    /// next backend where flash attention does not apply. On the CPU the same as `Fused`.
    Flash,
    /// The same with cuDNN's fused attention tried first on CUDA, as `Flash` does flash attention.
    Cudnn,
    /// The batch×heads axis in slices, each computed with plain matmuls: bounded peak memory.
    Sliced(SliceSize),
    /// Scores, softmax and weighted sum as separate operations over all heads at once.
    Plain,
}

impl std::str::FromStr for AttentionBackend {
    type Err = Error;

    /// Parses `fused`, `flash`, `cudnn`, `plain`, `sliced` (auto slice size) or `sliced:<auto|max|rows>`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fused" => Ok(Self::Fused),
            "flash" => Ok(Self::Flash),
            "cudnn" => Ok(Self::Cudnn),
            "plain" => Ok(Self::Plain),
            "sliced" => Ok(Self::Sliced(SliceSize::Auto)),
            _ => match s.strip_prefix("sliced:") {
                Some(size) => Ok(Self::Sliced(size.parse()?)),
                None => Err(Error::InvalidSetting {
                    setting: "attention backend",
                    value: s.to_owned(),
                    expected: "`fused`, `flash`, `cudnn`, `plain`, `sliced` or `sliced:<auto|max|rows>`",
                }),
            },
        }
    }
}

/// Multi-head attention of already projected queries, keys and values.
///
/// The channels of each input are `heads` groups of `head_dim` channels (head-major, as diffusers'
/// `head_to_batch_dim` reads them); the output has the same layout, ready for the output projection.
/// Scores are scaled by `1/√head_dim`. With the plain and sliced backends the softmax is taken in fp32
/// even for half-precision inputs, as the fused kernels do internally.
///
/// No tensor value is read on the host, and all shapes follow from the input shapes, so the call can
/// be captured in a CUDA graph.
///
/// # Shapes
/// `query` `[batch, query_len, heads·head_dim]`, `key` and `value` `[batch, key_len, heads·head_dim]`
/// → `[batch, query_len, heads·head_dim]`.
///
/// # Errors
/// [`Error::Shape`] when the inputs are not 3-D, disagree in batch, width or key length, or the width
/// is not a multiple of `heads`.
pub fn attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: i64,
    backend: AttentionBackend,
) -> Result<Tensor> {
    let (q_size, k_size, v_size) = (query.size(), key.size(), value.size());
    let consistent = q_size.len() == 3
        && k_size.len() == 3
        && v_size == k_size
        && q_size[0] == k_size[0]
        && q_size[2] == k_size[2]
        && heads > 0
        && q_size[2] % heads == 0;
    if !consistent {
        return Err(Error::Shape {
            what: format!("attention with {heads} heads"),
            expected: "query [B, Lq, H·D], key = value [B, Lk, H·D]".to_owned(),
            actual: format!("query {q_size:?}, key {k_size:?}, value {v_size:?}"),
        });
    }
    let (batch, query_len, width) = (q_size[0], q_size[1], q_size[2]);
    let head_dim = width / heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    // [B, L, H·D] → [B, H, L, D]
    let split = |t: &Tensor| t.view([batch, -1, heads, head_dim]).transpose(1, 2);
    let (q, k, v) = (split(query), split(key), split(value));
    let out = match backend {
        AttentionBackend::Fused => fused(&q, &k, &v, false, Some(scale)),
        AttentionBackend::Flash | AttentionBackend::Cudnn => {
            let first = if backend == AttentionBackend::Flash {
                torch_cuda::sdp::Backend::Flash
            } else {
                torch_cuda::sdp::Backend::Cudnn
            };
            let run = || fused(&q, &k, &v, false, Some(scale));
            // On the CPU there is no order to set; without the shim it cannot be set: libtorch's own
            // order then.
            if q.device().is_cuda() {
                torch_cuda::sdp::with_first(&[first], run).unwrap_or_else(|_| run())
            } else {
                run()
            }
        }
        AttentionBackend::Plain => weighted_sum(&q, &k, &v, scale),
        AttentionBackend::Sliced(size) => {
            // Slices run over the flattened batch×heads axis, as diffusers' `SlicedAttnProcessor` does.
            let rows = size.rows(heads);
            let flat = |t: &Tensor| t.reshape([batch * heads, -1, head_dim]);
            let (q, k, v) = (flat(&q), flat(&k), flat(&v));
            let slices: Vec<Tensor> = (0..batch * heads)
                .step_by(rows as usize)
                .map(|start| {
                    let end = (start + rows).min(batch * heads);
                    let part = |t: &Tensor| t.narrow(0, start, end - start);
                    weighted_sum(&part(&q), &part(&k), &part(&v), scale)
                })
                .collect();
            Tensor::cat(&slices, 0).view([batch, heads, query_len, head_dim])
        }
    };
    // [B, H, L, D] → [B, L, H·D]
    Ok(out.transpose(1, 2).reshape([batch, query_len, width]))
}

/// `softmax(q kᵀ · scale) v` over the last two dimensions, softmax in fp32.
fn weighted_sum(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let scores = q.matmul(&k.transpose(-1, -2)) * scale;
    scores.softmax(-1, Kind::Float).to_kind(v.kind()).matmul(v)
}

/// libtorch's fused `scaled_dot_product_attention` over `[batch, heads, len, head_dim]` tensors.
///
/// On the CPU, bf16 and fp16 inputs are computed in fp32 and cast back: libtorch's CPU kernel for
/// them picks AVX-512 or AMX code from the CPU's features and fails ("pack_vnni2 is only supported
/// when avx512 is supported") when `ATEN_CPU_CAPABILITY` selects less than the CPU has; it
/// accumulates in fp32 anyway. CUDA tensors go to libtorch's flash or memory-efficient kernels.
pub(crate) fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    is_causal: bool,
    scale: Option<f64>,
) -> Tensor {
    let kind = q.kind();
    if q.device() == tch::Device::Cpu && matches!(kind, Kind::BFloat16 | Kind::Half) {
        let float = |t: &Tensor| t.to_kind(Kind::Float);
        return Tensor::scaled_dot_product_attention::<Tensor>(
            &float(q),
            &float(k),
            &float(v),
            None,
            0.0,
            is_causal,
            scale,
            false,
        )
        .to_kind(kind);
    }
    Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, is_causal, scale, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn inputs(batch: i64, lq: i64, lk: i64, width: i64) -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(7);
        let opts = (Kind::Float, Device::Cpu);
        (
            Tensor::randn([batch, lq, width], opts),
            Tensor::randn([batch, lk, width], opts),
            Tensor::randn([batch, lk, width], opts),
        )
    }

    /// The textbook definition, head by head, to check the backends against.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64) -> Tensor {
        let d = q.size()[2] / heads;
        let per_head: Vec<Tensor> = (0..heads)
            .map(|h| {
                let (qh, kh, vh) = (
                    q.narrow(2, h * d, d),
                    k.narrow(2, h * d, d),
                    v.narrow(2, h * d, d),
                );
                (qh.matmul(&kh.transpose(1, 2)) / (d as f64).sqrt())
                    .softmax(-1, Kind::Float)
                    .matmul(&vh)
            })
            .collect();
        Tensor::cat(&per_head, 2)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn all_backends_agree_with_the_definition() {
        let (q, k, v) = inputs(3, 9, 5, 12);
        let expected = reference(&q, &k, &v, 3);
        let backends = [
            AttentionBackend::Fused,
            AttentionBackend::Flash,
            AttentionBackend::Cudnn,
            AttentionBackend::Plain,
            AttentionBackend::Sliced(SliceSize::Auto),
            AttentionBackend::Sliced(SliceSize::Max),
            AttentionBackend::Sliced(SliceSize::Rows(2)),
            AttentionBackend::Sliced(SliceSize::Rows(4)),
            AttentionBackend::Sliced(SliceSize::Rows(100)),
        ];
        for backend in backends {
            let out = attention(&q, &k, &v, 3, backend).unwrap();
            assert_eq!(out.size(), [3, 9, 12]);
            let diff = max_abs_diff(&out, &expected);
            assert!(diff < 1e-5, "{backend:?}: max abs diff {diff}");
        }
    }

    #[test]
    fn matches_torch_sdpa_fixture() {
        // tests/fixtures/torch_ops.safetensors holds PyTorch's SDPA on [2, 4, 9, 8] heads-first inputs.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/torch_ops.safetensors");
        assert!(
            path.exists(),
            "missing fixture {}: regenerate it with `tools/fixtures/regenerate.sh --only ops`",
            path.display()
        );
        let file = crate::weights::TensorFile::open(path).unwrap();
        let get = |key: &str| file.tensor(key, Device::Cpu, None).unwrap();
        let merge = |t: Tensor| t.transpose(1, 2).reshape([2, -1, 32]);
        let (q, k, v) = (merge(get("q")), merge(get("k")), merge(get("v")));
        let expected = merge(get("sdpa"));
        for backend in [
            AttentionBackend::Fused,
            AttentionBackend::Plain,
            AttentionBackend::Sliced(SliceSize::Rows(3)),
        ] {
            let diff = max_abs_diff(&attention(&q, &k, &v, 4, backend).unwrap(), &expected);
            assert!(diff < 1e-5, "{backend:?}: max abs diff {diff}");
        }
    }

    #[test]
    fn bad_shapes_and_settings_are_errors() {
        let (q, k, v) = inputs(2, 4, 4, 6);
        let msg = attention(&q, &k, &v, 4, AttentionBackend::Plain)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("4 heads") && msg.contains("[2, 4, 6]"),
            "{msg}"
        );
        let msg = attention(&q, &k.narrow(0, 0, 1), &v, 2, AttentionBackend::Plain)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("key [1, 4, 6]"), "{msg}");
        assert_eq!(
            "cudnn".parse::<AttentionBackend>().unwrap(),
            AttentionBackend::Cudnn
        );
        assert_eq!(
            "sliced:max".parse::<AttentionBackend>().unwrap(),
            AttentionBackend::Sliced(SliceSize::Max)
        );
        assert_eq!(
            "sliced:8".parse::<AttentionBackend>().unwrap(),
            AttentionBackend::Sliced(SliceSize::Rows(8))
        );
        let msg = "sliced:0"
            .parse::<AttentionBackend>()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`0`") && msg.contains("slice size"), "{msg}");
        assert!(
            "flashy"
                .parse::<AttentionBackend>()
                .unwrap_err()
                .to_string()
                .contains("`flashy`")
        );
        assert_eq!(
            "flash".parse::<AttentionBackend>().unwrap(),
            AttentionBackend::Flash
        );
        assert_eq!(SliceSize::Auto.rows(5), 2);
        assert_eq!(SliceSize::Auto.rows(1), 1);
    }
}
