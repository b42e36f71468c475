//! Learning-rate schedules: diffusers' `get_scheduler` (`diffusers/optimization.py`) as pure functions
//! of the optimizer step.
//!
//! diffusers builds each schedule as a `torch.optim.lr_scheduler.LambdaLR` whose multiplier is a
//! function of the number of `scheduler.step()` calls so far; the learning rate an optimizer step uses
//! is `base_lr * multiplier(step)`. [`LrSchedule::lr_at`] computes the same product with the same
//! floating-point operations in the same order, so it equals `scheduler.get_last_lr()[0]` to the last
//! bit or nearly (`tests/fixtures/lr-schedules.safetensors` holds diffusers' values).
//!
//! Being a function of the step rather than a stateful object, a schedule needs no state in a
//! checkpoint: a resumed run asks for `lr_at(global_step)` and continues where it stopped.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// The learning rate the polynomial schedule ends at, diffusers' `lr_end` default (the training
/// scripts do not expose it).
pub const POLYNOMIAL_LR_END: f64 = 1e-7;

/// The schedule shapes of diffusers' `SchedulerType`, by the names the training scripts'
/// `--lr_scheduler` flag takes (`piecewise_constant` is not offered by the SDXL scripts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// The base learning rate throughout (`constant`).
    Constant,
    /// Linear warm-up from 0, then the base rate (`constant_with_warmup`).
    ConstantWithWarmup,
    /// Linear warm-up, then a linear decay to 0 at the last step (`linear`).
    Linear,
    /// Linear warm-up, then a cosine decay; half a period by default, ending at 0 (`cosine`).
    Cosine,
    /// Linear warm-up, then `num_cycles` cosine decays, each restarting at the base rate
    /// (`cosine_with_restarts`).
    CosineWithRestarts,
    /// Linear warm-up, then a polynomial decay to [`POLYNOMIAL_LR_END`] (`polynomial`).
    Polynomial,
}

impl SchedulerKind {
    /// Every kind, in diffusers' order of the SDXL scripts' help text.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Linear,
        SchedulerKind::Cosine,
        SchedulerKind::CosineWithRestarts,
        SchedulerKind::Polynomial,
        SchedulerKind::Constant,
        SchedulerKind::ConstantWithWarmup,
    ];

    /// diffusers' name of the schedule, as `--lr_scheduler` takes it.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Constant => "constant",
            SchedulerKind::ConstantWithWarmup => "constant_with_warmup",
            SchedulerKind::Linear => "linear",
            SchedulerKind::Cosine => "cosine",
            SchedulerKind::CosineWithRestarts => "cosine_with_restarts",
            SchedulerKind::Polynomial => "polynomial",
        }
    }

    /// Whether the shape depends on the total number of steps (and so divides by the steps after
    /// warm-up).
    fn decays(self) -> bool {
        !matches!(
            self,
            SchedulerKind::Constant | SchedulerKind::ConstantWithWarmup
        )
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        SchedulerKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let valid: Vec<&str> = SchedulerKind::ALL.iter().map(|kind| kind.name()).collect();
                Error::InvalidOption {
                    option: "--lr_scheduler",
                    problem: format!(
                        "unknown schedule {name:?}; expected one of {}",
                        valid.join(", ")
                    ),
                }
            })
    }
}

/// A learning-rate schedule: the rate of every optimizer step of a run.
///
/// ```
/// use trainer::lr_scheduler::{LrSchedule, SchedulerKind};
///
/// let schedule = LrSchedule::new(SchedulerKind::Cosine, 1e-4, 10, 100)?;
/// assert_eq!(schedule.lr_at(0), 0.0); // warm-up starts at zero
/// assert_eq!(schedule.lr_at(10), 1e-4); // and reaches the base rate after 10 steps
/// assert!(schedule.lr_at(100) < 1e-20); // the half cosine ends at zero
/// # Ok::<(), trainer::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    kind: SchedulerKind,
    base_lr: f64,
    warmup_steps: u64,
    total_steps: u64,
    num_cycles: f64,
    power: f64,
}

impl LrSchedule {
    /// A schedule of `kind` from `base_lr` (`--learning_rate`), warming up over `warmup_steps`
    /// (`--lr_warmup_steps`) of `total_steps` optimizer steps (`--max_train_steps`), with diffusers'
    /// defaults for the rest: 0.5 cycles for `cosine`, 1 for `cosine_with_restarts`, power 1 for
    /// `polynomial`.
    ///
    /// The training scripts pass `lr_warmup_steps * num_processes` and `max_train_steps *
    /// num_processes`; with one process these are the flags' values.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming the flag: a negative or non-finite learning rate (for
    /// `polynomial`: one not above [`POLYNOMIAL_LR_END`], as diffusers requires), no training steps,
    /// or (for the decaying schedules) more warm-up steps than training steps, or for `polynomial`
    /// as many, which diffusers would divide by zero for.
    pub fn new(
        kind: SchedulerKind,
        base_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Self> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(invalid(
                "--learning_rate",
                format!("must be a finite number >= 0, got {base_lr}"),
            ));
        }
        if kind == SchedulerKind::Polynomial && base_lr <= POLYNOMIAL_LR_END {
            return Err(invalid(
                "--learning_rate",
                format!(
                    "the polynomial schedule decays to {POLYNOMIAL_LR_END}, so it must start above it, got {base_lr}"
                ),
            ));
        }
        if total_steps == 0 {
            return Err(invalid(
                "--max_train_steps",
                "must be at least 1, got 0".to_owned(),
            ));
        }
        if kind.decays() && warmup_steps > total_steps {
            return Err(invalid(
                "--lr_warmup_steps",
                format!(
                    "{warmup_steps} warm-up steps exceed the {total_steps} training steps (--max_train_steps) of the {kind} schedule"
                ),
            ));
        }
        if kind == SchedulerKind::Polynomial && warmup_steps == total_steps {
            return Err(invalid(
                "--lr_warmup_steps",
                format!(
                    "the polynomial schedule needs steps after warm-up, but warm-up takes all {total_steps} training steps (--max_train_steps)"
                ),
            ));
        }
        let num_cycles = if kind == SchedulerKind::CosineWithRestarts {
            1.0
        } else {
            0.5
        };
        Ok(Self {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
            num_cycles,
            power: 1.0,
        })
    }

    /// The schedule exactly as diffusers' SDXL training scripts build it: `get_scheduler(kind,
    /// num_warmup_steps, num_training_steps, num_cycles=lr_num_cycles, power=lr_power)`.
    /// `get_scheduler` forwards `num_cycles` to `cosine_with_restarts` only (plain `cosine` keeps
    /// its half period whatever `--lr_num_cycles` says) and `power` to `polynomial` only; both are
    /// still checked.
    ///
    /// # Errors
    /// As [`LrSchedule::new`], [`LrSchedule::with_cycles`] and [`LrSchedule::with_power`].
    pub fn from_script_flags(
        kind: SchedulerKind,
        base_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
        lr_num_cycles: f64,
        lr_power: f64,
    ) -> Result<Self> {
        let schedule = Self::new(kind, base_lr, warmup_steps, total_steps)?;
        let checked = schedule
            .clone()
            .with_cycles(lr_num_cycles)?
            .with_power(lr_power)?;
        Ok(match kind {
            SchedulerKind::CosineWithRestarts | SchedulerKind::Polynomial => checked,
            _ => schedule,
        })
    }

    /// Sets the number of cosine periods: for `cosine` the number of full periods after warm-up
    /// (0.5, the default, is one decay to zero), for `cosine_with_restarts` the number of decays
    /// (default 1). Other kinds ignore it.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for `--lr_num_cycles` when it is not a finite number above 0.
    pub fn with_cycles(mut self, num_cycles: f64) -> Result<Self> {
        if !(num_cycles.is_finite() && num_cycles > 0.0) {
            return Err(invalid(
                "--lr_num_cycles",
                format!("must be a finite number > 0, got {num_cycles}"),
            ));
        }
        self.num_cycles = num_cycles;
        Ok(self)
    }

    /// Sets the exponent of the `polynomial` decay (default 1, a straight line). Other kinds ignore it.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for `--lr_power` when it is not a finite number above 0.
    pub fn with_power(mut self, power: f64) -> Result<Self> {
        if !(power.is_finite() && power > 0.0) {
            return Err(invalid(
                "--lr_power",
                format!("must be a finite number > 0, got {power}"),
            ));
        }
        self.power = power;
        Ok(self)
    }

    /// The schedule's shape.
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The learning rate after warm-up (`--learning_rate`).
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// The number of warm-up steps.
    pub fn warmup_steps(&self) -> u64 {
        self.warmup_steps
    }

    /// The number of training steps the decay is spread over.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The learning rate of optimizer step `step` (0-based): what diffusers' `get_last_lr()[0]` is
    /// after `step` calls of `scheduler.step()`. Steps past the total keep following the formula, as
    /// in diffusers (the linear and restart schedules stay at 0, `polynomial` at its end rate, and
    /// `cosine` rises again).
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.multiplier(step)
    }

    /// The learning rate at step `step` of another parameter group that starts at `initial`:
    /// `LambdaLR` multiplies every group's initial rate by the same factor.
    pub fn lr_from(&self, initial: f64, step: u64) -> f64 {
        initial * self.multiplier(step)
    }

    /// The factor `LambdaLR` multiplies the base rate by, written with the operations of
    /// `diffusers/optimization.py` in their order so the products round the same way.
    fn multiplier(&self, step: u64) -> f64 {
        let warmup = self.warmup_steps;
        if self.kind == SchedulerKind::Constant {
            return 1.0;
        }
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        // Signed: `linear` counts the steps left, which go negative past the end.
        let (step, warmup, total) = (step as i64, warmup as i64, self.total_steps as i64);
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        match self.kind {
            SchedulerKind::Constant | SchedulerKind::ConstantWithWarmup => 1.0,
            SchedulerKind::Linear => {
                let remaining = (total - step) as f64 / (total - warmup).max(1) as f64;
                remaining.max(0.0)
            }
            SchedulerKind::Cosine => {
                let angle = std::f64::consts::PI * self.num_cycles * 2.0 * progress;
                (0.5 * (1.0 + angle.cos())).max(0.0)
            }
            SchedulerKind::CosineWithRestarts => {
                if progress >= 1.0 {
                    return 0.0;
                }
                let angle = std::f64::consts::PI * ((self.num_cycles * progress) % 1.0);
                (0.5 * (1.0 + angle.cos())).max(0.0)
            }
            SchedulerKind::Polynomial => {
                if step > total {
                    return POLYNOMIAL_LR_END / self.base_lr;
                }
                let lr_range = self.base_lr - POLYNOMIAL_LR_END;
                // `new` guarantees steps after warm-up, so this never divides by zero.
                let pct_remaining = 1.0 - (step - warmup) as f64 / (total - warmup) as f64;
                let decayed = lr_range * pct_remaining.powf(self.power) + POLYNOMIAL_LR_END;
                decayed / self.base_lr
            }
        }
    }
}

fn invalid(option: &'static str, problem: String) -> Error {
    Error::InvalidOption { option, problem }
}

#[cfg(test)]
mod tests;
