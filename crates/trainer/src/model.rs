//! The model being trained: the frozen UNet in the training precision (optionally with fp8 weights)
//! with the LoRA injected in fp32, and, under mixed precision, the LoRA's compute copies.
//!
//! With `--train_text_encoder` it also holds both text encoders with their LoRA ([`TextEncoders`]).
//!
//! The frozen UNet is a [`SharedUnet`]: a run's own, or one that the variants of a sweep
//! ([`crate::sweep`]) share, each [`TrainModel`] putting its LoRA on it when it is its turn.
//!
//! It knows nothing of data sources: it is loaded from the model folder and handed inputs by the step.

mod text;

pub use text::{CheckpointedText, TextEncoders};

use std::cell::{Ref, RefCell};
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use lora::{Component, LoraConfig, LoraState};
use sdxl_model::attention::AttentionBackend;
use sdxl_model::unet::UNet2DConditionModel;

use crate::config::{Attention, TrainConfig};
use crate::logs::say as log;
use crate::model_files::ModelFolder;
use crate::rng::RunRng;
use crate::{Error, Result};

/// The adapter name the LoRA is trained under.
pub const ADAPTER: &str = "default";

/// The frozen UNet, loaded once, that the LoRA of a run is attached to — or, in a sweep
/// ([`crate::sweep`]), that the LoRA of each variant is attached to in turn (each variant's
/// adapters are called [`ADAPTER`], as in a run of its own, and the others' wait detached).
#[derive(Clone)]
pub struct SharedUnet {
    slot: Rc<RefCell<UnetSlot>>,
}

struct UnetSlot {
    unet: UNet2DConditionModel,
    store: VarStore,
    /// The model whose LoRA is on the UNet now.
    attached: Option<u64>,
    /// The other models' LoRA, detached.
    parked: BTreeMap<u64, lora::DetachedAdapters>,
    /// The id of the next model loaded on this UNet.
    next_id: u64,
}

impl std::fmt::Debug for SharedUnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedUnet").finish_non_exhaustive()
    }
}

/// `--fp8_compute` needs fp8 tensor cores on a CUDA device (compute capability 8.9 or newer) and the
/// shim that holds the differentiable product; the CPU multiplies in fp8 through oneDNN.
fn check_fp8_tensor_cores(device: Device) -> Result<()> {
    if !torch_cuda::shim_compiled() {
        return Err(Error::InvalidOption {
            option: "--fp8_compute",
            problem: "this build has no torch-cuda shim (torch's CUDA headers were not found at \
                      build time), which holds the differentiable fp8 product"
                .into(),
        });
    }
    if let Some(problem) = torch_cuda::fp8::unsupported_device(device) {
        return Err(Error::InvalidOption {
            option: "--fp8_compute",
            problem: format!(
                "{problem}: fp8 products need fp8 tensor cores (compute capability 8.9 or newer: \
                 Ada, Hopper, Blackwell)"
            ),
        });
    }
    Ok(())
}

impl SharedUnet {
    /// Loads the UNet of `folder` frozen in `kind`, with (`--fp8_base_weights`) its fp8 weights
    /// and `--attention`'s backend: what every LoRA trained on it shares.
    ///
    /// # Errors
    /// Loading errors naming the file or module.
    pub fn load(
        config: &TrainConfig,
        folder: &ModelFolder,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let (mut store, mut unet) = folder.load_unet(device, kind)?;
        store.freeze();
        if config.fp8_base_weights {
            log(format!(
                "linear layers: {}",
                lora::quantize_base_fp8(&mut unet)?
            ));
            log(format!("convolutions: {}", unet.quantize_convs_fp8()?));
            if config.fp8_compute {
                check_fp8_tensor_cores(device)?;
                // torch-cuda's product (the shim is checked above): every layer, gradients included.
                let backward = if config.fp8_gradients {
                    torch_cuda::fp8::Backward::Fp8
                } else {
                    torch_cuda::fp8::Backward::Widened
                };
                let layers =
                    lora::set_fp8_products(&mut unet, sdxl_model::unet::fp8_products(backward));
                log(format!(
                    "fp8 products: {layers} linear layers multiply in fp8 (inputs quantized per call; \
                     input gradients {})",
                    if config.fp8_gradients {
                        "in fp8, output gradients quantized to e5m2"
                    } else {
                        "by the widened weights"
                    }
                ));
            } else if !config.gradient_checkpointing {
                // Autograd keeps each layer's widened weight for the backward: the UNet's full-precision size.
                log(
                    "note: fp8 base weights save memory in training only with --gradient_checkpointing",
                );
            }
        }
        if config.channels_last && device.is_cuda() {
            unet.set_channels_last(true);
        }
        unet.set_attention_backend(match config.attention {
            Attention::Fused => AttentionBackend::Fused,
            Attention::Flash => AttentionBackend::Flash,
            Attention::Cudnn => AttentionBackend::Cudnn,
            Attention::Sliced => AttentionBackend::Sliced(sdxl_model::attention::SliceSize::Auto),
            Attention::Plain => AttentionBackend::Plain,
        });
        Ok(Self {
            slot: Rc::new(RefCell::new(UnetSlot {
                unet,
                store,
                attached: None,
                parked: BTreeMap::new(),
                next_id: 0,
            })),
        })
    }

    /// Detaches the LoRA on the UNet now (if any), keeping it for its model.
    fn park(&self) -> Result<()> {
        let mut slot = self.slot.borrow_mut();
        if let Some(owner) = slot.attached.take() {
            let detached = lora::detach(&mut slot.unet, ADAPTER)?;
            slot.parked.insert(owner, detached);
        }
        Ok(())
    }
}

/// The UNet with its trainable LoRA (and the text encoders with theirs, when trained).
pub struct TrainModel {
    base: SharedUnet,
    /// Which of the LoRA trained on `base` is this model's.
    id: u64,
    _lora_store: VarStore,
    /// Every LoRA parameter: the UNet's, then the text encoders' (`text_encoder.…`).
    params: Vec<(String, Tensor)>,
    /// The UNet's LoRA parameters (the optimizer's first group).
    unet_params: Vec<Tensor>,
    text: Option<TextEncoders>,
    /// bf16 copies of the LoRA under mixed precision (cast once per optimizer step, not per use).
    copies: Option<lora::ComputeCopies>,
    /// The run's generator: the LoRA's initial values, the adapters' dropout and the step's draws.
    rng: Arc<RunRng>,
}

impl std::fmt::Debug for TrainModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainModel")
            .field("lora_parameters", &self.params.len())
            .finish()
    }
}

impl TrainModel {
    /// Loads the UNet of `folder` frozen in `kind` ([`SharedUnet::load`]) and injects the LoRA of
    /// `--rank` / `--lora_alpha` seeded from `--seed`.
    ///
    /// # Errors
    /// Loading and injection errors naming the file or module.
    pub fn load(
        config: &TrainConfig,
        folder: &ModelFolder,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let base = SharedUnet::load(config, folder, device, kind)?;
        Self::load_on(&base, config, folder, (device, kind))
    }

    /// Injects the LoRA of `config` into `base` (detaching the LoRA on it now, which its model
    /// attaches again with [`TrainModel::activate`]): a model of its own on a shared UNet, with
    /// the same initial values, draws and text encoders as [`TrainModel::load`] gives.
    ///
    /// # Errors
    /// Injection errors naming the module; the text encoders' loading errors.
    pub fn load_on(
        base: &SharedUnet,
        config: &TrainConfig,
        folder: &ModelFolder,
        (device, kind): (Device, Kind),
    ) -> Result<Self> {
        base.park()?;
        // Every draw of the run comes from its own generator, seeded from --seed for the LoRA's
        // initial values (the stream a default generator seeded alike would give).
        let rng = Arc::new(RunRng::new(device, config.seed)?);
        let lora_store = VarStore::new(device);
        let lora_config = config.lora_config()?;
        if config.gradient_checkpointing
            && lora_config.dropout > 0.0
            && !torch_cuda::rng::available(device)
        {
            return Err(Error::InvalidOption {
                option: "--lora_dropout",
                problem: format!(
                    "with --gradient_checkpointing needs the recomputation to replay the dropout \
                     masks, and this build cannot save {device:?}'s random state (torch-cuda was \
                     built without torch's or CUDA's headers)"
                ),
            });
        }
        let mut slot = base.slot.borrow_mut();
        let unet = &mut slot.unet;
        let report = lora::inject_with(
            unet,
            &lora_store.root(),
            ADAPTER,
            &lora_config,
            rng.as_ref(),
        )?;
        // Adapter dropout is on while training; validation switches it off around its images.
        lora::set_training(unet, true);
        lora::set_randomness(unet, Some(Arc::clone(&rng) as Arc<dyn lora::Randomness>));
        let copies = compute_copies(unet, kind)?;
        let mut params: Vec<(String, Tensor)> =
            lora::trainable_variables(unet).into_iter().collect();
        let id = slot.next_id;
        slot.next_id += 1;
        slot.attached = Some(id);
        drop(slot);
        let unet_params = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let text = if config.train_text_encoder {
            let text = TextEncoders::load_drawing_from(config, folder, (device, kind), &rng)?;
            params.extend(text.params().map(|(n, p)| (n.clone(), p.shallow_clone())));
            Some(text)
        } else {
            None
        };
        let model = Self {
            base: base.clone(),
            id,
            _lora_store: lora_store,
            params,
            unet_params,
            text,
            copies,
            rng,
        };
        log(lora_summary(
            &lora_config,
            &report,
            model
                .unet_params
                .iter()
                .map(|p| p.numel() as i64)
                .sum::<i64>(),
        ));
        Ok(model)
    }

    /// Puts this model's LoRA on the shared UNet (detaching the one there), with its generator
    /// drawing the adapters' dropout; nothing to do for a UNet of its own.
    ///
    /// # Errors
    /// Adapter errors.
    pub fn activate(&self) -> Result<()> {
        let mut slot = self.base.slot.borrow_mut();
        if slot.attached == Some(self.id) {
            return Ok(());
        }
        if let Some(owner) = slot.attached.take() {
            let detached = lora::detach(&mut slot.unet, ADAPTER)?;
            slot.parked.insert(owner, detached);
        }
        let mine = slot.parked.remove(&self.id).unwrap_or_default();
        lora::attach(&mut slot.unet, mine)?;
        lora::set_randomness(
            &mut slot.unet,
            Some(Arc::clone(&self.rng) as Arc<dyn lora::Randomness>),
        );
        slot.attached = Some(self.id);
        Ok(())
    }

    /// Runs `f` on the UNet that `models` share with each model's LoRA on its own rows of the
    /// batch (`rows[i]` for `models[i]`, [`lora::attach_rows`]): one forward pass (and its
    /// backward, inside `f`) for all of them. The LoRA on the UNet before is parked; afterwards
    /// every model's LoRA is parked again (the next [`TrainModel::activate`] puts one on).
    ///
    /// # Errors
    /// Models on different UNets; adapter errors; `f`'s.
    pub(crate) fn with_rows<R>(
        models: &[&TrainModel],
        rows: &[std::ops::Range<i64>],
        f: impl FnOnce(&UNet2DConditionModel) -> Result<R>,
    ) -> Result<R> {
        let Some(first) = models.first() else {
            return Err(Error::InvalidOption {
                option: "--sweep_execution",
                problem: "a batched micro-step of no variant".into(),
            });
        };
        let base = &first.base;
        if models.iter().any(|m| !Rc::ptr_eq(&m.base.slot, &base.slot))
            || models.len() != rows.len()
        {
            return Err(Error::InvalidOption {
                option: "--sweep_execution",
                problem: "a batched micro-step's variants must share one UNet, one row range each"
                    .into(),
            });
        }
        base.park()?;
        // Each model's LoRA on its rows; those attached so far are taken off again on a failure.
        let mut attached: Vec<(u64, std::ops::Range<i64>)> = Vec::with_capacity(models.len());
        let mut failure = None;
        {
            let mut slot = base.slot.borrow_mut();
            for (model, range) in models.iter().zip(rows) {
                let mut mine = slot.parked.remove(&model.id).unwrap_or_default();
                if mine.is_empty() {
                    continue;
                }
                match lora::attach_rows(&mut slot.unet, range.clone(), &mut mine) {
                    Ok(()) => attached.push((model.id, range.clone())),
                    Err(error) => {
                        slot.parked.insert(model.id, mine);
                        failure = Some(Error::from(error));
                        break;
                    }
                }
            }
        }
        let result = match failure {
            Some(error) => Err(error),
            None => {
                let slot = base.slot.borrow();
                f(&slot.unet)
            }
        };
        let mut slot = base.slot.borrow_mut();
        for (id, range) in attached {
            let back = lora::detach_rows(&mut slot.unet, range)?;
            slot.parked.insert(id, back);
        }
        result
    }

    /// The rank of each UNet module's LoRA, by module path (`down_blocks.1.….to_q`).
    pub fn unet_adapter_ranks(&self) -> std::collections::HashMap<String, i64> {
        let suffix = format!(".{ADAPTER}.lora_A");
        self.params[..self.unet_params.len()]
            .iter()
            .filter_map(|(name, param)| {
                let module = name.strip_suffix(&suffix)?;
                Some((module.to_owned(), *param.size().first()?))
            })
            .collect()
    }

    /// The run's generator.
    pub(crate) fn rng(&self) -> &Arc<RunRng> {
        &self.rng
    }

    /// The UNet with the LoRA (of this model, once [`TrainModel::activate`]d, when the UNet is
    /// shared).
    pub fn unet(&self) -> Ref<'_, UNet2DConditionModel> {
        Ref::map(self.base.slot.borrow(), |slot| &slot.unet)
    }

    /// The text encoders with their LoRA, when they are trained.
    pub fn text_encoders(&self) -> Option<&TextEncoders> {
        self.text.as_ref()
    }

    /// Every LoRA parameter by name (fp32, on the training device): what checkpoints hold.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The optimizer's parameter groups, as diffusers' script forms them: the UNet's LoRA, then
    /// (with `--train_text_encoder`) each text encoder's (handles sharing their storage).
    pub fn param_groups(&self) -> Vec<Vec<Tensor>> {
        let clone = |ts: &[Tensor]| ts.iter().map(Tensor::shallow_clone).collect::<Vec<_>>();
        let mut groups = vec![clone(&self.unet_params)];
        if let Some(text) = &self.text {
            groups.extend(text.trained().iter().map(|g| clone(g)));
        }
        groups
    }

    /// Every parameter the optimizer updates, in group order (what the gradient norm is over).
    pub fn param_tensors(&self) -> Vec<Tensor> {
        self.param_groups().into_iter().flatten().collect()
    }

    /// Every set of compute copies under mixed precision (the UNet's, then the text encoders').
    pub fn all_copies(&self) -> Vec<&lora::ComputeCopies> {
        let text = self.text.iter().flat_map(|t| t.copies());
        self.copies.iter().chain(text).collect()
    }

    /// Whether the LoRA computes from compute copies (mixed precision).
    pub fn has_copies(&self) -> bool {
        self.copies.is_some()
    }

    /// Trainable LoRA elements (those the optimizer updates).
    pub fn lora_parameter_count(&self) -> i64 {
        self.param_tensors().iter().map(|p| p.numel() as i64).sum()
    }

    /// The frozen UNet's (elements, bytes as stored).
    pub fn base_size(&self) -> (i64, i64) {
        let variables = self.base.slot.borrow().store.variables();
        let elements = variables.values().map(|v| v.numel() as i64).sum();
        let bytes = variables
            .values()
            .map(|v| (v.numel() * v.kind().elt_size_in_bytes()) as i64)
            .sum();
        (elements, bytes)
    }

    /// Training mode (adapter dropout on) or evaluation mode (off, for validation images).
    pub fn set_training(&mut self, training: bool) {
        lora::set_training(&mut self.base.slot.borrow_mut().unet, training);
        if let Some(text) = &mut self.text {
            text.set_training(training);
        }
    }

    /// Turns the LoRA on or off (the base model's images for the comparison grid).
    ///
    /// # Errors
    /// Adapter errors.
    pub fn set_lora_enabled(&mut self, enabled: bool) -> Result<()> {
        lora::set_enabled(&mut self.base.slot.borrow_mut().unet, ADAPTER, enabled)?;
        if let Some(text) = &mut self.text {
            text.set_enabled(enabled)?;
        }
        Ok(())
    }

    /// The LoRA as a state to write in any format.
    ///
    /// # Errors
    /// Adapter errors.
    pub fn lora_state(&mut self) -> Result<LoraState> {
        let mut state = LoraState::new();
        state.extract(
            &mut self.base.slot.borrow_mut().unet,
            Component::Unet,
            ADAPTER,
        )?;
        if let Some(text) = &mut self.text {
            text.extract(&mut state)?;
        }
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
        self.refresh_copies()
    }

    /// Recasts the compute copies from the fp32 parameters, after the parameters were written
    /// outside an optimizer step (a load, the EMA weights swapped in or out).
    ///
    /// # Errors
    /// Adapter errors.
    pub fn refresh_copies(&self) -> Result<()> {
        for copies in self.all_copies() {
            copies.refresh()?;
        }
        Ok(())
    }

    /// Runs `f` with the `--use_ema` average's weights in the model, as diffusers' scripts do
    /// around validation and saving (`store`, `copy_to`, …, `restore`), then puts the trained
    /// weights back; without an average, runs `f` on the trained weights.
    ///
    /// # Errors
    /// `f`'s errors; adapter and optimizer errors.
    pub fn with_ema_weights<R>(
        &mut self,
        ema: Option<&mut optim8bit::EMAModel>,
        f: impl FnOnce(&mut Self) -> Result<R>,
    ) -> Result<R> {
        let Some(ema) = ema else {
            return f(self);
        };
        ema.store()?;
        // Whatever fails after the store, the trained weights go back.
        let result = ema
            .copy_to()
            .map_err(Error::from)
            .and_then(|()| self.refresh_copies())
            .and_then(|()| f(self));
        ema.restore()?;
        self.refresh_copies()?;
        result
    }
}

/// With mixed precision the LoRA computes as peft does under accelerate's autocast (bf16 products,
/// fp32 weights and gradients), which is what diffusers' script trains with. The products read
/// copies in `kind` refreshed after each optimizer step; the masters and their gradients stay fp32
/// (same values as casting in every use, fewer kernels).
fn compute_copies(
    model: &mut dyn lora::HasLinears,
    kind: Kind,
) -> Result<Option<lora::ComputeCopies>> {
    lora::set_compute_kind(model, ADAPTER, (kind != Kind::Float).then_some(kind))?;
    if kind == Kind::Float {
        return Ok(None);
    }
    let copies = lora::ComputeCopies::new(model, ADAPTER)?;
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
