//! The trainer with the LoRA shapes of issue 17 on the tiny preset (CPU): kohya's targets with LoCon
//! (`--target_modules kohya --conv_rank`), rsLoRA and adapter dropout under gradient checkpointing
//! train, write the convolution adapters into every LoRA file, and resume to a bit-identical LoRA;
//! DoRA trains on linear layers and convolutions.
//!
//! Every training run happens in a child process (this test binary re-run on the ignored test
//! `training_child`): each run has a process of its own (its logging, its thread count).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use trainer::run::{KOHYA_FILE, LORA_FILE};

#[path = "common/training.rs"]
mod training;

use training::{assert_bit_identical, losses, run_output, run_to_end, scratch, tensors, tiny};

fn shape_of(named: &[(String, tch::Tensor)], key: &str) -> Vec<i64> {
    named
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("{key} missing"))
        .1
        .size()
}

#[test]
fn locon_with_dropout_and_checkpointing_trains_writes_conv_adapters_and_resumes_bit_identically() {
    let dir = scratch("locon");
    let config = |name: &str, steps: u64| {
        tiny(&dir.join(name))
            .with_target_modules("kohya".into())
            .with_conv_rank(Some(2))
            .with_conv_alpha(Some(1.0))
            .with_lora_dropout(0.1)
            .with_use_rslora(true)
            .with_gradient_checkpointing(true)
            .with_max_train_steps(steps)
            .with_checkpointing_steps(2)
            .with_logging_steps(1)
            .with_validation_prompt(None)
            .with_resume_from_checkpoint(Some("latest".into()))
    };
    let whole = config("whole", 4);
    let (ok, stderr) = run_output(&whole);
    assert!(ok, "training failed:\n{stderr}");
    assert!(
        stderr.contains("LoRA (rsLoRA scaling) on ") && stderr.contains("at rank 2 alpha 1"),
        "{stderr}"
    );
    let run_losses = losses(&whole);
    assert_eq!(run_losses.len(), 4);
    assert!(run_losses.iter().all(|l| l.is_finite() && *l > 0.0));

    // diffusers' layout: the 3×3 kernels at the conv rank, 1×1 kernels and linear layers at --rank.
    let diffusers = tensors(&whole.output_dir.join(LORA_FILE));
    let rank = i64::from(whole.rank);
    assert_eq!(
        shape_of(
            &diffusers,
            "unet.down_blocks.0.resnets.0.conv1.lora.down.weight"
        )[..],
        [2, 16, 3, 3]
    );
    assert_eq!(
        shape_of(
            &diffusers,
            "unet.down_blocks.0.downsamplers.0.conv.lora.up.weight"
        )[..],
        [16, 2, 1, 1]
    );
    assert_eq!(
        shape_of(
            &diffusers,
            "unet.down_blocks.1.resnets.0.conv_shortcut.lora.down.weight"
        )[..],
        [rank, 16, 1, 1]
    );
    assert_eq!(
        shape_of(
            &diffusers,
            "unet.mid_block.resnets.0.time_emb_proj.lora.down.weight"
        )[0],
        rank
    );
    assert!(
        diffusers
            .iter()
            .any(|(k, _)| k.contains("attentions.0.proj_in.lora"))
    );
    assert!(
        !diffusers
            .iter()
            .any(|(k, _)| k.contains("conv_in") || k.contains("conv_out"))
    );
    // kohya's layout, in kohya's SGM names.
    let kohya = tensors(&whole.output_dir.join(KOHYA_FILE));
    assert_eq!(
        shape_of(
            &kohya,
            "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"
        )[..],
        [2, 16, 3, 3]
    );
    let alpha = kohya
        .iter()
        .find(|(k, _)| k == "lora_unet_input_blocks_3_0_op.alpha")
        .unwrap();
    // kohya has no rsLoRA: its alpha keeps the scale, alpha / √r = alpha_kohya / r.
    assert!((alpha.1.double_value(&[]) - 2f64.sqrt()).abs() < 1e-6);

    // Stopped after the checkpoint of step 2, then resumed to step 4: the same masks and updates.
    run_to_end(&config("split", 2));
    run_to_end(&config("split", 4));
    assert_bit_identical(
        &whole.output_dir.join(LORA_FILE),
        &dir.join("split").join(LORA_FILE),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dora_trains_on_linear_layers_and_convolutions() {
    let dir = scratch("dora");
    let config = tiny(&dir.join("run"))
        .with_use_dora(true)
        .with_conv_rank(Some(2))
        .with_max_train_steps(2)
        .with_checkpointing_steps(2)
        .with_validation_prompt(None);
    let (ok, stderr) = run_output(&config);
    assert!(ok, "training failed:\n{stderr}");
    assert!(stderr.contains("DoRA on "), "{stderr}");
    let named = tensors(&config.output_dir.join(LORA_FILE));
    // peft's shapes: `[out]` for a linear layer, `[1, out, 1, 1]` for a convolution.
    assert_eq!(
        shape_of(
            &named,
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"
        )[..],
        [32]
    );
    assert_eq!(
        shape_of(
            &named,
            "unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector"
        )[..],
        [1, 16, 1, 1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn locon_trains_under_bf16_mixed_precision() {
    use trainer::config::MixedPrecision;
    let dir = scratch("locon-bf16");
    let config = tiny(&dir.join("run"))
        .with_mixed_precision(MixedPrecision::Bf16)
        .with_target_modules("to_q,to_out.0".into())
        .with_conv_rank(Some(2))
        .with_max_train_steps(3)
        .with_checkpointing_steps(3)
        .with_logging_steps(1)
        .with_validation_prompt(None);
    run_to_end(&config);
    let run_losses = losses(&config);
    assert_eq!(run_losses.len(), 3);
    assert!(run_losses.iter().all(|l| l.is_finite() && *l > 0.0));
    // The adapters train (B moved off zero) in fp32, the convolutions' among them.
    let named = tensors(&config.output_dir.join(LORA_FILE));
    let up = named
        .iter()
        .find(|(k, _)| k == "unet.down_blocks.0.resnets.0.conv2.lora.up.weight")
        .unwrap();
    assert_eq!(up.1.kind(), tch::Kind::Float);
    assert!(up.1.abs().max().double_value(&[]) > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}
