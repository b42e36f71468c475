//! The maths every scheduler shares: the training betas and ᾱ (`alphas_cumprod`), the training sigmas,
//! and the numpy helpers diffusers' `set_timesteps` is written with.
//!
//! Follows the module-level functions and "Copied from" methods of diffusers'
//! `schedulers/scheduling_euler_discrete.py` (`betas_for_alpha_bar`, `rescale_zero_terminal_snr`,
//! `_sigma_to_t`, `_convert_to_karras`). Tensors are computed with the same libtorch float32 operations
//! diffusers uses, and the numpy float64 steps are repeated in f64 with numpy's own formulas (its
//! `linspace`, `arange` and `interp`), so that the schedules agree to the last bit or nearly.

use tch::{Kind, Tensor};

use super::config::{BetaConfig, BetaSchedule};
use crate::Result;

/// The training betas, float32 on the CPU, exactly as diffusers builds them.
pub(crate) fn betas(config: &BetaConfig) -> Result<Tensor> {
    let n = config.num_train_timesteps;
    let betas = match &config.schedule {
        BetaSchedule::Linear => torch_linspace(config.beta_start, config.beta_end, n)?,
        BetaSchedule::ScaledLinear => {
            torch_linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n)?.f_square()?
        }
        BetaSchedule::SquaredCosCapV2 => {
            Tensor::f_from_slice(&cosine_betas(config.num_train_timesteps))?
                .f_to_kind(Kind::Float)?
        }
        BetaSchedule::Trained(betas) => Tensor::f_from_slice(betas)?.f_to_kind(Kind::Float)?,
    };
    if config.rescale_zero_terminal_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        Ok(betas)
    }
}

/// float32 `torch.linspace` on the CPU, with the same bits on every CPU
/// ([`torch_cuda::portable::linspace`]); PyTorch rounds `start` and `end` to float32 first.
fn torch_linspace(start: f64, end: f64, steps: usize) -> Result<Tensor> {
    let values = torch_cuda::portable::linspace(start as f32, end as f32, steps);
    Ok(Tensor::f_from_slice(&values)?)
}

/// ᾱ_t = ∏(1 − β), float32 on the CPU (libtorch's cumulative product runs in double precision,
/// element after element, on every CPU).
pub(crate) fn alphas_cumprod(betas: &Tensor) -> Result<Tensor> {
    Ok(betas.f_rsub_scalar(1.0)?.f_cumprod(0, None::<Kind>)?)
}

/// The cosine schedule of Nichol & Dhariwal: β_i = 1 − ᾱ((i+1)/n)/ᾱ(i/n), capped at 0.999, in f64.
fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// Rescales betas so that the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise
/// Schedules and Sample Steps are Flawed", algorithm 1): √ᾱ is shifted to end at 0 and scaled to keep
/// its start.
fn rescale_zero_terminal_snr(betas: &Tensor) -> Result<Tensor> {
    let sqrt_alphas_bar = alphas_cumprod(betas)?.f_sqrt()?;
    let first = sqrt_alphas_bar.f_get(0)?;
    let last = sqrt_alphas_bar.f_get(-1)?;
    let scale = first.f_div(&first.f_sub(&last)?)?;
    let sqrt_alphas_bar = sqrt_alphas_bar.f_sub(&last)?.f_mul(&scale)?;
    let alphas_bar = sqrt_alphas_bar.f_square()?;
    let n = alphas_bar.size()[0];
    let alphas = alphas_bar
        .f_narrow(0, 1, n - 1)?
        .f_div(&alphas_bar.f_narrow(0, 0, n - 1)?)?;
    let alphas = Tensor::f_cat(&[alphas_bar.f_narrow(0, 0, 1)?, alphas], 0)?;
    Ok(alphas.f_rsub_scalar(1.0)?)
}

/// σ_t = √((1 − ᾱ_t)/ᾱ_t) for every training timestep, ascending in t, as float32 values.
pub(crate) fn train_sigmas(alphas_cumprod: &Tensor) -> Result<Vec<f32>> {
    let sigmas = alphas_cumprod
        .f_rsub_scalar(1.0)?
        .f_div(alphas_cumprod)?
        .f_sqrt()?;
    Ok(Vec::<f32>::try_from(&sigmas)?)
}

/// A CPU float32 tensor as a vector.
pub(crate) fn to_vec(tensor: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        &tensor.f_to_kind(Kind::Float)?.f_contiguous()?,
    )?)
}

/// `numpy.linspace(start, stop, num)` in float64, with numpy's formula (`i·step + start`, last value
/// set to `stop`).
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

/// `numpy.arange(start, stop, step)` in float64: `ceil((stop − start)/step)` values
/// `start + i·((start + step) − start)`, numpy's fill rule.
pub(crate) fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len as usize)
        .map(|i| start + i as f64 * delta)
        .collect()
}

/// `numpy.interp(x, arange(len(fp)), fp)`: piecewise-linear interpolation of values given at the
/// integers 0, 1, …, with numpy's formula `slope·(x − x_j) + f_j`.
pub(crate) fn interp(xs: &[f64], fp: &[f32]) -> Vec<f64> {
    let last = fp.len().saturating_sub(1);
    xs.iter()
        .map(|&x| {
            if fp.is_empty() {
                return f64::NAN;
            }
            if x.is_nan() {
                return x;
            }
            if x <= 0.0 {
                return f64::from(fp[0]);
            }
            if x >= last as f64 {
                return f64::from(fp[last]);
            }
            let j = x.floor() as usize;
            let (low, high) = (f64::from(fp[j]), f64::from(fp[j + 1]));
            (high - low) * (x - j as f64) + low
        })
        .collect()
}

/// The noise levels of Karras et al. 2022 ("Elucidating the Design Space…", eq. 5) with ρ = 7:
/// `num` sigmas from `sigma_max` down to `sigma_min`, evenly spaced in σ^(1/ρ).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, num: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    linspace(0.0, 1.0, num)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, interpolating linearly in log σ between
/// the two neighbouring training sigmas; `log_sigmas` ascends with t (diffusers' `_sigma_to_t`).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // numpy: argmax of the running count of `log_sigmas[i] <= log_sigma`, i.e. the last such index (0 if
    // none), kept below the final index so that a neighbour above exists.
    let last_at_or_below = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0);
    let low_idx = last_at_or_below.min(log_sigmas.len().saturating_sub(2));
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    // numpy subtracts the two float32 entries in float32.
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// float32 natural logs of float32 values, as numpy's `np.log` on a float32 array.
pub(crate) fn ln_f32(values: &[f32]) -> Vec<f32> {
    values.iter().map(|v| v.ln()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers_match_numpy() {
        assert_eq!(linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        // np.arange(1000, 0, -1000/61) has 62 values: the quotient rounds up past 61.
        assert_eq!(arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(
            arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(
            interp(&[0.0, 0.5, 2.0, 7.0], &[1.0, 2.0, 4.0]),
            vec![1.0, 1.5, 4.0, 4.0]
        );
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let config = BetaConfig::sdxl();
        let sigmas = train_sigmas(&alphas_cumprod(&betas(&config).unwrap()).unwrap()).unwrap();
        let log_sigmas = ln_f32(&sigmas);
        for t in [0usize, 1, 500, 998, 999] {
            let found = sigma_to_t(f64::from(sigmas[t]), &log_sigmas);
            assert!((found - t as f64).abs() < 1e-3, "t {t}: {found}");
        }
        // Below the smallest and above the largest sigma the timestep is clamped to the ends.
        assert_eq!(sigma_to_t(1e-6, &log_sigmas), 0.0);
        assert_eq!(sigma_to_t(1e6, &log_sigmas), 999.0);
    }
}
