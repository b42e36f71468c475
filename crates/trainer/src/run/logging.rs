//! The loop's reporting: the progress bar, and at every `--logging_steps` the device-side window
//! sums read once (the loop's only host synchronisation) into TensorBoard events and the JSON-lines
//! metrics log.

use crate::Result;
use crate::config::TrainConfig;
use crate::logs::jsonl::MetricsLog;
use crate::logs::tensorboard::{EventWriter, HParam};
use crate::step::Accumulators;

/// The scalar tags TensorBoard's HParams tab shows beside the hyper-parameters.
const METRICS: [&str; 3] = ["train/loss", "train/lr", "train/grad_norm"];

/// The run's flags as TensorBoard hyper-parameters: numbers, booleans and strings as they are, a
/// list or table as its JSON text; unset options left out.
fn hparams(config: &TrainConfig) -> Vec<(String, HParam)> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(config) else {
        return Vec::new();
    };
    fields
        .into_iter()
        .filter_map(|(name, value)| {
            let value = match value {
                serde_json::Value::Null => return None,
                serde_json::Value::Bool(b) => HParam::Bool(b),
                serde_json::Value::Number(n) => HParam::Number(n.as_f64()?),
                serde_json::Value::String(s) => HParam::Text(s),
                other => HParam::Text(other.to_string()),
            };
            Some((name, value))
        })
        .collect()
}

/// The run's logs and progress bar (files and a visible bar on rank 0 only).
pub(super) struct RunLogs {
    metrics: Option<MetricsLog>,
    events: Option<EventWriter>,
    pub(super) progress: indicatif::ProgressBar,
}

/// What one read of the window gave.
pub(super) struct Window {
    /// The window's mean loss, if any step of it was applied.
    pub(super) loss: Option<f64>,
    /// Steps skipped so far (whole run).
    pub(super) skipped: u64,
}

impl RunLogs {
    /// Opens (or, resumed, continues) `output_dir/logs` — one metrics log and one event file a
    /// run — and starts the bar at `start_step`; the other processes of a data-parallel run
    /// (`main` false) write no files and show no bar, but read the window as rank 0 does (every
    /// process takes the same stop decisions).
    pub(super) fn open(config: &TrainConfig, start_step: u64, main: bool) -> Result<Self> {
        let logs = config.output_dir.join("logs");
        let (metrics, events) = if main {
            let metrics = MetricsLog::open(&logs.join("metrics.jsonl"), Some(start_step))?;
            let mut events = EventWriter::continue_run(&logs, start_step)?;
            events.add_hparams(&hparams(config), &METRICS)?;
            (Some(metrics), Some(events))
        } else {
            (None, None)
        };
        // Steps, elapsed, ETA, steps/s and images/s (the global batch per step), loss and lr.
        let images_per_step = f64::from(config.train_batch_size)
            * f64::from(config.gradient_accumulation_steps)
            * f64::from(config.nproc_per_node.max(1));
        let template = "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}, {images_per_sec}] {msg}";
        let progress = if main {
            crate::logs::progress_bar(config.max_train_steps, template)
        } else {
            indicatif::ProgressBar::hidden()
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            progress.set_style(style.with_key(
                "images_per_sec",
                move |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1} images/s", state.per_sec() * images_per_step);
                },
            ));
        }
        let progress = progress.with_position(start_step);
        Ok(Self {
            metrics,
            events,
            progress,
        })
    }

    /// Reads the device-side window sums, logs them and starts a new window.
    pub(super) fn window(
        &mut self,
        acc: &mut Accumulators,
        step: u64,
        lr: f64,
        peak_memory_gib: Option<f64>,
    ) -> Result<Window> {
        let window_loss = acc.window_loss.double_value(&[]);
        let window_steps = acc.window_steps.double_value(&[]);
        let skipped = acc.skipped.double_value(&[]) as u64;
        let grad_norm = acc.grad_norm.double_value(&[]);
        // fp16: the loss scale now and the scaler's overflow skips so far.
        let scaler = acc.scaler.as_ref().map(|scaler| {
            (
                scaler.scale_tensor().double_value(&[]),
                acc.overflows.double_value(&[]) as u64,
            )
        });
        let _ = acc.window_loss.zero_();
        let _ = acc.window_steps.zero_();
        let loss = (window_steps > 0.0).then(|| window_loss / window_steps);
        let window = Window { loss, skipped };
        let (Some(events), Some(metrics)) = (&mut self.events, &mut self.metrics) else {
            return Ok(window);
        };
        let at = step as i64;
        if let Some(loss) = loss {
            events.add_scalar("train/loss", at, loss as f32)?;
        }
        events.add_scalar("train/lr", at, lr as f32)?;
        events.add_scalar("train/grad_norm", at, grad_norm as f32)?;
        events.add_scalar("train/skipped_steps", at, skipped as f32)?;
        if let Some(memory) = peak_memory_gib {
            events.add_scalar("train/peak_memory_gib", at, memory as f32)?;
        }
        let mut record = serde_json::json!({
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped_steps": skipped,
            "peak_memory_gib": peak_memory_gib,
            "elapsed_s": self.progress.elapsed().as_secs_f64(),
        });
        let mut scaler_text = String::new();
        if let Some((scale, overflows)) = scaler {
            events.add_scalar("train/loss_scale", at, scale as f32)?;
            events.add_scalar("train/overflow_steps", at, overflows as f32)?;
            record["loss_scale"] = scale.into();
            record["overflow_steps"] = overflows.into();
            scaler_text = format!(" scale {scale:.0} overflows {overflows}");
        }
        metrics.write(&record)?;
        let loss_text = loss.map_or_else(|| "n/a".to_owned(), |l| format!("{l:.4}"));
        let memory_text = peak_memory_gib.map_or_else(String::new, |m| format!(" mem {m:.2} GiB"));
        let skipped_text = if skipped > 0 {
            format!(" skipped {skipped}")
        } else {
            String::new()
        };
        self.progress.set_message(format!(
            "loss {loss_text} lr {lr:.2e}{memory_text}{skipped_text}{scaler_text}"
        ));
        Ok(window)
    }

    /// Logs the PNG file `path` under `tag` at `step` in TensorBoard (rank 0; nothing elsewhere).
    pub(super) fn add_image_file(
        &mut self,
        tag: &str,
        step: u64,
        path: &std::path::Path,
    ) -> Result<()> {
        match &mut self.events {
            Some(events) => events.add_image_file(tag, step as i64, path),
            None => Ok(()),
        }
    }

    /// Flushes the event file.
    pub(super) fn flush(&mut self) -> Result<()> {
        match &mut self.events {
            Some(events) => events.flush(),
            None => Ok(()),
        }
    }
}
