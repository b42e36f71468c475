//! A checkpoint folder (`checkpoint-1/` of `--output_dir`) resumed as `--resume_from_checkpoint
//! checkpoint-1` resumes it: `config.toml` checked against the run's settings, `trainer_state.json`,
//! the LoRA parameters and the optimizer state read into the trainer.
//!
//! The input holds the folder's four files, in this order, between `\n--8<--\n` lines:
//! `trainer_state.json`, `config.toml`, `lora_parameters.safetensors`, `optimizer.safetensors`.
//! The trainer (the tiny SDXL fixture, the imagefolder fixture, batch 1, rank 2, on the CPU) is
//! built once and trains one step, which writes a real `checkpoint-1`; its files, joined that way,
//! are written to `<work>/checkpoint-seed.bin` (the corpus's `ok-` seed comes from there). The paths in
//! `config.toml` are stored as `@FIXTURES@` and `@OUTPUT_DIR@`, put back on reading, so that the
//! corpus resumes on any machine and in any clone.

use std::path::Path;

use super::{Outcome, Runner, fresh, parts, put, text};
use trainer::{TrainConfig, Trainer};

const FILES: [&str; 4] = [
    "trainer_state.json",
    "config.toml",
    "lora_parameters.safetensors",
    "optimizer.safetensors",
];

pub(super) fn runner(fixtures: &Path, work: &Path) -> Result<Runner, String> {
    let output_dir = work.join("out");
    if output_dir.exists() {
        std::fs::remove_dir_all(&output_dir).map_err(text)?;
    }
    let mut config = TrainConfig::tiny_demo(
        &fixtures.join("tiny-sdxl"),
        &fixtures.join("captioned-images/imagefolder"),
        &output_dir,
    );
    config.max_train_steps = 1;
    config.checkpointing_steps = 1;
    config.train_batch_size = 1;
    config.gradient_accumulation_steps = 1;
    config.rank = 2;
    config.resolution = 32;
    config.validation_prompt = None;
    config.device = "cpu".into();
    config.dataloader_num_workers = 1;
    let mut trainer = Trainer::new(config).map_err(text)?;
    trainer.run().map_err(text)?;
    let checkpoint = output_dir.join("checkpoint-1");
    let mut seed = Vec::new();
    for (i, name) in FILES.iter().enumerate() {
        if i > 0 {
            seed.extend_from_slice(b"\n--8<--\n");
        }
        seed.extend(std::fs::read(checkpoint.join(name)).map_err(text)?);
    }
    let paths = [
        (fixtures.display().to_string(), "@FIXTURES@"),
        (output_dir.display().to_string(), "@OUTPUT_DIR@"),
    ];
    for (path, token) in &paths {
        seed = replace_all(&seed, path.as_bytes(), token.as_bytes());
    }
    put(work, "checkpoint-seed.bin", &seed)?;
    Ok(Box::new(move |data: &[u8]| -> Outcome {
        fresh(&checkpoint)?;
        let mut data = data.to_vec();
        for (path, token) in &paths {
            data = replace_all(&data, token.as_bytes(), path.as_bytes());
        }
        for (name, bytes) in FILES.iter().zip(parts(&data, FILES.len())) {
            put(&checkpoint, name, bytes)?;
        }
        match trainer.resume_from("checkpoint-1").map_err(text)? {
            Some(1) => Ok(()),
            other => Err(format!("resumed at {other:?}")),
        }
    }))
}

/// `data` with every occurrence of `from` replaced by `to`.
fn replace_all(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    while let Some(at) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}
