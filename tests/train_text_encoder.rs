//! `--train_text_encoder` end to end on the tiny preset (the repository's tiny SDXL-shaped model and
//! demo dataset, on the CPU): both LoRA files hold the two text encoders' adapters and load back onto
//! the encoders, training moved every adapter that SDXL's conditioning reads (and left the one it
//! does not read as it started), gradient checkpointing of the encoders trains as the plain step
//! does, bf16 runs through the encoders' compute copies, and a run stopped at a checkpoint and
//! resumed ends on the bit-identical LoRA of an uninterrupted one. The flags' own errors are checked
//! too.
//!
//! Every training run happens in a child process (this test binary re-run on the ignored test
//! `training_child`): each run has a process of its own (its logging, its thread count).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::Path;

use trainer::TrainConfig;
use trainer::config::MixedPrecision;
use trainer::run::{KOHYA_FILE, LORA_FILE};

#[path = "common/training.rs"]
mod training;

use training::{assert_bit_identical, fixture, losses, run_output, run_to_end, scratch, tiny};

/// The tiny encoders' layers (tests/fixtures/tiny-sdxl/text_encoder*/config.json).
const LAYERS: [usize; 2] = [3, 4];
/// The text encoders' rate, a hundredth of the tiny preset's UNet rate (1e-3), so that a group given
/// the other's rate shows.
const LR: f64 = 1e-5;

fn config(dir: &Path, name: &str, steps: u64) -> TrainConfig {
    tiny(&dir.join(name))
        .with_train_text_encoder(true)
        .with_text_encoder_lr(LR)
        .with_max_train_steps(steps)
        .with_checkpointing_steps(2)
        .with_logging_steps(1)
        .with_validation_prompt(None)
        .with_resume_from_checkpoint(Some("latest".into()))
}

/// The `lora_B` (`up`) of every text-encoder module of a diffusers-format file, by module.
fn text_encoder_ups(file: &Path) -> Vec<((lora::Component, String), tch::Tensor)> {
    let read = lora::format::read(file, Default::default()).unwrap();
    read.state
        .modules
        .into_iter()
        .filter(|((c, _), _)| *c != lora::Component::Unet)
        .map(|(key, module)| (key, module.up))
        .collect()
}

#[test]
fn text_encoder_lora_trains_loads_back_and_resumes_identically() {
    let dir = scratch("text-encoder");
    let plain = config(&dir, "plain", 4)
        .with_validation_prompt(Some("Naruto style anime character".into()))
        .with_validation_steps(2)
        .with_validation_inference_steps(4);
    run_to_end(&plain);
    let out = &plain.output_dir;

    // 1. The diffusers file: the UNet's 136 modules and 4 projections per encoder layer.
    let file = lora::format::read(out.join(LORA_FILE), Default::default()).unwrap();
    let count = |c: lora::Component| file.state.component(c).count();
    assert_eq!(count(lora::Component::Unet), 136);
    assert_eq!(count(lora::Component::TextEncoder), 4 * LAYERS[0]);
    assert_eq!(count(lora::Component::TextEncoder2), 4 * LAYERS[1]);
    let keys: Vec<String> = training::tensors(&out.join(LORA_FILE))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    // As the script's `convert_state_dict_to_diffusers` names the encoders' adapters.
    for key in [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
        "text_encoder_2.text_model.encoder.layers.3.self_attn.out_proj.lora_linear_layer.up.weight",
    ] {
        assert!(keys.iter().any(|k| k == key), "no {key}");
    }

    // 2. The kohya file names them lora_te1_ / lora_te2_ and reads back as the same adapters.
    let kohya_keys: Vec<String> = training::tensors(&out.join(KOHYA_FILE))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        kohya_keys
            .iter()
            .any(|k| k.starts_with("lora_te1_text_model_encoder_layers_0_self_attn_q_proj."))
    );
    assert!(
        kohya_keys
            .iter()
            .any(|k| k.starts_with("lora_te2_text_model_encoder_layers_3_self_attn_v_proj."))
    );
    let mut encoder = sdxl_model::prompt::PromptEncoder::from_pretrained(
        fixture("tiny-sdxl"),
        &sdxl_model::pretrained::LoadOptions::default(),
    )
    .unwrap()
    .model;
    let mut names = lora::format::ModuleNames::new();
    let unet_file = fixture("tiny-sdxl/unet/diffusion_pytorch_model.safetensors");
    names
        .add_model_file(lora::Component::Unet, &unet_file)
        .unwrap();
    // The encoders' module paths as the model has them (the tiny files are transformers 5's,
    // whose keys lack the `text_model.` level that kohya's names keep).
    let (te1, te2) = encoder.text_encoders_mut();
    for (component, model) in [
        (
            lora::Component::TextEncoder,
            te1 as &mut dyn lora::HasLinears,
        ),
        (lora::Component::TextEncoder2, te2),
    ] {
        let mut paths = Vec::new();
        model.for_each_linear(&mut |path, _| paths.push(path.to_owned()));
        names.add_paths(component, paths.iter().map(String::as_str));
    }
    let unet_config =
        sdxl_model::unet::UNetConfig::from_file(fixture("tiny-sdxl/unet/config.json")).unwrap();
    let renames = lora::format::BlockRenames::new(sdxl_model::unet::sgm_unet_table(&unet_config));
    let options = lora::format::ReadOptions::default()
        .with_module_names(Some(&names))
        .with_block_renames(Some(&renames));
    let kohya = lora::format::read(out.join(KOHYA_FILE), options).unwrap();
    assert_eq!(kohya.state.modules.len(), file.state.modules.len());
    for (key, module) in &file.state.modules {
        let other = &kohya.state.modules[key];
        assert!(
            module.down.equal(&other.down) && module.up.equal(&other.up),
            "{key:?}"
        );
    }

    // 3. The adapters load back onto the encoders and change their output.
    let before = tch::no_grad(|| encoder.encode(&["a prompt"], None, None)).unwrap();
    let (te1, te2) = encoder.text_encoders_mut();
    let applied = [
        file.state
            .apply(te1, lora::Component::TextEncoder, "loaded", false)
            .unwrap(),
        file.state
            .apply(te2, lora::Component::TextEncoder2, "loaded", false)
            .unwrap(),
    ];
    assert_eq!(applied, [4 * LAYERS[0], 4 * LAYERS[1]]);
    let after = tch::no_grad(|| encoder.encode(&["a prompt"], None, None)).unwrap();
    assert!(!after.context.allclose(&before.context, 1e-6, 1e-7, false));
    assert!(!after.pooled.allclose(&before.pooled, 1e-6, 1e-7, false));

    // 4. B starts at zero: every adapter SDXL's conditioning reads moved; the first encoder's last
    //    layer, which it does not read, never got a gradient and stayed at zero (as in the script,
    //    where PyTorch's AdamW skips parameters without a gradient).
    let last = format!("text_model.encoder.layers.{}.", LAYERS[0] - 1);
    for ((component, module), up) in text_encoder_ups(&out.join(LORA_FILE)) {
        let moved = up.abs().max().double_value(&[]) > 0.0;
        let unread = component == lora::Component::TextEncoder && module.starts_with(&last);
        assert_eq!(moved, !unread, "{component}.{module}");
    }

    //    Each group moved at its own rate: Adam moves an entry by at most 2.3·lr a step in its first
    //    steps (β₁ 0.9, β₂ 0.999: (1−β₁)/√(1−β₂) · √(1−β₂ᵗ)/(1−β₁ᵗ) / √(1−β₁²/β₂)), so B ≤ 9.2·lr after
    //    4 steps; the UNet's first step alone moves B by its lr wherever the gradient is not tiny.
    let max_up = |component: lora::Component| {
        file.state
            .component(component)
            .map(|(_, m)| m.up.abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    };
    let unet_up = max_up(lora::Component::Unet);
    assert!(unet_up > 0.5e-3, "UNet B {unet_up}");
    for component in [lora::Component::TextEncoder, lora::Component::TextEncoder2] {
        let up = max_up(component);
        assert!(up > 0.0 && up <= 10.0 * LR, "{component} B {up}");
    }

    // 5. Validation images encode the prompt with the trained encoders; the log and card say so.
    assert!(out.join("validation/step-000002.png").is_file());
    assert!(out.join("base_vs_lora.png").is_file());
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("text encoders was enabled"), "{card}");
    let checkpoint = training::tensors(&out.join("checkpoint-2/lora_parameters.safetensors"));
    assert!(
        checkpoint
            .iter()
            .any(|(n, _)| n.starts_with("text_encoder_2."))
    );

    // 6. Gradient checkpointing (the encoders' layers recomputed too) trains as the plain step does:
    //    the same operations, summed in another order (fp32 rounding, 1e-7 relative per sum over a few
    //    hundred terms), then Adam, whose update is continuous in the gradient: far below lr / 100.
    let checkpointed = config(&dir, "checkpointed", 4).with_gradient_checkpointing(true);
    run_to_end(&checkpointed);
    for (a, b) in losses(&plain).iter().zip(&losses(&checkpointed)) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "{a} vs {b}");
    }
    let ups_a = text_encoder_ups(&out.join(LORA_FILE));
    let ups_b = text_encoder_ups(&checkpointed.output_dir.join(LORA_FILE));
    assert_eq!(ups_a.len(), ups_b.len());
    for ((key, a), (_, b)) in ups_a.iter().zip(&ups_b) {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff <= LR / 100.0, "{key:?}: {diff}");
    }

    // 6b. The same with adapter dropout on both encoders and the UNet: the recomputed layers replay the
    //     forward's masks, so the two runs still differ only by summation order.
    let dropout = |name: &str, gradient_checkpointing| {
        config(&dir, name, 4)
            .with_lora_dropout(0.25)
            .with_gradient_checkpointing(gradient_checkpointing)
    };
    let (plain_dropout, checkpointed_dropout) = (
        dropout("dropout", false),
        dropout("dropout-checkpointed", true),
    );
    run_to_end(&plain_dropout);
    run_to_end(&checkpointed_dropout);
    for (a, b) in losses(&plain_dropout)
        .iter()
        .zip(&losses(&checkpointed_dropout))
    {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "{a} vs {b}");
    }
    let ups_a = text_encoder_ups(&plain_dropout.output_dir.join(LORA_FILE));
    let ups_b = text_encoder_ups(&checkpointed_dropout.output_dir.join(LORA_FILE));
    let ups_none = text_encoder_ups(&out.join(LORA_FILE));
    for ((key, a), (_, b)) in ups_a.iter().zip(&ups_b) {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff <= LR / 100.0, "{key:?}: {diff}");
    }
    assert!(
        ups_a
            .iter()
            .zip(&ups_none)
            .any(|((_, a), (_, n))| (a - n).abs().max().double_value(&[]) > LR / 100.0),
        "--lora_dropout changed nothing in the text encoders' LoRA"
    );

    // 7. bf16 (the encoders' LoRA through compute copies): stopped after the checkpoint of step 2,
    //    resumed to step 4, it ends on the uninterrupted run's LoRA bit for bit.
    let bf16 =
        |name: &str, steps| config(&dir, name, steps).with_mixed_precision(MixedPrecision::Bf16);
    let whole = bf16("whole", 4);
    run_to_end(&whole);
    assert!(losses(&whole).iter().all(|l| l.is_finite()));
    run_to_end(&bf16("split", 2));
    run_to_end(&bf16("split", 4));
    assert_bit_identical(
        &whole.output_dir.join(LORA_FILE),
        &dir.join("split").join(LORA_FILE),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn text_encoder_flags_are_checked() {
    let args = |extra: &[&str]| {
        TrainConfig::from_args(extra.iter().map(|s| (*s).to_owned()))
            .err()
            .map(|e| e.to_string())
    };
    let error = args(&["--text_encoder_lr", "1e-4"]).unwrap();
    assert!(
        error.contains("--text_encoder_lr") && error.contains("--train_text_encoder"),
        "{error}"
    );
    let error = args(&["--adam_weight_decay_text_encoder", "0.1"]).unwrap();
    assert!(
        error.contains("--adam_weight_decay_text_encoder"),
        "{error}"
    );
    let error = args(&["--train_text_encoder", "--text_encoder_lr", "-1"]).unwrap();
    assert!(
        error.contains("--text_encoder_lr") && error.contains("out of range"),
        "{error}"
    );
    let error = args(&["--train_text_encoder", "--text_encoder_lr", "nan"]).unwrap();
    assert!(error.contains("--text_encoder_lr"), "{error}");
    assert_eq!(
        args(&["--train_text_encoder", "--text_encoder_lr", "1e-4"]),
        None
    );

    // 0 means --learning_rate, as in the script; otherwise its own rate, never scaled.
    let parsed =
        |extra: &[&str]| TrainConfig::from_args(extra.iter().map(|s| (*s).to_owned())).unwrap();
    let zero = parsed(&[
        "--train_text_encoder",
        "--text_encoder_lr",
        "0",
        "--scale_lr",
    ]);
    assert_eq!(zero.text_encoder_learning_rate(), zero.base_learning_rate());
    let own = parsed(&["--train_text_encoder", "--scale_lr"]);
    assert_eq!(own.text_encoder_learning_rate(), 5e-6);

    // A text encoder of one layer has no penultimate hidden state: the run stops naming the flag.
    let dir = scratch("one-layer");
    let model = dir.join("model");
    for part in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let from = fixture("tiny-sdxl").join(part);
        std::fs::create_dir_all(model.join(part)).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), model.join(part).join(entry.file_name())).unwrap();
        }
    }
    let te_config = model.join("text_encoder/config.json");
    let text = std::fs::read_to_string(&te_config).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["num_hidden_layers"] = 1.into();
    std::fs::write(&te_config, json.to_string()).unwrap();
    let weights = model.join("text_encoder/model.safetensors");
    let kept: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.contains("layers.1.") && !k.contains("layers.2."))
        .collect();
    tch::Tensor::write_safetensors(&kept, &weights).unwrap();
    let one_layer =
        config(&dir, "run", 1).with_pretrained_model_name_or_path(model.display().to_string());
    let (ok, stderr) = run_output(&one_layer);
    assert!(!ok && stderr.contains("--train_text_encoder"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
