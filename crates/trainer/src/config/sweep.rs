//! Sweep files (`--sweep FILE.toml`): the settings shared by every variant (`[base]`, keys are
//! flag names as in a `--config` file) and K variants (`[[variant]]`, each a `name` and the flags
//! it changes). What a variant may change is what leaves the frozen base and the sweep's loop
//! alone ([`VARIANT_FLAGS`]); everything is checked here, before any model loads.
//!
//! ```toml
//! [base]
//! max_train_steps = 20
//! learning_rate = 1e-4
//!
//! [[variant]]
//! name = "lr-3e-4"
//! learning_rate = 3e-4
//!
//! [[variant]]
//! name = "rank-8"
//! rank = 8
//! lora_alpha = 8
//! ```

use std::path::{Path, PathBuf};

use super::TrainConfig;
use crate::{Error, Result};

/// The flags a variant may set: its learning rate and schedule, its LoRA (rank, alpha, targets,
/// variant), its optimizer, its seed, its data (subset, prompts, captions, flips, batch size) and
/// its loss options. The others are the sweep's: the model and its precision (one frozen base for
/// every variant), the resolution and the loop's length and cadence (one loop for every variant).
pub const VARIANT_FLAGS: &[&str] = &[
    // the data each of its steps draws
    "dataset_name",
    "dataset_config",
    "image_column",
    "caption_column",
    "max_train_samples",
    "instance_prompt",
    "caption_extension",
    "caption_dropout_rate",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "caption_separator",
    "caption_tag_dropout_rate",
    "caption_prefix",
    "caption_suffix",
    "random_flip",
    "center_crop",
    "train_batch_size",
    // the learning rate and its schedule
    "learning_rate",
    "scale_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    // the LoRA
    "rank",
    "lora_alpha",
    "target_modules",
    "conv_rank",
    "conv_alpha",
    "use_dora",
    "lora_dropout",
    "use_rslora",
    // the optimizer
    "optimizer",
    "use_8bit_adam",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "prodigy_beta3",
    "prodigy_decouple",
    "prodigy_use_bias_correction",
    "prodigy_safeguard_warmup",
    "prodigy_d_coef",
    "adafactor_relative_step",
    "adafactor_scale_parameter",
    "adafactor_warmup_init",
    "optimizer_args",
    "max_grad_norm",
    "use_ema",
    "ema_decay",
    "ema_min_decay",
    "ema_update_after_step",
    "ema_use_warmup",
    "ema_inv_gamma",
    "ema_power",
    // the loss and the draws
    "snr_gamma",
    "noise_offset",
    "seed",
    "max_nonfinite_steps",
];

/// Flags the sweep itself sets or refuses in `[base]`.
const SWEEP_OWNED: [(&str, &str); 2] = [
    (
        "nproc_per_node",
        "a sweep runs in one process (its variants share one loaded model)",
    ),
    (
        "overwrite_output_dir",
        "a sweep does not move a previous run aside: choose another --output_dir or remove it",
    ),
];

/// How a sweep's variants take their steps (`--sweep_execution`, or `sweep_execution` at the top
/// of the sweep file; the flag wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SweepExecution {
    /// One variant after another on the shared UNet: each variant bit-identical to its own run.
    #[default]
    Sequential,
    /// The variants' micro-steps in one UNet call, each variant's LoRA on its own rows of the
    /// batch; what cannot share a call runs on its own (docs/SWEEPS.md).
    Batched,
}

impl SweepExecution {
    /// The values, as the flag spells them.
    pub const NAMES: [&'static str; 2] = ["sequential", "batched"];

    /// The execution `value` names (`sequential` or `batched`).
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming `--sweep_execution` and the values.
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "sequential" => Ok(Self::Sequential),
            "batched" => Ok(Self::Batched),
            other => Err(Error::InvalidOption {
                option: "--sweep_execution",
                problem: format!("`{other}` is not `sequential` or `batched`"),
            }),
        }
    }

    /// The name the flag takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sequential => "sequential",
            Self::Batched => "batched",
        }
    }
}

/// A variant: its name (its output folder's) and the flags it sets.
#[derive(Debug, Clone)]
pub struct SweepVariant {
    /// The variant's name: its folder under the sweep's `--output_dir`.
    pub name: String,
    keys: toml::Table,
}

/// A sweep file, checked: see the module documentation.
#[derive(Debug, Clone)]
pub struct SweepFile {
    path: PathBuf,
    base: toml::Table,
    variants: Vec<SweepVariant>,
    execution: SweepExecution,
}

impl SweepFile {
    /// Reads and checks the sweep file `path`.
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::SweepFile`] naming the file, the table and the key: TOML syntax,
    /// keys that are not flags or that a variant may not set, values of the wrong type, missing,
    /// duplicate or unsafe variant names, no variant.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// [`SweepFile::read`] of the text `text` (`path` names it in errors).
    ///
    /// # Errors
    /// As [`SweepFile::read`].
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |problem: String| Error::SweepFile {
            path: path.to_owned(),
            problem,
        };
        let mut top: toml::Table =
            toml::from_str(text).map_err(|e| bad(super::one_line_toml_error(text, &e)))?;
        let base = match top.remove("base") {
            None => toml::Table::new(),
            Some(toml::Value::Table(table)) => table,
            Some(_) => return Err(bad("`base` must be a table: [base]".into())),
        };
        let variants = match top.remove("variant") {
            Some(toml::Value::Array(tables)) => tables,
            Some(_) => {
                return Err(bad(
                    "`variant` must be an array of tables: [[variant]]".into()
                ));
            }
            None => Vec::new(),
        };
        let execution = match top.remove("sweep_execution") {
            None => SweepExecution::default(),
            Some(toml::Value::String(value)) => SweepExecution::parse(&value)
                .map_err(|e| bad(format!("`sweep_execution` at the top level: {e}")))?,
            Some(_) => {
                return Err(bad(
                    "`sweep_execution` at the top level must be a string: `sequential` or `batched`"
                        .into(),
                ));
            }
        };
        if let Some(key) = top.keys().next() {
            return Err(bad(format!(
                "unknown key `{key}` at the top level (a sweep file holds a [base] table, \
                 [[variant]] tables and `sweep_execution`)"
            )));
        }
        let file = Self {
            path: path.to_owned(),
            base: normalized(base),
            variants: Vec::new(),
            execution,
        };
        file.check_base_keys()?;
        let mut file = file;
        for (index, variant) in variants.into_iter().enumerate() {
            let variant = file.variant(index + 1, variant)?;
            file.variants.push(variant);
        }
        if file.variants.is_empty() {
            return Err(bad(
                "has no [[variant]] table (each needs a `name` and the flags it changes)".into(),
            ));
        }
        // Every variant's settings must make a valid config on the defaults already.
        let base = file.base_over(TrainConfig::default())?;
        file.variant_configs(&base)?;
        Ok(file)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the variants take their steps: the file's `sweep_execution`, or what
    /// [`SweepFile::with_execution`] set.
    pub fn execution(&self) -> SweepExecution {
        self.execution
    }

    /// The sweep with `execution` (`--sweep_execution`, which wins over the file's key).
    #[must_use]
    pub fn with_execution(mut self, execution: SweepExecution) -> Self {
        self.execution = execution;
        self
    }

    /// The variants, in the file's order.
    pub fn variants(&self) -> &[SweepVariant] {
        &self.variants
    }

    /// `start` (the defaults, a preset) with `[base]`'s keys set.
    ///
    /// # Errors
    /// [`Error::SweepFile`] naming `[base]` and what the flags' parser said.
    pub fn base_over(&self, start: TrainConfig) -> Result<TrainConfig> {
        self.over(&start, &self.base, "[base]")
    }

    /// Each variant's settings: `base` with the variant's keys set and its `--output_dir` the
    /// folder of its name under `base`'s, each validated.
    ///
    /// # Errors
    /// [`Error::SweepFile`] naming the variant and the flag; `--nproc_per_node` above 1 or
    /// `--overwrite_output_dir` in `base`.
    pub fn variant_configs(&self, base: &TrainConfig) -> Result<Vec<(String, TrainConfig)>> {
        for (flag, why) in SWEEP_OWNED {
            let set = match flag {
                "nproc_per_node" => base.nproc_per_node > 1,
                _ => base.overwrite_output_dir,
            };
            if set {
                return Err(self.bad(format!("--{flag} cannot be used with --sweep: {why}")));
            }
        }
        self.variants
            .iter()
            .enumerate()
            .map(|(index, variant)| {
                let what = format!("[[variant]] {} (`{}`)", index + 1, variant.name);
                let mut config = self.over(base, &variant.keys, &what)?;
                config.output_dir = base.output_dir.join(&variant.name);
                config
                    .validate()
                    .map_err(|e| self.bad(format!("{what}: {e}")))?;
                Ok((variant.name.clone(), config))
            })
            .collect()
    }

    fn bad(&self, problem: String) -> Error {
        Error::SweepFile {
            path: self.path.clone(),
            problem,
        }
    }

    fn check_base_keys(&self) -> Result<()> {
        for key in self.base.keys() {
            if !TrainConfig::FLAG_NAMES.contains(&key.as_str()) {
                return Err(self.bad(format!("[base]: `{key}` is not a flag")));
            }
        }
        Ok(())
    }

    /// The variant of table `index` (1-based), its keys checked.
    fn variant(&self, index: usize, value: toml::Value) -> Result<SweepVariant> {
        let toml::Value::Table(keys) = value else {
            return Err(self.bad(format!("[[variant]] {index} is not a table")));
        };
        let mut keys = normalized(keys);
        let name = match keys.remove("name") {
            Some(toml::Value::String(name)) => name,
            Some(_) => {
                return Err(self.bad(format!("[[variant]] {index}: `name` must be a string")));
            }
            None => {
                return Err(self.bad(format!(
                    "[[variant]] {index} has no `name` (its output folder's)"
                )));
            }
        };
        if let Some(problem) = unsafe_name(&name) {
            return Err(self.bad(format!("[[variant]] {index}: name `{name}` {problem}")));
        }
        if self.variants.iter().any(|v| v.name == name) {
            return Err(self.bad(format!(
                "[[variant]] {index}: name `{name}` is taken by an earlier variant"
            )));
        }
        for key in keys.keys() {
            if VARIANT_FLAGS.contains(&key.as_str()) {
                continue;
            }
            let problem = if TrainConfig::FLAG_NAMES.contains(&key.as_str()) {
                format!(
                    "`{key}` is the same for every variant (the frozen base model, its precision \
                     and the sweep's loop are shared): set it in [base]"
                )
            } else {
                format!("`{key}` is not a flag")
            };
            return Err(self.bad(format!("[[variant]] {index} (`{name}`): {problem}")));
        }
        Ok(SweepVariant { name, keys })
    }

    /// `config` with `keys` set, `what` naming the table in errors.
    fn over(&self, config: &TrainConfig, keys: &toml::Table, what: &str) -> Result<TrainConfig> {
        let bad = |e: String| self.bad(format!("{what}: {}", e.trim().replace('\n', " ")));
        let mut merged: toml::Table =
            toml::from_str(&config.to_toml()?).map_err(|e| bad(e.to_string()))?;
        merged.extend(keys.clone());
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.message().to_owned()))
    }
}

/// kohya's spelling of `--optimizer` as the flag's.
fn normalized(mut keys: toml::Table) -> toml::Table {
    if let Some(value) = keys.remove("optimizer_type") {
        keys.insert("optimizer".into(), value);
    }
    keys
}

/// Why `name` cannot name a folder under the sweep's output folder, if it cannot.
fn unsafe_name(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 64 {
        return Some("must have 1 to 64 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Some("may hold only letters, digits, `-`, `_` and `.`");
    }
    if name.starts_with('.') {
        return Some("may not start with `.`");
    }
    if name.starts_with("checkpoint-") || name.starts_with("sweep_") || name == "logs" {
        return Some("is a name the sweep's own files use");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SweepFile> {
        SweepFile::parse(Path::new("sweep.toml"), text)
    }

    fn problem(text: &str) -> String {
        match parse(text) {
            Err(error) => error.to_string(),
            Ok(file) => panic!("accepted: {file:?}"),
        }
    }

    #[test]
    fn variants_override_the_base() {
        let file = parse(
            "[base]\nlearning_rate = 1e-4\nmax_train_steps = 7\noutput_dir = \"out\"\n\
             [[variant]]\nname = \"a\"\n\
             [[variant]]\nname = \"b\"\nlearning_rate = 3e-4\nrank = 8\noptimizer_type = \"adamw\"\n",
        )
        .unwrap();
        let base = file.base_over(TrainConfig::default()).unwrap();
        let configs = file.variant_configs(&base).unwrap();
        assert_eq!(configs.len(), 2);
        let (name, b) = &configs[1];
        assert_eq!(name, "b");
        assert_eq!((b.learning_rate, b.rank, b.max_train_steps), (3e-4, 8, 7));
        assert_eq!(
            b.optimizer_kind().unwrap(),
            crate::config::OptimizerKind::AdamW
        );
        assert_eq!(b.output_dir, Path::new("out/b"));
        assert_eq!(configs[0].1.learning_rate, 1e-4);
    }

    #[test]
    fn the_execution_comes_from_the_file_or_the_flag_and_either_takes_graphs_and_profiles() {
        let sequential = parse("[[variant]]\nname = \"a\"\n").unwrap();
        assert_eq!(sequential.execution(), SweepExecution::Sequential);
        let file = parse("sweep_execution = \"batched\"\n[[variant]]\nname = \"a\"\n").unwrap();
        assert_eq!(file.execution(), SweepExecution::Batched);
        let mut base = file.base_over(TrainConfig::default()).unwrap();
        assert!(file.variant_configs(&base).is_ok());
        // Batched micro-steps are captured with --cuda_graph.
        base.cuda_graph = true;
        assert!(file.variant_configs(&base).is_ok());
        // A profile of a batched sweep probes the sweep's whole step.
        base.profile_step = Some(3);
        assert!(file.variant_configs(&base).is_ok());
        let file = file.with_execution(SweepExecution::Sequential);
        assert!(file.variant_configs(&base).is_ok());
        assert!(
            SweepExecution::parse("parallel")
                .unwrap_err()
                .to_string()
                .contains("--sweep_execution")
        );
        assert!(
            problem("sweep_execution = \"fast\"\n[[variant]]\nname = \"a\"\n")
                .contains("`sweep_execution` at the top level")
        );
    }

    #[test]
    fn bad_files_name_the_table_and_key() {
        for (text, expected) in [
            (
                "[[variant]]\nname = \"a\"\nresolution = 64\n",
                "[[variant]] 1 (`a`): `resolution` is the same for every variant",
            ),
            (
                "[[variant]]\nname = \"a\"\nlearning_rat = 1.0\n",
                "`learning_rat` is not a flag",
            ),
            (
                "[base]\nrezolution = 64\n[[variant]]\nname = \"a\"\n",
                "[base]: `rezolution` is not a flag",
            ),
            (
                "[[variant]]\nlearning_rate = 1.0\n",
                "[[variant]] 1 has no `name`",
            ),
            (
                "[[variant]]\nname = \"a\"\n[[variant]]\nname = \"a\"\n",
                "[[variant]] 2: name `a` is taken",
            ),
            (
                "[[variant]]\nname = \"../x\"\n",
                "name `../x` may hold only",
            ),
            (
                "[[variant]]\nname = \"checkpoint-5\"\n",
                "the sweep's own files",
            ),
            ("[base]\nmax_train_steps = 5\n", "has no [[variant]]"),
            (
                "seed = 3\n[[variant]]\nname = \"a\"\n",
                "unknown key `seed` at the top level",
            ),
            (
                "[[variant]]\nname = \"a\"\nrank = \"four\"\n",
                "[[variant]] 1 (`a`): invalid type",
            ),
            (
                "[[variant]]\nname = \"a\"\nrank = 0\n",
                "[[variant]] 1 (`a`): --rank",
            ),
            (
                "[base]\nnproc_per_node = 2\n[[variant]]\nname = \"a\"\n",
                "--nproc_per_node cannot be used with --sweep",
            ),
            ("[[variant]\nname = \"a\"\n", "sweep.toml: line 1"),
        ] {
            let message = problem(text);
            assert!(message.starts_with("sweep.toml: "), "{message}");
            assert!(message.contains(expected), "{text:?}: {message}");
        }
    }
}
