//! Ancestral sampling with noise drawn from libtorch's seeded default CPU generator (through
//! `torch_cuda::portable::randn`, the same numbers on every CPU) reproduces diffusers run with
//! `torch.Generator().manual_seed(11)`.
//!
//! The only test of this binary: the default generator is process-wide, so another test drawing
//! random numbers in parallel would change the sequence.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use common::fixture;

use sdxl_model::schedulers::{SchedulerConfig, SchedulerKind, build};
use sdxl_model::weights::TensorFile;
use tch::Device;

#[test]
fn seeded_default_generator_reproduces_torch_generator_noise() {
    let golden = TensorFile::open(fixture("schedulers.safetensors")).unwrap();
    let get = |key: &str| golden.tensor(key, Device::Cpu, None).unwrap();

    // tch::manual_seed + torch_cuda::portable::randn draws what torch.Generator().manual_seed + torch.randn do.
    tch::manual_seed(11);
    for i in 0..6 {
        let drawn = torch_cuda::portable::randn(&[2, 4, 4, 4]).unwrap();
        assert!(
            drawn.equal(&get(&format!("euler_ancestral/loop/{i}/noise"))),
            "draw {i}"
        );
    }

    // So the ancestral sampler can draw its own noise: diffusers' loop, step by step, with no noise passed.
    let mut scheduler = build(
        SchedulerKind::EulerAncestralDiscrete,
        &SchedulerConfig::sdxl(),
    )
    .unwrap();
    scheduler.set_timesteps(6).unwrap();
    tch::manual_seed(11);
    for i in 0..6 {
        let key = |what: &str| format!("euler_ancestral/loop/{i}/{what}");
        let prev = scheduler
            .step(&get(&key("model_output")), &get(&key("sample")), None)
            .unwrap();
        let expected = get(&key("prev_sample"));
        // One ancestral step on given inputs: about a dozen elementwise operations.
        test_support::check(
            &format!("Euler ancestral step {i} with drawn noise vs diffusers"),
            test_support::max_rel_error(&prev, &expected),
            test_support::f32_bound(18.0),
        );
    }
}
