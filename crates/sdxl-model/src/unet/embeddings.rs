//! Sinusoidal timestep embeddings and the MLP that widens them.
//!
//! Follows diffusers' `models/embeddings.py`: `get_timestep_embedding`, `Timesteps` and
//! `TimestepEmbedding`. SDXL uses them twice: for the diffusion timestep (`time_proj` →
//! `time_embedding`) and for the six micro-conditioning numbers (`add_time_proj` → `add_embedding`).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use lora::Linear;

/// Sinusoidal embedding of one number per row, computed in fp32 on the numbers' device.
///
/// Frequencies are `exp(-ln(10000)·k / (dim/2 - freq_shift))` for `k < dim/2`; the output is
/// `[sin, cos]`, or `[cos, sin]` with `flip_sin_to_cos` (SDXL). `dim` must be even (the config
/// validation guarantees it for every caller in this crate).
///
/// # Shapes
/// `numbers` `[n]` (any numeric kind) → `[n, dim]` fp32.
pub fn timestep_embedding(
    numbers: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, numbers.device()))
        * (-(10000f64.ln()) / (half as f64 - freq_shift));
    let angles = numbers.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (angles.sin(), angles.cos());
    if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)
    } else {
        Tensor::cat(&[sin, cos], 1)
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    /// `linear_1`.
    pub(crate) linear_1: Linear,
    /// `linear_2`.
    pub(crate) linear_2: Linear,
}

impl TimestepEmbedding {
    /// Creates `linear_1` (`in_dim → out_dim`) and `linear_2` (`out_dim → out_dim`) under `path`.
    pub fn new(path: &nn::Path, in_dim: i64, out_dim: i64) -> Self {
        Self {
            linear_1: Linear::new(&(path / "linear_1"), in_dim, out_dim, true),
            linear_2: Linear::new(&(path / "linear_2"), out_dim, out_dim, true),
        }
    }

    /// Calls `f` with `prefix.linear_1` and `prefix.linear_2`.
    pub fn for_each_linear(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        f(&format!("{prefix}.linear_1"), &mut self.linear_1);
        f(&format!("{prefix}.linear_2"), &mut self.linear_2);
    }
}

impl Module for TimestepEmbedding {
    /// # Shapes
    /// `[n, in_dim]` → `[n, out_dim]`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn matches_the_formula_with_cos_first() {
        let t = Tensor::from_slice(&[0.0f32, 1.0, 999.0]);
        let emb = timestep_embedding(&t, 8, true, 0.0);
        assert_eq!(emb.size(), [3, 8]);
        // Row 2, frequency k = 1 of 4: 999 · exp(-ln(10000)/4).
        let angle = 999.0 * (-(10000f64.ln()) / 4.0).exp();
        let got = |col: i64| emb.double_value(&[2, col]);
        assert!((got(1) - angle.cos()).abs() < 1e-4 && (got(5) - angle.sin()).abs() < 1e-4);
        // Row 0 is cos(0) = 1 then sin(0) = 0.
        let first = Tensor::cat(
            &[
                Tensor::ones([4], (Kind::Float, Device::Cpu)),
                Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        assert!(emb.get(0).allclose(&first, 0.0, 1e-7, false));
        let unflipped = timestep_embedding(&t, 8, false, 1.0);
        let angle = 999.0 * (-(10000f64.ln()) / 3.0).exp();
        assert!((unflipped.double_value(&[2, 1]) - angle.sin()).abs() < 1e-4);
    }
}
