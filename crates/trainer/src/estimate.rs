//! The memory and time a run will need on a CUDA device, printed before step 1.
//!
//! A model, not a measurement: resident weights are counted exactly (parameters × bytes), while
//! activation memory and step time are scaled from the trainer's own runs of the seed recipe (SDXL
//! base at 512 px, batch 2 × accumulation 2, bf16, rank-4 LoRA). The constants below are fitted to the
//! time and peak per optimizer step that docs/BENCHMARKS.md records for them: eager in call K and
//! eager with gradient checkpointing in call M ("GPU runs of 2026-12-01, second session"); the
//! checkpointed eager peak and CUDA graphs with and without checkpointing in call P ("third
//! session"). The graphs' time is the GPU's own work; eager adds per-operation host overhead, which
//! does not grow with the batch; the graphs' memory pool holds a little more than an eager step.
//! Activations and GPU time scale with batch × latent area and, for other UNets, with the parameter
//! count relative to SDXL's (crude, but right for SDXL-shaped models; at 1024 px batch 1 the time
//! comes out high against the 1024 px rows of calls M and Q, since the per-kernel cost does not
//! scale).

use std::fmt;

use crate::config::OptimizerKind;

/// SDXL base UNet parameters (the calibration model).
const SDXL_UNET_PARAMS: f64 = 2_567_463_684.0;
/// Samples × latent pixels of the calibration step (batch 2 at 64 × 64 latents).
const CALIBRATION_PIXELS: f64 = 2.0 * 64.0 * 64.0;
const GIB: f64 = (1u64 << 30) as f64;

/// Measured eager activation peak above the resident weights and the trainable state, GiB, plain and
/// checkpointed.
const ACTIVATIONS_GIB: [f64; 2] = [7.81 - 4.78 - 0.054, 5.29 - 4.78 - 0.054];
/// What the CUDA graphs' memory pool holds beyond an eager step, GiB, plain and checkpointed.
const GRAPH_POOL_GIB: [f64; 2] = [0.06, 0.01];
/// Host overhead per eager micro-step, s (does not scale), plain and checkpointed.
const HOST_SECONDS: [f64; 2] = [0.202, 0.435];
/// GPU work per micro-step at the calibration size, s, plain and checkpointed.
const GPU_SECONDS: [f64; 2] = [0.0474, 0.073];
/// One 8-bit AdamW step (with clipping) over SDXL rank-4 LoRA parameters, s.
const OPTIMIZER_SECONDS: f64 = 0.008;

/// What an optimizer step costs beyond 8-bit AdamW's, s per LoRA parameter tensor: the step time of
/// the seed recipe with CUDA graphs on an H100 (docs/BENCHMARKS.md, "Optimizers, fp16 and EMA
/// (H100)": 1,120 tensors) less 8-bit AdamW's, per tensor. AdamW steps flat buffers; Lion,
/// Lion8bit, Prodigy and Adafactor run their kernels tensor by tensor, so their cost grows with the
/// tensor count. Eager steps add host time per operation on top (not modelled).
pub fn optimizer_seconds_per_tensor(kind: OptimizerKind) -> f64 {
    match kind {
        OptimizerKind::AdamW | OptimizerKind::AdamW8bit => 0.0,
        // (0.1300 − 0.1045) s / 1120
        OptimizerKind::Lion => 22.8e-6,
        // (0.1765 − 0.1045) s / 1120
        OptimizerKind::Lion8bit => 64.3e-6,
        // (0.1840 − 0.1045) s / 1120
        OptimizerKind::Prodigy => 71.0e-6,
        // (0.1849 − 0.1045) s / 1120 with the relative step (60.4e-6 without)
        OptimizerKind::Adafactor => 71.8e-6,
    }
}

/// What the estimate is computed from.
#[derive(Debug, Clone, Copy)]
pub struct EstimateInput {
    /// UNet parameters.
    pub unet_params: i64,
    /// Bytes per UNet weight in the compute type (2 for bf16, 4 for fp32).
    pub weight_bytes: i64,
    /// Bytes the UNet's weights occupy as stored (less than `unet_params × weight_bytes` with
    /// `--fp8_base_weights`).
    pub stored_weight_bytes: i64,
    /// Trainable LoRA parameters.
    pub lora_params: i64,
    /// Optimizer state bytes.
    pub optimizer_state_bytes: i64,
    /// Bytes of the `--use_ema` average: one fp32 copy of the trainable parameters (else 0).
    pub ema_bytes: i64,
    /// Seconds the optimizer's step takes beyond 8-bit AdamW's ([`optimizer_seconds_per_tensor`]
    /// × the LoRA's parameter tensors).
    pub optimizer_extra_seconds: f64,
    /// Samples per micro-step.
    pub batch: i64,
    /// Latent height × width.
    pub latent_pixels: i64,
    /// Micro-steps per optimizer step.
    pub accumulation: i64,
    /// Optimizer steps still to run.
    pub steps: u64,
    /// Gradient checkpointing on.
    pub checkpointing: bool,
    /// The step is replayed as CUDA graphs (no per-operation host overhead).
    pub cuda_graph: bool,
    /// fp8-stored linear layers multiply in fp8 (`--fp8_compute`): autograd keeps no widened copy of
    /// their weights, only of the convolutions'.
    pub fp8_products: bool,
    /// Bytes of the text encoders' weights kept on the device (`--train_text_encoder`; else 0).
    pub text_encoder_weight_bytes: i64,
    /// Peak activation bytes of the text encoders in a micro-step ([`text_encoder_activation_bytes`]).
    pub text_encoder_activation_bytes: i64,
}

/// The activations autograd keeps for a text encoder's backward in one micro-step, counted from its
/// shape (not measured): per sample and layer, the 77 tokens' inputs of the two layer norms, the
/// four projections and the attention output (8 × hidden), and of the MLP (3 × intermediate); with
/// checkpointing only each layer's input stays, plus one layer being recomputed.
/// `encoders` are (hidden, intermediate, layers) of each encoder.
pub fn text_encoder_activation_bytes(
    encoders: &[(i64, i64, i64)],
    batch: i64,
    weight_bytes: i64,
    checkpointing: bool,
) -> i64 {
    const TOKENS: i64 = 77;
    encoders
        .iter()
        .map(|&(hidden, intermediate, layers)| {
            let layer = TOKENS * (8 * hidden + 3 * intermediate);
            let kept = if checkpointing {
                TOKENS * hidden * layers + layer
            } else {
                layer * layers
            };
            kept * batch * weight_bytes
        })
        .sum()
}

/// The estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Resident UNet weights (and text encoders, when trained), GiB.
    pub weights_gib: f64,
    /// LoRA parameters, their gradients, the optimizer state and the `--use_ema` average, GiB.
    pub trainable_gib: f64,
    /// Peak activations of a micro-step, GiB.
    pub activations_gib: f64,
    /// Expected peak allocated device memory, GiB.
    pub peak_gib: f64,
    /// Expected seconds per optimizer step (eager).
    pub seconds_per_step: f64,
    /// Expected seconds for the remaining steps.
    pub total_seconds: f64,
}

/// The convolutions' share of the SDXL UNet's quantized weights (51 convolutions 635.6 MiB of
/// 4,894.0 MiB with the 743 linear layers in bf16; docs/BENCHMARKS.md, "generation with fp8 UNet
/// weights"): what autograd still keeps widened under `--fp8_compute`, convolutions always widening.
const CONV_WEIGHT_SHARE: f64 = 635.6 / 4894.0;

/// Estimates memory and time of a CUDA run.
pub fn estimate(input: &EstimateInput) -> Estimate {
    let mode = usize::from(input.checkpointing);
    let size = (input.batch * input.latent_pixels) as f64 / CALIBRATION_PIXELS;
    let model = input.unet_params as f64 / SDXL_UNET_PARAMS;
    let weights_gib = (input.stored_weight_bytes + input.text_encoder_weight_bytes) as f64 / GIB;
    // fp8-stored weights are widened layer by layer; without checkpointing autograd keeps every widened
    // copy for the backward pass. (With checkpointing one segment's copies are alive at a time; that
    // term is not modelled.)
    let widened_gib = if input.stored_weight_bytes < input.unet_params * input.weight_bytes
        && !input.checkpointing
    {
        let widened = if input.fp8_products {
            CONV_WEIGHT_SHARE
        } else {
            1.0
        };
        widened * (input.unet_params * input.weight_bytes) as f64 / GIB
    } else {
        0.0
    };
    // fp32 parameters and gradients, plus the optimizer state and the EMA's copy.
    let trainable_gib =
        (input.lora_params * 8 + input.optimizer_state_bytes + input.ema_bytes) as f64 / GIB;
    // Activations are stored in the weights' type; fp32 doubles them.
    let activations_gib = ACTIVATIONS_GIB[mode] * size * model * (input.weight_bytes as f64 / 2.0)
        + input.text_encoder_activation_bytes as f64 / GIB;
    let graph_gib = if input.cuda_graph {
        GRAPH_POOL_GIB[mode] * size * model
    } else {
        0.0
    };
    let host = if input.cuda_graph {
        0.0
    } else {
        HOST_SECONDS[mode] * model.clamp(0.05, 1.0)
    };
    let micro = host + GPU_SECONDS[mode] * size * model;
    let seconds_per_step =
        micro * input.accumulation as f64 + OPTIMIZER_SECONDS + input.optimizer_extra_seconds;
    Estimate {
        weights_gib,
        trainable_gib,
        activations_gib,
        peak_gib: weights_gib + trainable_gib + activations_gib + widened_gib + graph_gib,
        seconds_per_step,
        total_seconds: seconds_per_step * input.steps as f64,
    }
}

/// The estimate of a sweep ([`crate::sweep`]): the variants' runs `variants` in one process on one
/// loaded model. The weights count once; each variant's LoRA, gradients, optimizer state and
/// the rest of its peak beyond the activations (its CUDA graphs' pool, fp8 widening) count for
/// each; the activations count for the largest variant (the variants' steps run one after
/// another, each freeing its activations before the next); the step times add up.
///
/// `None` for no variant.
pub fn sweep_estimate(variants: &[Estimate]) -> Option<Estimate> {
    let first = variants.first()?;
    let weights_gib = first.weights_gib;
    let trainable_gib = variants.iter().map(|e| e.trainable_gib).sum();
    let activations_gib = variants
        .iter()
        .map(|e| e.activations_gib)
        .fold(0.0, f64::max);
    let others: f64 = variants
        .iter()
        .map(|e| (e.peak_gib - e.weights_gib - e.trainable_gib - e.activations_gib).max(0.0))
        .sum();
    Some(Estimate {
        weights_gib,
        trainable_gib,
        activations_gib,
        peak_gib: weights_gib + trainable_gib + activations_gib + others,
        seconds_per_step: variants.iter().map(|e| e.seconds_per_step).sum(),
        total_seconds: variants.iter().map(|e| e.total_seconds).sum(),
    })
}

/// [`sweep_estimate`] for `--sweep_execution batched`: as the sequential sweep's, but the
/// activations are those of the summed batch (every variant's micro-step in one UNet call: the sum
/// of the variants' activations) rather than the largest variant's. The step time stays the sum of
/// the variants' (the same arithmetic; what one call saves is not measured yet).
///
/// `None` for no variant.
pub fn batched_sweep_estimate(variants: &[Estimate]) -> Option<Estimate> {
    let sequential = sweep_estimate(variants)?;
    let activations_gib: f64 = variants.iter().map(|e| e.activations_gib).sum();
    Some(Estimate {
        activations_gib,
        peak_gib: sequential.peak_gib - sequential.activations_gib + activations_gib,
        ..sequential
    })
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let minutes = self.total_seconds / 60.0;
        write!(
            f,
            "estimated peak GPU memory {:.2} GiB (weights {:.2}, LoRA + optimizer {:.3}, activations {:.2}); \
             about {:.2} s per optimizer step, {:.0} min in all (calibrated on an H200)",
            self.peak_gib,
            self.weights_gib,
            self.trainable_gib,
            self.activations_gib,
            self.seconds_per_step,
            minutes
        )
    }
}

/// One optimizer's line of the comparison printed with the estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerRow {
    /// The optimizer as `--optimizer` names it.
    pub name: &'static str,
    /// Its per-parameter state for this run's LoRA, bytes.
    pub state_bytes: i64,
    /// The run's estimated peak with this optimizer, GiB.
    pub peak_gib: f64,
    /// The run's estimated seconds per optimizer step with this optimizer.
    pub seconds_per_step: f64,
    /// Whether the run uses it.
    pub chosen: bool,
}

/// The state memory and step time of each optimizer for this run's LoRA, the chosen one marked:
/// what switching `--optimizer` would change in the estimate (the state, and the optimizer step's
/// own time, [`optimizer_seconds_per_tensor`]).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerTable {
    /// LoRA parameters the optimizers update.
    pub lora_params: i64,
    /// One row per optimizer.
    pub rows: Vec<OptimizerRow>,
}

impl OptimizerTable {
    /// Rows for `choices` (name, state bytes, extra step seconds, chosen), each with the peak and
    /// step time of `input` holding that state and taking that time instead of
    /// `input.optimizer_state_bytes` and `input.optimizer_extra_seconds`.
    pub fn new(input: &EstimateInput, choices: &[(&'static str, i64, f64, bool)]) -> Self {
        let rows = choices
            .iter()
            .map(|&(name, state_bytes, extra_seconds, chosen)| {
                let e = estimate(&EstimateInput {
                    optimizer_state_bytes: state_bytes,
                    optimizer_extra_seconds: extra_seconds,
                    ..*input
                });
                OptimizerRow {
                    name,
                    state_bytes,
                    peak_gib: e.peak_gib,
                    seconds_per_step: e.seconds_per_step,
                    chosen,
                }
            })
            .collect();
        Self {
            lora_params: input.lora_params,
            rows,
        }
    }
}

impl fmt::Display for OptimizerTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "optimizer state and step for this LoRA ({:.2} M parameters; * = --optimizer):",
            self.lora_params as f64 / 1e6
        )?;
        for row in &self.rows {
            write!(
                f,
                "\n  {} {:<10} {:>9.2} MiB ({:.2} bytes/parameter), estimated peak {:.2} GiB, {:.2} s/step",
                if row.chosen { '*' } else { ' ' },
                row.name,
                row.state_bytes as f64 / (1u64 << 20) as f64,
                row.state_bytes as f64 / self.lora_params.max(1) as f64,
                row.peak_gib,
                row.seconds_per_step
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// K variants: the weights once, K LoRA-and-optimizer states and graph pools, one set of
    /// activations, K step times.
    #[test]
    fn a_sweep_counts_the_weights_once_and_each_variant_s_state() {
        let small = estimate(&EstimateInput {
            cuda_graph: true,
            ..seed_recipe(false)
        });
        let large = estimate(&EstimateInput {
            cuda_graph: true,
            lora_params: 4 * seed_recipe(false).lora_params,
            batch: 4,
            ..seed_recipe(false)
        });
        assert_eq!(sweep_estimate(&[]), None);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let one = sweep_estimate(&[small]).unwrap();
        assert!(close(one.peak_gib, small.peak_gib) && one.total_seconds == small.total_seconds);
        let sweep = sweep_estimate(&[small, large, small]).unwrap();
        assert_eq!(sweep.weights_gib, small.weights_gib);
        assert!(close(
            sweep.trainable_gib,
            2.0 * small.trainable_gib + large.trainable_gib
        ));
        assert_eq!(sweep.activations_gib, large.activations_gib);
        let pool = |e: &Estimate| e.peak_gib - e.weights_gib - e.trainable_gib - e.activations_gib;
        assert!(pool(&small) > 0.0);
        assert!(close(
            sweep.peak_gib,
            small.weights_gib
                + sweep.trainable_gib
                + large.activations_gib
                + 2.0 * pool(&small)
                + pool(&large)
        ));
        assert!(close(
            sweep.seconds_per_step,
            2.0 * small.seconds_per_step + large.seconds_per_step
        ));
        assert!(sweep.peak_gib < 3.0 * small.peak_gib.max(large.peak_gib));

        // Batched: the activations of the summed batch, the rest as the sequential sweep's.
        let batched = batched_sweep_estimate(&[small, large, small]).unwrap();
        assert!(close(
            batched.activations_gib,
            2.0 * small.activations_gib + large.activations_gib
        ));
        assert!(close(
            batched.peak_gib - sweep.peak_gib,
            2.0 * small.activations_gib
        ));
        assert_eq!(batched.trainable_gib, sweep.trainable_gib);
        assert_eq!(batched_sweep_estimate(&[]), None);
    }

    /// Each row's peak differs from the chosen one's by exactly the difference of their states,
    /// and the table names every optimizer with its bytes per parameter, the chosen one marked.
    #[test]
    fn optimizer_rows_differ_by_their_state() {
        let input = seed_recipe(false);
        let n = input.lora_params;
        let table = OptimizerTable::new(
            &input,
            &[
                ("AdamW", 8 * n, 0.0, false),
                ("AdamW8bit", input.optimizer_state_bytes, 0.0, true),
                ("Lion", 4 * n, 0.0255, false),
            ],
        );
        // Only the optimizer's own time differs between the rows.
        let seconds = estimate(&input).seconds_per_step;
        assert_eq!(table.rows[1].seconds_per_step, seconds);
        assert!((table.rows[2].seconds_per_step - seconds - 0.0255).abs() < 1e-12);
        let chosen = estimate(&input).peak_gib;
        assert_eq!(table.rows[1].peak_gib, chosen);
        let gib_diff = (8 * n - input.optimizer_state_bytes) as f64 / GIB;
        assert!((table.rows[0].peak_gib - chosen - gib_diff).abs() < 1e-12);
        assert!(table.rows[2].peak_gib < table.rows[0].peak_gib);
        let text = table.to_string();
        assert!(text.contains("* AdamW8bit"), "{text}");
        assert!(text.contains("  AdamW      "), "{text}");
        assert!(text.contains("(8.00 bytes/parameter)"), "{text}");
        assert!(text.contains("(4.00 bytes/parameter)"), "{text}");
        assert_eq!(text.lines().count(), 4);
    }

    fn seed_recipe(checkpointing: bool) -> EstimateInput {
        EstimateInput {
            unet_params: SDXL_UNET_PARAMS as i64,
            weight_bytes: 2,
            stored_weight_bytes: 2 * SDXL_UNET_PARAMS as i64,
            lora_params: 5_806_080,
            optimizer_state_bytes: 2 * 5_806_080,
            ema_bytes: 0,
            optimizer_extra_seconds: 0.0,
            batch: 2,
            latent_pixels: 64 * 64,
            accumulation: 2,
            steps: 1200,
            checkpointing,
            cuda_graph: false,
            fp8_products: false,
            text_encoder_weight_bytes: 0,
            text_encoder_activation_bytes: 0,
        }
    }

    /// SDXL's encoders in bf16 (817 M parameters: 123 M CLIP-L, 695 M bigG) add their weights, and
    /// activations that checkpointing shrinks.
    #[test]
    fn trained_text_encoders_count_their_weights_and_activations() {
        let encoders = [(768, 3072, 12), (1280, 5120, 32)];
        let with_text = |checkpointing| {
            let activations = text_encoder_activation_bytes(&encoders, 2, 2, checkpointing);
            estimate(&EstimateInput {
                text_encoder_weight_bytes: 2 * 817_000_000,
                text_encoder_activation_bytes: activations,
                ..seed_recipe(checkpointing)
            })
        };
        for checkpointing in [false, true] {
            let (base, text) = (
                estimate(&seed_recipe(checkpointing)),
                with_text(checkpointing),
            );
            let weights = text.weights_gib - base.weights_gib;
            assert!((weights - 2.0 * 817e6 / GIB).abs() < 1e-9);
            let activations = text.activations_gib - base.activations_gib;
            assert!(activations > 0.0 && activations < 0.4, "{activations}");
        }
        let plain = text_encoder_activation_bytes(&encoders, 2, 2, false);
        assert!(text_encoder_activation_bytes(&encoders, 2, 2, true) * 4 < plain);
    }

    /// `--use_ema` adds one fp32 copy of the trainable parameters to the trainable memory and
    /// the peak, nothing else.
    #[test]
    fn the_ema_counts_one_fp32_copy_of_the_trainable_parameters() {
        let base = seed_recipe(false);
        let plain = estimate(&base);
        let ema = estimate(&EstimateInput {
            ema_bytes: 4 * base.lora_params,
            ..base
        });
        let copy = 4.0 * base.lora_params as f64 / GIB;
        assert!((ema.trainable_gib - plain.trainable_gib - copy).abs() < 1e-12);
        assert!((ema.peak_gib - plain.peak_gib - copy).abs() < 1e-12);
        assert_eq!(ema.activations_gib, plain.activations_gib);
    }

    /// The settings measured in docs/BENCHMARKS.md (calls K, M and P): eager and captured, with
    /// and without checkpointing, and checkpointed with fp8 base weights; the estimate is within 15 % of
    /// each step time and 0.1 GiB of each peak.
    #[test]
    fn agrees_with_the_measured_settings() {
        for (checkpointing, cuda_graph, seconds, peak) in [
            (false, false, 0.507, 7.81),
            (true, false, 1.024, 5.29),
            (false, true, 0.103, 7.87),
            (true, true, 0.154, 5.30),
        ] {
            let e = estimate(&EstimateInput {
                cuda_graph,
                ..seed_recipe(checkpointing)
            });
            assert!(
                (e.seconds_per_step / seconds - 1.0).abs() < 0.15,
                "{checkpointing} {cuda_graph}: {e} vs {seconds} s"
            );
            assert!(
                (e.peak_gib - peak).abs() < 0.1,
                "{checkpointing} {cuda_graph}: {e} vs {peak} GiB"
            );
        }
        // fp8 base weights (stored size: the `unet_fp8 --full` row of docs/BENCHMARKS.md's Results),
        // checkpointed, eager and captured (call P). The widening costs time the model does not count,
        // so only the memory is held to it.
        for (cuda_graph, peak) in [(false, 2.96), (true, 2.97)] {
            let stored = (2.39 * GIB) as i64;
            let e = estimate(&EstimateInput {
                cuda_graph,
                stored_weight_bytes: stored,
                ..seed_recipe(true)
            });
            assert!(
                (e.peak_gib - peak).abs() < 0.1,
                "fp8 {cuda_graph}: {e} vs {peak} GiB"
            );
        }
    }

    #[test]
    fn fp8_storage_counts_its_bytes_and_its_widened_copies_without_checkpointing() {
        let fp8 = |checkpointing| {
            estimate(&EstimateInput {
                stored_weight_bytes: SDXL_UNET_PARAMS as i64,
                ..seed_recipe(checkpointing)
            })
        };
        let (bf16, plain, checkpointed) = (estimate(&seed_recipe(true)), fp8(false), fp8(true));
        assert!((bf16.weights_gib / checkpointed.weights_gib - 2.0).abs() < 1e-9);
        assert!((bf16.peak_gib - checkpointed.peak_gib - bf16.weights_gib / 2.0).abs() < 1e-9);
        assert!(
            plain.peak_gib > estimate(&seed_recipe(false)).peak_gib,
            "widened copies cost more than they save"
        );
        // With fp8 products only the convolutions' widened copies stay: below bf16 without checkpointing.
        let products = estimate(&EstimateInput {
            stored_weight_bytes: SDXL_UNET_PARAMS as i64,
            fp8_products: true,
            ..seed_recipe(false)
        });
        let saved = plain.peak_gib - products.peak_gib;
        assert!(
            (saved - (1.0 - CONV_WEIGHT_SHARE) * bf16.weights_gib).abs() < 1e-9,
            "{saved}"
        );
        assert!(products.peak_gib < estimate(&seed_recipe(false)).peak_gib);
    }

    #[test]
    fn grows_with_batch_and_area_but_not_weights() {
        let base = estimate(&seed_recipe(false));
        let big = estimate(&EstimateInput {
            batch: 4,
            latent_pixels: 128 * 128,
            ..seed_recipe(false)
        });
        assert_eq!(big.weights_gib, base.weights_gib);
        assert!((big.activations_gib / base.activations_gib - 8.0).abs() < 1e-9);
        assert!(big.seconds_per_step > base.seconds_per_step);
    }
}
