//! Gradient clipping by the global L2 norm, on the device.
//!
//! Follows PyTorch 2.11's `torch.nn.utils.clip_grad_norm_` (`torch/nn/utils/clip_grad.py`, the
//! foreach path with `norm_type = 2`, `error_if_nonfinite = False`): the norm of every gradient,
//! the norm of those norms (which is the norm of all gradients concatenated), then every gradient
//! multiplied in place by `min(max_norm / (total + 1e-6), 1)`. The factor is applied
//! unconditionally rather than behind an `if factor < 1`, which would read the norm on the host;
//! a factor of exactly 1 leaves a gradient bit-identical.
//!
//! The norms are computed in fp32 whatever the gradients' element type (torch keeps the
//! gradients' type, so for bf16 gradients torch's norm is coarser). A NaN or infinite norm makes
//! the factor NaN or 0 and the gradients non-finite, as in torch; the caller tells the optimizer
//! to skip that step with [`AdamW::step_if`](crate::AdamW::step_if)`(norm.isfinite())`.

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Added to the norm before dividing, as in torch, so a zero norm gives a finite factor.
const NORM_EPSILON: f64 = 1e-6;

/// Scales the gradients of `params` in place so that their global L2 norm is at most `max_norm`,
/// and returns the norm before clipping as a 0-dim fp32 tensor on the first parameter's device.
///
/// Parameters without a gradient are ignored; with no gradient at all the norm is 0. Nothing is
/// read back to the host, so the call can be captured in a CUDA graph. `max_norm` must be finite
/// and positive (it is the trainer's `max_grad_norm`).
///
/// # Shapes
/// `params` any shapes, floating point → norm `[]` (fp32).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<Tensor> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::InvalidHyperParameter {
            name: "max_grad_norm".into(),
            value: max_norm,
            reason: "must be finite and > 0",
        });
    }
    let device = params.first().map_or(Device::Cpu, Tensor::device);
    // Whether a gradient exists is autograd metadata, not a tensor value.
    let grads: Vec<Tensor> = params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect();
    if grads.is_empty() {
        return Ok(Tensor::f_zeros([] as [i64; 0], (Kind::Float, device))?);
    }
    // On CUDA, PyTorch takes its foreach path (two launches for the norms, one for the scaling,
    // instead of one per tensor); so do we, through the shim, where every gradient is on one CUDA
    // device.
    if device.is_cuda() && torch_cuda::shim_compiled() && grads.iter().all(|g| g.device() == device)
    {
        return torch_cuda::foreach::clip_norm_(&grads, max_norm, NORM_EPSILON)
            .map_err(Error::from);
    }
    tch::no_grad(|| {
        let norms = grads
            .iter()
            .map(|grad| {
                Ok(grad
                    .f_norm_scalaropt_dtype(2.0, Kind::Float)?
                    .f_to_device(device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let total = Tensor::f_stack(&norms, 0)?.f_norm_scalaropt_dtype(2.0, Kind::Float)?;
        // torch evaluates `max_norm / (total + eps)` as `reciprocal(total + eps) * max_norm`.
        let factor = total
            .f_add_scalar(NORM_EPSILON)?
            .f_reciprocal()?
            .f_mul_scalar(max_norm)?
            .f_clamp_max(1.0)?;
        for grad in &grads {
            let mut grad = grad.shallow_clone();
            let _ = grad.f_mul_(&factor.f_to_device(grad.device())?)?;
        }
        Ok(total)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter of `values` whose gradient is exactly `grad`.
    fn with_grad(values: &Tensor, grad: &Tensor) -> Tensor {
        let param = values.copy().set_requires_grad(true);
        (&param * grad).sum(Kind::Float).backward();
        param
    }

    fn scalar(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    #[test]
    fn norm_five_is_scaled_to_one_and_returned_before_clipping() {
        let a = with_grad(
            &Tensor::zeros([2], (Kind::Float, Device::Cpu)),
            &Tensor::from_slice(&[3.0f32, 0.0]),
        );
        let b = with_grad(
            &Tensor::zeros([1, 1], (Kind::Float, Device::Cpu)),
            &Tensor::from_slice(&[4.0f32]).view([1, 1]),
        );
        let norm = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 1.0).unwrap();
        assert_eq!(norm.size(), Vec::<i64>::new());
        assert_eq!(norm.kind(), Kind::Float);
        assert_eq!(scalar(&norm), 5.0);
        let factor = 1.0 / (5.0 + 1e-6);
        assert!((a.grad().double_value(&[0]) - 3.0 * factor).abs() < 1e-7);
        assert_eq!(a.grad().double_value(&[1]), 0.0);
        assert!((b.grad().double_value(&[0, 0]) - 4.0 * factor).abs() < 1e-7);
        let clipped =
            (a.grad().square().sum(Kind::Double) + b.grad().square().sum(Kind::Double)).sqrt();
        assert!(
            (scalar(&clipped) - 1.0).abs() < 1e-6,
            "clipped norm {}",
            scalar(&clipped)
        );
    }

    #[test]
    fn gradients_below_the_limit_are_untouched() {
        tch::manual_seed(11);
        let grad = Tensor::randn([40, 30], (Kind::Float, Device::Cpu));
        let param = with_grad(&Tensor::zeros([40, 30], (Kind::Float, Device::Cpu)), &grad);
        let expected_norm = scalar(&grad.to_kind(Kind::Double).square().sum(Kind::Double).sqrt());
        let norm = clip_grad_norm(&[param.shallow_clone()], expected_norm * 1.5).unwrap();
        assert!((scalar(&norm) - expected_norm).abs() < 1e-5 * expected_norm);
        assert!(
            param.grad().equal(&grad),
            "a factor clamped to 1 must leave the gradient bit-identical"
        );
    }

    #[test]
    fn random_gradients_match_the_definition_computed_in_f64() {
        // Several shapes and element types, and one parameter without a gradient that must be
        // ignored (and keep no gradient).
        tch::manual_seed(5);
        let cpu = Device::Cpu;
        let grads = [
            Tensor::randn([5000], (Kind::Float, cpu)),
            Tensor::randn([7, 9], (Kind::Float, cpu)) * 3.0,
            Tensor::randn([300], (Kind::BFloat16, cpu)),
        ];
        let params: Vec<Tensor> = grads
            .iter()
            .map(|g| with_grad(&g.zeros_like(), g))
            .collect();
        let idle = Tensor::ones([4], (Kind::Float, cpu)).set_requires_grad(true);
        let mut all: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
        all.insert(1, idle.shallow_clone());

        let as_f64: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Double).reshape([-1]))
            .collect();
        let expected_norm = scalar(&Tensor::cat(&as_f64, 0).square().sum(Kind::Double).sqrt());
        let max_norm = 10.0;
        let factor = (max_norm / (expected_norm + 1e-6)).min(1.0);
        assert!(factor < 0.2, "the test must clip: norm {expected_norm}");

        let norm = clip_grad_norm(&all, max_norm).unwrap();
        assert!(
            (scalar(&norm) - expected_norm).abs() < 1e-6 * expected_norm,
            "{} vs {expected_norm}",
            scalar(&norm)
        );
        assert!(!idle.grad().defined());
        for ((param, original), grad) in params.iter().zip(&as_f64).zip(&grads) {
            let got = param.grad().to_kind(Kind::Double).reshape([-1]);
            assert_eq!(param.grad().kind(), grad.kind());
            // fp32 gradients: a few ulp of the factor; bf16 ones: their own rounding (2⁻⁹ relative).
            let tolerance = if grad.kind() == Kind::BFloat16 {
                4e-3
            } else {
                1e-6
            };
            let error = scalar(&(&got - original * factor).abs().max())
                / scalar(&(original * factor).abs().max());
            assert!(
                error < tolerance,
                "{:?}: relative error {error}",
                grad.kind()
            );
        }
    }

    #[test]
    fn non_finite_norms_leave_the_gradients_non_finite() {
        let nan = with_grad(
            &Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            &Tensor::from_slice(&[1.0f32, f32::NAN, 2.0]),
        );
        let norm = clip_grad_norm(&[nan.shallow_clone()], 1.0).unwrap();
        assert!(scalar(&norm).is_nan());
        assert!(
            nan.grad().isnan().all().int64_value(&[]) == 1,
            "NaN factor: every gradient is NaN"
        );

        let inf = with_grad(
            &Tensor::zeros([2], (Kind::Float, Device::Cpu)),
            &Tensor::from_slice(&[f32::INFINITY, 2.0]),
        );
        let norm = clip_grad_norm(&[inf.shallow_clone()], 1.0).unwrap();
        assert_eq!(scalar(&norm), f64::INFINITY);
        // Factor 1/inf = 0: inf·0 is NaN, the finite element becomes 0.
        assert!(inf.grad().double_value(&[0]).is_nan());
        assert_eq!(inf.grad().double_value(&[1]), 0.0);
    }

    #[test]
    fn no_gradients_give_a_zero_norm() {
        let idle = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let norm = clip_grad_norm(&[idle.shallow_clone()], 1.0).unwrap();
        assert_eq!(
            (norm.size(), norm.kind(), scalar(&norm)),
            (Vec::<i64>::new(), Kind::Float, 0.0)
        );
        assert_eq!(scalar(&clip_grad_norm(&[], 1.0).unwrap()), 0.0);
    }

    #[test]
    fn bad_max_norms_are_named() {
        let p = with_grad(
            &Tensor::zeros([2], (Kind::Float, Device::Cpu)),
            &Tensor::from_slice(&[1.0f32, 1.0]),
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = clip_grad_norm(&[p.shallow_clone()], bad).unwrap_err();
            assert!(err.to_string().contains("max_grad_norm"), "{err}");
            assert!(matches!(err, Error::InvalidHyperParameter { .. }));
        }
        assert!(
            p.grad().equal(&Tensor::from_slice(&[1.0f32, 1.0])),
            "a refused call changes nothing"
        );
    }
}
