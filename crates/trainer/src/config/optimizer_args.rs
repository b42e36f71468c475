//! kohya's `--optimizer_args`: `key=value` settings handed to the optimizer's constructor, here
//! the chosen optimizer's own settings, written as Python literals (`True`, `1.0`, `0.9,0.99`,
//! `None`) as kohya's users write them, e.g.
//! `--optimizer_args relative_step=False scale_parameter=False warmup_init=False`. They override
//! the matching flags; a key the optimizer does not have is an error naming it and the keys it has.

use optim8bit::OptimizerConfig;

use crate::{Error, Result};

const FLAG: &str = "--optimizer_args";

fn fail(problem: String) -> Error {
    Error::InvalidOption {
        option: FLAG,
        problem,
    }
}

/// `key=value` pairs of `text`; a piece without `=` continues the previous value (`betas=0.9, 0.99`).
fn pairs(text: &str) -> Result<Vec<(String, String)>> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for piece in text.split_whitespace() {
        match (piece.split_once('='), pairs.last_mut()) {
            (Some((key, value)), _) => pairs.push((key.to_owned(), value.to_owned())),
            (None, Some((_, value))) => value.push_str(piece),
            (None, None) => return Err(fail(format!("`{piece}` is not key=value"))),
        }
    }
    Ok(pairs)
}

fn float(key: &str, value: &str) -> Result<f64> {
    value
        .parse()
        .map_err(|_| fail(format!("{key}={value}: not a number")))
}

/// A whole number of elements ≥ 0 (bitsandbytes' `min_8bit_size`).
fn count(key: &str, value: &str) -> Result<i64> {
    value
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| fail(format!("{key}={value}: not a whole number ≥ 0")))
}

fn boolean(key: &str, value: &str) -> Result<bool> {
    match value {
        "True" | "true" => Ok(true),
        "False" | "false" => Ok(false),
        _ => Err(fail(format!("{key}={value}: not True or False"))),
    }
}

/// `0.9,0.99`, `(0.9, 0.99)` or `[0.9,0.99]`.
fn betas(key: &str, value: &str) -> Result<(f64, f64)> {
    let inner = value.trim_matches(|c| matches!(c, '(' | ')' | '[' | ']'));
    match inner.split(',').collect::<Vec<_>>()[..] {
        [a, b] => Ok((float(key, a.trim())?, float(key, b.trim())?)),
        _ => Err(fail(format!("{key}={value}: not two numbers"))),
    }
}

/// The keys each optimizer takes.
fn keys(config: &OptimizerConfig) -> &'static [&'static str] {
    match config {
        OptimizerConfig::AdamW(_) => &["betas", "eps", "min_8bit_size"],
        OptimizerConfig::Lion(_) => &["betas", "min_8bit_size"],
        OptimizerConfig::Prodigy(_) => &[
            "betas",
            "beta3",
            "eps",
            "d0",
            "d_coef",
            "growth_rate",
            "decouple",
            "use_bias_correction",
            "safeguard_warmup",
        ],
        OptimizerConfig::Adafactor(_) => &[
            "relative_step",
            "scale_parameter",
            "warmup_init",
            "clip_threshold",
            "decay_rate",
            "beta1",
        ],
        // An optimizer optim8bit adds later takes no keys until it is listed here.
        _ => &[],
    }
}

/// Sets `key` of `config` to `value`; false for a key the optimizer does not have.
fn set(config: &mut OptimizerConfig, key: &str, value: &str) -> Result<bool> {
    let (k, v) = (key, value);
    let optional = |v: &str| -> Result<Option<f64>> {
        if v == "None" {
            Ok(None)
        } else {
            float(k, v).map(Some)
        }
    };
    match config {
        OptimizerConfig::AdamW(c) => match k {
            "betas" => (c.beta1, c.beta2) = betas(k, v)?,
            "eps" => c.eps = float(k, v)?,
            "min_8bit_size" => c.min_8bit_size = count(k, v)?,
            _ => return Ok(false),
        },
        OptimizerConfig::Lion(c) => match k {
            "betas" => (c.beta1, c.beta2) = betas(k, v)?,
            "min_8bit_size" => c.min_8bit_size = count(k, v)?,
            _ => return Ok(false),
        },
        OptimizerConfig::Prodigy(c) => match k {
            "betas" => (c.beta1, c.beta2) = betas(k, v)?,
            "beta3" => c.beta3 = optional(v)?,
            "eps" => c.eps = float(k, v)?,
            "d0" => c.d0 = float(k, v)?,
            "d_coef" => c.d_coef = float(k, v)?,
            "growth_rate" => c.growth_rate = float(k, v)?,
            "decouple" => c.decouple = boolean(k, v)?,
            "use_bias_correction" => c.use_bias_correction = boolean(k, v)?,
            "safeguard_warmup" => c.safeguard_warmup = boolean(k, v)?,
            _ => return Ok(false),
        },
        OptimizerConfig::Adafactor(c) => match k {
            "relative_step" => c.relative_step = boolean(k, v)?,
            "scale_parameter" => c.scale_parameter = boolean(k, v)?,
            "warmup_init" => c.warmup_init = boolean(k, v)?,
            "clip_threshold" => c.clip_threshold = float(k, v)?,
            "decay_rate" => c.decay_rate = float(k, v)?,
            "beta1" => c.beta1 = optional(v)?,
            _ => return Ok(false),
        },
        _ => return Ok(false),
    }
    Ok(true)
}

/// Applies `text` to `config`.
///
/// # Errors
/// [`Error::InvalidOption`] naming `--optimizer_args` and the key.
pub(super) fn apply(text: &str, config: &mut OptimizerConfig) -> Result<()> {
    for (key, value) in pairs(text)? {
        if !set(config, &key, &value)? {
            let hint = if key == "weight_decay" {
                " (the weight decay is --adam_weight_decay)"
            } else {
                ""
            };
            return Err(fail(format!(
                "`{key}` is not a setting of this optimizer{hint}; it takes {}",
                keys(config).join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use optim8bit::{AdafactorConfig, LionConfig, ProdigyConfig};

    #[test]
    fn kohya_style_arguments_set_the_optimizer_and_unknown_keys_are_named() {
        let mut ada = OptimizerConfig::Adafactor(AdafactorConfig::default());
        apply(
            "relative_step=False scale_parameter=False warmup_init=False beta1=0.9",
            &mut ada,
        )
        .unwrap();
        let OptimizerConfig::Adafactor(c) = ada else {
            panic!("{ada:?}")
        };
        assert!(!c.relative_step && !c.scale_parameter && !c.warmup_init);
        assert_eq!(c.beta1, Some(0.9));
        let mut prodigy = OptimizerConfig::Prodigy(ProdigyConfig::default());
        apply(
            "decouple=True d_coef=2 betas=0.9, 0.99 use_bias_correction=False beta3=None",
            &mut prodigy,
        )
        .unwrap();
        let OptimizerConfig::Prodigy(c) = prodigy else {
            panic!("{prodigy:?}")
        };
        assert_eq!(
            (c.d_coef, c.beta1, c.beta2, c.beta3),
            (2.0, 0.9, 0.99, None)
        );
        assert!(c.decouple && !c.use_bias_correction);
        let mut lion = OptimizerConfig::Lion(LionConfig::eight_bit());
        apply("betas=(0.95,0.98) min_8bit_size=0", &mut lion).unwrap();
        assert_eq!(
            lion,
            OptimizerConfig::Lion(
                LionConfig::eight_bit()
                    .with_beta1(0.95)
                    .with_beta2(0.98)
                    .with_min_8bit_size(0)
            )
        );
        let err = apply("min_8bit_size=-1", &mut lion)
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_8bit_size=-1"), "{err}");
        let err = apply("weight_decay=0.1", &mut lion)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--optimizer_args") && err.contains("weight_decay"),
            "{err}"
        );
        assert!(
            err.contains("--adam_weight_decay") && err.contains("betas"),
            "{err}"
        );
        let err = apply("d_coef=2", &mut lion).unwrap_err().to_string();
        assert!(err.contains("`d_coef`"), "{err}");
        let err = apply("d_coef=big", &mut prodigy).unwrap_err().to_string();
        assert!(err.contains("d_coef=big"), "{err}");
        let err = apply("decouple", &mut prodigy).unwrap_err().to_string();
        assert!(err.contains("key=value"), "{err}");
    }
}
