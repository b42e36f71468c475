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
mod tests {
    use super::*;

    use std::path::PathBuf;

    fn fixture() -> PathBuf {
        let root = std::env::var_os("SDXL_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
            });
        let path = root.join("lr-schedules.safetensors");
        assert!(
            path.exists(),
            "missing fixture {}: regenerate it with `tools/fixtures/regenerate.sh --only lr_schedules`",
            path.display()
        );
        path
    }

    /// The cases of `LR_SCHEDULE_CASES` in `tools/fixtures/generate.py`, as the header metadata lists them.
    fn fixture_cases() -> serde_json::Map<String, serde_json::Value> {
        let bytes = std::fs::read(fixture()).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let cases = header["__metadata__"]["cases"].as_str().unwrap();
        serde_json::from_str(cases).unwrap()
    }

    #[test]
    fn every_schedule_equals_diffusers_step_by_step() {
        let cases = fixture_cases();
        let expected: std::collections::HashMap<String, tch::Tensor> =
            tch::Tensor::read_safetensors(fixture())
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(cases.len(), 16);
        let mut kinds_seen = std::collections::HashSet::new();
        for (case, config) in &cases {
            let kind: SchedulerKind = config["scheduler"].as_str().unwrap().parse().unwrap();
            kinds_seen.insert(kind);
            let lr = config["learning_rate"].as_f64().unwrap();
            let warmup = config["warmup_steps"].as_u64().unwrap();
            let total = config["total_steps"].as_u64().unwrap();
            let cycles = config.get("num_cycles").and_then(|c| c.as_f64());
            let power = config.get("power").and_then(|p| p.as_f64());
            let schedule = match config["built_by"].as_str().unwrap() {
                // The training scripts' call: the flags' defaults are 1 cycle and power 1.
                "get_scheduler" => LrSchedule::from_script_flags(
                    kind,
                    lr,
                    warmup,
                    total,
                    cycles.unwrap_or(1.0),
                    power.unwrap_or(1.0),
                ),
                "function" => LrSchedule::new(kind, lr, warmup, total)
                    .and_then(|s| s.with_cycles(cycles.unwrap())),
                other => panic!("unknown builder {other}"),
            }
            .unwrap();
            let values = Vec::<f64>::try_from(&expected[case]).unwrap();
            assert_eq!(values.len() as u64, total + 6, "{case}");
            for (step, &want) in values.iter().enumerate() {
                let got = schedule.lr_at(step as u64);
                let tolerance = 1e-12 * want.abs().max(f64::MIN_POSITIVE);
                assert!(
                    (got - want).abs() <= tolerance,
                    "{case} step {step}: {got:e} vs diffusers {want:e}"
                );
            }
        }
        assert_eq!(
            kinds_seen.len(),
            SchedulerKind::ALL.len(),
            "every kind is checked"
        );
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.to_string().parse::<SchedulerKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<SchedulerKind>(&json).unwrap(), kind);
        }
        let err = "cosine_annealing"
            .parse::<SchedulerKind>()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--lr_scheduler: unknown schedule \"cosine_annealing\""),
            "{err}"
        );
        for kind in SchedulerKind::ALL {
            assert!(err.contains(kind.name()), "{err}");
        }
        assert!(serde_json::from_str::<SchedulerKind>("\"Cosine\"").is_err());
    }

    fn flag_of(result: Result<LrSchedule>) -> &'static str {
        match result {
            Err(Error::InvalidOption { option, .. }) => option,
            other => panic!("expected an invalid option, got {other:?}"),
        }
    }

    #[test]
    fn bad_settings_name_their_flag() {
        use SchedulerKind::*;
        for lr in [-1e-4, f64::NAN, f64::INFINITY] {
            assert_eq!(
                flag_of(LrSchedule::new(Constant, lr, 0, 10)),
                "--learning_rate"
            );
        }
        assert_eq!(
            flag_of(LrSchedule::new(Polynomial, 1e-7, 0, 10)),
            "--learning_rate"
        );
        assert_eq!(
            flag_of(LrSchedule::new(Linear, 1e-4, 0, 0)),
            "--max_train_steps"
        );
        assert_eq!(
            flag_of(LrSchedule::new(Constant, 1e-4, 0, 0)),
            "--max_train_steps"
        );
        for kind in [Linear, Cosine, CosineWithRestarts, Polynomial] {
            assert_eq!(
                flag_of(LrSchedule::new(kind, 1e-4, 11, 10)),
                "--lr_warmup_steps",
                "{kind}"
            );
        }
        assert_eq!(
            flag_of(LrSchedule::new(Polynomial, 1e-4, 10, 10)),
            "--lr_warmup_steps"
        );
        // Warm-up longer than the run is odd but well defined where nothing divides by the rest.
        assert!(LrSchedule::new(ConstantWithWarmup, 1e-4, 11, 10).is_ok());
        assert!(LrSchedule::new(Cosine, 1e-4, 10, 10).is_ok());
        let schedule = LrSchedule::new(CosineWithRestarts, 1e-4, 0, 10).unwrap();
        for cycles in [0.0, -1.0, f64::NAN] {
            assert_eq!(
                flag_of(schedule.clone().with_cycles(cycles)),
                "--lr_num_cycles"
            );
        }
        for power in [0.0, -2.0, f64::INFINITY] {
            assert_eq!(flag_of(schedule.clone().with_power(power)), "--lr_power");
        }
        assert_eq!(
            flag_of(LrSchedule::from_script_flags(
                Cosine,
                1e-4,
                0,
                10,
                1.0,
                f64::NAN
            )),
            "--lr_power"
        );
        let err = LrSchedule::new(Linear, 1e-4, 20, 10)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--lr_warmup_steps") && err.contains("20") && err.contains("10"),
            "{err}"
        );
    }

    #[test]
    fn builders_change_only_the_kinds_that_use_them() {
        let cosine = LrSchedule::new(SchedulerKind::Cosine, 1e-4, 0, 100).unwrap();
        let three = cosine.clone().with_cycles(3.0).unwrap();
        assert_ne!(cosine.lr_at(25), three.lr_at(25));
        let flags =
            LrSchedule::from_script_flags(SchedulerKind::Cosine, 1e-4, 0, 100, 3.0, 2.0).unwrap();
        assert_eq!(
            flags, cosine,
            "get_scheduler does not forward num_cycles to cosine"
        );
        let linear = LrSchedule::new(SchedulerKind::Linear, 1e-4, 0, 100).unwrap();
        let powered = linear
            .clone()
            .with_power(2.0)
            .unwrap()
            .with_cycles(4.0)
            .unwrap();
        assert_eq!(
            (0..120).map(|s| linear.lr_at(s)).collect::<Vec<_>>(),
            (0..120).map(|s| powered.lr_at(s)).collect::<Vec<_>>()
        );
    }
}
