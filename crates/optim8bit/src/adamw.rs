//! AdamW with block-wise 8-bit states (bitsandbytes `AdamW8bit`) or with fp32 states.
//!
//! Follows bitsandbytes 0.50: `bitsandbytes/optim/optimizer.py` (`Optimizer2State`: which
//! parameters get 8-bit states, the state layout) and, for the order of the arithmetic, the CUDA
//! kernels `kOptimizerStatic8bit2StateBlockwise` (8-bit states) and `kOptimizer32bit2State`
//! (fp32 states) in `csrc/kernels.cu`:
//!
//! 1. (8-bit) dequantize `m = code₁[c₁]·absmax₁`, `v = code₂[c₂]·absmax₂` per block of 256;
//! 2. `v ← β₂v + (1−β₂)g²`, `m ← β₁m + (1−β₁)g`;
//! 3. `p ← p − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε·√(1−β₂ᵗ))`;
//! 4. decoupled weight decay *after* the step, `p ← p·(1 − lr·wd)` (torch's AdamW and bitsandbytes'
//!    CPU path decay before; the difference is of order lr²·wd);
//! 5. (8-bit) new absmax per block, requantize to the nearest code keeping the sign of `m`.
//!
//! With 8-bit states, an element whose gradient is NaN or ±inf is not updated and its moments are
//! reset to zero, as in the 8-bit kernel (the fp32 kernel has no such guard, and neither has this
//! fp32 path).
//!
//! The constants `1 − β` are computed in float32 (`1.0f − beta`) as the kernels do; bitsandbytes'
//! CPU path and torch round the float64 value instead, which makes `v` differ by 1.3e-5 relative
//! for β₂ = 0.999. Bias corrections are computed in float64.
//!
//! The states of a parameter group live in one flat buffer per kind (8-bit, fp32), each parameter
//! padded to whole blocks, and a step over a group whose parameters all have gradients is one
//! sequence of tensor operations over those buffers, not one per parameter. The step count, the
//! learning rates and the bias corrections live on the device and nothing is read back to the host,
//! so a step can be captured in a CUDA graph.
//!
//! [`AdamW::step_if`] takes the decision whether to step as a device tensor: the update is computed
//! as always and every write-back (parameters, codes, absmax, fp32 moments) and the step count go
//! through `where(apply, new, old)`, so a skipped step leaves everything bit-identical without a
//! host-side branch on tensor contents.

use tch::{Device, Kind, Tensor};

use crate::quantize::{
    BLOCK_SIZE, QuantMap, as_blocks, block_count, dequantize_blocks, requantize_blocks,
};
use crate::{Error, Result};

/// How an optimizer stores its per-parameter states (Adam's two moments, Lion's momentum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatePrecision {
    /// Block-wise 8-bit codes (bitsandbytes `AdamW8bit`, `Lion8bit`) for tensors of at least
    /// `min_8bit_size` elements ([`AdamWConfig::min_8bit_size`],
    /// [`LionConfig::min_8bit_size`](crate::LionConfig::min_8bit_size)), fp32 for smaller ones.
    EightBit,
    /// fp32 for every tensor.
    Fp32,
}

/// The settings shared by all parameter groups; learning rate and weight decay are per group.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct AdamWConfig {
    /// Decay of the first moment, β₁.
    pub beta1: f64,
    /// Decay of the second moment, β₂.
    pub beta2: f64,
    /// Added to √v̂ in the denominator.
    pub eps: f64,
    /// Tensors with fewer elements keep fp32 states even with [`StatePrecision::EightBit`]
    /// (bitsandbytes' `min_8bit_size`).
    pub min_8bit_size: i64,
    /// How the moments are stored.
    pub precision: StatePrecision,
}

setters! {
    /// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
    /// from [`Default`] (or a named constructor) by these.
    AdamWConfig {
        with_beta1 => beta1: f64,
        with_beta2 => beta2: f64,
        with_eps => eps: f64,
        with_min_8bit_size => min_8bit_size: i64,
        with_precision => precision: StatePrecision,
    }
}

/// [`AdamWConfig::eight_bit`], the crate's purpose (bitsandbytes' `AdamW8bit`).
impl Default for AdamWConfig {
    fn default() -> Self {
        Self::eight_bit()
    }
}

impl AdamWConfig {
    /// bitsandbytes' `AdamW8bit` defaults: betas (0.9, 0.999), eps 1e-8, `min_8bit_size` 4096.
    pub fn eight_bit() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            min_8bit_size: 4096,
            precision: StatePrecision::EightBit,
        }
    }

    /// The same defaults with fp32 states everywhere.
    pub fn fp32() -> Self {
        Self {
            precision: StatePrecision::Fp32,
            ..Self::eight_bit()
        }
    }

    /// Bytes [`AdamW::state_bytes`] counts for one parameter of `shape`: 2 per element plus one
    /// fp32 absmax per moment and block of 256 for 8-bit states, 8 per element for fp32 ones.
    pub fn state_bytes(&self, shape: &[i64]) -> i64 {
        let numel: i64 = shape.iter().product();
        if AdamW::uses_8bit(self, numel) {
            2 * numel + 2 * 4 * block_count(numel, BLOCK_SIZE)
        } else {
            8 * numel
        }
    }

    fn validate(&self) -> Result<()> {
        check_range(
            "betas.0",
            self.beta1,
            (0.0..1.0).contains(&self.beta1),
            "must lie in [0, 1)",
        )?;
        check_range(
            "betas.1",
            self.beta2,
            (0.0..1.0).contains(&self.beta2),
            "must lie in [0, 1)",
        )?;
        check_range(
            "eps",
            self.eps,
            self.eps.is_finite() && self.eps >= 0.0,
            "must be finite and ≥ 0",
        )?;
        check_range(
            "min_8bit_size",
            self.min_8bit_size as f64,
            self.min_8bit_size >= 0,
            "must be ≥ 0",
        )
    }
}

/// Parameters that share a learning rate and a weight decay.
#[derive(Debug)]
pub struct ParamGroup {
    /// The tensors to optimize (floating point, on one device, with `requires_grad`).
    pub params: Vec<Tensor>,
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay (bitsandbytes' default for AdamW is 1e-2).
    pub weight_decay: f64,
}

impl ParamGroup {
    /// A group of `params` with its own learning rate and weight decay.
    pub fn new(params: Vec<Tensor>, lr: f64, weight_decay: f64) -> Self {
        Self {
            params,
            lr,
            weight_decay,
        }
    }
}

/// The moments of one parameter.
#[derive(Debug)]
pub(crate) enum Moments {
    /// 8-bit codes over the parameter padded to whole blocks, and one absmax per block. The padding
    /// holds the values the CUDA kernel loads for elements past the end (code 128 for `m`, 0 for
    /// `v`), so a ragged last block gets the same absmax as there.
    Blockwise {
        m_codes: Tensor,
        v_codes: Tensor,
        m_absmax: Tensor,
        v_absmax: Tensor,
    },
    /// fp32 moments, flattened.
    Full { m: Tensor, v: Tensor },
}

/// Code index that the CUDA kernel loads for first-moment elements past the end of a tensor.
pub(crate) const M_PAD_CODE: f64 = 128.0;

#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) param: Tensor,
    pub(crate) numel: i64,
    pub(crate) moments: Moments,
}

#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) slots: Vec<Slot>,
    pub(crate) lr_value: f64,
    /// The learning rate as a 0-dim float64 tensor on the device, read by the step.
    pub(crate) lr: Tensor,
    pub(crate) weight_decay: f64,
    /// The group's 8-bit states in one buffer (the slots' moments are views into it).
    pub(crate) flat_8bit: Option<FlatStates>,
    /// The group's fp32 states in one buffer.
    pub(crate) flat_fp32: Option<FlatStates>,
}

/// The states of all slots of one kind in a group, stored contiguously, so that a step over the
/// whole group is one sequence of tensor operations instead of one per parameter (a LoRA has
/// about a thousand small tensors; per-tensor operations would cost dozens of kernel launches each).
///
/// Every 8-bit slot is padded to whole blocks, so no block straddles two parameters and the
/// arithmetic is exactly that of one parameter at a time.
#[derive(Debug)]
pub(crate) struct FlatStates {
    /// Consecutive runs of slots updated together.
    chunks: Vec<Chunk>,
    /// 8-bit only, when some slot is ragged: true at padding positions, where `m` keeps code 128.
    padding: Option<Tensor>,
    moments: Moments,
}

/// Elements a chunk collects before it is closed: enough to keep the number of operations per
/// step small, few enough that the step's temporaries stay small (4 MiB each in fp32) and, on the
/// CPU, in cache. One flat pass over a 100 M-parameter group streams every temporary through main
/// memory, and on the CPU was slower than one pass per 1 M-element tensor.
const CHUNK_ELEMENTS: i64 = 1 << 20;

/// A contiguous range of a flat buffer holding whole slots.
#[derive(Debug)]
struct Chunk {
    /// Slot indices with each slot's first element in the flat layout.
    members: Vec<(usize, i64)>,
    /// First element of the chunk in the flat layout.
    start: i64,
    /// Elements in the chunk (8-bit: a whole number of blocks).
    len: i64,
}

/// Cuts `members` (slot index, offset, padded length), in storage order, into chunks.
fn chunks_of(members: &[(usize, i64, i64)]) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    for &(index, offset, len) in members {
        match chunks.last_mut() {
            Some(chunk) if chunk.len + len <= CHUNK_ELEMENTS => {
                chunk.members.push((index, offset));
                chunk.len += len;
            }
            _ => chunks.push(Chunk {
                members: vec![(index, offset)],
                start: offset,
                len,
            }),
        }
    }
    chunks
}

/// AdamW with 8-bit block-wise or fp32 moments (see the module docs for the exact update).
#[derive(Debug)]
pub struct AdamW {
    pub(crate) config: AdamWConfig,
    pub(crate) groups: Vec<Group>,
    pub(crate) device: Device,
    /// Steps taken, a 0-dim float64 tensor on the device.
    pub(crate) step: Tensor,
    pub(crate) signed_map: QuantMap,
    pub(crate) unsigned_map: QuantMap,
}

impl AdamW {
    /// An optimizer over `groups`; every parameter must be a floating-point tensor and all of them
    /// must live on one device. States start at zero (bitsandbytes initialises them lazily to the
    /// same values).
    pub fn new(groups: Vec<ParamGroup>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let device = groups
            .iter()
            .flat_map(|g| g.params.first())
            .map(Tensor::device)
            .next()
            .unwrap_or(Device::Cpu);
        let mut built = Vec::with_capacity(groups.len());
        for (group_index, group) in groups.into_iter().enumerate() {
            check_group_value(group_index, "lr", group.lr)?;
            check_group_value(group_index, "weight_decay", group.weight_decay)?;
            let mut slots = Vec::with_capacity(group.params.len());
            for (index, param) in group.params.into_iter().enumerate() {
                let unsupported = |reason: String| Error::UnsupportedParameter {
                    group: group_index,
                    index,
                    reason,
                };
                if !param.defined() {
                    return Err(unsupported("undefined tensor".into()));
                }
                if !param.is_floating_point() {
                    return Err(unsupported(format!(
                        "element type {:?} is not floating point",
                        param.kind()
                    )));
                }
                if param.device() != device {
                    return Err(unsupported(format!(
                        "lives on {:?}, the first parameter on {device:?}",
                        param.device()
                    )));
                }
                slots.push((param.numel() as i64, param));
            }
            let (slots, flat_8bit, flat_fp32) = Self::allocate_states(&config, slots, device)?;
            let lr = Tensor::f_from_slice(&[group.lr])?
                .f_reshape([] as [i64; 0])?
                .f_to_device(device)?;
            built.push(Group {
                slots,
                lr_value: group.lr,
                lr,
                weight_decay: group.weight_decay,
                flat_8bit,
                flat_fp32,
            });
        }
        Ok(Self {
            config,
            groups: built,
            device,
            step: Tensor::f_zeros([] as [i64; 0], (Kind::Double, device))?,
            signed_map: QuantMap::signed(device)?,
            unsigned_map: QuantMap::unsigned(device)?,
        })
    }

    pub(crate) fn uses_8bit(config: &AdamWConfig, numel: i64) -> bool {
        config.precision == StatePrecision::EightBit && numel >= config.min_8bit_size
    }

    /// Zero states for a group's parameters: one flat buffer per kind of state, and per parameter
    /// views into it.
    #[allow(clippy::type_complexity)]
    fn allocate_states(
        config: &AdamWConfig,
        params: Vec<(i64, Tensor)>,
        device: Device,
    ) -> Result<(Vec<Slot>, Option<FlatStates>, Option<FlatStates>)> {
        let (mut members_8bit, mut members_fp32) = (Vec::new(), Vec::new());
        let (mut len_8bit, mut len_fp32) = (0i64, 0i64);
        for (index, (numel, _)) in params.iter().enumerate() {
            if Self::uses_8bit(config, *numel) {
                let padded = block_count(*numel, BLOCK_SIZE) * BLOCK_SIZE;
                members_8bit.push((index, len_8bit, padded));
                len_8bit += padded;
            } else {
                members_fp32.push((index, len_fp32, *numel));
                len_fp32 += numel;
            }
        }
        let codes = |len| Tensor::f_zeros([len], (Kind::Uint8, device));
        let floats = |len| Tensor::f_zeros([len], (Kind::Float, device));
        let flat_8bit = if members_8bit.is_empty() {
            None
        } else {
            let padding = Tensor::f_zeros([len_8bit], (Kind::Bool, device))?;
            let mut ragged = false;
            for &(index, offset, _) in &members_8bit {
                let numel = params[index].0;
                let pad = block_count(numel, BLOCK_SIZE) * BLOCK_SIZE - numel;
                if pad > 0 {
                    let _ = padding.f_narrow(0, offset + numel, pad)?.f_fill_(1i64)?;
                    ragged = true;
                }
            }
            let m_codes = codes(len_8bit)?.f_masked_fill(&padding, M_PAD_CODE)?;
            let moments = Moments::Blockwise {
                m_codes,
                v_codes: codes(len_8bit)?,
                m_absmax: floats(len_8bit / BLOCK_SIZE)?,
                v_absmax: floats(len_8bit / BLOCK_SIZE)?,
            };
            Some(FlatStates {
                chunks: chunks_of(&members_8bit),
                padding: ragged.then_some(padding),
                moments,
            })
        };
        let flat_fp32 = if members_fp32.is_empty() {
            None
        } else {
            let moments = Moments::Full {
                m: floats(len_fp32)?,
                v: floats(len_fp32)?,
            };
            Some(FlatStates {
                chunks: chunks_of(&members_fp32),
                padding: None,
                moments,
            })
        };

        let mut views: Vec<Option<Moments>> = params.iter().map(|_| None).collect();
        for flat in [&flat_8bit, &flat_fp32].into_iter().flatten() {
            for &(index, offset) in flat.chunks.iter().flat_map(|chunk| &chunk.members) {
                let numel = params[index].0;
                views[index] = Some(match &flat.moments {
                    Moments::Blockwise {
                        m_codes,
                        v_codes,
                        m_absmax,
                        v_absmax,
                    } => {
                        let padded = block_count(numel, BLOCK_SIZE) * BLOCK_SIZE;
                        let (first_block, blocks) = (offset / BLOCK_SIZE, padded / BLOCK_SIZE);
                        Moments::Blockwise {
                            m_codes: m_codes.f_narrow(0, offset, padded)?,
                            v_codes: v_codes.f_narrow(0, offset, padded)?,
                            m_absmax: m_absmax.f_narrow(0, first_block, blocks)?,
                            v_absmax: v_absmax.f_narrow(0, first_block, blocks)?,
                        }
                    }
                    Moments::Full { m, v } => Moments::Full {
                        m: m.f_narrow(0, offset, numel)?,
                        v: v.f_narrow(0, offset, numel)?,
                    },
                });
            }
        }
        let slots = params
            .into_iter()
            .zip(views)
            .filter_map(|((numel, param), moments)| {
                moments.map(|moments| Slot {
                    param,
                    numel,
                    moments,
                })
            })
            .collect();
        Ok((slots, flat_8bit, flat_fp32))
    }

    /// The shared settings.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The device the parameters and states live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Number of parameter groups.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The learning rate of a group.
    pub fn learning_rate(&self, group: usize) -> Result<f64> {
        Ok(self.group(group)?.lr_value)
    }

    /// The weight decay of a group.
    pub fn weight_decay(&self, group: usize) -> Result<f64> {
        Ok(self.group(group)?.weight_decay)
    }

    /// Sets a group's learning rate. This writes the device tensor the step reads, so call it
    /// between steps (outside a captured graph); a replayed graph then uses the new value.
    pub fn set_learning_rate(&mut self, group: usize, lr: f64) -> Result<()> {
        check_group_value(group, "lr", lr)?;
        let entry = self.group_mut(group)?;
        let _ = entry.lr.f_fill_(lr)?;
        entry.lr_value = lr;
        Ok(())
    }

    fn group(&self, group: usize) -> Result<&Group> {
        let groups = self.groups.len();
        self.groups
            .get(group)
            .ok_or(Error::NoSuchGroup { group, groups })
    }

    fn group_mut(&mut self, group: usize) -> Result<&mut Group> {
        let groups = self.groups.len();
        self.groups
            .get_mut(group)
            .ok_or(Error::NoSuchGroup { group, groups })
    }

    /// Steps taken, as the device tensor the step updates (0-dim float64).
    pub fn step_count(&self) -> &Tensor {
        &self.step
    }

    /// Number of parameter elements the optimizer updates.
    pub fn param_count(&self) -> i64 {
        self.groups
            .iter()
            .flat_map(|g| &g.slots)
            .map(|s| s.numel)
            .sum()
    }

    /// Bytes held by the optimizer's per-parameter states (codes, absmax, fp32 moments), not
    /// counting the two shared 256-entry code tables (2 KiB) and a few scalars.
    pub fn state_bytes(&self) -> i64 {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        self.groups
            .iter()
            .flat_map(|g| &g.slots)
            .map(|slot| match &slot.moments {
                Moments::Blockwise {
                    m_codes,
                    v_codes,
                    m_absmax,
                    v_absmax,
                } => bytes(m_codes) + bytes(v_codes) + bytes(m_absmax) + bytes(v_absmax),
                Moments::Full { m, v } => bytes(m) + bytes(v),
            })
            .sum()
    }

    /// Sets every parameter's gradient to zero (parameters without a gradient are left alone).
    pub fn zero_grad(&mut self) -> Result<()> {
        if self.device.is_cuda() && torch_cuda::shim_compiled() {
            // One launch per chunk of the list instead of one per gradient.
            let grads: Vec<Tensor> = self
                .groups
                .iter()
                .flat_map(|g| &g.slots)
                .map(|slot| slot.param.grad())
                .filter(Tensor::defined)
                .collect();
            return torch_cuda::foreach::zero_(&grads).map_err(Error::from);
        }
        for slot in self.groups.iter().flat_map(|g| &g.slots) {
            let mut grad = slot.param.grad();
            if grad.defined() {
                let _ = grad.f_zero_()?;
            }
        }
        Ok(())
    }

    /// One AdamW step over every parameter that has a gradient; parameters without one are
    /// skipped, as in PyTorch and bitsandbytes. The step count is shared by all parameters
    /// (bitsandbytes counts per parameter; the two differ only for parameters that go without a
    /// gradient on some steps).
    pub fn step(&mut self) -> Result<()> {
        tch::no_grad(|| self.step_inner(None))
    }

    /// [`step`](Self::step) if `apply` holds, decided on the device: `apply` is a 0-dim bool (or
    /// 0/1 number; nonzero means apply) on the optimizer's device, typically
    /// `loss.isfinite().logical_and(&grad_norm.isfinite())`.
    ///
    /// When `apply` is true the result is bit-identical to [`step`](Self::step); when false every
    /// parameter, every state (8-bit codes and their padding, absmax, fp32 moments) and the step
    /// count keep their exact values. Nothing is read back to the host, so the call can be
    /// captured in a CUDA graph; it costs the full update plus one `where` per written tensor
    /// whichever way it goes.
    pub fn step_if(&mut self, apply: &Tensor) -> Result<()> {
        // Shape, element type and device are metadata: checking them does not synchronise.
        let apply = crate::common::check_condition(apply, self.device)?;
        tch::no_grad(|| self.step_inner(Some(&apply)))
    }

    /// One step; with a `gate` (0-dim bool on the device) every write-back keeps the old value
    /// where the gate is false, and the step count advances by the gate.
    fn step_inner(&mut self, gate: Option<&Tensor>) -> Result<()> {
        match gate {
            Some(apply) => {
                let _ = self.step.f_add_(&apply.f_to_kind(Kind::Double)?)?;
            }
            None => {
                let _ = self.step.f_add_scalar_(1.0)?;
            }
        }
        let (beta1, beta2, eps) = (self.config.beta1, self.config.beta2, self.config.eps);
        // Bias corrections in float64 on the device: 1 − β₁ᵗ and √(1 − β₂ᵗ).
        let correction1 = Tensor::f_pow_scalar(beta1, &self.step)?
            .f_neg()?
            .f_add_scalar(1.0)?;
        let correction2 = Tensor::f_pow_scalar(beta2, &self.step)?
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_sqrt()?;
        let eps_term = correction2.f_mul_scalar(eps)?.f_to_kind(Kind::Float)?;
        let constants = Constants {
            beta1: f64::from(beta1 as f32),
            beta2: f64::from(beta2 as f32),
            // As the kernels compute them: 1.0f − beta in fp32.
            one_minus_beta1: f64::from(1.0f32 - beta1 as f32),
            one_minus_beta2: f64::from(1.0f32 - beta2 as f32),
            eps_term,
        };
        for group in &self.groups {
            let step_size = group
                .lr
                .f_neg()?
                .f_mul(&correction2)?
                .f_div(&correction1)?
                .f_to_kind(Kind::Float)?;
            let decay = (group.weight_decay > 0.0)
                .then(|| {
                    group
                        .lr
                        .f_mul_scalar(group.weight_decay)?
                        .f_neg()?
                        .f_add_scalar(1.0)?
                        .f_to_kind(Kind::Float)
                })
                .transpose()?;
            let update = Update {
                step_size: &step_size,
                decay: decay.as_ref(),
                constants: &constants,
                gate,
            };
            // Whether a parameter has a gradient is host-side metadata, not a tensor value.
            if group.slots.iter().all(|slot| slot.param.grad().defined()) {
                for flat in [&group.flat_8bit, &group.flat_fp32].into_iter().flatten() {
                    self.update_flat(group, flat, &update)?;
                }
                continue;
            }
            for slot in &group.slots {
                let grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                let flat = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.f_to_kind(Kind::Float)?.f_reshape([slot.numel])?)
                };
                match &slot.moments {
                    Moments::Blockwise {
                        m_codes,
                        v_codes,
                        m_absmax,
                        v_absmax,
                    } => {
                        let grad = as_blocks(&flat(&grad)?, BLOCK_SIZE, 0.0)?;
                        let param = as_blocks(&flat(&slot.param)?, BLOCK_SIZE, 0.0)?;
                        let stepped = self.update_blocks(
                            &grad,
                            &param,
                            [m_codes, v_codes],
                            [m_absmax, v_absmax],
                            &update,
                        )?;
                        write_param(slot, &stepped, 0)?;
                        let padding = m_codes.size1()? - slot.numel;
                        if padding > 0 {
                            let _ = m_codes
                                .f_narrow(0, slot.numel, padding)?
                                .f_fill_(M_PAD_CODE)?;
                        }
                    }
                    Moments::Full { m, v } => write_param(
                        slot,
                        &update_full(&flat(&grad)?, &flat(&slot.param)?, m, v, &update)?,
                        0,
                    )?,
                }
            }
        }
        Ok(())
    }

    /// One step over all parameters of a group that share a kind of state, chunk by chunk of the
    /// flat buffers.
    fn update_flat(&self, group: &Group, flat: &FlatStates, update: &Update) -> Result<()> {
        for chunk in &flat.chunks {
            let (start, len) = (chunk.start, chunk.len);
            let moments = match &flat.moments {
                Moments::Blockwise {
                    m_codes,
                    v_codes,
                    m_absmax,
                    v_absmax,
                } => Moments::Blockwise {
                    m_codes: m_codes.f_narrow(0, start, len)?,
                    v_codes: v_codes.f_narrow(0, start, len)?,
                    m_absmax: m_absmax.f_narrow(0, start / BLOCK_SIZE, len / BLOCK_SIZE)?,
                    v_absmax: v_absmax.f_narrow(0, start / BLOCK_SIZE, len / BLOCK_SIZE)?,
                },
                Moments::Full { m, v } => Moments::Full {
                    m: m.f_narrow(0, start, len)?,
                    v: v.f_narrow(0, start, len)?,
                },
            };
            let padding = flat
                .padding
                .as_ref()
                .map(|p| p.f_narrow(0, start, len))
                .transpose()?;
            self.update_chunk(group, chunk, &moments, padding.as_ref(), update)?;
        }
        Ok(())
    }

    /// One step over the slots of a chunk; `moments` and `padding` are the chunk's views.
    fn update_chunk(
        &self,
        group: &Group,
        chunk: &Chunk,
        moments: &Moments,
        padding: Option<&Tensor>,
        update: &Update,
    ) -> Result<()> {
        let eight_bit = matches!(moments, Moments::Blockwise { .. });
        // Gradients and parameters laid out as the states are: 8-bit slots padded to whole blocks.
        let mut grads = Vec::with_capacity(2 * chunk.members.len());
        let mut params = Vec::with_capacity(2 * chunk.members.len());
        for &(index, _) in &chunk.members {
            let slot = &group.slots[index];
            grads.push(
                slot.param
                    .grad()
                    .f_to_kind(Kind::Float)?
                    .f_reshape([slot.numel])?,
            );
            params.push(slot.param.f_to_kind(Kind::Float)?.f_reshape([slot.numel])?);
            let padding = block_count(slot.numel, BLOCK_SIZE) * BLOCK_SIZE - slot.numel;
            if eight_bit && padding > 0 {
                let zeros = Tensor::f_zeros([padding], (Kind::Float, self.device))?;
                grads.push(zeros.shallow_clone());
                params.push(zeros);
            }
        }
        let grads = Tensor::f_cat(&grads, 0)?;
        let params = Tensor::f_cat(&params, 0)?;
        let stepped = match moments {
            Moments::Blockwise {
                m_codes,
                v_codes,
                m_absmax,
                v_absmax,
            } => {
                let as_rows = |t: &Tensor| t.f_view([-1, BLOCK_SIZE]);
                let stepped = self.update_blocks(
                    &as_rows(&grads)?,
                    &as_rows(&params)?,
                    [m_codes, v_codes],
                    [m_absmax, v_absmax],
                    update,
                )?;
                if let Some(padding) = padding {
                    assign(m_codes, &m_codes.f_masked_fill(padding, M_PAD_CODE)?)?;
                }
                stepped
            }
            Moments::Full { m, v } => update_full(&grads, &params, m, v, update)?,
        };
        for &(index, offset) in &chunk.members {
            write_param(&group.slots[index], &stepped, offset - chunk.start)?;
        }
        Ok(())
    }

    /// The 8-bit update of `[blocks, 256]` gradients and parameters with the given codes and
    /// absmax (updated in place); returns the stepped parameters, `[blocks, 256]`.
    fn update_blocks(
        &self,
        grad: &Tensor,
        param: &Tensor,
        [m_codes, v_codes]: [&Tensor; 2],
        [m_absmax, v_absmax]: [&Tensor; 2],
        update: &Update,
    ) -> Result<Tensor> {
        let c = update.constants;
        let blocks = m_absmax.size1()?;
        let finite = grad.f_isfinite()?;
        let grad = grad.f_where_scalarother(&finite, 0.0)?;

        let (m_codes, v_codes) = (
            m_codes.f_view([blocks, BLOCK_SIZE])?,
            v_codes.f_view([blocks, BLOCK_SIZE])?,
        );
        // 1. Dequantize.
        let m = dequantize_blocks(&self.signed_map, &m_codes, m_absmax)?;
        let v = dequantize_blocks(&self.unsigned_map, &v_codes, v_absmax)?;
        // 2. Moments, in the kernel's order of operations; non-finite gradients reset them.
        let v = v
            .f_mul_scalar(c.beta2)?
            .f_add(&grad.f_mul_scalar(c.one_minus_beta2)?.f_mul(&grad)?)?;
        let m = m
            .f_mul_scalar(c.beta1)?
            .f_add(&grad.f_mul_scalar(c.one_minus_beta1)?)?;
        let v = v.f_where_scalarother(&finite, 0.0)?;
        let m = m.f_where_scalarother(&finite, 0.0)?;
        // 3.–4. Parameter step and weight decay, only where the gradient was finite.
        let stepped = update.gated(
            adam_step(param, &m, &v, update)?.f_where_self(&finite, param)?,
            param,
        )?;
        // 5. New absmax and nearest codes.
        let (new_m_codes, new_m_absmax) = requantize_blocks(&self.signed_map, &m)?;
        let (new_v_codes, new_v_absmax) = requantize_blocks(&self.unsigned_map, &v)?;
        assign(&m_codes, &update.gated(new_m_codes, &m_codes)?)?;
        assign(&v_codes, &update.gated(new_v_codes, &v_codes)?)?;
        assign(m_absmax, &update.gated(new_m_absmax, m_absmax)?)?;
        assign(v_absmax, &update.gated(new_v_absmax, v_absmax)?)?;
        Ok(stepped)
    }
}

/// Host-side constants of one step and the device-side bias-corrected epsilon.
struct Constants {
    beta1: f64,
    beta2: f64,
    one_minus_beta1: f64,
    one_minus_beta2: f64,
    /// ε·√(1 − β₂ᵗ), 0-dim float32 on the device.
    eps_term: Tensor,
}

/// What a group's parameters need for the step.
struct Update<'a> {
    /// −lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ), 0-dim float32.
    step_size: &'a Tensor,
    /// 1 − lr·wd, 0-dim float32, when the group decays.
    decay: Option<&'a Tensor>,
    constants: &'a Constants,
    /// For [`AdamW::step_if`]: 0-dim bool on the device, whether the results are written back.
    gate: Option<&'a Tensor>,
}

impl Update<'_> {
    /// `new` where the step applies and `old` where it is skipped. An unconditional step returns
    /// `new` without adding an operation.
    fn gated(&self, new: Tensor, old: &Tensor) -> Result<Tensor> {
        Ok(match self.gate {
            Some(apply) => new.f_where_self(apply, old)?,
            None => new,
        })
    }
}

/// `p + step_size · m / (√v + ε̂)`, then the decoupled weight decay.
fn adam_step(param: &Tensor, m: &Tensor, v: &Tensor, update: &Update) -> Result<Tensor> {
    let direction = m.f_div(&v.f_sqrt()?.f_add(&update.constants.eps_term)?)?;
    let stepped = param.f_add(&direction.f_mul(update.step_size)?)?;
    Ok(match update.decay {
        Some(decay) => stepped.f_mul(decay)?,
        None => stepped,
    })
}

/// Writes the slot's values, starting at element `offset` of `updated` (any shape), back into the
/// parameter, in its own element type.
fn write_param(slot: &Slot, updated: &Tensor, offset: i64) -> Result<()> {
    let values = updated
        .f_reshape([-1])?
        .f_narrow(0, offset, slot.numel)?
        .f_reshape(slot.param.size())?;
    assign(&slot.param, &values)
}

/// The fp32-state update of flat gradients and parameters, in the order of bitsandbytes' 32-bit
/// kernel; updates `m` and `v` in place and returns the stepped parameters.
fn update_full(
    grad: &Tensor,
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    update: &Update,
) -> Result<Tensor> {
    let c = update.constants;
    let new_m = m
        .f_mul_scalar(c.beta1)?
        .f_add(&grad.f_mul_scalar(c.one_minus_beta1)?)?;
    let new_v = v
        .f_mul_scalar(c.beta2)?
        .f_add(&grad.f_mul(grad)?.f_mul_scalar(c.one_minus_beta2)?)?;
    assign(m, &update.gated(new_m, m)?)?;
    assign(v, &update.gated(new_v, v)?)?;
    update.gated(adam_step(param, m, v, update)?, param)
}

/// Copies `src` into the storage `dst` shares with the optimizer's tensors.
pub(crate) fn assign(dst: &Tensor, src: &Tensor) -> Result<()> {
    // tch wants `&mut` for in-place ops although the handle is shared; a second handle to the
    // same storage is the idiomatic way around that.
    dst.shallow_clone().f_copy_(src)?;
    Ok(())
}

pub(crate) fn check_range(name: &str, value: f64, ok: bool, reason: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidHyperParameter {
            name: name.into(),
            value,
            reason,
        })
    }
}

pub(crate) fn check_group_value(group: usize, field: &str, value: f64) -> Result<()> {
    check_range(
        &format!("param_groups[{group}].{field}"),
        value,
        value.is_finite() && value >= 0.0,
        "must be finite and ≥ 0",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &Tensor) {
        let mut existing = p.grad();
        if existing.defined() {
            let _ = existing.zero_();
        }
        (p * g).sum(Kind::Float).backward();
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.detach().reshape([-1])).unwrap()
    }

    #[test]
    fn first_fp32_step_follows_the_kernel_formula() {
        // After one step m̂/√v̂ = g/|g|, so p₁ = (p₀ − lr·sign(g)·|g|/(|g| + ε)) · (1 − lr·wd).
        let p = param(&[1.0, -2.0, 0.5]);
        let (lr, wd) = (0.01, 0.1);
        let mut opt = AdamW::new(
            vec![ParamGroup::new(vec![p.shallow_clone()], lr, wd)],
            AdamWConfig::fp32(),
        )
        .unwrap();
        set_grad(&p, &Tensor::from_slice(&[0.3f32, -4.0, 0.0]));
        opt.step().unwrap();
        let got = values(&p);
        let expected: Vec<f64> = [(1.0, 0.3), (-2.0, -4.0), (0.5, 0.0)]
            .iter()
            .map(|&(p0, g): &(f64, f64)| {
                let direction = if g == 0.0 {
                    0.0
                } else {
                    g.signum() * g.abs() / (g.abs() + 1e-8)
                };
                (p0 - lr * direction) * (1.0 - lr * wd)
            })
            .collect();
        for (g, e) in got.iter().zip(&expected) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn eight_bit_states_only_from_min_8bit_size() {
        let small = Tensor::zeros([4095], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let large = Tensor::zeros([4096], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let opt = AdamW::new(
            vec![ParamGroup::new(vec![small, large], 1e-3, 0.0)],
            AdamWConfig::eight_bit(),
        )
        .unwrap();
        let slots = &opt.groups[0].slots;
        assert!(matches!(slots[0].moments, Moments::Full { .. }));
        assert!(matches!(slots[1].moments, Moments::Blockwise { .. }));
        // 4095 · 8 bytes, then 4096 · 2 bytes of codes and 2 · 16 fp32 absmax.
        assert_eq!(opt.state_bytes(), 4095 * 8 + 4096 * 2 + 2 * 16 * 4);
    }

    #[test]
    fn non_finite_gradients_skip_the_element_and_reset_its_moments() {
        let numel = 5000; // 8-bit states, ragged last block
        let p = Tensor::randn([numel], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let before = p.detach().copy();
        let mut opt = AdamW::new(
            vec![ParamGroup::new(vec![p.shallow_clone()], 1e-2, 1e-2)],
            AdamWConfig::eight_bit(),
        )
        .unwrap();
        set_grad(&p, &Tensor::randn([numel], (Kind::Float, Device::Cpu)));
        opt.step().unwrap();
        let after_first = p.detach().copy();
        let grad = Tensor::randn([numel], (Kind::Float, Device::Cpu));
        let bad = [3i64, 4000, 4999];
        for (i, value) in bad.iter().zip([f32::NAN, f32::INFINITY, f32::NEG_INFINITY]) {
            let _ = grad.get(*i).fill_(f64::from(value));
        }
        set_grad(&p, &grad);
        opt.step().unwrap();
        let after = p.detach();
        assert!(after.isfinite().all().int64_value(&[]) == 1);
        assert!(
            after.eq_tensor(&after_first).all().int64_value(&[]) == 0,
            "finite elements must move"
        );
        assert!(after_first.eq_tensor(&before).all().int64_value(&[]) == 0);
        let Moments::Blockwise {
            m_codes, v_codes, ..
        } = &opt.groups[0].slots[0].moments
        else {
            panic!()
        };
        for i in bad {
            assert_eq!(
                after.double_value(&[i]),
                after_first.double_value(&[i]),
                "element {i} moved"
            );
            assert_eq!(
                m_codes.int64_value(&[i]),
                127,
                "m of element {i} is code 0.0"
            );
            assert_eq!(v_codes.int64_value(&[i]), 0, "v of element {i} is code 0.0");
        }
    }

    #[test]
    fn groups_have_their_own_learning_rate_and_it_can_change() {
        let a = param(&[1.0; 4]);
        let b = param(&[1.0; 4]);
        let groups = vec![
            ParamGroup::new(vec![a.shallow_clone()], 0.1, 0.0),
            ParamGroup::new(vec![b.shallow_clone()], 0.0, 0.0),
        ];
        let mut opt = AdamW::new(groups, AdamWConfig::fp32()).unwrap();
        let ones = Tensor::ones([4], (Kind::Float, Device::Cpu));
        set_grad(&a, &ones);
        set_grad(&b, &ones);
        opt.step().unwrap();
        assert!((values(&a)[0] - 0.9).abs() < 1e-6);
        assert_eq!(values(&b)[0], 1.0);
        opt.set_learning_rate(1, 0.5).unwrap();
        assert_eq!(opt.learning_rate(1).unwrap(), 0.5);
        set_grad(&b, &ones);
        opt.step().unwrap();
        // m̂/√v̂ = 1 up to the kernel's fp32 (1 − β) constants (1 − 0.999f is 1.3e-5 short of 1e-3).
        assert!((values(&b)[0] - 0.5).abs() < 1e-5, "{:?}", values(&b));
        assert!(matches!(
            opt.set_learning_rate(2, 0.1),
            Err(Error::NoSuchGroup {
                group: 2,
                groups: 2
            })
        ));
        assert!(matches!(
            opt.set_learning_rate(0, f64::NAN),
            Err(Error::InvalidHyperParameter { .. })
        ));
    }

    #[test]
    fn bad_settings_and_parameters_are_named() {
        let p = || param(&[1.0]);
        let err = AdamW::new(
            vec![ParamGroup::new(vec![p()], 1e-3, 0.0)],
            AdamWConfig {
                beta2: 1.0,
                ..AdamWConfig::eight_bit()
            },
        );
        assert!(err.unwrap_err().to_string().contains("betas.1"));
        let err = AdamW::new(
            vec![
                ParamGroup::new(vec![p()], 1e-3, 0.0),
                ParamGroup::new(vec![p()], -1.0, 0.0),
            ],
            AdamWConfig::eight_bit(),
        );
        assert!(err.unwrap_err().to_string().contains("param_groups[1].lr"));
        let ints = Tensor::from_slice(&[1i64, 2]);
        let err = AdamW::new(
            vec![ParamGroup::new(vec![p(), ints], 1e-3, 0.0)],
            AdamWConfig::eight_bit(),
        );
        let message = err.unwrap_err().to_string();
        assert!(
            message.contains("param_groups[0].params[1]") && message.contains("Int64"),
            "{message}"
        );
    }

    #[test]
    fn group_step_equals_one_parameter_at_a_time() {
        // A parameter without a gradient sends its group down the per-parameter path; the other
        // parameters must come out bit-identical to the flat path of a group without it.
        // The 1.1 M-element tensor is a chunk of its own, so the last one starts a new chunk.
        let shapes: [&[i64]; 5] = [&[5000], &[4096], &[300], &[1100, 1000], &[70, 90]];
        for config in [AdamWConfig::eight_bit(), AdamWConfig::fp32()] {
            tch::manual_seed(3);
            let initial: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
                .collect();
            let grads: Vec<Vec<Tensor>> = (0..3)
                .map(|_| {
                    shapes
                        .iter()
                        .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
                        .collect()
                })
                .collect();
            let fresh = || {
                initial
                    .iter()
                    .map(|t| t.copy().set_requires_grad(true))
                    .collect::<Vec<_>>()
            };
            let (flat, single) = (fresh(), fresh());
            let idle = Tensor::zeros([8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let mut flat_opt = AdamW::new(
                vec![ParamGroup::new(
                    flat.iter().map(Tensor::shallow_clone).collect(),
                    1e-2,
                    1e-2,
                )],
                config,
            )
            .unwrap();
            let mut with_idle = single.iter().map(Tensor::shallow_clone).collect::<Vec<_>>();
            with_idle.push(idle.shallow_clone());
            let mut single_opt =
                AdamW::new(vec![ParamGroup::new(with_idle, 1e-2, 1e-2)], config).unwrap();
            for step in &grads {
                for ((a, b), g) in flat.iter().zip(&single).zip(step) {
                    set_grad(a, g);
                    set_grad(b, g);
                }
                flat_opt.step().unwrap();
                single_opt.step().unwrap();
            }
            for (a, b) in flat.iter().zip(&single) {
                assert!(
                    a.equal(b),
                    "{:?}: parameters differ between the paths",
                    config.precision
                );
            }
            assert_eq!(values(&idle), vec![0.0; 8]);
        }
    }

    /// Bit patterns, so that a comparison also tells −0.0 from 0.0 and NaN payloads apart.
    fn bits(t: &Tensor) -> Tensor {
        match t.kind() {
            Kind::Float => t.contiguous().view_dtype(Kind::Int),
            Kind::Double => t.contiguous().view_dtype(Kind::Int64),
            _ => t.shallow_clone(),
        }
    }

    fn assert_same_bits(a: &[Tensor], b: &[Tensor], what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (a, b)) in a.iter().zip(b).enumerate() {
            assert!(
                a.kind() == b.kind() && bits(a).equal(&bits(b)),
                "{what}: tensor {i} differs"
            );
        }
    }

    /// Every tensor a step can write besides the parameters: the step count and the flat state
    /// buffers, padding included (the slots' moments are views into them).
    fn states(opt: &AdamW) -> Vec<Tensor> {
        let mut all = vec![opt.step.copy()];
        for flat in opt
            .groups
            .iter()
            .flat_map(|g| [&g.flat_8bit, &g.flat_fp32])
            .flatten()
        {
            match &flat.moments {
                Moments::Blockwise {
                    m_codes,
                    v_codes,
                    m_absmax,
                    v_absmax,
                } => all.extend([m_codes, v_codes, m_absmax, v_absmax].map(Tensor::copy)),
                Moments::Full { m, v } => all.extend([m, v].map(Tensor::copy)),
            }
        }
        all
    }

    /// The CPU, and CUDA when there is one (the GPU run checks the gated step there too).
    fn test_devices() -> Vec<Device> {
        let mut devices = vec![Device::Cpu];
        if tch::Cuda::is_available() {
            devices.push(Device::Cuda(0));
        }
        devices
    }

    /// An optimizer over fresh copies of `initial` on `device`: group 0 (with weight decay) takes
    /// the first two, group 1 the rest plus a parameter that never gets a gradient, which sends
    /// group 1 down the per-parameter path.
    fn gated_problem(
        initial: &[Tensor],
        config: AdamWConfig,
        device: Device,
    ) -> (Vec<Tensor>, AdamW) {
        let params: Vec<Tensor> = initial
            .iter()
            .map(|t| t.to_device(device).copy().set_requires_grad(true))
            .collect();
        let idle = Tensor::zeros([8], (Kind::Float, device)).set_requires_grad(true);
        let mut rest: Vec<Tensor> = params[2..].iter().map(Tensor::shallow_clone).collect();
        rest.push(idle);
        let groups = vec![
            ParamGroup::new(
                params[..2].iter().map(Tensor::shallow_clone).collect(),
                1e-2,
                1e-2,
            ),
            ParamGroup::new(rest, 3e-3, 0.0),
        ];
        (params, AdamW::new(groups, config).unwrap())
    }

    /// Smaller than a block, a ragged last block (two of them in one chunk), whole blocks.
    const GATED_SHAPES: [&[i64]; 4] = [&[100], &[5000], &[2, 256], &[30, 7]];

    /// 8-bit states everywhere, the default mix (8-bit from 4096 elements), fp32 everywhere.
    fn gated_configs() -> [AdamWConfig; 3] {
        [
            AdamWConfig {
                min_8bit_size: 0,
                ..AdamWConfig::eight_bit()
            },
            AdamWConfig::eight_bit(),
            AdamWConfig::fp32(),
        ]
    }

    fn random_grads(steps: usize) -> Vec<Vec<Tensor>> {
        (0..steps)
            .map(|_| {
                GATED_SHAPES
                    .iter()
                    .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)) * 0.1)
                    .collect()
            })
            .collect()
    }

    fn set_grads(params: &[Tensor], grads: &[Tensor]) {
        for (p, g) in params.iter().zip(grads) {
            set_grad(p, &g.to_device(p.device()));
        }
    }

    #[test]
    fn step_if_true_equals_step_bit_for_bit() {
        for (device, config) in test_devices()
            .into_iter()
            .flat_map(|d| gated_configs().map(|c| (d, c)))
        {
            tch::manual_seed(21);
            let initial: Vec<Tensor> = GATED_SHAPES
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
                .collect();
            let (plain, mut plain_opt) = gated_problem(&initial, config, device);
            let (gated, mut gated_opt) = gated_problem(&initial, config, device);
            for (step, grads) in random_grads(4).iter().enumerate() {
                set_grads(&plain, grads);
                set_grads(&gated, grads);
                plain_opt.step().unwrap();
                // A bool condition and a 0/1 float one.
                let apply = if step % 2 == 0 {
                    Tensor::from(true)
                } else {
                    Tensor::from(1.0f32)
                }
                .to_device(device);
                gated_opt.step_if(&apply).unwrap();
                let what = format!(
                    "{device:?} {:?} min_8bit_size {} step {step}",
                    config.precision, config.min_8bit_size
                );
                assert_same_bits(&plain, &gated, &format!("{what}: parameters"));
                assert_same_bits(
                    &states(&plain_opt),
                    &states(&gated_opt),
                    &format!("{what}: states"),
                );
            }
            assert_eq!(gated_opt.step_count().double_value(&[]), 4.0);
        }
    }

    #[test]
    fn step_if_false_changes_nothing_and_the_run_continues_as_if_it_never_happened() {
        for (device, config) in test_devices()
            .into_iter()
            .flat_map(|d| gated_configs().map(|c| (d, c)))
        {
            tch::manual_seed(22);
            let initial: Vec<Tensor> = GATED_SHAPES
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
                .collect();
            let grads = random_grads(4);
            let skipped = random_grads(3);
            let (reference, mut reference_opt) = gated_problem(&initial, config, device);
            let (gated, mut gated_opt) = gated_problem(&initial, config, device);
            for (step, grads) in grads.iter().enumerate() {
                set_grads(&reference, grads);
                reference_opt.step().unwrap();
                // Skipped calls before the first step (step count 0: the bias corrections divide
                // by zero, which must not leak through) and between later ones.
                if step < skipped.len() {
                    set_grads(&gated, &skipped[step]);
                    let (params_before, states_before) = (
                        gated.iter().map(Tensor::copy).collect::<Vec<_>>(),
                        states(&gated_opt),
                    );
                    let skip = if step == 1 {
                        Tensor::from(0.0f32)
                    } else {
                        Tensor::from(false)
                    }
                    .to_device(device);
                    gated_opt.step_if(&skip).unwrap();
                    let what = format!(
                        "{device:?} {:?} min_8bit_size {} skip {step}",
                        config.precision, config.min_8bit_size
                    );
                    assert_same_bits(&params_before, &gated, &format!("{what}: parameters"));
                    assert_same_bits(
                        &states_before,
                        &states(&gated_opt),
                        &format!("{what}: states"),
                    );
                }
                set_grads(&gated, grads);
                gated_opt
                    .step_if(&Tensor::from(true).to_device(device))
                    .unwrap();
            }
            let what = format!(
                "{device:?} {:?} min_8bit_size {}",
                config.precision, config.min_8bit_size
            );
            assert_same_bits(
                &reference,
                &gated,
                &format!("{what}: parameters after the run"),
            );
            assert_same_bits(
                &states(&reference_opt),
                &states(&gated_opt),
                &format!("{what}: states after the run"),
            );
        }
    }

    #[test]
    fn a_nan_gradient_gated_by_the_clipped_norm_changes_nothing() {
        for (device, config) in test_devices()
            .into_iter()
            .flat_map(|d| gated_configs().map(|c| (d, c)))
        {
            tch::manual_seed(23);
            let initial: Vec<Tensor> = GATED_SHAPES
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
                .collect();
            let (params, mut opt) = gated_problem(&initial, config, device);
            let clipped_step = |opt: &mut AdamW| {
                let norm = crate::clip_grad_norm(&params, 1.0).unwrap();
                opt.step_if(&norm.isfinite()).unwrap();
            };
            let good = random_grads(2);
            set_grads(&params, &good[0]);
            clipped_step(&mut opt);
            let bad = random_grads(1).remove(0);
            let _ = bad[2].get(1).get(17).fill_(f64::NAN);
            set_grads(&params, &bad);
            let (params_before, states_before) = (
                params.iter().map(Tensor::copy).collect::<Vec<_>>(),
                states(&opt),
            );
            clipped_step(&mut opt);
            let what = format!(
                "{device:?} {:?} min_8bit_size {}",
                config.precision, config.min_8bit_size
            );
            assert_same_bits(&params_before, &params, &format!("{what}: parameters"));
            assert_same_bits(&states_before, &states(&opt), &format!("{what}: states"));
            // The next finite step goes through.
            set_grads(&params, &good[1]);
            clipped_step(&mut opt);
            assert_eq!(opt.step_count().double_value(&[]), 2.0);
            assert!(!params[0].equal(&params_before[0]));
        }
    }

    #[test]
    fn step_if_refuses_a_condition_that_is_not_a_scalar() {
        let p = param(&[1.0, 2.0]);
        let mut opt = AdamW::new(
            vec![ParamGroup::new(vec![p.shallow_clone()], 0.1, 0.0)],
            AdamWConfig::fp32(),
        )
        .unwrap();
        set_grad(&p, &Tensor::from_slice(&[1.0f32, 1.0]));
        let err = opt.step_if(&Tensor::from_slice(&[true])).unwrap_err();
        assert!(
            matches!(&err, Error::StepCondition { shape, .. } if shape == &[1]),
            "{err}"
        );
        assert!(err.to_string().contains("0-dim"), "{err}");
        assert_eq!(values(&p), vec![1.0, 2.0]);
        assert_eq!(opt.step_count().double_value(&[]), 0.0);
        if tch::Cuda::is_available() {
            let q = Tensor::ones([2], (Kind::Float, Device::Cuda(0))).set_requires_grad(true);
            let mut opt = AdamW::new(
                vec![ParamGroup::new(vec![q], 0.1, 0.0)],
                AdamWConfig::fp32(),
            )
            .unwrap();
            let err = opt.step_if(&Tensor::from(true)).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::StepCondition {
                        device: Device::Cpu,
                        expected: Device::Cuda(0),
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn parameters_without_gradient_are_skipped() {
        let p = param(&[1.0, 2.0]);
        let mut opt = AdamW::new(
            vec![ParamGroup::new(vec![p.shallow_clone()], 0.1, 0.1)],
            AdamWConfig::fp32(),
        )
        .unwrap();
        opt.step().unwrap();
        assert_eq!(values(&p), vec![1.0, 2.0]);
    }
}
