//! What each flag's value can be: booleans, numbers, paths, options and the enums
//! (`--mixed_precision`, `--attention`, `--lr_scheduler`), each parsed with an error naming the flag.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::lr_scheduler::SchedulerKind;
use crate::{Error, Result};

/// A value a flag can take: parsed from its text, or switched on by the bare flag (booleans).
pub trait FlagValue: Sized {
    /// Whether the bare flag (no value) means `true`.
    const IS_SWITCH: bool = false;
    /// The value's kind as `--help` shows it.
    const HINT: &'static str;
    /// Parses `text` (`None` for a bare switch) for `flag`.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming `flag`.
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self>;
}

pub(super) fn need<'t>(flag: &'static str, text: Option<&'t str>) -> Result<&'t str> {
    text.ok_or_else(|| Error::InvalidOption {
        option: flag,
        problem: "needs a value".into(),
    })
}

fn parsed<T: FromStr>(flag: &'static str, text: Option<&str>, what: &str) -> Result<T> {
    let text = need(flag, text)?;
    text.parse().map_err(|_| Error::InvalidOption {
        option: flag,
        problem: format!("`{text}` is not {what}"),
    })
}

impl FlagValue for bool {
    const IS_SWITCH: bool = true;
    const HINT: &'static str = "[true|false]";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        match text {
            None | Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(Error::InvalidOption {
                option: flag,
                problem: format!("`{other}` is not true or false"),
            }),
        }
    }
}

impl FlagValue for u64 {
    const HINT: &'static str = "<integer>";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        parsed(flag, text, "a non-negative integer")
    }
}

impl FlagValue for u32 {
    const HINT: &'static str = "<integer>";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        parsed(flag, text, "a non-negative integer")
    }
}

impl FlagValue for f64 {
    const HINT: &'static str = "<number>";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        parsed(flag, text, "a number")
    }
}

impl FlagValue for String {
    const HINT: &'static str = "<text>";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        need(flag, text).map(str::to_owned)
    }
}

impl FlagValue for PathBuf {
    const HINT: &'static str = "<path>";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        need(flag, text).map(PathBuf::from)
    }
}

/// `none` (any case) or an empty value clears an optional setting.
impl<T: FlagValue> FlagValue for Option<T> {
    const IS_SWITCH: bool = T::IS_SWITCH;
    const HINT: &'static str = T::HINT;
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        match text {
            Some(t) if t.is_empty() || t.eq_ignore_ascii_case("none") => Ok(None),
            _ => T::parse_flag(flag, text).map(Some),
        }
    }
}

impl FlagValue for SchedulerKind {
    const HINT: &'static str =
        "<constant|constant_with_warmup|linear|cosine|cosine_with_restarts|polynomial>";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        let text = need(flag, text)?;
        text.parse().map_err(|_| Error::InvalidOption {
            option: flag,
            problem: format!("`{text}` is not one of {}", Self::HINT),
        })
    }
}

/// The precision the frozen model computes in (`--mixed_precision`); LoRA parameters and optimizer
/// arithmetic stay fp32 in every mode, and the VAE encodes in fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// fp32 everywhere (`no`).
    No,
    /// bf16 UNet and text encoders; the VAE encodes in fp32.
    Bf16,
    /// fp16 UNet and text encoders with dynamic loss scaling (`torch.amp.GradScaler`'s
    /// defaults); the VAE encodes in fp32, as diffusers' scripts keep it without a fixed VAE.
    Fp16,
}

impl MixedPrecision {
    /// The element type of the frozen weights and their activations.
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::No => tch::Kind::Float,
            Self::Bf16 => tch::Kind::BFloat16,
            Self::Fp16 => tch::Kind::Half,
        }
    }
}

impl FlagValue for MixedPrecision {
    const HINT: &'static str = "<no|fp16|bf16>";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        match need(flag, text)? {
            "no" | "fp32" => Ok(Self::No),
            "bf16" => Ok(Self::Bf16),
            "fp16" => Ok(Self::Fp16),
            other => Err(Error::InvalidOption {
                option: flag,
                problem: format!("`{other}` is not no, fp16 or bf16"),
            }),
        }
    }
}

/// The attention implementation of the UNet (`--attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// libtorch's fused scaled-dot-product attention in libtorch's order (flash attention first, or
    /// cuDNN's on Hopper/Blackwell with a recent cuDNN: `torch_cuda::sdp`).
    Fused,
    /// The same with flash attention tried first on CUDA (PyTorch's
    /// `sdpa_kernel([SDPBackend.FLASH_ATTENTION], set_priority=True)`).
    Flash,
    /// The same with cuDNN's fused attention tried first on CUDA (PyTorch's
    /// `sdpa_kernel([SDPBackend.CUDNN_ATTENTION], set_priority=True)`).
    Cudnn,
    /// Attention computed a slice of heads at a time (diffusers' `enable_attention_slicing`).
    Sliced,
    /// Plain matmul-softmax-matmul.
    Plain,
}

impl FlagValue for Attention {
    const HINT: &'static str = "<fused|flash|cudnn|sliced|plain>";
    fn parse_flag(flag: &'static str, text: Option<&str>) -> Result<Self> {
        match need(flag, text)? {
            "fused" | "sdpa" => Ok(Self::Fused),
            "flash" => Ok(Self::Flash),
            "cudnn" => Ok(Self::Cudnn),
            "sliced" => Ok(Self::Sliced),
            "plain" => Ok(Self::Plain),
            other => Err(Error::InvalidOption {
                option: flag,
                problem: format!("`{other}` is not one of {}", Self::HINT),
            }),
        }
    }
}

/// Serde for optional settings whose default is a value: `None` is written as the text `none`
/// (TOML has no null, and a missing key would mean the default), and `none` (any case) is read back
/// as `None`; other values as themselves, or parsed from text.
pub(super) mod none_as_text {
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(
        value: &Option<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => value.serialize(serializer),
            None => serializer.serialize_str("none"),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw<T> {
        Text(String),
        Value(T),
    }

    pub fn deserialize<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + FromStr,
        T::Err: std::fmt::Display,
    {
        match Raw::<T>::deserialize(deserializer)? {
            Raw::Text(text) if text.eq_ignore_ascii_case("none") => Ok(None),
            Raw::Text(text) => text.parse().map(Some).map_err(serde::de::Error::custom),
            Raw::Value(value) => Ok(Some(value)),
        }
    }
}
