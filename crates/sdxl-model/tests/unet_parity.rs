//! UNet-XL against diffusers: the tiny fixture UNets (random perturbed weights, made by
//! `tools/fixtures/generate.py`) must reproduce diffusers' outputs with every attention backend, and
//! checkpointed gradients must equal plain ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use common::depth::unet_shape;
use common::{fixture, rel};
use test_support::{check, f32_bound, unet_depth};

use sdxl_model::attention::{AttentionBackend, SliceSize};
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};
use sdxl_model::weights::{TensorFile, load_into};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

struct Case {
    config: UNetConfig,
    vs: VarStore,
    unet: UNet2DConditionModel,
    io: TensorFile,
}

fn load(folder: &str, io: &str, config: UNetConfig) -> Case {
    let dir = fixture(folder);
    assert_eq!(
        UNetConfig::from_file(dir.join("config.json")).unwrap(),
        config
    );
    let vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(&vs.root(), &config);
    let file = TensorFile::open(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let report = load_into(&vs, &[file], str::to_owned).unwrap();
    assert!(report.is_complete() && report.loaded > 0);
    Case {
        config,
        vs,
        unet,
        io: TensorFile::open(fixture(io)).unwrap(),
    }
}

impl Case {
    fn get(&self, key: &str) -> Tensor {
        self.io.tensor(key, Device::Cpu, None).unwrap()
    }

    fn run(&self) -> Tensor {
        let (sample, t, ctx, text, ids) = (
            self.get("sample"),
            self.get("timesteps"),
            self.get("encoder_hidden_states"),
            self.get("text_embeds"),
            self.get("time_ids"),
        );
        let inputs = UNetInputs {
            sample: &sample,
            timesteps: &t,
            encoder_hidden_states: &ctx,
            text_embeds: Some(&text),
            time_ids: Some(&ids),
        };
        tch::no_grad(|| self.unet.forward(&inputs)).unwrap()
    }
}

impl Case {
    /// The depth of this UNet's forward pass on the fixture's inputs (`test_support::unet_depth`).
    fn depth(&self) -> f64 {
        unet_depth(&unet_shape(
            &self.config,
            &self.get("sample"),
            &self.get("encoder_hidden_states"),
        ))
    }
}

fn check_parity(mut case: Case, name: &str) {
    let expected = case.get("out");
    // float32 roundings along the UNet's longest path (docs/NUMERICS.md).
    let bound = f32_bound(case.depth());
    for backend in [
        AttentionBackend::Fused,
        AttentionBackend::Plain,
        AttentionBackend::Sliced(SliceSize::Auto),
        AttentionBackend::Sliced(SliceSize::Max),
        AttentionBackend::Sliced(SliceSize::Rows(3)),
    ] {
        case.unet.set_attention_backend(backend);
        check(
            &format!("{name} UNet {backend:?} vs diffusers"),
            rel(&case.run(), &expected),
            bound,
        );
    }
    let _ = &case.vs;
}

#[test]
fn tiny_sdxl_matches_diffusers_with_every_backend() {
    check_parity(
        load(
            "tiny-sdxl/unet",
            "tiny-sdxl-unet-io.safetensors",
            UNetConfig::tiny_sdxl(),
        ),
        "tiny-sdxl",
    );
}

#[test]
fn unet_tiny_b_matches_diffusers_with_every_backend() {
    check_parity(
        load(
            "unet-tiny-b",
            "unet-tiny-b-io.safetensors",
            UNetConfig::tiny_b(),
        ),
        "unet-tiny-b",
    );
}

#[test]
fn checkpointed_gradients_equal_plain_gradients() {
    let case = load(
        "tiny-sdxl/unet",
        "tiny-sdxl-unet-io.safetensors",
        UNetConfig::tiny_sdxl(),
    );
    let sample = case.get("sample").set_requires_grad(true);
    let context = case.get("encoder_hidden_states").set_requires_grad(true);
    let (t, text, ids) = (
        case.get("timesteps"),
        case.get("text_embeds"),
        case.get("time_ids"),
    );
    let inputs = UNetInputs {
        sample: &sample,
        timesteps: &t,
        encoder_hidden_states: &context,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    tch::manual_seed(5);
    let weighting = Tensor::randn(sample.size(), (Kind::Float, Device::Cpu));
    let watched = [
        "conv_in.weight",
        "add_embedding.linear_1.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj.weight",
        "mid_block.resnets.0.conv1.weight",
        "up_blocks.0.attentions.2.proj_out.weight",
        "up_blocks.2.resnets.2.time_emb_proj.weight",
        "conv_out.bias",
    ];
    let variables = case.vs.variables();
    let grads_of = |names: &[&str]| -> Vec<Tensor> {
        names.iter().map(|n| variables[*n].grad().copy()).collect()
    };
    let zero_grads = || {
        for var in variables.values() {
            let mut grad = var.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    };

    // Plain: one autograd graph over the whole UNet.
    let out = case.unet.forward(&inputs).unwrap();
    (&out * &weighting).sum(Kind::Float).backward();
    let plain_weights = grads_of(&watched);
    let (plain_sample, plain_context) = (sample.grad().copy(), context.grad().copy());
    zero_grads();

    // Checkpointed: no graph in the forward pass; the backward recomputes block by block.
    let checkpointed = case.unet.forward_checkpointed(&inputs).unwrap();
    assert!(!checkpointed.output().requires_grad());
    // The same kernels on the same inputs: the recomputation may only reorder roundings.
    let forward_bound = f32_bound(case.depth());
    check(
        "checkpointed UNet output vs plain",
        rel(checkpointed.output(), &out),
        forward_bound,
    );
    // A gradient passes through the forward pass and back: twice its depth.
    let backward_bound = f32_bound(2.0 * case.depth());
    let grads = checkpointed.backward(&weighting).unwrap();
    let ckpt_weights = grads_of(&watched);
    for (name, (ckpt, plain)) in watched.iter().zip(ckpt_weights.iter().zip(&plain_weights)) {
        check(
            &format!("checkpointed d loss / d {name} vs plain"),
            rel(ckpt, plain),
            backward_bound,
        );
    }
    for (name, ckpt, plain) in [
        ("sample", grads.sample, plain_sample),
        (
            "encoder_hidden_states",
            grads.encoder_hidden_states,
            plain_context,
        ),
    ] {
        check(
            &format!("checkpointed d loss / d {name} vs plain"),
            rel(&ckpt.unwrap(), &plain),
            backward_bound,
        );
    }
    assert!(grads.text_embeds.is_some() && grads.time_ids.is_some());
}

#[test]
fn inputs_of_the_wrong_shape_are_errors_naming_the_input() {
    let case = load(
        "unet-tiny-b",
        "unet-tiny-b-io.safetensors",
        UNetConfig::tiny_b(),
    );
    let (sample, t, ctx, text, ids) = (
        case.get("sample"),
        case.get("timesteps"),
        case.get("encoder_hidden_states"),
        case.get("text_embeds"),
        case.get("time_ids"),
    );
    let wide_ctx = Tensor::zeros([3, 5, 32], (Kind::Float, Device::Cpu));
    let short_ids = ids.narrow(1, 0, 5);
    let cases: [(UNetInputs<'_>, &str); 4] = [
        (
            UNetInputs {
                sample: &ctx,
                timesteps: &t,
                encoder_hidden_states: &ctx,
                text_embeds: Some(&text),
                time_ids: Some(&ids),
            },
            "`sample`",
        ),
        (
            UNetInputs {
                sample: &sample,
                timesteps: &t,
                encoder_hidden_states: &wide_ctx,
                text_embeds: Some(&text),
                time_ids: Some(&ids),
            },
            "[3, L, 24]",
        ),
        (
            UNetInputs {
                sample: &sample,
                timesteps: &t,
                encoder_hidden_states: &ctx,
                text_embeds: Some(&text),
                time_ids: Some(&short_ids),
            },
            "`time_ids`",
        ),
        (
            UNetInputs {
                sample: &sample,
                timesteps: &t,
                encoder_hidden_states: &ctx,
                text_embeds: None,
                time_ids: None,
            },
            "missing",
        ),
    ];
    for (inputs, needle) in cases {
        let msg = case.unet.forward(&inputs).unwrap_err().to_string();
        assert!(msg.contains(needle), "{needle} not in: {msg}");
    }
}

/// The full-size SDXL-base UNet (random weights, bf16, ≈ 5 GB): parameter count of the hub model and a
/// complete SGM mapping. Ignored by default for its memory; run with `--ignored` (CUDA when available).
#[test]
#[ignore = "allocates the full 2.6 B-parameter UNet"]
fn sdxl_base_has_the_hub_parameter_count_and_a_complete_sgm_table() {
    let config = UNetConfig::sdxl_base();
    let mut vs = VarStore::new(Device::cuda_if_available());
    vs.set_kind(Kind::BFloat16);
    let unet = tch::no_grad(|| UNet2DConditionModel::new(&vs.root(), &config));
    let variables = vs.variables();
    let params: i64 = variables
        .values()
        .map(Tensor::numel)
        .map(|n| n as i64)
        .sum();
    println!(
        "sdxl_base: {} tensors, {params} parameters",
        variables.len()
    );
    // diffusers' UNet2DConditionModel for stabilityai/stable-diffusion-xl-base-1.0.
    assert_eq!(params, 2_567_463_684);
    let table = sdxl_model::unet::sgm_unet_table(&config);
    let mapped: std::collections::BTreeSet<String> = variables
        .keys()
        .map(|k| {
            sdxl_model::unet::to_sgm(&table, k).unwrap_or_else(|| panic!("{k} has no SGM name"))
        })
        .collect();
    assert_eq!(mapped.len(), variables.len());
    drop(unet);
}

#[test]
fn channels_last_matches_diffusers_and_returns_nchw() {
    let mut case = load(
        "tiny-sdxl/unet",
        "tiny-sdxl-unet-io.safetensors",
        UNetConfig::tiny_sdxl(),
    );
    let expected = case.get("out");
    let nchw = case.run();
    case.unet.set_channels_last(true);
    assert!(case.unet.channels_last());
    // The variable store's kernels are laid out NHWC in place (values unchanged).
    let kernel = &case.vs.variables()["down_blocks.1.resnets.0.conv1.weight"];
    let [o, i, kh, kw] = <[i64; 4]>::try_from(kernel.size()).unwrap();
    assert_eq!(
        kernel.stride(),
        [i * kh * kw, 1, kw * i, i],
        "{o}×{i} kernel"
    );
    let out = case.run();
    assert!(out.is_contiguous(), "the output is not returned NCHW");
    // Another layout changes only the kernels' summation order: the fp32 bound of the parity test.
    let bound = f32_bound(case.depth());
    check(
        "tiny-sdxl UNet channels-last vs diffusers",
        rel(&out, &expected),
        bound,
    );
    check(
        "tiny-sdxl UNet channels-last vs NCHW",
        rel(&out, &nchw),
        bound,
    );
    // Back to NCHW: the kernels are contiguous again and the output is the NCHW model's.
    case.unet.set_channels_last(false);
    assert!(case.vs.variables()["down_blocks.1.resnets.0.conv1.weight"].is_contiguous());
    assert!(case.run().equal(&nchw));
}
