//! Optimizer-state memory per parameter, measured on the tensors the optimizer really holds.
//!
//! For the seed's LoRA (rank 4 on the 560 attention projections of the SDXL UNet, 5.81 M
//! parameters): every tensor of width 1280 or 2048 has ≥ 4096 elements and gets 8-bit states,
//! 2 bytes of codes per element plus two fp32 absmax per 256 elements (2.031 bytes); the 2,560-element
//! tensors of the width-640 blocks stay fp32 (8 bytes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use optim8bit::{AdamW, AdamWConfig, Lion, LionConfig, ParamGroup};
use support::seed_lora_shapes;
use tch::{Device, Kind, Tensor};

fn bytes_for(shapes: &[Vec<i64>], config: AdamWConfig) -> (i64, i64) {
    let params: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu)))
        .collect();
    let optimizer = AdamW::new(vec![ParamGroup::new(params, 1e-4, 1e-2)], config).unwrap();
    (optimizer.state_bytes(), optimizer.param_count())
}

#[test]
fn seed_lora_state_is_about_two_bytes_per_parameter() {
    let shapes = seed_lora_shapes();
    let (bytes, params) = bytes_for(&shapes, AdamWConfig::eight_bit());
    let (fp32_bytes, _) = bytes_for(&shapes, AdamWConfig::fp32());
    assert_eq!(shapes.len(), 1120);
    assert_eq!(params, 5_806_080);

    // What the layout implies, computed from the shapes alone.
    let numel = |s: &Vec<i64>| s.iter().product::<i64>();
    let (small, large): (Vec<_>, Vec<_>) = shapes.iter().partition(|s| numel(s) < 4096);
    let large_numel: i64 = large.iter().map(|s| numel(s)).sum();
    let blocks: i64 = large.iter().map(|s| (numel(s) + 255) / 256).sum();
    let small_numel: i64 = small.iter().map(|s| numel(s)).sum();
    assert_eq!(bytes, 2 * large_numel + 2 * 4 * blocks + 8 * small_numel);

    let per_param = bytes as f64 / params as f64;
    let large_per_param = (2 * large_numel + 8 * blocks) as f64 / large_numel as f64;
    println!("seed LoRA: {params} parameters in {} tensors", shapes.len());
    println!("  8-bit AdamW state: {bytes} bytes = {per_param:.3} bytes/param");
    println!(
        "    {large_numel} params in 8-bit tensors: {large_per_param:.4} bytes/param (2 + 8/256)"
    );
    println!("    {small_numel} params in tensors under min_8bit_size: 8 bytes/param (fp32)");
    println!(
        "  fp32 AdamW state:  {fp32_bytes} bytes = {:.3} bytes/param",
        fp32_bytes as f64 / params as f64
    );
    assert!((large_per_param - 2.03125).abs() < 1e-9);
    assert_eq!(fp32_bytes, 8 * params);
    assert!(per_param < 2.5, "{per_param}");
}

/// Lion8bit on the seed's LoRA: one momentum, so 1 byte of codes per element plus one fp32 absmax
/// per 256 elements (1.016 bytes) in the tensors of ≥ 4096 elements, 4 bytes below.
#[test]
fn seed_lora_lion8bit_state_is_about_one_byte_per_parameter() {
    let shapes = seed_lora_shapes();
    let bytes_for = |config: LionConfig| {
        let params: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu)))
            .collect();
        Lion::new(vec![ParamGroup::new(params, 1e-4, 1e-2)], config)
            .unwrap()
            .state_bytes()
    };
    let (bytes, fp32_bytes) = (
        bytes_for(LionConfig::eight_bit()),
        bytes_for(LionConfig::fp32()),
    );
    let numel = |s: &Vec<i64>| s.iter().product::<i64>();
    let (small, large): (Vec<_>, Vec<_>) = shapes.iter().partition(|s| numel(s) < 4096);
    let large_numel: i64 = large.iter().map(|s| numel(s)).sum();
    let blocks: i64 = large.iter().map(|s| (numel(s) + 255) / 256).sum();
    let small_numel: i64 = small.iter().map(|s| numel(s)).sum();
    assert_eq!(bytes, large_numel + 4 * blocks + 4 * small_numel);
    let params = large_numel + small_numel;
    assert_eq!(fp32_bytes, 4 * params);
    let per_param = bytes as f64 / params as f64;
    println!(
        "  Lion8bit state: {bytes} bytes = {per_param:.3} bytes/param; fp32 Lion: 4 bytes/param"
    );
    assert!(per_param < 1.25, "{per_param}");
}
