//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with a float32 momentum
//! as `lion-pytorch` 0.2.5 implements it, or with an 8-bit block-quantized momentum as bitsandbytes
//! 0.50 `Lion8bit` does. Per parameter:
//!
//! 1. (8-bit) dequantize `m = code[c]·absmax` per block of 256;
//! 2. `p ← p·(1 − lr·wd)` (weight decay first, decoupled);
//! 3. `p ← p − lr·sign(β₁·m + (1−β₁)·g)`;
//! 4. `m ← β₂·m + (1−β₂)·g`;
//! 5. (8-bit) new absmax per block, requantize to the nearest code of the signed dynamic map keeping
//!    the sign of `m`.
//!
//! `m` starts at zero.
//!
//! **fp32** ([`LionConfig::fp32`], the default) follows lion-pytorch (`lion_pytorch/lion_pytorch.py`,
//! `update_fn`): the factors `1 − lr·wd`, `1 − β` are computed in float64 and rounded to float32
//! where they meet the tensors. lion-pytorch's `decoupled_weight_decay` option (weight decay divided
//! by the initial lr) and its Triton kernel are not reproduced: pass the weight decay you want
//! applied as `lr·wd`.
//!
//! **8-bit** ([`LionConfig::eight_bit`]) follows bitsandbytes 0.50: `bitsandbytes/optim/lion.py`
//! (`Lion8bit`: betas (0.9, 0.99), `min_8bit_size` 4096) and `optim/optimizer.py`
//! (`Optimizer1State`: tensors of fewer than `min_8bit_size` elements keep an fp32 momentum, larger
//! ones `state1` codes and `absmax1` per block of 256), with the arithmetic of the CUDA kernels
//! `kOptimizerStatic8bit1StateBlockwise` (8-bit) and `kOptimizer32bit1State` (fp32) in
//! `csrc/kernels.cu`: `1 − β` and `1 − lr·wd` are computed in float32 (`1.0f − beta`), the weight
//! decay only when it is > 0, a ragged last block is padded as the kernel loads it (gradient 0,
//! code 128), and the block quantization is [`crate::quantize`]'s, shared with AdamW.
//! bitsandbytes' CPU path rounds the float64 `1 − β` instead (the momentum differs by 9.3e-7
//! relative for β₂ = 0.99). The 1-state kernels have no guard against non-finite gradients (a NaN
//! spoils its block's momentum there as here); gate such steps with [`Lion::step_if`].
//!
//! Unlike AdamW, Lion updates one parameter at a time (no flat buffers over a group).

use std::path::Path;

use tch::{Kind, Tensor};

use crate::adamw::{M_PAD_CODE, check_range};
use crate::common::{Entry, Groups, load_entries, put, save_entries, scalar, shared_methods};
use crate::quantize::{
    BLOCK_SIZE, QuantMap, as_blocks, block_count, dequantize_blocks, requantize_blocks,
};
use crate::{ParamGroup, Result, StatePrecision};

/// Lion's settings shared by all groups; learning rate and weight decay are per group.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct LionConfig {
    /// Weight of the momentum in the update direction, β₁.
    pub beta1: f64,
    /// Decay of the momentum, β₂.
    pub beta2: f64,
    /// How the momentum is stored, and with it whose arithmetic the step follows (see the
    /// [module documentation](crate::lion)).
    pub precision: StatePrecision,
    /// With [`StatePrecision::EightBit`], tensors with fewer elements keep an fp32 momentum
    /// (bitsandbytes' `min_8bit_size`).
    pub min_8bit_size: i64,
}

setters! {
    /// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
    /// from [`Default`] (or a named constructor) by these.
    LionConfig {
        with_beta1 => beta1: f64,
        with_beta2 => beta2: f64,
        with_precision => precision: StatePrecision,
        with_min_8bit_size => min_8bit_size: i64,
    }
}

impl LionConfig {
    /// Bytes [`Lion::state_bytes`] counts for one parameter of `shape`: a float32 momentum, or
    /// with [`StatePrecision::EightBit`] (from `min_8bit_size` elements on) one byte per element
    /// plus an fp32 absmax per block of 256.
    pub fn state_bytes(&self, shape: &[i64]) -> i64 {
        let numel = shape.iter().product::<i64>();
        if self.precision == StatePrecision::EightBit && numel >= self.min_8bit_size {
            numel + 4 * block_count(numel, BLOCK_SIZE)
        } else {
            4 * numel
        }
    }
}

impl Default for LionConfig {
    /// lion-pytorch's defaults: betas (0.9, 0.99), fp32 momentum.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.99,
            precision: StatePrecision::Fp32,
            min_8bit_size: 4096,
        }
    }
}

impl LionConfig {
    /// lion-pytorch's `Lion` defaults (the same as [`Default`]): betas (0.9, 0.99), fp32 momentum.
    pub fn fp32() -> Self {
        Self::default()
    }

    /// bitsandbytes' `Lion8bit` defaults: betas (0.9, 0.99), 8-bit momentum for tensors of at least
    /// 4096 elements.
    pub fn eight_bit() -> Self {
        Self {
            precision: StatePrecision::EightBit,
            ..Self::default()
        }
    }

    fn bits(&self) -> f64 {
        match self.precision {
            StatePrecision::EightBit => 8.0,
            StatePrecision::Fp32 => 32.0,
        }
    }
}

/// The momentum of one parameter.
#[derive(Debug)]
enum Momentum {
    /// float32, the parameter's shape.
    Full(Tensor),
    /// `uint8` codes of the signed dynamic map in the parameter's shape, and one float32 absmax per
    /// block of 256 elements of the flattened parameter.
    Blockwise { codes: Tensor, absmax: Tensor },
}

/// Lion with an fp32 or 8-bit momentum per parameter. See the [module documentation](crate::lion).
#[derive(Debug)]
pub struct Lion {
    config: LionConfig,
    groups: Groups<Momentum>,
    step: Tensor,
    /// The signed dynamic map, with 8-bit states.
    map: Option<QuantMap>,
}

/// The host constants of a step: the β factors as the reference rounds them.
struct Constants {
    beta1: f64,
    one_minus_beta1: f64,
    beta2: f64,
    one_minus_beta2: f64,
}

impl Lion {
    /// An optimizer over `groups` of float32 parameters on one device.
    pub fn new(groups: Vec<ParamGroup>, config: LionConfig) -> Result<Self> {
        for (name, beta) in [("betas.0", config.beta1), ("betas.1", config.beta2)] {
            check_range(
                name,
                beta,
                (0.0..=1.0).contains(&beta),
                "must lie in [0, 1]",
            )?;
        }
        check_range(
            "min_8bit_size",
            config.min_8bit_size as f64,
            config.min_8bit_size >= 0,
            "must be ≥ 0",
        )?;
        let groups = Groups::new(groups, |p| {
            let numel = p.numel() as i64;
            if config.precision == StatePrecision::EightBit && numel >= config.min_8bit_size {
                Ok(Momentum::Blockwise {
                    codes: Tensor::f_zeros(p.size(), (Kind::Uint8, p.device()))?,
                    absmax: Tensor::f_zeros(
                        [block_count(numel, BLOCK_SIZE)],
                        (Kind::Float, p.device()),
                    )?,
                })
            } else {
                Ok(Momentum::Full(p.f_zeros_like()?))
            }
        })?;
        let map = match config.precision {
            StatePrecision::EightBit => Some(QuantMap::signed(groups.device)?),
            StatePrecision::Fp32 => None,
        };
        let step = scalar(0.0, groups.device)?;
        Ok(Self {
            config,
            groups,
            step,
            map,
        })
    }

    /// The shared settings.
    pub fn config(&self) -> &LionConfig {
        &self.config
    }

    shared_methods!();

    fn constants(&self) -> Constants {
        let LionConfig { beta1, beta2, .. } = self.config;
        match self.config.precision {
            // lion-pytorch: `1 − β` in float64, rounded to float32 by the tensor operation.
            StatePrecision::Fp32 => Constants {
                beta1,
                one_minus_beta1: 1.0 - beta1,
                beta2,
                one_minus_beta2: 1.0 - beta2,
            },
            // The kernels: `1.0f − beta` in float32.
            StatePrecision::EightBit => Constants {
                beta1,
                one_minus_beta1: f64::from(1.0f32 - beta1 as f32),
                beta2,
                one_minus_beta2: f64::from(1.0f32 - beta2 as f32),
            },
        }
    }

    /// `1 − lr·wd` as a 0-dim device tensor, or `None` where the reference leaves the parameter as
    /// it is (no weight decay).
    fn decay(&self, lr: &Tensor, weight_decay: f64) -> Result<Option<Tensor>> {
        if weight_decay == 0.0 {
            return Ok(None);
        }
        let decay = match self.config.precision {
            // float64 on the device, rounded where it meets the parameter.
            StatePrecision::Fp32 => lr.f_mul_scalar(-weight_decay)?.f_add_scalar(1.0)?,
            // The kernels' `1.0f − lr * weight_decay` in float32.
            StatePrecision::EightBit => lr
                .f_to_kind(Kind::Float)?
                .f_mul_scalar(weight_decay)?
                .f_neg()?
                .f_add_scalar(1.0)?,
        };
        Ok(Some(decay))
    }

    fn step_inner(&mut self, gate: Option<&Tensor>) -> Result<()> {
        let c = self.constants();
        for group in &self.groups.groups {
            let decay = self.decay(&group.lr, group.weight_decay)?;
            let update = Update {
                c: &c,
                lr: &group.lr,
                decay: decay.as_ref(),
            };
            for (param, state) in group.params.iter().zip(&group.states) {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = grad.f_to_kind(Kind::Float)?;
                match state {
                    Momentum::Full(m) => {
                        let (updated, new_m) = update.apply(param, &grad, m)?;
                        put(param, &updated, gate)?;
                        put(m, &new_m, gate)?;
                    }
                    Momentum::Blockwise { codes, absmax } => {
                        let map = self.map.as_ref().ok_or_else(|| {
                            crate::Error::Shape(
                                "internal: an 8-bit momentum without its code table".into(),
                            )
                        })?;
                        self.step_blockwise(param, &grad, [codes, absmax], map, &update, gate)?;
                    }
                }
            }
        }
        put(&self.step, &self.step.f_add_scalar(1.0)?, gate)
    }

    /// The 8-bit step of one parameter: its tensors as `[blocks, 256]` rows padded as the kernel
    /// loads a ragged last block (gradient and parameter 0, code 128); the padding takes part in
    /// the new absmax, as there.
    fn step_blockwise(
        &self,
        param: &Tensor,
        grad: &Tensor,
        [codes, absmax]: [&Tensor; 2],
        map: &QuantMap,
        update: &Update,
        gate: Option<&Tensor>,
    ) -> Result<()> {
        let numel = param.numel() as i64;
        let rows = |t: &Tensor, fill: f64| as_blocks(&t.f_reshape([numel])?, BLOCK_SIZE, fill);
        let m = dequantize_blocks(map, &rows(codes, M_PAD_CODE)?, absmax)?;
        let (updated, new_m) = update.apply(&rows(param, 0.0)?, &rows(grad, 0.0)?, &m)?;
        let (new_codes, new_absmax) = requantize_blocks(map, &new_m)?;
        let unpadded = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_reshape([-1])?
                .f_narrow(0, 0, numel)?
                .f_reshape(param.size())?)
        };
        put(param, &unpadded(&updated)?, gate)?;
        put(codes, &unpadded(&new_codes)?, gate)?;
        put(absmax, &new_absmax, gate)
    }

    fn entries(&self) -> Vec<(String, Entry)> {
        let mut entries = vec![
            ("step".to_string(), Entry::State(self.step.shallow_clone())),
            ("beta1".to_string(), Entry::Setting(self.config.beta1)),
            ("beta2".to_string(), Entry::Setting(self.config.beta2)),
            ("precision".to_string(), Entry::Setting(self.config.bits())),
            (
                "min_8bit_size".to_string(),
                Entry::Setting(self.config.min_8bit_size as f64),
            ),
        ];
        if let Some(map) = &self.map {
            entries.push((
                "qmap1".to_string(),
                Entry::Fixed(map.code().shallow_clone()),
            ));
        }
        entries.extend(self.groups.group_entries());
        for (g, group) in self.groups.groups.iter().enumerate() {
            for (i, state) in group.states.iter().enumerate() {
                let key = |name: &str| format!("state.{g}.{i}.{name}");
                match state {
                    Momentum::Full(m) => {
                        entries.push((key("exp_avg"), Entry::State(m.shallow_clone())));
                    }
                    Momentum::Blockwise { codes, absmax } => {
                        entries.push((key("state1"), Entry::State(codes.shallow_clone())));
                        entries.push((key("absmax1"), Entry::State(absmax.shallow_clone())));
                    }
                }
            }
        }
        entries
    }

    /// Writes the complete state to `path` atomically as safetensors: step, learning rates and
    /// momenta (`state.{g}.{i}.exp_avg` fp32, or bitsandbytes' `state1` codes and `absmax1`), and
    /// for checking the betas, weight decays, precision (8 or 32), `min_8bit_size` and the code
    /// table `qmap1`. Reads the device tensors, so it synchronises.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_entries(path.as_ref(), &self.entries())
    }

    /// Restores a state written by [`Lion::save`] for the same parameters and settings (betas,
    /// weight decays, precision and `min_8bit_size` must be equal; learning rates are taken from
    /// the file). Nothing changes if a check fails.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        load_entries(path.as_ref(), &self.entries())?;
        self.groups.sync_lr_values()
    }
}

/// What one group's parameters need for the step.
struct Update<'a> {
    c: &'a Constants,
    /// The learning rate, 0-dim float64 on the device (rounded to float32 where it meets `sign`).
    lr: &'a Tensor,
    /// `1 − lr·wd`, when the group decays.
    decay: Option<&'a Tensor>,
}

impl Update<'_> {
    /// Lion's update of float32 `param`, `grad`, `m` (one shape): (new parameter, new momentum).
    fn apply(&self, param: &Tensor, grad: &Tensor, m: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = self.c;
        let decayed = match self.decay {
            Some(decay) => param.f_mul(decay)?,
            None => param.shallow_clone(),
        };
        let direction = m
            .f_mul_scalar(c.beta1)?
            .f_add(&grad.f_mul_scalar(c.one_minus_beta1)?)?
            .f_sign()?;
        let updated = decayed.f_sub(&direction.f_mul(self.lr)?)?;
        let new_m = m
            .f_mul_scalar(c.beta2)?
            .f_add(&grad.f_mul_scalar(c.one_minus_beta2)?)?;
        Ok((updated, new_m))
    }
}
