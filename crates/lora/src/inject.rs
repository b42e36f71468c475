//! Adapter injection by module-path patterns, and the operations that act on every adapted layer
//! of a model: training mode, enabling, merging, collecting the trainable tensors.
//!
//! Follows peft's `LoraConfig` / `LoraModel` (`peft/tuners/lora/config.py`, `model.py`): targets
//! are matched on the module path by dotted suffix (`to_q` matches `…attn1.to_q`), rank and alpha
//! can be overridden per module by the same kind of pattern, and `B` starts at zero so that a
//! freshly injected model computes exactly what the base model computes. Targets may be linear
//! layers or convolutions (LoCon); kohya's `conv_dim` / `conv_alpha` are [`LoraConfig::conv_rank`] and
//! [`LoraConfig::conv_alpha`].

use std::collections::BTreeMap;
use std::sync::Arc;

use tch::nn;
use tch::{Kind, Tensor};

use crate::adapter::{Adapter, Scaling};
use crate::layer::{AdaptedLayer, for_each_layer};
use crate::linear::HasLinears;
use crate::randomness::{DefaultGenerator, Randomness};
use crate::targets::{TEXT_ENCODER_ATTENTION_TARGETS, UNET_ATTENTION_TARGETS};
use crate::{Error, Result};

/// How `A` is initialised (`B` always starts at zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Init {
    /// Kaiming-uniform with `a = √5`, i.e. uniform in ±1/√in (peft's default, kohya's).
    #[default]
    KaimingUniform,
    /// Normal with standard deviation `1/r` (peft's `"gaussian"`, used by diffusers' scripts).
    Gaussian,
}

/// What to inject: peft's `LoraConfig`, for linear layers and 2-D convolutions.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct LoraConfig {
    /// Default rank `r`.
    pub rank: i64,
    /// Default alpha.
    pub alpha: f64,
    /// Module-path suffixes to adapt (`to_q`, `to_out.0`, or a full path).
    pub targets: Vec<String>,
    /// Per-module rank overrides, keyed by module-path suffix; the longest matching key wins.
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-module alpha overrides, keyed by module-path suffix; the longest matching key wins.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Dropout on the adapter input while training.
    pub dropout: f64,
    /// How `A` starts.
    pub init: Init,
    /// rsLoRA: scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// DoRA: add a trainable magnitude vector per output row (per output channel of a convolution).
    pub use_dora: bool,
    /// kohya's `conv_dim`: the rank of convolutions whose kernel is larger than 1×1; `None`: the
    /// rank of every other layer (peft). 1×1 convolutions always take [`LoraConfig::rank`], as in
    /// kohya.
    #[serde(default)]
    pub conv_rank: Option<i64>,
    /// kohya's `conv_alpha`, the alpha of the layers [`LoraConfig::conv_rank`] applies to; `None`:
    /// the conv rank (scale 1, as the default alpha of the linear layers).
    #[serde(default)]
    pub conv_alpha: Option<f64>,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these; the targets are given by
/// [`LoraConfig::with_targets`] (or assigned).
impl LoraConfig {
    /// Sets [`LoraConfig::rank`].
    #[must_use]
    pub fn with_rank(mut self, rank: i64) -> Self {
        self.rank = rank;
        self
    }

    /// Sets [`LoraConfig::alpha`].
    #[must_use]
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets [`LoraConfig::rank_pattern`].
    #[must_use]
    pub fn with_rank_pattern(mut self, rank_pattern: BTreeMap<String, i64>) -> Self {
        self.rank_pattern = rank_pattern;
        self
    }

    /// Sets [`LoraConfig::alpha_pattern`].
    #[must_use]
    pub fn with_alpha_pattern(mut self, alpha_pattern: BTreeMap<String, f64>) -> Self {
        self.alpha_pattern = alpha_pattern;
        self
    }

    /// Sets [`LoraConfig::dropout`].
    #[must_use]
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    /// Sets [`LoraConfig::init`].
    #[must_use]
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }

    /// Sets [`LoraConfig::use_rslora`].
    #[must_use]
    pub fn with_use_rslora(mut self, use_rslora: bool) -> Self {
        self.use_rslora = use_rslora;
        self
    }

    /// Sets [`LoraConfig::use_dora`].
    #[must_use]
    pub fn with_use_dora(mut self, use_dora: bool) -> Self {
        self.use_dora = use_dora;
        self
    }

    /// Sets [`LoraConfig::conv_rank`].
    #[must_use]
    pub fn with_conv_rank(mut self, conv_rank: Option<i64>) -> Self {
        self.conv_rank = conv_rank;
        self
    }

    /// Sets [`LoraConfig::conv_alpha`].
    #[must_use]
    pub fn with_conv_alpha(mut self, conv_alpha: Option<f64>) -> Self {
        self.conv_alpha = conv_alpha;
        self
    }
}

/// [`LoraConfig::unet_attention`] at rank 4, diffusers' SDXL LoRA scripts' default.
impl Default for LoraConfig {
    fn default() -> Self {
        Self::unet_attention(4)
    }
}

impl LoraConfig {
    /// What diffusers' SDXL scripts set up for the UNet: attention projections, alpha = rank,
    /// gaussian init.
    pub fn unet_attention(rank: i64) -> Self {
        Self::with_targets(rank, &UNET_ATTENTION_TARGETS)
    }

    /// What diffusers' SDXL scripts set up for a text encoder (`--train_text_encoder`).
    pub fn text_encoder_attention(rank: i64) -> Self {
        Self::with_targets(rank, &TEXT_ENCODER_ATTENTION_TARGETS)
    }

    /// Alpha = rank, gaussian init, no dropout, on the given targets.
    pub fn with_targets(rank: i64, targets: &[&str]) -> Self {
        Self {
            rank,
            alpha: rank as f64,
            targets: targets.iter().map(|t| (*t).to_owned()).collect(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            dropout: 0.0,
            init: Init::Gaussian,
            use_rslora: false,
            use_dora: false,
            conv_rank: None,
            conv_alpha: None,
        }
    }

    /// The scaling rule this configuration asks for.
    pub fn scaling(&self) -> Scaling {
        if self.use_rslora {
            Scaling::RankStabilized
        } else {
            Scaling::Standard
        }
    }

    /// Whether `module` is a target.
    pub fn targets_module(&self, module: &str) -> bool {
        self.targets
            .iter()
            .any(|target| matches_suffix(module, target))
    }

    /// The rank and alpha of `module` (a linear layer or 1×1 convolution) after the patterns.
    pub fn rank_and_alpha(&self, module: &str) -> (i64, f64) {
        self.layer_rank_and_alpha(module, false)
    }

    /// The rank and alpha of `module`; `spatial_conv` tells whether it is a convolution with a
    /// kernel larger than 1×1. The patterns win, then [`LoraConfig::conv_rank`] /
    /// [`LoraConfig::conv_alpha`] for such a convolution, then [`LoraConfig::rank`] /
    /// [`LoraConfig::alpha`].
    pub fn layer_rank_and_alpha(&self, module: &str, spatial_conv: bool) -> (i64, f64) {
        let conv = self.conv_rank.filter(|_| spatial_conv);
        let rank = longest_match(&self.rank_pattern, module)
            .copied()
            .or(conv)
            .unwrap_or(self.rank);
        let conv_alpha = conv.map(|r| self.conv_alpha.unwrap_or(r as f64));
        let alpha = longest_match(&self.alpha_pattern, module)
            .copied()
            .or(conv_alpha)
            .unwrap_or(self.alpha);
        (rank, alpha)
    }

    /// Checks ranks, alphas and dropout.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: String, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.rank < 1 {
            return bad("rank".into(), "must be at least 1");
        }
        if !self.alpha.is_finite() {
            return bad("alpha".into(), "must be finite");
        }
        if let Some((key, _)) = self.rank_pattern.iter().find(|(_, r)| **r < 1) {
            return bad(format!("rank_pattern[{key:?}]"), "must be at least 1");
        }
        if let Some((key, _)) = self.alpha_pattern.iter().find(|(_, a)| !a.is_finite()) {
            return bad(format!("alpha_pattern[{key:?}]"), "must be finite");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout".into(), "must be in [0, 1)");
        }
        if self.targets.is_empty() {
            return bad("targets".into(), "must name at least one module");
        }
        if self.conv_rank.is_some_and(|r| r < 1) {
            return bad("conv_rank".into(), "must be at least 1");
        }
        match self.conv_alpha {
            Some(a) if !a.is_finite() => bad("conv_alpha".into(), "must be finite"),
            Some(_) if self.conv_rank.is_none() => bad(
                "conv_alpha".into(),
                "needs conv_rank (it is the alpha of that rank)",
            ),
            _ => Ok(()),
        }
    }
}

/// `module` equals `pattern` or ends with `.pattern` (peft's target and pattern rule).
pub(crate) fn matches_suffix(module: &str, pattern: &str) -> bool {
    module == pattern
        || module
            .strip_suffix(pattern)
            .is_some_and(|head| head.ends_with('.'))
}

fn longest_match<'a, T>(patterns: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
    patterns
        .iter()
        .filter(|(key, _)| matches_suffix(module, key))
        .max_by_key(|(key, _)| key.len())
        .map(|(_, value)| value)
}

/// The variable-store path of a dotted module path (`a.b.0` → `root / "a" / "b" / "0"`).
/// An empty module path maps to `root / "_"` (a variable cannot be named at the root itself).
pub fn module_path<'a>(root: &nn::Path<'a>, module: &str) -> nn::Path<'a> {
    let mut parts = module.split('.').filter(|part| !part.is_empty());
    let mut path = root / parts.next().unwrap_or("_");
    for part in parts {
        path = &path / part;
    }
    path
}

/// Which layers an injection adapted.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct InjectionReport {
    /// `(module path, rank, alpha)` of every adapted layer, in the model's order.
    pub adapted: Vec<(String, i64, f64)>,
    /// Target patterns that matched no layer (allowed, but usually a typo).
    pub unmatched_targets: Vec<String>,
}

impl std::fmt::Display for InjectionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} layer(s) adapted", self.adapted.len())?;
        for (module, rank, alpha) in &self.adapted {
            writeln!(f, "  {module}  r={rank} alpha={alpha}")?;
        }
        if !self.unmatched_targets.is_empty() {
            writeln!(
                f,
                "targets that matched nothing: {}",
                self.unmatched_targets.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Adds an adapter called `name` to every linear layer and convolution of `model` that `config`
/// targets.
///
/// The adapter's tensors are created in `root`'s variable store (trainable, in that store's
/// element type, normally fp32) as `<module path>.lora_A.weight`, `<module path>.lora_B.weight`
/// and, for DoRA, `<module path>.lora_magnitude_vector` (peft's state-dict names); on a convolution
/// `A` is `[r, in, kh, kw]` and `B` `[out, r, 1, 1]`. Base weights and biases of every layer the
/// model exposes are frozen (`requires_grad = false`), as peft does; freezing the rest of the model
/// (norms) is the caller's (`VarStore::freeze`).
///
/// # Errors
/// [`Error::InvalidConfig`], [`Error::NoTargetMatched`] when nothing was adapted,
/// [`Error::DuplicateAdapter`] when a target already carries an adapter called `name`.
pub fn inject(
    model: &mut dyn HasLinears,
    root: &nn::Path,
    name: &str,
    config: &LoraConfig,
) -> Result<InjectionReport> {
    inject_with(model, root, name, config, &DefaultGenerator)
}

/// [`inject`] with the down-projections' initial values drawn from `randomness` instead of
/// libtorch's default generator (in the same order, so a source seeded like the default generator
/// gives the same values). Dropout masks are set apart, by [`set_randomness`].
///
/// # Errors
/// As [`inject`]; the source's errors.
pub fn inject_with(
    model: &mut dyn HasLinears,
    root: &nn::Path,
    name: &str,
    config: &LoraConfig,
    randomness: &dyn Randomness,
) -> Result<InjectionReport> {
    config.validate()?;
    let mut report = InjectionReport::default();
    let mut matched = vec![false; config.targets.len()];
    let mut failure = None;
    for_each_layer(model, &mut |module, layer| {
        layer.freeze_base();
        if failure.is_some() || !config.targets_module(module) {
            return;
        }
        for (flag, target) in matched.iter_mut().zip(&config.targets) {
            *flag |= matches_suffix(module, target);
        }
        let (rank, alpha) = config.layer_rank_and_alpha(module, layer.shape().is_spatial_conv());
        let added = new_adapter(
            &module_path(root, module),
            name,
            layer,
            (rank, alpha),
            config,
            randomness,
        )
        .and_then(|adapter| layer.add_adapter(module, adapter));
        match added {
            Ok(()) => report.adapted.push((module.to_owned(), rank, alpha)),
            Err(error) => failure = Some(error),
        }
    });
    if let Some(error) = failure {
        return Err(error);
    }
    if report.adapted.is_empty() {
        return Err(Error::NoTargetMatched {
            targets: config.targets.clone(),
        });
    }
    report.unmatched_targets = config
        .targets
        .iter()
        .zip(&matched)
        .filter(|(_, m)| !**m)
        .map(|(t, _)| t.clone())
        .collect();
    Ok(report)
}

fn new_adapter(
    path: &nn::Path,
    name: &str,
    layer: &dyn AdaptedLayer,
    (rank, alpha): (i64, f64),
    config: &LoraConfig,
    randomness: &dyn Randomness,
) -> Result<Adapter> {
    let shape = layer.shape();
    let (down_shape, up_shape) = shape.adapter_shapes(rank);
    // What tch's `nn::Init::Randn` / `nn::Init::Uniform` draw, from `randomness`.
    let (kind, device) = (path.kind(), path.device());
    let initial = match config.init {
        Init::Gaussian => randomness.randn(&down_shape, kind, device)? * (1.0 / rank as f64),
        Init::KaimingUniform => {
            let bound = 1.0 / (shape.fan_in() as f64).sqrt();
            randomness.uniform(&down_shape, -bound, bound, kind, device)?
        }
    };
    let down = (path / "lora_A").f_var_copy("weight", &initial)?;
    let up = (path / "lora_B").f_var("weight", &up_shape, nn::Init::Const(0.0))?;
    let mut adapter = Adapter::new(name, down, up, alpha);
    adapter.scaling = config.scaling();
    adapter.dropout = config.dropout;
    if config.use_dora {
        // With B = 0 the adapted weight is W, so the magnitude starts at W's row norms (a kernel's:
        // over input channels and taps).
        let weight = layer
            .base_value()
            .to_kind(Kind::Float)
            .to_device(path.device());
        let norm = adapter.dora_weight_norm(&weight, &weight.zeros_like());
        adapter.magnitude = Some(path.f_var_copy("lora_magnitude_vector", &norm)?);
    }
    Ok(adapter)
}

/// Runs `f` on every layer with an adapter called `name`, stopping at the first error. Returns how
/// many layers have such an adapter.
fn for_each_named(
    model: &mut dyn HasLinears,
    name: &str,
    f: &mut dyn FnMut(&str, &mut dyn AdaptedLayer) -> Result<()>,
) -> Result<usize> {
    let mut count = 0;
    let mut failure = None;
    for_each_layer(model, &mut |module, layer| {
        if failure.is_none() && layer.adapter(name).is_some() {
            count += 1;
            if let Err(error) = f(module, layer) {
                failure = Some(error);
            }
        }
    });
    match failure {
        Some(error) => Err(error),
        None if count == 0 => Err(Error::UnknownAdapter {
            module: String::new(),
            adapter: name.to_owned(),
        }),
        None => Ok(count),
    }
}

/// Switches adapter `name` on or off in every layer without merging.
///
/// # Errors
/// [`Error::UnknownAdapter`] when no layer has it.
pub fn set_enabled(model: &mut dyn HasLinears, name: &str, enabled: bool) -> Result<usize> {
    for_each_named(model, name, &mut |module, layer| {
        layer.set_adapter_enabled(module, name, enabled)
    })
}

/// Sets adapter `name`'s multiplier (the per-LoRA weight when several are active) in every layer.
/// Unmerge first: a merged adapter keeps the multiplier it was merged with.
///
/// # Errors
/// [`Error::UnknownAdapter`] when no layer has it.
pub fn set_multiplier(model: &mut dyn HasLinears, name: &str, multiplier: f64) -> Result<usize> {
    update_adapter(model, name, &mut |adapter| adapter.multiplier = multiplier)
}

/// Sets the [`compute_kind`](crate::Adapter::compute_kind) of adapter `name` on every layer that has
/// it; returns how many layers that was.
///
/// # Errors
/// [`Error::UnknownAdapter`] when no layer has the adapter.
pub fn set_compute_kind(
    model: &mut dyn HasLinears,
    name: &str,
    kind: Option<tch::Kind>,
) -> Result<usize> {
    update_adapter(model, name, &mut |adapter| adapter.compute_kind = kind)
}

/// Applies `f` to adapter `name` in every layer that has it; returns how many layers that was.
fn update_adapter(
    model: &mut dyn HasLinears,
    name: &str,
    f: &mut dyn FnMut(&mut crate::Adapter),
) -> Result<usize> {
    for_each_named(model, name, &mut |module, layer| {
        let adapter = layer
            .adapter_mut(name)
            .ok_or_else(|| Error::UnknownAdapter {
                module: module.to_owned(),
                adapter: name.to_owned(),
            })?;
        f(adapter);
        Ok(())
    })
}

/// The adapters of one name taken off a model by [`detach`], with their state (compute copies,
/// compute type, enabled flag) kept, to be put back by [`attach`]: several sets of adapters of the
/// same name (one per training run) can take turns on one frozen model.
#[derive(Debug, Default)]
pub struct DetachedAdapters {
    /// `(module path, adapter)` in the model's layer order.
    pub(crate) adapters: Vec<(String, Adapter)>,
}

impl DetachedAdapters {
    /// How many layers the adapters came from.
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    /// Whether no adapter was detached.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }
}

/// Takes adapter `name` off every layer that has it (unmerging a merged one first).
///
/// # Errors
/// [`Error::UnknownAdapter`] when no layer has it; unmerge errors.
pub fn detach(model: &mut dyn HasLinears, name: &str) -> Result<DetachedAdapters> {
    let mut detached = DetachedAdapters::default();
    for_each_named(model, name, &mut |module, layer| {
        let adapter = layer.remove_adapter(module, name)?;
        detached.adapters.push((module.to_owned(), adapter));
        Ok(())
    })?;
    Ok(detached)
}

/// Puts adapters taken off by [`detach`] back on the layers they came from.
///
/// # Errors
/// [`Error::DuplicateAdapter`] when a layer already has an adapter of that name,
/// [`Error::ModulesNotInModel`] naming the modules `model` does not have (the others are attached).
pub fn attach(model: &mut dyn HasLinears, detached: DetachedAdapters) -> Result<()> {
    let mut waiting: BTreeMap<String, Adapter> = detached.adapters.into_iter().collect();
    let mut failure = None;
    for_each_layer(model, &mut |module, layer| {
        if failure.is_none()
            && let Some(adapter) = waiting.remove(module)
            && let Err(error) = layer.add_adapter(module, adapter)
        {
            failure = Some(error);
        }
    });
    if let Some(error) = failure {
        return Err(error);
    }
    if !waiting.is_empty() {
        return Err(Error::ModulesNotInModel {
            modules: waiting.into_keys().collect(),
        });
    }
    Ok(())
}

/// Training mode (adapter dropout on) or evaluation mode for every linear layer and convolution.
pub fn set_training(model: &mut dyn HasLinears, training: bool) {
    for_each_layer(model, &mut |_, layer| layer.set_training(training));
}

/// Where the dropout of every adapted layer of `model` draws its masks while training:
/// `randomness`, or libtorch's default generator (`None`, the default).
pub fn set_randomness(model: &mut dyn HasLinears, randomness: Option<Arc<dyn Randomness>>) {
    for_each_layer(model, &mut |_, layer| {
        layer.set_randomness(randomness.clone());
    });
}

/// Merges every enabled adapter (or only those named) into the base weights of every layer.
///
/// # Errors
/// [`Error::NonFiniteMerge`] naming the first layer whose merged weight would not be finite
/// (layers before it stay merged; call [`unmerge`] to undo), [`Error::Fp8BaseWeight`] for an
/// adapted layer whose base weight is stored in fp8.
pub fn merge(model: &mut dyn HasLinears, names: Option<&[&str]>) -> Result<()> {
    let mut failure = None;
    for_each_layer(model, &mut |module, layer| {
        if failure.is_some() || layer.adapters().is_empty() {
            return;
        }
        let present: Option<Vec<&str>> = names.map(|names| {
            names
                .iter()
                .copied()
                .filter(|n| layer.adapter(n).is_some())
                .collect()
        });
        if let Err(error) = layer.merge(module, present.as_deref()) {
            failure = Some(error);
        }
    });
    failure.map_or(Ok(()), Err)
}

/// Undoes every merge in every layer.
///
/// # Errors
/// [`Error::Fp8BaseWeight`] naming the first layer whose base weight is stored in fp8, libtorch
/// errors.
pub fn unmerge(model: &mut dyn HasLinears) -> Result<()> {
    let mut failure = None;
    for_each_layer(model, &mut |module, layer| {
        if failure.is_none()
            && let Err(error) = layer.unmerge(module)
        {
            failure = Some(error);
        }
    });
    failure.map_or(Ok(()), Err)
}

/// The trainable tensors of every adapter (`A`, `B`, DoRA magnitudes), by
/// `<module path>.<adapter name>.{lora_A,lora_B,lora_magnitude_vector}`: what the optimizer gets.
/// Base weights are never included.
pub fn trainable_variables(model: &mut dyn HasLinears) -> BTreeMap<String, Tensor> {
    let mut variables = BTreeMap::new();
    for_each_layer(model, &mut |module, layer| {
        for adapter in layer.adapters() {
            let key = |part: &str| format!("{module}.{}.{part}", adapter.name);
            variables.insert(key("lora_A"), adapter.down.shallow_clone());
            variables.insert(key("lora_B"), adapter.up.shallow_clone());
            if let Some(magnitude) = &adapter.magnitude {
                variables.insert(key("lora_magnitude_vector"), magnitude.shallow_clone());
            }
        }
    });
    variables
}
