//! `--use_ema` and its settings, as the arguments of diffusers' `EMAModel`.

use optim8bit::EMAConfig;

use super::TrainConfig;
use crate::{Error, Result};

impl TrainConfig {
    /// The EMA's settings with `--use_ema`, else `None`.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming the flag: a value out of range, or an `--ema_*` flag set
    /// without `--use_ema` (where it would silently do nothing).
    pub fn ema_config(&self) -> Result<Option<EMAConfig>> {
        let defaults = Self::default();
        let fail = |option: &'static str, problem: String| Error::InvalidOption { option, problem };
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        for (option, value, default, ok, range) in [
            (
                "--ema_decay",
                self.ema_decay,
                defaults.ema_decay,
                unit(self.ema_decay),
                "[0, 1]",
            ),
            (
                "--ema_min_decay",
                self.ema_min_decay,
                defaults.ema_min_decay,
                unit(self.ema_min_decay),
                "[0, 1]",
            ),
            (
                "--ema_inv_gamma",
                self.ema_inv_gamma,
                defaults.ema_inv_gamma,
                self.ema_inv_gamma.is_finite() && self.ema_inv_gamma > 0.0,
                "a number > 0",
            ),
            (
                "--ema_power",
                self.ema_power,
                defaults.ema_power,
                self.ema_power.is_finite() && self.ema_power >= 0.0,
                "a number ≥ 0",
            ),
        ] {
            if !ok {
                return Err(fail(option, format!("{value} is out of range ({range})")));
            }
            if value != default && !self.use_ema {
                return Err(fail(
                    option,
                    format!("{value} has no effect without --use_ema"),
                ));
            }
        }
        for (option, set) in [
            ("--ema_update_after_step", self.ema_update_after_step != 0),
            ("--ema_use_warmup", self.ema_use_warmup),
        ] {
            if set && !self.use_ema {
                return Err(fail(option, "has no effect without --use_ema".into()));
            }
        }
        Ok(self.use_ema.then_some(
            EMAConfig::default()
                .with_decay(self.ema_decay)
                .with_min_decay(self.ema_min_decay)
                .with_update_after_step(self.ema_update_after_step)
                .with_use_ema_warmup(self.ema_use_warmup)
                .with_inv_gamma(self.ema_inv_gamma)
                .with_power(self.ema_power),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<TrainConfig> {
        TrainConfig::from_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn the_flags_become_ema_model_arguments_with_its_defaults() {
        assert_eq!(parse(&[]).unwrap().ema_config().unwrap(), None);
        assert_eq!(
            parse(&["--use_ema"]).unwrap().ema_config().unwrap(),
            Some(EMAConfig::default())
        );
        let config = parse(&[
            "--use_ema",
            "--ema_decay",
            "0.999",
            "--ema_min_decay=0.5",
            "--ema_update_after_step",
            "100",
            "--ema_use_warmup",
            "--ema_inv_gamma",
            "2",
            "--ema_power",
            "0.75",
        ])
        .unwrap();
        assert_eq!(
            config.ema_config().unwrap(),
            Some(
                EMAConfig::default()
                    .with_decay(0.999)
                    .with_min_decay(0.5)
                    .with_update_after_step(100)
                    .with_use_ema_warmup(true)
                    .with_inv_gamma(2.0)
                    .with_power(0.75)
            )
        );
    }

    #[test]
    fn bad_values_and_settings_without_use_ema_name_their_flag() {
        let flag = |args: &[&str]| match parse(args) {
            Err(Error::InvalidOption { option, .. }) => option,
            other => panic!("{args:?}: expected a refused flag, got {other:?}"),
        };
        assert_eq!(flag(&["--use_ema", "--ema_decay", "1.5"]), "--ema_decay");
        assert_eq!(
            flag(&["--use_ema", "--ema_inv_gamma", "0"]),
            "--ema_inv_gamma"
        );
        assert_eq!(flag(&["--use_ema", "--ema_power", "-1"]), "--ema_power");
        assert_eq!(flag(&["--ema_decay", "0.99"]), "--ema_decay");
        assert_eq!(flag(&["--ema_use_warmup"]), "--ema_use_warmup");
        assert_eq!(
            flag(&["--ema_update_after_step", "3"]),
            "--ema_update_after_step"
        );
    }
}
