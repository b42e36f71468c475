//! The model being trained: the frozen UNet in the training precision (optionally with fp8 weights)
//! with the LoRA injected in fp32, and, under mixed precision, the LoRA's compute copies.
//!
//! It knows nothing of data sources: it is loaded from the model folder and handed inputs by the step.

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use lora::{Component, LoraConfig, LoraState};
use sdxl_model::attention::AttentionBackend;
use sdxl_model::unet::{UNet2DConditionModel, UNetConfig, UNetWeights, load_unet};

use crate::config::{Attention, TrainConfig};
use crate::logs::say as log;
use crate::model_files::ModelFolder;
use crate::{Error, Result};

/// The adapter name the LoRA is trained under.
pub const ADAPTER: &str = "default";

/// The UNet with its trainable LoRA.
pub struct TrainModel {
    unet: UNet2DConditionModel,
    unet_store: VarStore,
    _lora_store: VarStore,
    params: Vec<(String, Tensor)>,
    /// bf16 copies of the LoRA under mixed precision (cast once per optimizer step, not per use).
    copies: Option<lora::ComputeCopies>,
}

impl std::fmt::Debug for TrainModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainModel")
            .field("lora_parameters", &self.params.len())
            .finish()
    }
}

impl TrainModel {
    /// Loads the UNet of `folder` frozen in `kind`, sets its attention backend and (with
    /// `--fp8_base_weights`) its fp8 weights, and injects the LoRA of `--rank` / `--lora_alpha`
    /// seeded from `--seed`.
    ///
    /// # Errors
    /// Loading and injection errors naming the file or module.
    pub fn load(
        config: &TrainConfig,
        folder: &ModelFolder,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let unet_dir = folder.root.join("unet");
        let unet_config = UNetConfig::from_file(unet_dir.join("config.json"))?;
        let weights = UNetWeights::Diffusers {
            folder: unet_dir,
            variant: folder.variant.clone(),
        };
        let (mut unet_store, mut unet) = load_unet(&unet_config, &weights, device, kind)?;
        unet_store.freeze();
        if config.fp8_base_weights {
            log(format!(
                "linear layers: {}",
                lora::quantize_base_fp8(&mut unet)?
            ));
            log(format!("convolutions: {}", unet.quantize_convs_fp8()?));
            if !config.gradient_checkpointing {
                // Autograd keeps each layer's widened weight for the backward: the UNet's full-precision size.
                log(
                    "note: fp8 base weights save memory in training only with --gradient_checkpointing",
                );
            }
        }
        unet.set_attention_backend(match config.attention {
            Attention::Fused => AttentionBackend::Fused,
            Attention::Sliced => AttentionBackend::Sliced(sdxl_model::attention::SliceSize::Auto),
            Attention::Plain => AttentionBackend::Plain,
        });
        tch::manual_seed(config.seed as i64);
        let lora_store = VarStore::new(device);
        let lora_config = config.lora_config()?;
        let report = lora::inject(&mut unet, &lora_store.root(), ADAPTER, &lora_config)?;
        // Adapter dropout is on while training; validation switches it off around its images.
        lora::set_training(&mut unet, true);
        let copies = compute_copies(&mut unet, kind)?;
        let params: Vec<(String, Tensor)> =
            lora::trainable_variables(&mut unet).into_iter().collect();
        let model = Self {
            unet,
            unet_store,
            _lora_store: lora_store,
            params,
            copies,
        };
        log(lora_summary(
            &lora_config,
            &report,
            model.lora_parameter_count(),
        ));
        Ok(model)
    }

    /// The UNet with the LoRA.
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The trainable LoRA parameters by name (fp32, on the training device).
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Handles sharing the storage of the trainable parameters.
    pub fn param_tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.shallow_clone()).collect()
    }

    /// The compute copies under mixed precision.
    pub fn copies(&self) -> Option<&lora::ComputeCopies> {
        self.copies.as_ref()
    }

    /// Trainable LoRA elements.
    pub fn lora_parameter_count(&self) -> i64 {
        self.params.iter().map(|(_, p)| p.numel() as i64).sum()
    }

    /// The frozen UNet's (elements, bytes as stored).
    pub fn base_size(&self) -> (i64, i64) {
        let variables = self.unet_store.variables();
        let elements = variables.values().map(|v| v.numel() as i64).sum();
        let bytes = variables
            .values()
            .map(|v| (v.numel() * v.kind().elt_size_in_bytes()) as i64)
            .sum();
        (elements, bytes)
    }

    /// Training mode (adapter dropout on) or evaluation mode (off, for validation images).
    pub fn set_training(&mut self, training: bool) {
        lora::set_training(&mut self.unet, training);
    }

    /// Turns the LoRA on or off (the base model's images for the comparison grid).
    ///
    /// # Errors
    /// Adapter errors.
    pub fn set_lora_enabled(&mut self, enabled: bool) -> Result<()> {
        lora::set_enabled(&mut self.unet, ADAPTER, enabled)?;
        Ok(())
    }

    /// The LoRA as a state to write in any format.
    ///
    /// # Errors
    /// Adapter errors.
    pub fn lora_state(&mut self) -> Result<LoraState> {
        let mut state = LoraState::new();
        state.extract(&mut self.unet, Component::Unet, ADAPTER)?;
        Ok(state)
    }

    /// Fails if a LoRA parameter is not finite (a host read; only at save points).
    ///
    /// # Errors
    /// [`Error::NonFiniteLora`] naming `what` and the parameter.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        for (name, param) in &self.params {
            if !bool::try_from(param.isfinite().all())? {
                return Err(Error::NonFiniteLora {
                    what: what.to_owned(),
                    parameter: name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Copies saved parameters (by name) into the trainable ones and refreshes the compute copies.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming `path` and the missing or misshapen parameter.
    pub fn load_params(&mut self, saved: &[(String, Tensor)], path: &Path) -> Result<()> {
        let problem = |problem: String| Error::Checkpoint {
            path: path.to_owned(),
            problem,
        };
        tch::no_grad(|| -> Result<()> {
            for (name, param) in &mut self.params {
                let value = saved
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| {
                        problem(format!("has no `{name}` (another --rank or model?)"))
                    })?;
                if value.size() != param.size() {
                    return Err(problem(format!(
                        "`{name}` has shape {:?}, the model needs {:?}",
                        value.size(),
                        param.size()
                    )));
                }
                param.f_copy_(value)?;
            }
            Ok(())
        })?;
        if let Some(copies) = &self.copies {
            copies.refresh()?;
        }
        Ok(())
    }
}

/// With mixed precision the LoRA computes as peft does under accelerate's autocast (bf16 products,
/// fp32 weights and gradients), which is what diffusers' script trains with. The products read
/// copies in `kind` refreshed after each optimizer step; the masters and their gradients stay fp32
/// (same values as casting in every use, fewer kernels).
fn compute_copies(
    unet: &mut UNet2DConditionModel,
    kind: Kind,
) -> Result<Option<lora::ComputeCopies>> {
    lora::set_compute_kind(unet, ADAPTER, (kind != Kind::Float).then_some(kind))?;
    if kind == Kind::Float {
        return Ok(None);
    }
    let copies = lora::ComputeCopies::new(unet, ADAPTER)?;
    if let Some(copies) = &copies {
        log(format!(
            "LoRA computes from {:?} copies in {} groups",
            copies.kind(),
            copies.groups()
        ));
    }
    Ok(copies)
}

/// What was adapted, for the log: the variant, the layer count by rank and alpha, the targets.
fn lora_summary(config: &LoraConfig, report: &lora::InjectionReport, parameters: i64) -> String {
    let variant = match (config.use_dora, config.use_rslora) {
        (true, true) => "DoRA (rsLoRA scaling)",
        (true, false) => "DoRA",
        (false, true) => "LoRA (rsLoRA scaling)",
        (false, false) => "LoRA",
    };
    let mut groups: Vec<(i64, f64, usize)> = Vec::new();
    for (_, rank, alpha) in &report.adapted {
        match groups.iter_mut().find(|(r, a, _)| r == rank && a == alpha) {
            Some(group) => group.2 += 1,
            None => groups.push((*rank, *alpha, 1)),
        }
    }
    let groups: Vec<String> = groups
        .iter()
        .map(|(rank, alpha, count)| format!("{count} at rank {rank} alpha {alpha}"))
        .collect();
    let mut line = format!(
        "{variant} on {} layers ({}), targets {}, dropout {}: {parameters} trainable parameters",
        report.adapted.len(),
        groups.join(", "),
        config.targets.join(","),
        config.dropout
    );
    if !report.unmatched_targets.is_empty() {
        line.push_str(&format!(
            "; targets that matched no layer: {}",
            report.unmatched_targets.join(",")
        ));
    }
    line
}
