//! Gradient checkpointing by segments, for libtorch bindings that have no `torch.utils.checkpoint`.
//!
//! A forward pass is written once as a sequence of *segments* (closures over the model's layers) that
//! read and write numbered values on a [`Tape`]. In plain mode the segments simply run, building the
//! usual autograd graph. In checkpointing mode each segment runs under `no_grad`, so only the values
//! at segment boundaries stay in memory; [`Tape::backward`] then walks the segments in reverse, re-runs
//! each one with autograd on detached copies of its inputs, and back-propagates the gradient of its
//! output through it with the surrogate `sum(output · grad)`. That surrogate's backward accumulates
//! parameter gradients (e.g. LoRA weights) exactly as one big backward would, and yields the gradients
//! of the segment's inputs, which are summed per value and handed on to earlier segments.
//!
//! A segment that draws random numbers (LoRA dropout) must draw the same ones when it is recomputed,
//! or its gradients belong to another forward pass. So, as torch.utils.checkpoint's
//! `preserve_rng_state`, the tape saves the default generator of the segment's device before the
//! segment runs and, in the backward, sets it back for the recomputation, then restores the state
//! that was current ([`torch_cuda::rng`]; on CUDA this also holds inside a graph capture). Segments
//! that draw from a generator of their own instead (a trainer's, see [`Tape::drawing_from`]) have that
//! generator saved and set back.
//!
//! Everything is device work with shapes fixed by the forward pass: no tensor value is read on the
//! host, so a step with checkpointing can be captured as a CUDA graph like one without.

use std::sync::Arc;

use tch::{Kind, Tensor};
use torch_cuda::rng::{Generator, RngState};

use crate::Result;

/// A value on a [`Tape`]: the input or output of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Value(usize);

type Segment<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;

struct Record<'a> {
    inputs: Vec<Value>,
    output: Value,
    segment: Segment<'a>,
    /// The generator of the inputs' device before the segment ran (`None` where this build cannot
    /// save it, see [`torch_cuda::rng::available`]).
    rng: Option<RngState>,
}

/// The values and, when checkpointing, the segments of one forward pass.
pub struct Tape<'a> {
    checkpointing: bool,
    /// The generator the segments draw from, when not the device's default one.
    generator: Option<Arc<Generator>>,
    values: Vec<Tensor>,
    records: Vec<Record<'a>>,
}

impl std::fmt::Debug for Tape<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tape")
            .field("checkpointing", &self.checkpointing)
            .field("values", &self.values.len())
            .finish()
    }
}

impl<'a> Tape<'a> {
    /// An empty tape; with `checkpointing` the segments run without autograd and are kept for
    /// [`Tape::backward`].
    pub fn new(checkpointing: bool) -> Self {
        Self {
            checkpointing,
            generator: None,
            values: Vec::new(),
            records: Vec::new(),
        }
    }

    /// The segments draw their random numbers (dropout) from `generator` (when `Some`) instead of
    /// the device's default generator: that is the generator saved before each segment and set back
    /// for its recomputation.
    pub fn drawing_from(mut self, generator: Option<Arc<Generator>>) -> Self {
        self.generator = generator;
        self
    }

    /// Puts an input of the whole pass on the tape.
    pub fn input(&mut self, tensor: &Tensor) -> Value {
        self.values.push(tensor.shallow_clone());
        Value(self.values.len() - 1)
    }

    /// The tensor of `value`.
    pub fn get(&self, value: Value) -> &Tensor {
        &self.values[value.0]
    }

    /// Runs `segment` on the tensors of `inputs` and puts its output on the tape.
    ///
    /// # Errors
    /// Whatever the segment returns.
    pub fn run(
        &mut self,
        inputs: &[Value],
        segment: impl Fn(&[Tensor]) -> Result<Tensor> + 'a,
    ) -> Result<Value> {
        let args: Vec<Tensor> = inputs
            .iter()
            .map(|v| self.values[v.0].shallow_clone())
            .collect();
        let rng = match (self.checkpointing, &self.generator, args.first()) {
            (false, _, _) => None,
            (true, Some(generator), _) => Some(RngState::of(generator)?),
            (true, None, Some(first)) => RngState::save(first.device())?,
            (true, None, None) => None,
        };
        let output = if self.checkpointing {
            tch::no_grad(|| segment(&args))?
        } else {
            segment(&args)?
        };
        self.values.push(output);
        let output = Value(self.values.len() - 1);
        if self.checkpointing {
            self.records.push(Record {
                inputs: inputs.to_vec(),
                output,
                segment: Box::new(segment),
                rng,
            });
        }
        Ok(output)
    }

    /// Back-propagates `output_grad`, the gradient of the loss w.r.t. `output`, through every
    /// recorded segment (recomputing each), accumulating parameter gradients into their `.grad()`.
    /// Returns the gradient of each requested value (`None` where no gradient reaches it or it is
    /// not a floating-point tensor).
    ///
    /// In plain mode nothing was recorded: call `backward` on a loss of the output instead.
    ///
    /// # Errors
    /// Whatever a segment returns, and libtorch errors of the backward passes.
    pub fn backward(
        &self,
        output: Value,
        output_grad: &Tensor,
        wanted: &[Value],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut grads: Vec<Option<Tensor>> = (0..self.values.len()).map(|_| None).collect();
        grads[output.0] = Some(output_grad.detach());
        for record in self.records.iter().rev() {
            let Some(grad) = grads[record.output.0].take() else {
                continue;
            };
            let inputs: Vec<Tensor> = record
                .inputs
                .iter()
                .map(|v| {
                    let value = self.values[v.0].detach();
                    if value.is_floating_point() {
                        value.set_requires_grad(true)
                    } else {
                        value
                    }
                })
                .collect();
            let recomputed = recompute(record, &inputs)?;
            // d/d(recomputed) of sum(recomputed · grad) is grad: one backward call feeds it through.
            let surrogate =
                (recomputed * grad.to_kind(self.values[record.output.0].kind())).sum(Kind::Float);
            surrogate.f_backward()?;
            for (value, input) in record.inputs.iter().zip(&inputs) {
                let input_grad = input.grad();
                if !input_grad.defined() {
                    continue;
                }
                grads[value.0] = Some(match grads[value.0].take() {
                    Some(sum) => sum + input_grad,
                    None => input_grad,
                });
            }
        }
        Ok(wanted
            .iter()
            .map(|v| grads[v.0].as_ref().map(Tensor::shallow_clone))
            .collect())
    }
}

/// Runs `record`'s segment again on `inputs` with the random generator (the device's default one or
/// the tape's own) where it stood before the segment's first run, then puts it back where it was.
fn recompute(record: &Record<'_>, inputs: &[Tensor]) -> Result<Tensor> {
    let Some(saved) = &record.rng else {
        return (record.segment)(inputs);
    };
    let current = saved.save_again()?;
    saved.restore()?;
    let recomputed = (record.segment)(inputs);
    current.restore()?;
    recomputed
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn recomputed_gradients_equal_plain_ones() {
        tch::manual_seed(3);
        let opts = (Kind::Double, Device::Cpu);
        let w1 = Tensor::randn([4, 4], opts).set_requires_grad(true);
        let w2 = Tensor::randn([4, 4], opts).set_requires_grad(true);
        let x = Tensor::randn([3, 4], opts).set_requires_grad(true);
        // y = tanh(x w1) ; z = (y + x) w2 — x feeds two segments, as the UNet's skips and embeddings do.
        fn run<'a>(tape: &mut Tape<'a>, x: &Tensor, w1: &'a Tensor, w2: &'a Tensor) -> Value {
            let xv = tape.input(x);
            let y = tape
                .run(&[xv], move |a| Ok(a[0].matmul(w1).tanh()))
                .unwrap();
            tape.run(&[y, xv], move |a| Ok((&a[0] + &a[1]).matmul(w2)))
                .unwrap()
        }
        let mut plain = Tape::new(false);
        let out = run(&mut plain, &x, &w1, &w2);
        plain.get(out).square().sum(Kind::Double).backward();
        let expected = [x.grad().copy(), w1.grad().copy(), w2.grad().copy()];
        for t in [&x, &w1, &w2] {
            let _ = t.grad().zero_();
        }

        let mut tape = Tape::new(true);
        let out = run(&mut tape, &x, &w1, &w2);
        assert!(
            !tape.get(out).requires_grad(),
            "checkpointed forward keeps no graph"
        );
        let grad_out = tape.get(out) * 2.0;
        let grads = tape.backward(out, &grad_out, &[Value(0)]).unwrap();
        let x_grad = grads[0].as_ref().unwrap();
        for (got, want) in [x_grad, &w1.grad(), &w2.grad()].into_iter().zip(&expected) {
            assert!(
                got.allclose(want, 1e-12, 1e-12, false),
                "{got:?} vs {want:?}"
            );
        }
    }
}
