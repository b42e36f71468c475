//! Two trainers in one process, training at the same time in two threads, end on the LoRA each ends
//! on alone, bit for bit, while a third thread keeps re-seeding and drawing from libtorch's default
//! generator: every draw of a run (the LoRA's initial values, the latents' posterior samples, noise,
//! timesteps and adapter-dropout masks) comes from the run's own generator (docs/LIBRARY.md,
//! "Randomness").

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};
use trainer::TrainConfig;
use trainer::run::LORA_FILE;

#[path = "common/training.rs"]
mod training;

use training::{scratch, tensors, tiny};

fn config(dir: &Path, name: &str, seed: u64, learning_rate: f64) -> TrainConfig {
    tiny(&dir.join(name))
        .with_seed(seed)
        .with_learning_rate(learning_rate)
        // Dropout masks are draws too.
        .with_lora_dropout(0.1)
        .with_max_train_steps(4)
        .with_checkpointing_steps(100)
        .with_validation_prompt(None)
}

/// Trains `config` to the end in this process; returns its LoRA file's tensors.
fn train(config: &TrainConfig) -> Vec<(String, Tensor)> {
    trainer::Trainer::new(config.clone())
        .and_then(|mut trainer| trainer.run())
        .unwrap_or_else(|e| panic!("{}: {e}", config.output_dir.display()));
    tensors(&config.output_dir.join(LORA_FILE))
}

fn assert_equal(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for ((ka, ta), (kb, tb)) in a.iter().zip(b) {
        assert_eq!(ka, kb, "{what}");
        assert!(ta.equal(tb), "{what}: {ka} differs");
    }
}

#[test]
fn two_trainers_in_two_threads_end_on_what_each_ends_on_alone() {
    // One intra-op thread: the same arithmetic alone and side by side.
    tch::set_num_threads(1);
    let dir = scratch("concurrent");
    let alone = [
        train(&config(&dir, "a-alone", 1, 1e-3)),
        train(&config(&dir, "b-alone", 2, 5e-4)),
    ];
    assert!(
        alone[0]
            .iter()
            .zip(&alone[1])
            .any(|((_, a), (_, b))| !a.equal(b)),
        "two seeds, two learning rates, one LoRA"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let default_generator_user = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut draws = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tch::manual_seed(draws as i64);
                let _ = Tensor::randn([256], (Kind::Float, Device::Cpu));
                draws += 1;
            }
            draws
        })
    };
    let together: Vec<_> = [("a-together", 1, 1e-3), ("b-together", 2, 5e-4)]
        .into_iter()
        .map(|(name, seed, lr)| {
            let config = config(&dir, name, seed, lr);
            std::thread::spawn(move || train(&config))
        })
        .collect();
    let together: Vec<_> = together.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let draws = default_generator_user.join().unwrap();
    assert!(draws > 0);
    assert_equal(&together[0], &alone[0], "trainer a beside trainer b");
    assert_equal(&together[1], &alone[1], "trainer b beside trainer a");
    let _ = std::fs::remove_dir_all(&dir);
}
