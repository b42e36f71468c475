//! The LoRA the flags describe: which UNet layers get an adapter (`--target_modules`, `--conv_rank`),
//! at which rank and alpha, with which variant (`--use_dora`, `--use_rslora`, `--lora_dropout`).
//!
//! The presets follow the two reference trainers: `attn` is what diffusers'
//! `train_dreambooth_lora_sdxl.py` adapts, `kohya` every linear layer inside a transformer block, as
//! kohya's `networks/lora.py` (`UNET_TARGET_REPLACE_MODULE`); `--conv_rank` adds kohya's `conv_dim`
//! set (docs/LORA.md gives both with their upstream sources).

use lora::{
    Init, LoraConfig, UNET_ATTENTION_TARGETS, UNET_RESNET_TARGETS, UNET_TRANSFORMER_TARGETS,
};

use super::TrainConfig;
use crate::{Error, Result};

/// The `--target_modules` presets and the module names each stands for.
pub(crate) const TARGET_PRESETS: [(&str, &[&str]); 2] = [
    ("attn", &UNET_ATTENTION_TARGETS),
    ("kohya", &UNET_TRANSFORMER_TARGETS),
];

fn fail<T>(option: &'static str, problem: impl Into<String>) -> Result<T> {
    Err(Error::InvalidOption {
        option,
        problem: problem.into(),
    })
}

impl TrainConfig {
    /// The module names `--target_modules` and `--conv_rank` select (dotted suffixes of diffusers
    /// module paths), without repeats, in the order given.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming `--target_modules` for an empty list or an empty name.
    pub fn lora_targets(&self) -> Result<Vec<String>> {
        let mut targets: Vec<String> = Vec::new();
        let mut add = |name: &str| {
            if !targets.iter().any(|t| t == name) {
                targets.push(name.to_owned());
            }
        };
        let text = self.target_modules.trim();
        match TARGET_PRESETS.iter().find(|(preset, _)| *preset == text) {
            Some((_, names)) => names.iter().for_each(|n| add(n)),
            None => {
                for name in text.split(',').map(str::trim) {
                    if name.is_empty() || name.starts_with('.') || name.ends_with('.') {
                        return fail(
                            "--target_modules",
                            format!(
                                "`{text}` is neither a preset (attn, kohya) nor a comma-separated list \
                                 of module names such as to_q,to_k,ff.net.2"
                            ),
                        );
                    }
                    add(name);
                }
            }
        }
        if self.conv_rank.is_some() {
            UNET_RESNET_TARGETS.iter().for_each(|n| add(n));
        }
        Ok(targets)
    }

    /// The `lora::LoraConfig` of the UNet's adapter.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming the flag whose value has no meaning.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        if self.conv_rank == Some(0) {
            return fail("--conv_rank", "must be at least 1");
        }
        if let Some(alpha) = self.conv_alpha {
            if self.conv_rank.is_none() {
                return fail(
                    "--conv_alpha",
                    "is the alpha of --conv_rank, which is not set",
                );
            }
            if !(alpha.is_finite() && alpha > 0.0) {
                return fail("--conv_alpha", format!("{alpha} is out of range"));
            }
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return fail(
                "--lora_dropout",
                format!("{} is not a probability in [0, 1)", self.lora_dropout),
            );
        }
        if self.use_dora && self.conv_rank.is_some() {
            return fail(
                "--use_dora",
                "DoRA on convolutions is not supported: drop --conv_rank (LoCon) or --use_dora",
            );
        }
        let rank = i64::from(self.rank);
        let targets = self.lora_targets()?;
        let names: Vec<&str> = targets.iter().map(String::as_str).collect();
        let mut config = LoraConfig::with_targets(rank, &names);
        config.alpha = self.lora_alpha.unwrap_or(rank as f64);
        config.conv_rank = self.conv_rank.map(i64::from);
        config.conv_alpha = self.conv_alpha;
        config.dropout = self.lora_dropout;
        config.use_dora = self.use_dora;
        config.use_rslora = self.use_rslora;
        config.init = Init::Gaussian;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<TrainConfig> {
        TrainConfig::from_args(args.iter().map(|s| (*s).to_owned()))
    }

    fn option_of(error: Error) -> &'static str {
        match error {
            Error::InvalidOption { option, .. } => option,
            other => panic!("not an option error: {other}"),
        }
    }

    #[test]
    fn presets_lists_and_the_conv_set() {
        let default = parse(&[]).unwrap().lora_config().unwrap();
        assert_eq!(default.targets, UNET_ATTENTION_TARGETS.map(String::from));
        assert_eq!(
            (default.rank, default.alpha, default.conv_rank),
            (4, 4.0, None)
        );
        let kohya = parse(&[
            "--target_modules",
            "kohya",
            "--conv_rank",
            "8",
            "--rank",
            "16",
        ])
        .unwrap()
        .lora_config()
        .unwrap();
        assert_eq!(kohya.targets.len(), 8 + 6);
        assert!(kohya.targets.iter().any(|t| t == "proj_in"));
        assert!(kohya.targets.iter().any(|t| t == "downsamplers.0.conv"));
        assert_eq!((kohya.conv_rank, kohya.conv_alpha), (Some(8), None));
        let list = parse(&[
            "--target_modules",
            " to_q, ff.net.2 ,to_q",
            "--lora_dropout",
            "0.1",
            "--use_rslora",
            "--use_dora",
        ])
        .unwrap()
        .lora_config()
        .unwrap();
        assert_eq!(list.targets, ["to_q", "ff.net.2"].map(String::from));
        assert!(list.use_rslora && list.use_dora && list.dropout == 0.1);
    }

    #[test]
    fn meaningless_values_name_their_flag() {
        for (args, flag) in [
            (&["--target_modules", "to_q,,to_k"][..], "--target_modules"),
            (&["--target_modules", ""], "--target_modules"),
            (&["--conv_rank", "0"], "--conv_rank"),
            (&["--conv_alpha", "2"], "--conv_alpha"),
            (&["--conv_rank", "4", "--conv_alpha", "-1"], "--conv_alpha"),
            (&["--lora_dropout", "1"], "--lora_dropout"),
            (&["--lora_dropout", "-0.1"], "--lora_dropout"),
            (&["--conv_rank", "4", "--use_dora"], "--use_dora"),
        ] {
            // Parsing validates.
            assert_eq!(option_of(parse(args).unwrap_err()), flag, "{args:?}");
        }
    }
}
