//! Checkpoints and exact resume: what `checkpoint-N/` holds (the LoRA parameters, the optimizer
//! state, the fp16 loss scaler's state, with `--use_ema` the average's state, the LoRA in diffusers'
//! and kohya's layouts as the final output has them — the average with `--use_ema` — the trainer
//! state and the config) and how a run continues from it bit for bit.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use std::time::SystemTime;

use super::Trainer;
use crate::checkpoint::io_error;
use crate::distributed::BatchLayout;
use crate::kohya_metadata::RunFacts;
use crate::logs::say;
use crate::outputs::write_lora_files;
use crate::{Error, Result};

const PARAMS_FILE: &str = "lora_parameters.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The fp16 loss scaler's scale and growth tracker (`--mixed_precision fp16` only).
const GRAD_SCALER_FILE: &str = "grad_scaler.safetensors";
/// The `--use_ema` average's state (diffusers' `EMAModel.state_dict`).
const EMA_FILE: &str = "ema.safetensors";
const STATE_FILE: &str = "trainer_state.json";
const CONFIG_FILE: &str = "config.toml";

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Micro-steps done (= batches consumed; the data position).
    pub micro_steps: u64,
    /// The run's seed.
    pub seed: u64,
    /// How randomness is drawn, for a reader of the checkpoint.
    pub rng: String,
    /// The learning rate the next step uses.
    pub next_learning_rate: f64,
    /// Steps skipped for non-finite values so far.
    pub skipped_steps: f64,
    /// Steps the fp16 loss scaler skipped for overflowing gradients so far (0 without fp16).
    #[serde(default)]
    pub overflow_steps: f64,
    /// Loss sum and applied steps of the logging window in progress.
    pub window_loss: f64,
    /// Applied steps of the logging window in progress.
    pub window_steps: f64,
    /// (step, mean loss) at every logging step so far.
    pub loss_history: Vec<(u64, f64)>,
    /// The optimizer whose state `optimizer.safetensors` holds, as `--optimizer` names it (absent
    /// in checkpoints written before the choice existed, which hold AdamW's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<String>,
    /// The world size and per-process batch (absent in checkpoints written before they were
    /// recorded, all of one process): a resume must keep their product, the global batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_layout: Option<BatchLayout>,
}

impl Trainer {
    /// What the LoRA files' metadata needs to know of the run after `steps` optimizer steps.
    pub(super) fn run_facts(&self, steps: u64) -> RunFacts {
        RunFacts {
            steps,
            batches_per_epoch: self.plan.steps_per_epoch(),
            started_at: self.started_at,
            written_at: SystemTime::now(),
            v_prediction: self.v_prediction,
        }
    }

    /// This run's layout of the global batch over its processes.
    fn batch_layout(&self) -> BatchLayout {
        BatchLayout {
            world_size: self.world.world_size,
            train_batch_size: self.config.train_batch_size as usize,
        }
    }

    /// Continues from `checkpoint-{step}` at `path`: checks the trainer state against the config,
    /// restores the LoRA parameters, the optimizer state and the logging window.
    pub(super) fn restore(&mut self, step: u64, path: &Path) -> Result<()> {
        let state_path = path.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(io_error(&state_path))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: state_path.clone(),
            problem: format!("not a trainer state: {e}"),
        })?;
        if state.step != step || state.seed != self.config.seed {
            return Err(Error::Checkpoint {
                path: state_path,
                problem: format!(
                    "records step {} and seed {}, expected step {step} and --seed {}",
                    state.step, state.seed, self.config.seed
                ),
            });
        }
        let optimizer = self.config.optimizer_kind()?;
        if let Some(saved) = &state.optimizer
            && saved != optimizer.name()
        {
            return Err(Error::Checkpoint {
                path: state_path,
                problem: format!(
                    "holds the state of --optimizer {saved}, and this run has --optimizer {optimizer}: \
                     resume with --optimizer {saved}, or start a new run"
                ),
            });
        }
        if let Some(recorded) = &state.batch_layout {
            self.batch_layout().check_resume(recorded)?;
        }
        let params_path = path.join(PARAMS_FILE);
        let saved = Tensor::read_safetensors(&params_path)?;
        self.model.load_params(&saved, &params_path)?;
        self.stepper
            .optimizer_mut()
            .load(path.join(OPTIMIZER_FILE))?;
        self.restore_ema(path)?;
        let acc = &mut self.stepper.acc;
        if let Some(scaler) = &mut acc.scaler {
            scaler.load(path.join(GRAD_SCALER_FILE))?;
        }
        let _ = acc.overflows.fill_(state.overflow_steps);
        let _ = acc.skipped.fill_(state.skipped_steps);
        let _ = acc.window_loss.fill_(state.window_loss);
        let _ = acc.window_steps.fill_(state.window_steps);
        self.loss_history = state.loss_history;
        self.start_step = step;
        say(format!("resumed from {} at step {step}", path.display()));
        Ok(())
    }

    /// With `--use_ema`, the average's state from `path`, which must have one; without, a note
    /// when it has one.
    fn restore_ema(&mut self, path: &Path) -> Result<()> {
        let file = path.join(EMA_FILE);
        match self.stepper.ema_mut() {
            Some(ema) if file.exists() => ema.load(&file)?,
            Some(_) => {
                return Err(Error::Checkpoint {
                    path: path.to_owned(),
                    problem: format!(
                        "has no {EMA_FILE}: it was written without --use_ema (resume it without \
                         --use_ema, or start the average afresh in a new output_dir)"
                    ),
                });
            }
            None if file.exists() => say(format!(
                "{} holds an EMA average; without --use_ema it is not used",
                path.display()
            )),
            None => {}
        }
        Ok(())
    }

    /// Writes `checkpoint-{step}` atomically, then prunes to `--checkpoints_total_limit`.
    pub(super) fn save_checkpoint(&mut self, step: u64) -> Result<PathBuf> {
        self.model.check_finite(&format!("checkpoint-{step}"))?;
        let acc = &self.stepper.acc;
        let state = TrainerState {
            step,
            micro_steps: step * u64::from(self.config.gradient_accumulation_steps),
            seed: self.config.seed,
            rng:
                "the run's own generator on the training device, re-seeded from (seed, micro-step) \
                  before every micro-step"
                    .into(),
            next_learning_rate: self.stepper.learning_rate(step),
            skipped_steps: acc.skipped.double_value(&[]),
            overflow_steps: acc.overflows.double_value(&[]),
            window_loss: acc.window_loss.double_value(&[]),
            window_steps: acc.window_steps.double_value(&[]),
            loss_history: self.loss_history.clone(),
            optimizer: Some(self.config.optimizer_kind()?.name().to_owned()),
            batch_layout: Some(self.batch_layout()),
        };
        let what = format!("checkpoint-{step}");
        let lora = self
            .model
            .with_ema_weights(self.stepper.ema_mut(), |model| {
                model.check_finite(&what)?;
                model.lora_state()
            })?;
        let facts = self.run_facts(step);
        let unet_config = self.model.unet().config().clone();
        let config = &self.config;
        let config_toml = self.config.to_toml()?;
        let named: Vec<(&str, Tensor)> = self
            .model
            .params()
            .iter()
            .map(|(n, p)| (n.as_str(), p.detach().to_device(Device::Cpu)))
            .collect();
        let optimizer = self.stepper.optimizer();
        let scaler = self.stepper.acc.scaler.as_ref();
        let ema = self.stepper.ema();
        let path = self.store.save(step, |dir| -> Result<()> {
            let write = |name: &str, bytes: &[u8]| {
                std::fs::write(dir.join(name), bytes).map_err(io_error(&dir.join(name)))
            };
            Tensor::write_safetensors(&named, dir.join(PARAMS_FILE))?;
            optimizer.save(dir.join(OPTIMIZER_FILE))?;
            if let Some(scaler) = scaler {
                scaler.save(dir.join(GRAD_SCALER_FILE))?;
            }
            if let Some(ema) = ema {
                ema.save(dir.join(EMA_FILE))?;
            }
            write_lora_files(dir, config, &lora, &unet_config, &facts)?;
            let json = serde_json::to_string_pretty(&state).map_err(|e| Error::Checkpoint {
                path: dir.join(STATE_FILE),
                problem: e.to_string(),
            })?;
            write(STATE_FILE, json.as_bytes())?;
            write(CONFIG_FILE, config_toml.as_bytes())?;
            if let Ok(delay) = std::env::var("TRAINER_TEST_SLOW_CHECKPOINT_MS") {
                // Fault-injection hook for the crash tests: widens the window in which a kill lands
                // mid-write. Never set in normal use.
                std::thread::sleep(std::time::Duration::from_millis(delay.parse().unwrap_or(0)));
            }
            Ok(())
        })?;
        if let Some(limit) = self.config.checkpoints_total_limit {
            for removed in self.store.prune(limit as usize)? {
                say(format!(
                    "removed checkpoint-{removed} (--checkpoints_total_limit {limit})"
                ));
            }
        }
        Ok(path)
    }
}
