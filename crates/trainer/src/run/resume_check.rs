//! What a resume may not change: the settings that decide what a step of the checkpoint's run
//! was — its micro-steps, the LoRA's shape and scale, the data it draws from — read from the
//! checkpoint's `config.toml` and compared with this run's before any model is loaded. (The global
//! batch is checked against `trainer_state.json`'s [`crate::distributed::BatchLayout`] and the seed
//! and optimizer when the checkpoint is restored.)

use std::path::Path;

use crate::checkpoint::io_error;
use crate::config::TrainConfig;
use crate::{Error, Result};

/// The flags a resume must keep, as they are spelled in `config.toml`.
const KEPT: [&str; 13] = [
    "gradient_accumulation_steps",
    "rank",
    "lora_alpha",
    "conv_rank",
    "conv_alpha",
    "use_dora",
    "use_rslora",
    "target_modules",
    "train_text_encoder",
    "dataset_name",
    "dataset_config",
    "max_train_samples",
    "with_prior_preservation",
];

/// The flags whose values are paths: equal when they name the same existing file or folder.
const PATHS: [&str; 2] = ["dataset_name", "dataset_config"];

/// Refuses to continue `checkpoint` (of `step`) with `config` when a setting of [`KEPT`] differs
/// from the checkpoint's `config.toml`, or `--max_train_steps` is below `step`; the error names
/// every such flag with both values.
///
/// # Errors
/// [`Error::ResumeFromCheckpoint`] listing the changes; [`Error::Io`] / [`Error::Checkpoint`] when
/// the checkpoint's `config.toml` cannot be read.
pub(super) fn check_resume_settings(
    checkpoint: &Path,
    step: u64,
    config: &TrainConfig,
) -> Result<()> {
    let file = checkpoint.join("config.toml");
    let text = std::fs::read_to_string(&file).map_err(io_error(&file))?;
    let saved: toml::Table = toml::from_str(&text).map_err(|e| Error::Checkpoint {
        path: file.clone(),
        problem: format!("not a config: {e}"),
    })?;
    let current: toml::Table =
        toml::from_str(&config.to_toml()?).map_err(|e| Error::Checkpoint {
            path: file.clone(),
            problem: format!("this run's config does not read back: {e}"),
        })?;
    let mut changes = Vec::new();
    for key in KEPT {
        let (before, now) = (saved.get(key), current.get(key));
        let same = before == now || (PATHS.contains(&key) && same_path(before, now));
        if !same {
            changes.push(format!(
                "--{key} {} (the checkpoint's) vs {} (this run's)",
                show(before),
                show(now)
            ));
        }
    }
    if config.max_train_steps < step {
        changes.push(format!(
            "--max_train_steps {} is below the checkpoint's step {step}",
            config.max_train_steps
        ));
    }
    if changes.is_empty() {
        return Ok(());
    }
    Err(Error::ResumeFromCheckpoint {
        path: checkpoint.to_owned(),
        problem: format!(
            "this run changes what a step of it means: {}; resume with the checkpoint's \
             values, or start a new run (another --output_dir, or --overwrite_output_dir)",
            changes.join("; ")
        ),
    })
}

/// A TOML value as a flag value; an absent key is the flag left unset.
fn show(value: Option<&toml::Value>) -> String {
    match value {
        None => "unset".into(),
        Some(toml::Value::String(text)) => format!("`{text}`"),
        Some(other) => other.to_string(),
    }
}

/// Whether two path values name the same existing file or folder (`data` and `./data/`).
fn same_path(a: Option<&toml::Value>, b: Option<&toml::Value>) -> bool {
    let canonical = |value: Option<&toml::Value>| {
        value
            .and_then(toml::Value::as_str)
            .and_then(|text| std::fs::canonicalize(text).ok())
    };
    matches!((canonical(a), canonical(b)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_changed_setting_is_named_with_both_values() {
        let dir = std::env::temp_dir().join(format!("resume-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let saved = TrainConfig {
            dataset_name: dir.display().to_string(),
            ..TrainConfig::default()
        };
        std::fs::write(dir.join("config.toml"), saved.to_toml().unwrap()).unwrap();
        // The same settings, the dataset spelled another way, more steps: accepted.
        let same = TrainConfig {
            dataset_name: format!("{}/.", dir.display()),
            max_train_steps: saved.max_train_steps + 5,
            learning_rate: 1.0,
            ..saved.clone()
        };
        check_resume_settings(&dir, 10, &same).unwrap();
        let changed = TrainConfig {
            gradient_accumulation_steps: 1,
            rank: 8,
            lora_alpha: Some(2.0),
            target_modules: "kohya".into(),
            dataset_name: "other/dataset".into(),
            max_train_steps: 5,
            ..saved.clone()
        };
        let error = check_resume_settings(&dir, 10, &changed)
            .unwrap_err()
            .to_string();
        for part in [
            "--gradient_accumulation_steps 2 (the checkpoint's) vs 1 (this run's)",
            "--rank 4 (the checkpoint's) vs 8 (this run's)",
            "--lora_alpha unset (the checkpoint's) vs 2.0 (this run's)",
            "--target_modules `attn` (the checkpoint's) vs `kohya` (this run's)",
            "--dataset_name `",
            "` (the checkpoint's) vs `other/dataset` (this run's)",
            "--max_train_steps 5 is below the checkpoint's step 10",
        ] {
            assert!(error.contains(part), "{part} not in: {error}");
        }
        assert!(error.starts_with("--resume_from_checkpoint "), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
