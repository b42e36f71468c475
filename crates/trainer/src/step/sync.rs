//! Data-parallel gradient averaging (DDP's all-reduce) over the run's [`Collective`]: after the
//! micro-steps of an optimizer step, every process's LoRA gradients are replaced by their mean over
//! the processes, and so is the step's loss, before clipping and the finite-step decision — so
//! every process clips the same gradients, takes the same skip-or-apply decision and applies the
//! same update, and the LoRA stays identical everywhere without being sent again.
//!
//! The gradients of the masters that compute copies cover ([`lora::ComputeCopies`]) already live
//! in one flat buffer per set: one all-reduce each (one for the seed recipe's UNet LoRA, 23 MB in
//! fp32). Any other trainable tensor's gradient (fp32 training without copies) is packed into one
//! flat tensor, averaged in one all-reduce and copied back. Nothing is read on the host and every
//! buffer is the same at every call, so the step stays capturable as a CUDA graph (NCCL on the
//! capturing stream).

use std::rc::Rc;

use tch::{Kind, Tensor};

use crate::Result;
use crate::distributed::Collective;
use crate::model::TrainModel;

/// What one optimizer step averages over the processes.
pub(crate) struct GradSync {
    group: Rc<dyn Collective>,
    /// The compute copies' flat master-gradient buffers.
    flat: Vec<Tensor>,
    /// Trainable tensors whose gradients are in no flat buffer.
    loose: Vec<Tensor>,
}

impl GradSync {
    /// The buffers of `model`'s LoRA, averaged over `group`.
    pub(crate) fn new(group: Rc<dyn Collective>, model: &TrainModel) -> Self {
        let copies = model.all_copies();
        let spans: Vec<(usize, usize)> = copies.iter().map(|c| span(c.masters())).collect();
        let loose = model
            .param_tensors()
            .into_iter()
            .filter(|p| {
                let (start, end) = span(p);
                !spans.iter().any(|&(s, e)| start >= s && end <= e)
            })
            .collect();
        let flat = copies
            .iter()
            .map(|c| c.master_grads().shallow_clone())
            .collect();
        Self { group, flat, loose }
    }

    /// Replaces the gradients and `step_loss` by their means over the processes.
    ///
    /// # Errors
    /// [`crate::Error::Collective`] naming the ranks that failed or timed out; libtorch errors.
    pub(crate) fn all_reduce(&self, step_loss: &Tensor) -> Result<()> {
        for buffer in &self.flat {
            self.group.all_reduce_mean(buffer)?;
        }
        // Tensors no backward reaches (TE1's last layer) have no gradient on any process alike.
        let grads: Vec<Tensor> = self
            .loose
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        if !grads.is_empty() {
            tch::no_grad(|| -> Result<()> {
                let pieces: Vec<Tensor> = grads
                    .iter()
                    .map(|g| g.f_reshape([-1])?.f_to_kind(Kind::Float))
                    .collect::<std::result::Result<_, _>>()?;
                let packed = Tensor::f_cat(&pieces, 0)?;
                self.group.all_reduce_mean(&packed)?;
                let mut offset = 0;
                for grad in &grads {
                    let n = grad.numel() as i64;
                    let mean = packed.f_narrow(0, offset, n)?.f_view_as(grad)?;
                    grad.shallow_clone().f_copy_(&mean)?;
                    offset += n;
                }
                Ok(())
            })?;
        }
        self.group.all_reduce_mean(step_loss)
    }
}

/// Makes every process start from rank 0's LoRA: each flat master buffer, then every other
/// trainable tensor, broadcast from rank 0 (the compute copies refreshed after).
///
/// # Errors
/// As [`GradSync::all_reduce`].
pub(crate) fn broadcast_lora(group: &dyn Collective, model: &TrainModel) -> Result<()> {
    let copies = model.all_copies();
    let spans: Vec<(usize, usize)> = copies.iter().map(|c| span(c.masters())).collect();
    tch::no_grad(|| -> Result<()> {
        for set in &copies {
            group.broadcast(set.masters(), 0)?;
        }
        for param in model.param_tensors() {
            let (start, end) = span(&param);
            if !spans.iter().any(|&(s, e)| start >= s && end <= e) {
                group.broadcast(&param, 0)?;
            }
        }
        for set in &copies {
            set.refresh()?;
        }
        Ok(())
    })
}

/// The bytes a tensor's elements occupy, as addresses (to tell whether a parameter is a view of a
/// flat buffer).
fn span(t: &Tensor) -> (usize, usize) {
    let start = t.data_ptr() as usize;
    (start, start + t.numel() * t.kind().elt_size_in_bytes())
}
