//! libtorch's multi-tensor ("foreach") operations, which tch does not expose: one kernel launch per
//! chunk of a tensor list instead of one per tensor. A training step over hundreds of small LoRA
//! tensors otherwise spends most of its optimizer-side launches on them.

use tch::Tensor;

use crate::Error;

#[cfg(torch_cuda_shim)]
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::c_void;
    unsafe extern "C" {
        pub fn torch_foreach_zero_(tensors: *const *mut c_void, count: i32) -> i32;
        pub fn torch_foreach_clip_norm_(
            tensors: *const *mut c_void,
            count: i32,
            max_norm: f64,
            eps: f64,
            total: *mut c_void,
        ) -> i32;
        pub fn torch_clear_grad(tensor: *mut c_void) -> i32;
    }
}

#[cfg(torch_cuda_shim)]
fn handles(tensors: &[Tensor]) -> Result<Vec<*mut std::ffi::c_void>, Error> {
    if tensors.iter().any(|t| !t.defined()) {
        return Err(Error::Foreach("an undefined tensor in the list".into()));
    }
    i32::try_from(tensors.len())
        .map_err(|_| Error::Foreach(format!("{} tensors are too many", tensors.len())))?;
    Ok(tensors
        .iter()
        .map(|t| t.as_ptr() as *mut std::ffi::c_void)
        .collect())
}

/// Zeroes every tensor in place (`torch._foreach_zero_`).
///
/// # Errors
/// [`Error::Foreach`] without the shim, for an undefined tensor, or when libtorch refuses.
pub fn zero_(tensors: &[Tensor]) -> Result<(), Error> {
    if tensors.is_empty() {
        return Ok(());
    }
    #[cfg(torch_cuda_shim)]
    {
        let list = handles(tensors)?;
        // SAFETY: `list` holds live tch handles (at::Tensor pointers) that outlive the call; the
        // shim copies the tensor objects (not their data) and catches every C++ exception.
        #[allow(unsafe_code)]
        let status = unsafe { ffi::torch_foreach_zero_(list.as_ptr(), list.len() as i32) };
        if status != 0 {
            return Err(Error::Foreach(crate::shim_last_error()));
        }
        Ok(())
    }
    #[cfg(not(torch_cuda_shim))]
    {
        Err(Error::Foreach(crate::NO_SHIM.into()))
    }
}

/// Drops the gradient of every tensor (`p.grad = None` in PyTorch, which tch cannot express): the
/// next backward writes fresh gradients instead of adding into the old ones. Before capturing a
/// CUDA graph of the first micro-step of an accumulation, this makes each replay start the
/// gradients afresh without a zeroing pass.
///
/// # Errors
/// [`Error::Foreach`] without the shim or for an undefined tensor.
pub fn clear_grads(tensors: &[Tensor]) -> Result<(), Error> {
    #[cfg(torch_cuda_shim)]
    {
        for handle in handles(tensors)? {
            // SAFETY: a live tch handle (an at::Tensor pointer) for the duration of the call; the
            // shim catches every C++ exception.
            #[allow(unsafe_code)]
            let status = unsafe { ffi::torch_clear_grad(handle) };
            if status != 0 {
                return Err(Error::Foreach(crate::shim_last_error()));
            }
        }
        Ok(())
    }
    #[cfg(not(torch_cuda_shim))]
    {
        let _ = tensors;
        Err(Error::Foreach(crate::NO_SHIM.into()))
    }
}

/// `torch.nn.utils.clip_grad_norm_` over `tensors` as PyTorch runs it on CUDA (the foreach path):
/// scales them in place by `min(max_norm / (‖·‖₂ + eps), 1)` of their joint 2-norm and returns that
/// norm (0-dim fp32, on their device). Nothing is read back to the host.
///
/// # Errors
/// [`Error::Foreach`] without the shim, for an empty list or an undefined tensor, or when libtorch
/// refuses (e.g. tensors on different devices).
pub fn clip_norm_(tensors: &[Tensor], max_norm: f64, eps: f64) -> Result<Tensor, Error> {
    let Some(first) = tensors.first() else {
        return Err(Error::Foreach("clip_norm_ of an empty list".into()));
    };
    #[cfg(torch_cuda_shim)]
    {
        let list = handles(tensors)?;
        let mut total = Tensor::f_zeros([] as [i64; 0], (tch::Kind::Float, first.device()))
            .map_err(|e| Error::Foreach(e.to_string()))?;
        // SAFETY: as in `zero_`; `total` is a live tensor the shim writes through copy_.
        #[allow(unsafe_code)]
        let status = unsafe {
            ffi::torch_foreach_clip_norm_(
                list.as_ptr(),
                list.len() as i32,
                max_norm,
                eps,
                total.as_mut_ptr() as *mut std::ffi::c_void,
            )
        };
        if status != 0 {
            return Err(Error::Foreach(crate::shim_last_error()));
        }
        Ok(total)
    }
    #[cfg(not(torch_cuda_shim))]
    {
        let _ = (first, max_norm, eps);
        Err(Error::Foreach(crate::NO_SHIM.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn foreach_clip_and_zero_match_the_per_tensor_arithmetic() {
        let _serial = crate::test_lock();
        if !crate::shim_compiled() {
            return;
        }
        let device = Device::cuda_if_available();
        let tensors: Vec<Tensor> = [3i64, 1000, 70_000]
            .iter()
            .map(|&n| Tensor::randn([n], (Kind::Float, device)))
            .collect();
        let originals: Vec<Tensor> = tensors.iter().map(Tensor::copy).collect();
        let norms: Vec<Tensor> = originals.iter().map(|t| t.norm()).collect();
        let expected_total = Tensor::stack(&norms, 0).norm();
        let total = clip_norm_(&tensors, 1.0, 1e-6).unwrap();
        assert_eq!(total.size(), Vec::<i64>::new());
        let rel = |a: &Tensor, b: &Tensor| ((a - b).abs().max() / b.abs().max()).double_value(&[]);
        assert!(rel(&total, &expected_total) < 1e-5);
        let factor = 1.0 / (expected_total.double_value(&[]) + 1e-6);
        for (clipped, original) in tensors.iter().zip(&originals) {
            assert!(rel(clipped, &(original * factor)) < 1e-5);
        }
        // Below the threshold nothing changes.
        let before: Vec<Tensor> = tensors.iter().map(Tensor::copy).collect();
        let _ = clip_norm_(&tensors, 10.0, 1e-6).unwrap();
        assert!(tensors.iter().zip(&before).all(|(a, b)| a.equal(b)));
        zero_(&tensors).unwrap();
        assert!(
            tensors
                .iter()
                .all(|t| t.abs().sum(Kind::Float).double_value(&[]) == 0.0)
        );
        assert!(clip_norm_(&[], 1.0, 1e-6).is_err());
        // Cleared gradients are undefined; the next backward writes them afresh.
        let param = Tensor::ones([4], (Kind::Float, device)).set_requires_grad(true);
        (&param * 3.0).sum(Kind::Float).backward();
        (&param * 3.0).sum(Kind::Float).backward();
        assert_eq!(
            param.grad().sum(Kind::Float).double_value(&[]),
            24.0,
            "two backward passes add"
        );
        clear_grads(std::slice::from_ref(&param)).unwrap();
        assert!(!param.grad().defined());
        (&param * 3.0).sum(Kind::Float).backward();
        assert_eq!(
            param.grad().sum(Kind::Float).double_value(&[]),
            12.0,
            "a fresh gradient after clearing"
        );
        assert!(zero_(&[Tensor::new()]).is_err());
    }
}
