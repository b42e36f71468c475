//! LoRA on the UNet's convolutions (kohya's LoCon set) and LoRA dropout under gradient
//! checkpointing, on the tiny SDXL fixture UNet.
//!
//! Which layers kohya adapts, and at which rank, follows sd-scripts' `networks/lora.py`
//! (docs/LORA.md): every linear layer inside a `Transformer2DModel`; with `conv_dim`, the layers of
//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` too, 3×3 convolutions at the conv rank, linear
//! layers and 1×1 convolutions at the linear rank; never `conv_in`, `conv_out` or the embeddings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::depth::unet_shape;
use common::{Seeded, fixture, rel};
use lora::format::{self, BlockRenames, Format, ModuleNames, ReadOptions, WriteOptions};
use lora::{Component, LoraConfig, LoraState};
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs, sgm_unet_table};
use sdxl_model::weights::{TensorFile, load_into};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use test_support::{check, f32_bound, unet_depth};
use torch_cuda::rng::Generator;

struct Case {
    config: UNetConfig,
    unet: UNet2DConditionModel,
    base: VarStore,
    io: TensorFile,
}

fn tiny_sdxl() -> Case {
    tiny_sdxl_on(Device::Cpu)
}

fn tiny_sdxl_on(device: Device) -> Case {
    let config = UNetConfig::tiny_sdxl();
    let base = VarStore::new(device);
    let unet = UNet2DConditionModel::new(&base.root(), &config);
    let file = TensorFile::open(fixture(
        "tiny-sdxl/unet/diffusion_pytorch_model.safetensors",
    ))
    .unwrap();
    assert!(
        load_into(&base, &[file], str::to_owned)
            .unwrap()
            .is_complete()
    );
    let io = TensorFile::open(fixture("tiny-sdxl-unet-io.safetensors")).unwrap();
    Case {
        config,
        unet,
        base,
        io,
    }
}

impl Case {
    fn get(&self, key: &str) -> Tensor {
        let device = self.base.device();
        self.io.tensor(key, device, None).unwrap()
    }

    /// kohya's LoCon with adapter dropout 0.5, B made non-zero so that the masks reach the output
    /// and every gradient, in training mode; returns the adapter store.
    /// The adapters draw their values and masks from the returned generator.
    fn with_dropout(&mut self) -> (VarStore, Arc<Generator>) {
        let device = self.base.device();
        let generator = Arc::new(Generator::on(device, 2).unwrap());
        let randomness = Arc::new(Seeded(generator.clone()));
        let store = VarStore::new(device);
        let mut config = kohya_locon(4);
        config.dropout = 0.5;
        lora::inject_with(
            &mut self.unet,
            &store.root(),
            "default",
            &config,
            &*randomness,
        )
        .unwrap();
        for (_, tensor) in store.variables() {
            let drawn = generator
                .randn_on_device(&tensor.size(), tensor.kind())
                .unwrap();
            tch::no_grad(|| tensor.shallow_clone().copy_(&(drawn * 0.1)));
        }
        lora::set_training(&mut self.unet, true);
        lora::set_randomness(&mut self.unet, Some(randomness));
        (store, generator)
    }
}

/// kohya's LoCon at network dim 4 / alpha 1 and conv dim 2 / conv alpha 1.
fn kohya_locon(rank: i64) -> LoraConfig {
    let targets: Vec<&str> = lora::UNET_TRANSFORMER_TARGETS
        .iter()
        .chain(&lora::UNET_RESNET_TARGETS)
        .copied()
        .collect();
    let mut config = LoraConfig::with_targets(rank, &targets);
    config.alpha = 1.0;
    config.conv_rank = Some(2);
    config.conv_alpha = Some(1.0);
    config
}

#[test]
fn kohya_locon_set_covers_resnets_samplers_and_transformers_only() {
    let mut case = tiny_sdxl();
    let store = VarStore::new(Device::Cpu);
    let report = lora::inject(&mut case.unet, &store.root(), "default", &kohya_locon(4)).unwrap();
    assert!(report.unmatched_targets.is_empty(), "{report}");
    let adapted: BTreeMap<String, (i64, f64)> = report
        .adapted
        .iter()
        .map(|(p, r, a)| (p.clone(), (*r, *a)))
        .collect();
    // What kohya's rule gives, worked out from the weights alone.
    let mut expected = BTreeMap::new();
    for (key, weight) in case.base.variables() {
        let Some(module) = key.strip_suffix(".weight") else {
            continue;
        };
        let in_block = module.contains(".resnets.")
            || module.contains(".attentions.")
            || module.contains("samplers.");
        match weight.size().as_slice() {
            [_, _] if in_block => expected.insert(module.to_owned(), (4, 1.0)),
            [_, _, 1, 1] if in_block => expected.insert(module.to_owned(), (4, 1.0)),
            [_, _, 3, 3] if in_block => expected.insert(module.to_owned(), (2, 1.0)),
            _ => None,
        };
    }
    assert_eq!(adapted, expected);
    for module in [
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.0.downsamplers.0.conv",
        "up_blocks.1.upsamplers.0.conv",
        "mid_block.resnets.1.time_emb_proj",
        "mid_block.attentions.0.proj_in",
        "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    ] {
        assert!(adapted.contains_key(module), "{module}");
    }
    for module in [
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "add_embedding.linear_2",
    ] {
        assert!(!adapted.contains_key(module), "{module}");
    }
    assert_eq!(
        store.variables()["down_blocks.0.resnets.0.conv2.lora_A.weight"].size(),
        [2, 16, 3, 3]
    );

    // Written as kohya's trainer names them (SGM blocks) and read back onto the same layers.
    for (_, tensor) in store.variables() {
        tch::no_grad(|| tensor.shallow_clone().copy_(&tensor.randn_like()));
    }
    let mut state = LoraState::new();
    state
        .extract(&mut case.unet, Component::Unet, "default")
        .unwrap();
    let renames = BlockRenames::new(sgm_unet_table(&case.config));
    let path = std::env::temp_dir().join(format!("locon-unet-{}.safetensors", std::process::id()));
    let options = WriteOptions::default().with_block_renames(Some(&renames));
    format::write(&path, &state, Format::Kohya, &options).unwrap();
    let keys: Vec<String> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for key in [
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",
        "lora_unet_input_blocks_1_0_out_layers_3.lora_up.weight",
        "lora_unet_input_blocks_1_0_emb_layers_1.alpha",
        "lora_unet_input_blocks_3_0_op.lora_down.weight",
        "lora_unet_input_blocks_4_0_skip_connection.lora_down.weight",
        "lora_unet_output_blocks_2_2_conv.lora_up.weight",
        "lora_unet_middle_block_1_proj_in.lora_down.weight",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing");
    }
    let mut names = ModuleNames::new();
    names.add_model(Component::Unet, &mut case.unet);
    let read = ReadOptions::default()
        .with_module_names(Some(&names))
        .with_block_renames(Some(&renames));
    let back = format::read(&path, read).unwrap().state;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(back.modules.len(), state.modules.len());
    for (key, module) in &state.modules {
        let other = &back.modules[key];
        assert!(
            module.down.equal(&other.down) && module.up.equal(&other.up),
            "{key:?}"
        );
        assert_eq!(module.alpha, other.alpha);
    }
}

#[test]
fn checkpointed_gradients_with_lora_dropout_equal_plain_ones() {
    let mut case = tiny_sdxl();
    let (_store, generator) = case.with_dropout();
    let (sample, t, ctx, text, ids) = (
        case.get("sample"),
        case.get("timesteps"),
        case.get("encoder_hidden_states"),
        case.get("text_embeds"),
        case.get("time_ids"),
    );
    let inputs = UNetInputs {
        sample: &sample,
        timesteps: &t,
        encoder_hidden_states: &ctx,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    let weighting = Tensor::randn(sample.size(), (Kind::Float, Device::Cpu));
    let params = lora::trainable_variables(&mut case.unet);
    let grads = || -> Vec<Tensor> { params.values().map(|p| p.grad().copy()).collect() };
    let zero = || {
        for p in params.values() {
            let _ = p.grad().zero_();
        }
    };

    generator.manual_seed(11).unwrap();
    let plain = case.unet.forward(&inputs).unwrap();
    (&plain * &weighting).sum(Kind::Float).backward();
    let plain_grads = grads();
    zero();
    // Another draw of the masks changes the output: dropout is on.
    generator.manual_seed(12).unwrap();
    let other = tch::no_grad(|| case.unet.forward(&inputs)).unwrap();
    assert!(rel(&other, &plain) > 1e-2);

    generator.manual_seed(11).unwrap();
    let checkpointed = case
        .unet
        .forward_checkpointed_drawing_from(&inputs, Some(generator.clone()))
        .unwrap();
    let depth = unet_depth(&unet_shape(&case.config, &sample, &ctx));
    check(
        "checkpointed output with dropout vs plain",
        rel(checkpointed.output(), &plain),
        f32_bound(depth),
    );
    checkpointed.backward(&weighting).unwrap();
    // What the generator draws next (the next step's noise), checked last.
    let after_backward = generator.uniform(&[8], 0.0, 1.0, Kind::Float).unwrap();
    let mut checked = 0;
    for ((name, _), (ckpt, plain)) in params.iter().zip(grads().iter().zip(&plain_grads)) {
        check(
            &format!("checkpointed d loss / d {name} with dropout vs plain"),
            rel(ckpt, plain),
            f32_bound(2.0 * depth),
        );
        checked += 1;
    }
    assert!(checked > 100, "{checked}");
    // The backward leaves the generator where the forward pass left it.
    generator.manual_seed(11).unwrap();
    let _ = tch::no_grad(|| case.unet.forward(&inputs)).unwrap();
    let next = generator.uniform(&[8], 0.0, 1.0, Kind::Float).unwrap();
    assert!(next.equal(&after_backward));
}

/// On CUDA, a checkpointed step with adapter dropout captured as a CUDA graph and replayed after
/// re-seeding gives the gradients of an eager plain step from the same seed: inside the graph the
/// recomputation replays the forward pass's masks (`torch_cuda::rng` restores the generator's
/// offset within the graph) — the generator being the adapters' own, registered with the graph.
#[test]
fn checkpointed_dropout_gradients_replay_inside_a_cuda_graph() {
    if !test_support::cuda() {
        return;
    }
    torch_cuda::set_allow_tf32(false, false);
    let device = Device::Cuda(0);
    let mut case = tiny_sdxl_on(device);
    let (_store, generator) = case.with_dropout();
    let (sample, t, ctx, text, ids) = (
        case.get("sample"),
        case.get("timesteps"),
        case.get("encoder_hidden_states"),
        case.get("text_embeds"),
        case.get("time_ids"),
    );
    let inputs = UNetInputs {
        sample: &sample,
        timesteps: &t,
        encoder_hidden_states: &ctx,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    let weighting = Tensor::randn(sample.size(), (Kind::Float, device));
    let params = lora::trainable_variables(&mut case.unet);
    let grads = || -> Vec<Tensor> { params.values().map(|p| p.grad().copy()).collect() };
    let zero = || {
        for p in params.values() {
            let _ = p.grad().zero_();
        }
    };
    generator.manual_seed(11).unwrap();
    let plain = case.unet.forward(&inputs).unwrap();
    (&plain * &weighting).sum(Kind::Float).backward();
    let plain_grads = grads();
    // No autograd graph made outside the capture may stay alive into it (its gradient-accumulation
    // nodes would tie the capture stream to the default stream).
    drop(plain);
    // Warm-up (cuBLAS / cuDNN handles, the gradients' storage), then the captured step.
    let step = || {
        let forward = case
            .unet
            .forward_checkpointed_drawing_from(&inputs, Some(generator.clone()))
            .unwrap();
        forward.backward(&weighting).unwrap();
    };
    step();
    zero();
    let (graph, ()) = torch_cuda::CudaGraph::capture_with(
        0,
        None,
        torch_cuda::CaptureMode::Global,
        &[&generator],
        step,
    )
    .unwrap();
    let depth = unet_depth(&unet_shape(&case.config, &sample, &ctx));
    for replay in 0..2 {
        zero();
        generator.manual_seed(11).unwrap();
        graph.replay().unwrap();
        tch::Cuda::synchronize(0);
        for ((name, _), (graphed, plain)) in params.iter().zip(grads().iter().zip(&plain_grads)) {
            check(
                &format!("replay {replay}: graphed checkpointed d loss / d {name} vs eager plain"),
                rel(graphed, plain),
                f32_bound(2.0 * depth),
            );
        }
    }
    // Another seed, other masks: the graph does not replay fixed draws.
    zero();
    generator.manual_seed(12).unwrap();
    graph.replay().unwrap();
    let other = params.values().next().unwrap().grad();
    assert!(rel(&other, &plain_grads[0]) > 1e-3);
}
