//! How much of the GPU a run uses: the model FLOPs of an optimizer step and the model FLOPs
//! utilization (MFU), the FLOPs a step needs ÷ its time ÷ the GPU's peak.
//!
//! The step's FLOPs are the UNet's products counted from its configuration at each micro-step's
//! latent size and batch ([`sdxl_model::unet::flops`]: forward, and the backward autograd runs when only
//! the LoRA trains), summed over the run's micro-steps and divided by its optimizer steps. Recomputation
//! under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs), nor are the text
//! encoders and the VAE. The peak is the vendor's dense bf16 tensor-core figure (without sparsity).

use std::collections::HashMap;

use sdxl_model::unet::{FlopShape, UNetConfig};

use crate::plan::MicroStep;

/// Text tokens the UNet's cross-attention sees (SDXL's two encoders' 77 positions, concatenated in width).
const TEXT_TOKENS: i64 = 77;

/// Published dense bf16 tensor-core peaks, TFLOP/s, by the name CUDA reports (NVIDIA's data sheets:
/// the sparsity figures halved).
pub fn dense_bf16_peak_tflops(device_name: &str) -> Option<f64> {
    let name = device_name.to_ascii_uppercase();
    let has = |part: &str| name.contains(part);
    if has("H100") || has("H200") {
        // SXM parts report as `NVIDIA H100 80GB HBM3` / `NVIDIA H200`; PCIe and NVL cards are slower.
        if has("PCIE") {
            return has("H100").then_some(756.5);
        }
        if has("NVL") {
            return None;
        }
        return Some(989.4);
    }
    if has("A100") {
        return Some(312.0);
    }
    if has("L40S") {
        return Some(362.05);
    }
    None
}

/// The model FLOPs of one optimizer step, averaged over `steps` optimizer steps made of
/// `micro_steps` (each micro-step's batch at its bucket's size), with the LoRA ranks `ranks` holds
/// by UNet module path.
pub fn step_flops(
    unet: &UNetConfig,
    ranks: &HashMap<String, i64>,
    bucket_sizes: &[(u32, u32)],
    micro_steps: &[MicroStep],
    steps: u64,
) -> f64 {
    let rank = |path: &str| ranks.get(path).copied();
    let mut per_shape: HashMap<(i64, u32, u32), f64> = HashMap::new();
    let mut total = 0.0;
    for step in micro_steps {
        let (width, height) = bucket_sizes.get(step.bucket).copied().unwrap_or_default();
        let batch = step.keys.len() as i64;
        total += *per_shape.entry((batch, width, height)).or_insert_with(|| {
            let shape = FlopShape {
                batch,
                height: i64::from(height) / 8,
                width: i64::from(width) / 8,
                text_len: TEXT_TOKENS,
            };
            unet.flops(shape, &rank).training()
        });
    }
    total / steps.max(1) as f64
}

/// A run's step FLOPs and the GPU they ran on.
#[derive(Debug, Clone, PartialEq)]
pub struct Throughput {
    /// Model FLOPs of one optimizer step.
    pub flops_per_step: f64,
    /// The GPU's name and its dense bf16 peak (TFLOP/s) where known.
    pub device: Option<(String, Option<f64>)>,
}

impl Throughput {
    /// Model FLOPs per second at `seconds_per_step`.
    pub fn flops_per_second(&self, seconds_per_step: f64) -> f64 {
        self.flops_per_step / seconds_per_step
    }

    /// The fraction of the GPU's peak at `seconds_per_step`, where the peak is known.
    pub fn mfu(&self, seconds_per_step: f64) -> Option<f64> {
        let peak = self.device.as_ref()?.1?;
        Some(self.flops_per_second(seconds_per_step) / (peak * 1e12))
    }

    /// E.g. `12.56 TFLOP per step (UNet model FLOPs), 120.0 TFLOP/s, MFU 12.1 % of the NVIDIA H100 80GB
    /// HBM3's 989.4 TFLOP/s dense bf16`.
    pub fn describe(&self, seconds_per_step: f64) -> String {
        let mut text = format!(
            "{:.2} TFLOP per step (UNet model FLOPs), {:.1} TFLOP/s",
            self.flops_per_step / 1e12,
            self.flops_per_second(seconds_per_step) / 1e12
        );
        match (&self.device, self.mfu(seconds_per_step)) {
            (Some((name, Some(peak))), Some(mfu)) => text.push_str(&format!(
                ", MFU {:.1} % of the {name}'s {peak:.1} TFLOP/s dense bf16",
                100.0 * mfu
            )),
            (Some((name, None)), _) => {
                text.push_str(&format!(
                    " (no published peak known for the {name}: no MFU)"
                ));
            }
            _ => {}
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use data::SampleKey;

    #[test]
    fn peaks_are_the_data_sheets_for_the_cards_named_and_absent_otherwise() {
        assert_eq!(dense_bf16_peak_tflops("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(dense_bf16_peak_tflops("NVIDIA H200"), Some(989.4));
        assert_eq!(dense_bf16_peak_tflops("NVIDIA H100 PCIe"), Some(756.5));
        assert_eq!(dense_bf16_peak_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(dense_bf16_peak_tflops("NVIDIA H100 NVL"), None);
        assert_eq!(dense_bf16_peak_tflops("NVIDIA GeForce RTX 4090"), None);
    }

    fn micro(bucket: usize, batch: usize) -> MicroStep {
        MicroStep {
            bucket,
            keys: vec![
                SampleKey {
                    seed: 0,
                    step: 0,
                    slot: 0,
                    item: 0
                };
                batch
            ],
            flips: vec![false; batch],
            prompts: vec![String::new(); batch],
            reg: vec![false; batch],
        }
    }

    #[test]
    fn a_step_sums_its_micro_steps_at_their_buckets() {
        let unet = UNetConfig::sdxl_base();
        let ranks: HashMap<String, i64> = [(
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q".to_owned(),
            4,
        )]
        .into();
        let sizes = [(512, 512), (768, 512)];
        let one = |bucket: usize, batch: i64| {
            let (w, h) = sizes[bucket];
            let shape = FlopShape {
                batch,
                height: i64::from(h) / 8,
                width: i64::from(w) / 8,
                text_len: 77,
            };
            unet.flops(shape, &|p: &str| ranks.get(p).copied())
                .training()
        };
        // Two optimizer steps of two micro-steps: three at 512² with batch 2, one at 768×512 with batch 1.
        let steps = [micro(0, 2), micro(0, 2), micro(1, 1), micro(0, 2)];
        let flops = step_flops(&unet, &ranks, &sizes, &steps, 2);
        assert_eq!(flops, (3.0 * one(0, 2) + one(1, 1)) / 2.0);
        let throughput = Throughput {
            flops_per_step: 12.5e12,
            device: Some(("NVIDIA H100 80GB HBM3".into(), Some(989.4))),
        };
        assert!((throughput.mfu(0.1).unwrap() - 125.0 / 989.4).abs() < 1e-12);
        assert!(throughput.describe(0.1).contains("MFU 12.6 %"));
    }
}
