//! `--optimizer` (kohya's `--optimizer_type`) and the flags of each optimizer: which optimizer a
//! run uses, with what settings and learning rates, and how kohya names it.
//!
//! The rules, following diffusers' `train_dreambooth_lora_sdxl.py` where it has them:
//! - without `--optimizer`, `--use_8bit_adam` picks AdamW8bit (the seed recipe's default) or
//!   AdamW; `--optimizer AdamW --use_8bit_adam` is AdamW8bit, as in diffusers;
//! - `--use_8bit_adam true` given with another optimizer is an error naming both flags (diffusers
//!   warns and ignores it), as is `--optimizer AdamW8bit --use_8bit_adam false`;
//! - `--adam_beta1`, `--adam_beta2` and `--adam_weight_decay` apply to AdamW, Prodigy and Lion
//!   (diffusers passes them to Prodigy); `--adam_epsilon` to AdamW and Prodigy. Without
//!   `--adam_beta2` each optimizer takes its reference's default: 0.999, Lion and Lion8bit 0.99
//!   (lion-pytorch, bitsandbytes). Adafactor takes only the weight decay (transformers' own β₂ schedule, no β₁);
//! - Prodigy uses `--learning_rate` for every group, the text encoders' included (diffusers
//!   overrides `--text_encoder_lr` so: Prodigy needs one rate); a rate ≤ 0.1 draws diffusers'
//!   warning that about 1.0 is usual;
//! - Adafactor with `--adafactor_relative_step` (transformers' default) computes its step size:
//!   the groups' learning rates are 0, `--learning_rate` is not used, and a schedule other than
//!   a constant one without warm-up is an error (transformers refuses an lr with relative_step).

use std::fmt;
use std::str::FromStr;

use optim8bit::{AdafactorConfig, AdamWConfig, LionConfig, OptimizerConfig, ProdigyConfig};
use serde::{Deserialize, Serialize};

use super::TrainConfig;
use super::flags::{FlagValue, need};
use crate::lr_scheduler::SchedulerKind;
use crate::{Error, Result};

/// An optimizer `--optimizer` can name (in a TOML file, in any case as on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub enum OptimizerKind {
    /// AdamW with fp32 states (`torch.optim.AdamW`).
    AdamW,
    /// AdamW with 8-bit block-quantized states (bitsandbytes' `AdamW8bit`).
    AdamW8bit,
    /// Prodigy (prodigyopt).
    Prodigy,
    /// Adafactor (transformers).
    Adafactor,
    /// Lion (lion-pytorch).
    Lion,
    /// Lion with an 8-bit block-quantized momentum (bitsandbytes' `Lion8bit`).
    Lion8bit,
}

impl OptimizerKind {
    /// Every choice, in `--help`'s order.
    pub const ALL: [Self; 6] = [
        Self::AdamW,
        Self::AdamW8bit,
        Self::Prodigy,
        Self::Adafactor,
        Self::Lion,
        Self::Lion8bit,
    ];

    /// The name as kohya's `--optimizer_type` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::AdamW => "AdamW",
            Self::AdamW8bit => "AdamW8bit",
            Self::Prodigy => "Prodigy",
            Self::Adafactor => "Adafactor",
            Self::Lion => "Lion",
            Self::Lion8bit => "Lion8bit",
        }
    }

    /// The Python class of the reference, module and name, as kohya's `ss_optimizer` writes it.
    pub fn python_class(self) -> &'static str {
        match self {
            Self::AdamW => "torch.optim.adamw.AdamW",
            Self::AdamW8bit => "bitsandbytes.optim.adamw.AdamW8bit",
            Self::Prodigy => "prodigyopt.prodigy.Prodigy",
            Self::Adafactor => "transformers.optimization.Adafactor",
            Self::Lion => "lion_pytorch.lion_pytorch.Lion",
            Self::Lion8bit => "bitsandbytes.optim.lion.Lion8bit",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OptimizerKind {
    type Err = ();
    /// Any case of a name (`adamw8bit`, `AdamW8bit`, `prodigy`, …).
    fn from_str(text: &str) -> std::result::Result<Self, ()> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(text))
            .ok_or(())
    }
}

impl TryFrom<String> for OptimizerKind {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        text.parse()
            .map_err(|()| format!("`{text}` is not one of {}", Self::HINT))
    }
}

impl FlagValue for OptimizerKind {
    const HINT: &'static str = "<AdamW|AdamW8bit|Prodigy|Adafactor|Lion|Lion8bit>";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        let text = need(flag, text)?;
        text.parse().map_err(|()| Error::InvalidOption {
            option: flag,
            problem: format!("`{text}` is not one of {} (any case)", Self::HINT),
        })
    }
}

/// The optimizer of a run: which, its settings, and the initial learning rates of the UNet's
/// group and of the text encoders' groups (the schedule multiplies both).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSetup {
    /// Which optimizer.
    pub kind: OptimizerKind,
    /// Its settings.
    pub config: OptimizerConfig,
    /// The UNet group's initial learning rate.
    pub unet_lr: f64,
    /// The text encoders' groups' initial learning rate.
    pub text_encoder_lr: f64,
}

fn conflict(problem: String) -> Error {
    Error::InvalidOption {
        option: "--use_8bit_adam",
        problem,
    }
}

impl TrainConfig {
    /// The optimizer `--optimizer` and `--use_8bit_adam` choose (see the module documentation).
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming both flags when they contradict each other.
    pub fn optimizer_kind(&self) -> Result<OptimizerKind> {
        Ok(match (self.optimizer, self.use_8bit_adam) {
            (None, None | Some(true)) => OptimizerKind::AdamW8bit,
            (None, Some(false)) => OptimizerKind::AdamW,
            (Some(OptimizerKind::AdamW), Some(true)) => OptimizerKind::AdamW8bit,
            (Some(OptimizerKind::AdamW8bit), Some(false)) => {
                return Err(conflict(
                    "false contradicts --optimizer AdamW8bit (8-bit states)".into(),
                ));
            }
            (Some(kind @ (OptimizerKind::AdamW | OptimizerKind::AdamW8bit)), _) => kind,
            (Some(kind), Some(true)) => {
                return Err(conflict(format!(
                    "true applies to AdamW only, and --optimizer is {kind}"
                )));
            }
            (Some(kind), _) => kind,
        })
    }

    /// The run's optimizer: [`Self::optimizer_kind`] with [`Self::optimizer_setup_for`], checked.
    ///
    /// # Errors
    /// As [`Self::optimizer_kind`]; [`Error::InvalidOption`] for Adafactor's relative step with
    /// a learning-rate schedule.
    pub fn optimizer_setup(&self) -> Result<OptimizerSetup> {
        let kind = self.optimizer_kind()?;
        let mut config = self.optimizer_setup_for(kind).config;
        if let Some(args) = &self.optimizer_args {
            super::optimizer_args::apply(args, &mut config)?;
        }
        let setup = self.with_rates(kind, config);
        if let OptimizerConfig::Adafactor(c) = setup.config
            && c.relative_step
        {
            self.check_relative_step()?;
        }
        Ok(setup)
    }

    /// `config` with the groups' initial rates: Prodigy's one rate for all groups, none for
    /// Adafactor's relative step.
    fn with_rates(&self, kind: OptimizerKind, config: OptimizerConfig) -> OptimizerSetup {
        let unet_lr = self.base_learning_rate();
        let (unet_lr, text_encoder_lr) = match config {
            OptimizerConfig::Prodigy(_) => (unet_lr, unet_lr),
            OptimizerConfig::Adafactor(c) if c.relative_step => (0.0, 0.0),
            _ => (unet_lr, self.text_encoder_learning_rate()),
        };
        OptimizerSetup {
            kind,
            config,
            unet_lr,
            text_encoder_lr,
        }
    }

    /// What this config's flags make of optimizer `kind` (also for kinds the run does not use,
    /// to compare their memory), without [`Self::optimizer_setup`]'s checks of the schedule.
    pub fn optimizer_setup_for(&self, kind: OptimizerKind) -> OptimizerSetup {
        let (beta1, eps) = (self.adam_beta1, self.adam_epsilon);
        let adam = |config: AdamWConfig| {
            config
                .with_beta1(beta1)
                .with_beta2(self.adam_beta2.unwrap_or(config.beta2))
                .with_eps(eps)
        };
        let config = match kind {
            OptimizerKind::AdamW8bit => OptimizerConfig::AdamW(adam(AdamWConfig::eight_bit())),
            OptimizerKind::AdamW => OptimizerConfig::AdamW(adam(AdamWConfig::fp32())),
            OptimizerKind::Lion | OptimizerKind::Lion8bit => {
                let default = if kind == OptimizerKind::Lion8bit {
                    LionConfig::eight_bit()
                } else {
                    LionConfig::fp32()
                };
                let beta2 = self.adam_beta2.unwrap_or(default.beta2);
                OptimizerConfig::Lion(default.with_beta1(beta1).with_beta2(beta2))
            }
            OptimizerKind::Prodigy => {
                let default = ProdigyConfig::default();
                OptimizerConfig::Prodigy(
                    default
                        .with_beta1(beta1)
                        .with_beta2(self.adam_beta2.unwrap_or(default.beta2))
                        .with_beta3(self.prodigy_beta3)
                        .with_eps(eps)
                        .with_decouple(self.prodigy_decouple)
                        .with_use_bias_correction(self.prodigy_use_bias_correction)
                        .with_safeguard_warmup(self.prodigy_safeguard_warmup)
                        .with_d_coef(self.prodigy_d_coef),
                )
            }
            OptimizerKind::Adafactor => OptimizerConfig::Adafactor(
                AdafactorConfig::default()
                    .with_relative_step(self.adafactor_relative_step)
                    .with_scale_parameter(self.adafactor_scale_parameter)
                    .with_warmup_init(self.adafactor_warmup_init),
            ),
        };
        self.with_rates(kind, config)
    }

    /// Adafactor's relative step computes the step size itself: a schedule cannot drive it.
    fn check_relative_step(&self) -> Result<()> {
        if self.lr_scheduler != SchedulerKind::Constant || self.lr_warmup_steps > 0 {
            return Err(Error::InvalidOption {
                option: "--adafactor_relative_step",
                problem: format!(
                    "computes Adafactor's step size (transformers' relative_step), so --lr_scheduler \
                     {:?} with --lr_warmup_steps {} cannot drive it: use --lr_scheduler constant \
                     without warm-up, or --adafactor_relative_step false with a --learning_rate",
                    self.lr_scheduler, self.lr_warmup_steps
                ),
            });
        }
        Ok(())
    }

    /// What a user of this optimizer should hear before the run starts: diffusers' warning of
    /// a low Prodigy rate, and what Adafactor's relative step does with the rates.
    pub fn optimizer_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        match self.optimizer_setup().map(|s| s.config) {
            Ok(OptimizerConfig::Prodigy(_)) if self.learning_rate <= 0.1 => notes.push(format!(
                "--learning_rate {} is low for Prodigy: it estimates the step size itself and is \
                 usually run at 1.0",
                self.learning_rate
            )),
            Ok(OptimizerConfig::Prodigy(_)) if self.train_text_encoder => notes.push(
                "Prodigy uses --learning_rate for the text encoders too (one rate for all groups)"
                    .into(),
            ),
            Ok(OptimizerConfig::Adafactor(c)) if c.relative_step => notes.push(
                "Adafactor computes its step size (relative_step): --learning_rate is not used, \
                 and the logged rate is 0"
                    .into(),
            ),
            _ => {}
        }
        notes
    }

    /// Checks of the optimizer flags: the choice, the settings' ranges, flags of an optimizer the
    /// run does not use.
    pub(super) fn validate_optimizer(&self) -> Result<()> {
        let setup = self.optimizer_setup()?;
        let kind = setup.kind;
        if let Some(beta2) = self.adam_beta2
            && !(0.0..1.0).contains(&beta2)
        {
            return Err(Error::InvalidOption {
                option: "--adam_beta2",
                problem: format!("{beta2} is out of range [0, 1)"),
            });
        }
        let defaults = Self::default();
        let prodigy_flags = [
            (
                "--prodigy_beta3",
                self.prodigy_beta3 != defaults.prodigy_beta3,
            ),
            (
                "--prodigy_decouple",
                self.prodigy_decouple != defaults.prodigy_decouple,
            ),
            (
                "--prodigy_use_bias_correction",
                self.prodigy_use_bias_correction != defaults.prodigy_use_bias_correction,
            ),
            (
                "--prodigy_safeguard_warmup",
                self.prodigy_safeguard_warmup != defaults.prodigy_safeguard_warmup,
            ),
            (
                "--prodigy_d_coef",
                self.prodigy_d_coef != defaults.prodigy_d_coef,
            ),
        ];
        let adafactor_flags = [
            (
                "--adafactor_relative_step",
                self.adafactor_relative_step != defaults.adafactor_relative_step,
            ),
            (
                "--adafactor_scale_parameter",
                self.adafactor_scale_parameter != defaults.adafactor_scale_parameter,
            ),
            (
                "--adafactor_warmup_init",
                self.adafactor_warmup_init != defaults.adafactor_warmup_init,
            ),
        ];
        for (owner, flags) in [
            (OptimizerKind::Prodigy, &prodigy_flags[..]),
            (OptimizerKind::Adafactor, &adafactor_flags[..]),
        ] {
            if let Some((flag, _)) = flags.iter().find(|(_, set)| *set && kind != owner) {
                return Err(Error::InvalidOption {
                    option: flag,
                    problem: format!("applies to --optimizer {owner}, and the run uses {kind}"),
                });
            }
        }
        // The optimizer's own range checks, on a parameter-less build.
        setup
            .config
            .build(Vec::new())
            .map(drop)
            .map_err(|e| Error::InvalidOption {
                option: "--optimizer",
                problem: format!("{kind}: {e}"),
            })
    }
}
