//! `GenerateOptions::cuda_graph`: the denoising loop's UNet call captured as a CUDA graph after the
//! first step and replayed. Refused off CUDA; on a CUDA machine the latents equal an eager run's
//! (tiny SDXL, fp32; the same kernels on the same inputs).

// Helpers outside #[test] functions unwrap too: a fixture that fails to load should fail the test.
#![allow(clippy::unwrap_used)]

mod common;

use common::fixture;
use sdxl_model::Error;
use sdxl_model::pipeline::{GenerateOptions, Pipeline};
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::vae::Upcast;
use tch::{Device, Tensor};

fn options(cuda_graph: bool, noise: &Tensor) -> GenerateOptions {
    GenerateOptions::default()
        .with_prompts(vec!["a photo of a cat".into()])
        .with_steps(6)
        .with_height(64)
        .with_width(64)
        .with_initial_noise(Some(noise.shallow_clone()))
        .with_cuda_graph(cuda_graph)
}

fn noise() -> Tensor {
    Tensor::from_slice(
        &(0..4 * 16 * 16)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect::<Vec<_>>(),
    )
    .reshape([1, 4, 16, 16]) // 64 px over the tiny VAE's factor of 4
}

#[test]
fn a_cuda_graph_is_refused_off_cuda_naming_the_setting() {
    let pipe = common::tiny_pipeline();
    let error = pipe.latents(&options(true, &noise())).unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidSetting {
                setting: "cuda_graph",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("cuda_graph"), "{error}");
}

#[test]
fn replayed_steps_give_the_eager_latents_on_cuda() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: the replay is checked on the GPU machine (docs/GPU.md)");
        return;
    }
    let load = LoadOptions::default()
        .device(Device::Cuda(0))
        .vae_upcast(Upcast::Never);
    let pipe = Pipeline::from_pretrained(fixture("tiny-sdxl"), &load)
        .unwrap()
        .model;
    let noise = noise();
    let eager = pipe.latents(&options(false, &noise)).unwrap();
    let graphed = pipe.latents(&options(true, &noise)).unwrap();
    let again = pipe.latents(&options(true, &noise)).unwrap();
    assert_eq!(eager.size(), graphed.size());
    let largest = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    assert_eq!(largest(&eager, &graphed), 0.0, "graph vs eager");
    assert_eq!(largest(&graphed, &again), 0.0, "two graphed runs");
    assert!(eager.abs().max().double_value(&[]) > 0.0);
}
