//! LoRA files: detecting the layout, mapping keys with explicit tables, reading into a
//! [`LoraState`] and writing one out atomically.
//!
//! One module per layout: [`diffusers`] (`lora.down` / `lora_linear_layer.down`), [`peft`]
//! (`lora_A` / `lora_B` plus `lora_adapter_metadata`) and [`kohya`] (`lora_unet_…` with `.alpha`).
//! Every file also records, in its header, the rank, alpha and targets per component (in the
//! layout's own convention) and the training configuration as JSON under `training_config`.

pub mod diffusers;
pub mod hashes;
mod io;
pub mod kohya;
pub mod peft;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Map, Value, json};
use tch::{Kind, Tensor};

use crate::adapter::Scaling;
use crate::inject::matches_suffix;
use crate::state::{Component, LoraState, ModuleLora};
use crate::{Error, Result};
pub use kohya::{BlockRenames, ModuleNames};

/// The header entry diffusers stores the per-component `LoraConfig` in.
pub const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";
/// The header entry the training configuration is stored in.
pub const TRAINING_CONFIG_KEY: &str = "training_config";

/// A LoRA file layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// diffusers' `lora.down` / `lora_linear_layer.down` keys (see [`diffusers`]).
    Diffusers,
    /// peft's `lora_A` / `lora_B` keys with `lora_adapter_metadata` (see [`peft`]).
    Peft,
    /// kohya / ComfyUI / A1111 `lora_unet_…` names (see [`kohya`]).
    Kohya,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "diffusers" => Ok(Format::Diffusers),
            "peft" => Ok(Format::Peft),
            "kohya" => Ok(Format::Kohya),
            other => Err(format!(
                "unknown LoRA format `{other}` (diffusers, peft or kohya)"
            )),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Diffusers => "diffusers",
            Format::Peft => "peft",
            Format::Kohya => "kohya",
        })
    }
}

/// Which tensor of a module's adapter a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Part {
    Down,
    Up,
    Alpha,
    Magnitude,
}

/// What a reader needs beyond the file: the model's module paths (kohya names cannot be turned
/// back into paths without them) and an optional UNet block renaming (SGM names).
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct ReadOptions<'a> {
    /// The model's linear-layer paths per component; required for kohya files.
    pub module_names: Option<&'a ModuleNames>,
    /// Extra UNet spellings accepted in kohya files.
    pub block_renames: Option<&'a BlockRenames>,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
impl<'a> ReadOptions<'a> {
    /// Sets [`ReadOptions::module_names`].
    #[must_use]
    pub fn with_module_names(mut self, module_names: Option<&'a ModuleNames>) -> Self {
        self.module_names = module_names;
        self
    }

    /// Sets [`ReadOptions::block_renames`].
    #[must_use]
    pub fn with_block_renames(mut self, block_renames: Option<&'a BlockRenames>) -> Self {
        self.block_renames = block_renames;
        self
    }
}

/// What a writer may vary.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct WriteOptions<'a> {
    /// kohya only: write UNet names in the renamed (e.g. SGM) spelling instead of diffusers'.
    pub block_renames: Option<&'a BlockRenames>,
    /// Extra header entries (e.g. kohya's `ss_*` or `modelspec.*`).
    pub extra_metadata: BTreeMap<String, String>,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
impl<'a> WriteOptions<'a> {
    /// Sets [`WriteOptions::block_renames`].
    #[must_use]
    pub fn with_block_renames(mut self, block_renames: Option<&'a BlockRenames>) -> Self {
        self.block_renames = block_renames;
        self
    }

    /// Sets [`WriteOptions::extra_metadata`].
    #[must_use]
    pub fn with_extra_metadata(mut self, extra_metadata: BTreeMap<String, String>) -> Self {
        self.extra_metadata = extra_metadata;
        self
    }
}

/// A LoRA file as read: its layout, its adapters, its whole header.
#[derive(Debug)]
#[non_exhaustive]
pub struct LoraFile {
    /// The detected layout.
    pub format: Format,
    /// The adapters.
    pub state: LoraState,
    /// Every header entry.
    pub metadata: BTreeMap<String, String>,
}

/// Tells the layout from the keys.
///
/// # Errors
/// [`Error::UnknownFormat`] when the keys fit no layout (`path` names the file in the message).
pub fn detect<'a>(path: &Path, keys: impl Iterator<Item = &'a str> + Clone) -> Result<Format> {
    let unknown = |reason: String| Error::UnknownFormat {
        path: path.to_owned(),
        reason,
    };
    if keys.clone().next().is_none() {
        return Err(unknown("the file holds no tensors".into()));
    }
    if kohya::is_kohya_file(keys.clone()) {
        return Ok(Format::Kohya);
    }
    if keys.clone().any(peft::is_peft_key) {
        return Ok(Format::Peft);
    }
    if keys.clone().any(diffusers::is_diffusers_key) {
        return Ok(Format::Diffusers);
    }
    let sample: Vec<&str> = keys.take(3).collect();
    Err(unknown(format!(
        "no `lora_A`, `lora.down`, `lora_linear_layer` or `lora_unet_` keys (e.g. {sample:?})"
    )))
}

#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<Tensor>,
    magnitude: Option<Tensor>,
}

/// Reads a LoRA file of any layout into a [`LoraState`].
///
/// Alpha comes from `.alpha` tensors (kohya; absent or zero means alpha = r) or from
/// `lora_adapter_metadata` (diffusers / peft; absent means alpha = r). Tensors keep their stored
/// element type.
///
/// # Errors
/// [`Error::UnplacedKeys`] listing every key that cannot be placed on a module (unknown suffix,
/// no such module, a module without its down or up matrix, shapes that disagree), plus the errors
/// of [`detect`], I/O and safetensors parsing, [`Error::BadMetadata`] for a header that does not
/// parse.
pub fn read(path: impl AsRef<Path>, options: ReadOptions) -> Result<LoraFile> {
    let path = path.as_ref();
    let raw = io::read(path)?;
    let format = detect(path, raw.tensors.keys().map(String::as_str))?;
    let resolver = (format == Format::Kohya).then(|| {
        options
            .module_names
            .map(|names| kohya::Resolver::new(names, options.block_renames))
    });
    let mut unplaced = Vec::new();
    let mut groups: BTreeMap<(Component, String), Parts> = BTreeMap::new();
    for (key, tensor) in raw.tensors {
        let placed = match (format, &resolver) {
            (Format::Kohya, Some(Some(resolver))) => resolver.place(&key),
            (Format::Kohya, _) => Err("reading kohya names needs the model's module names"),
            _ => peft::place(&key)
                .or_else(|| diffusers::place(&key))
                .ok_or("not a LoRA key of a known component"),
        };
        let (component, module, part) = match placed {
            Ok(placed) => placed,
            Err(reason) => {
                unplaced.push(format!("{key} ({reason})"));
                continue;
            }
        };
        let parts = groups.entry((component, module)).or_default();
        let slot = match part {
            Part::Down => &mut parts.down,
            Part::Up => &mut parts.up,
            Part::Alpha => &mut parts.alpha,
            Part::Magnitude => &mut parts.magnitude,
        };
        if slot.replace(tensor).is_some() {
            unplaced.push(format!(
                "{key} (a second tensor for the same module and part)"
            ));
        }
    }
    let adapter_config = parse_adapter_metadata(path, &raw.metadata)?;
    let mut state = LoraState::new();
    for ((component, module), parts) in groups {
        let qualified = format!("{component}.{module}");
        let (Some(down), Some(up)) = (parts.down, parts.up) else {
            unplaced.push(format!("{qualified} (has no down/A or no up/B matrix)"));
            continue;
        };
        let rank = down.size().first().copied().unwrap_or(0);
        let (alpha, scaling) = match parts.alpha {
            Some(alpha) => match alpha.f_double_value(&[]) {
                Ok(value) if value != 0.0 => (value, Scaling::Standard),
                Ok(_) => (rank as f64, Scaling::Standard),
                Err(_) => {
                    unplaced.push(format!(
                        "{qualified} (alpha is not a scalar: {:?})",
                        alpha.size()
                    ));
                    continue;
                }
            },
            None => {
                adapter_config
                    .get(&component)
                    .map_or((rank as f64, Scaling::Standard), |config| {
                        (
                            config.alpha_of(&module).unwrap_or(rank as f64),
                            config.scaling,
                        )
                    })
            }
        };
        // kohya's DoRA scale is `[out, 1]` (a convolution's `[out, 1, 1, 1]`); peft's magnitude is
        // `[out]` (a convolution's `[1, out, 1, 1]`, `_DoraConvNdLayer.get_weight_norm`).
        let magnitude = parts.magnitude.map(|m| {
            let size = m.size();
            let vector_like = size.iter().filter(|&&d| d != 1).count() <= 1;
            if (m.dim() == 2 && size[1] == 1) || (m.dim() == 4 && vector_like) {
                m.reshape([-1])
            } else {
                m
            }
        });
        let lora = ModuleLora {
            down,
            up,
            alpha,
            scaling,
            magnitude,
        };
        if let Err(error) = lora.check_shapes(&qualified) {
            unplaced.push(format!("{qualified} ({error})"));
            continue;
        }
        // Put the module on the model's own path when the caller gave the model's names.
        let module = match options.module_names {
            Some(names) if names.has_component(component) => {
                match names.resolve(component, &module) {
                    Ok(path) => path,
                    Err(reason) => {
                        unplaced.push(format!("{qualified} ({reason})"));
                        continue;
                    }
                }
            }
            _ => module,
        };
        if state
            .modules
            .insert((component, module.clone()), lora)
            .is_some()
        {
            unplaced.push(format!(
                "{qualified} (a second module for {component}.{module})"
            ));
        }
    }
    if !unplaced.is_empty() {
        return Err(Error::UnplacedKeys {
            path: path.to_owned(),
            keys: unplaced,
        });
    }
    state.training_config = match raw.metadata.get(TRAINING_CONFIG_KEY) {
        Some(text) => Some(serde_json::from_str(text).map_err(|e| Error::BadMetadata {
            path: path.to_owned(),
            key: TRAINING_CONFIG_KEY.into(),
            reason: e.to_string(),
        })?),
        None => None,
    };
    Ok(LoraFile {
        format,
        state,
        metadata: raw.metadata,
    })
}

/// The part of a component's `LoraConfig` the reader uses.
struct ComponentConfig {
    alpha: Option<f64>,
    alpha_pattern: BTreeMap<String, f64>,
    scaling: Scaling,
}

impl ComponentConfig {
    fn alpha_of(&self, module: &str) -> Option<f64> {
        self.alpha_pattern
            .iter()
            .filter(|(key, _)| matches_suffix(module, key))
            .max_by_key(|(key, _)| key.len())
            .map(|(_, alpha)| *alpha)
            .or(self.alpha)
    }
}

fn parse_adapter_metadata(
    path: &Path,
    metadata: &BTreeMap<String, String>,
) -> Result<BTreeMap<Component, ComponentConfig>> {
    let Some(text) = metadata.get(ADAPTER_METADATA_KEY) else {
        return Ok(BTreeMap::new());
    };
    let bad = |reason: String| Error::BadMetadata {
        path: path.to_owned(),
        key: ADAPTER_METADATA_KEY.into(),
        reason,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let object = value
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let mut configs = BTreeMap::new();
    for component in Component::ALL {
        let field = |name: &str| object.get(&format!("{}.{name}", component.diffusers_prefix()));
        if !object
            .keys()
            .any(|k| Component::split_diffusers_key(k).is_some_and(|(c, _)| c == component))
        {
            continue;
        }
        let alpha = match field("lora_alpha") {
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| bad(format!("{component}.lora_alpha is not a number")))?,
            ),
            None => None,
        };
        let mut alpha_pattern = BTreeMap::new();
        if let Some(pattern) = field("alpha_pattern").and_then(Value::as_object) {
            for (key, v) in pattern {
                let a = v.as_f64().ok_or_else(|| {
                    bad(format!(
                        "{component}.alpha_pattern[{key:?}] is not a number"
                    ))
                })?;
                alpha_pattern.insert(key.clone(), a);
            }
        }
        let rslora = field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let scaling = if rslora {
            Scaling::RankStabilized
        } else {
            Scaling::Standard
        };
        configs.insert(
            component,
            ComponentConfig {
                alpha,
                alpha_pattern,
                scaling,
            },
        );
    }
    Ok(configs)
}

/// The most common value (ties: the smallest), used as a component's default rank / alpha.
fn most_common<T: Copy + PartialOrd>(values: &[T]) -> Option<T> {
    let mut best: Option<(usize, T)> = None;
    for &v in values {
        let count = values.iter().filter(|&&w| w == v).count();
        let better = match best {
            None => true,
            Some((c, b)) => count > c || (count == c && v < b),
        };
        if better {
            best = Some((count, v));
        }
    }
    best.map(|(_, v)| v)
}

/// peft's `LoraConfig` of one component as diffusers stores it (`unet.r`, `unet.lora_alpha`, …):
/// the most common rank and alpha, per-module patterns for the rest, the module paths as targets.
fn component_adapter_metadata(
    state: &LoraState,
    component: Component,
    out: &mut Map<String, Value>,
) {
    let modules: Vec<(&str, &ModuleLora)> = state.component(component).collect();
    if modules.is_empty() {
        return;
    }
    let ranks: Vec<i64> = modules.iter().map(|(_, m)| m.rank()).collect();
    let alphas: Vec<f64> = modules.iter().map(|(_, m)| m.alpha).collect();
    let (rank, alpha) = (
        most_common(&ranks).unwrap_or(1),
        most_common(&alphas).unwrap_or(1.0),
    );
    let rank_pattern: Map<String, Value> = modules
        .iter()
        .filter(|(_, m)| m.rank() != rank)
        .map(|(p, m)| ((*p).to_owned(), json!(m.rank())))
        .collect();
    let alpha_pattern: Map<String, Value> = modules
        .iter()
        .filter(|(_, m)| m.alpha != alpha)
        .map(|(p, m)| ((*p).to_owned(), json!(m.alpha)))
        .collect();
    let prefix = component.diffusers_prefix();
    let mut put = |name: &str, value: Value| out.insert(format!("{prefix}.{name}"), value);
    put("r", json!(rank));
    put("lora_alpha", json!(alpha));
    put(
        "target_modules",
        json!(modules.iter().map(|(p, _)| *p).collect::<Vec<_>>()),
    );
    put("rank_pattern", Value::Object(rank_pattern));
    put("alpha_pattern", Value::Object(alpha_pattern));
    put(
        "use_rslora",
        json!(
            modules
                .iter()
                .any(|(_, m)| m.scaling == Scaling::RankStabilized)
        ),
    );
    put(
        "use_dora",
        json!(modules.iter().any(|(_, m)| m.magnitude.is_some())),
    );
}

/// Writes `state` to `path` in `format`, atomically.
///
/// Header: `format = pt`; for diffusers and peft, `lora_adapter_metadata` (per component: `r`,
/// `lora_alpha`, `target_modules`, `rank_pattern`, `alpha_pattern`, `use_rslora`, `use_dora`, which
/// diffusers' `load_lora_weights` turns into a `LoraConfig`); for kohya, `ss_network_module`,
/// `ss_network_dim`, `ss_network_alpha`; always `training_config` when the state has one.
///
/// kohya has no rsLoRA: an rsLoRA module is written with the alpha that gives the same scale
/// (`alpha · √r`).
///
/// # Errors
/// [`Error::InvalidConfig`] when a component mixes rsLoRA and plain scaling (peft's config cannot
/// say that), I/O and libtorch errors.
pub fn write(
    path: impl AsRef<Path>,
    state: &LoraState,
    format: Format,
    options: &WriteOptions,
) -> Result<()> {
    let path = path.as_ref();
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    for component in state.components() {
        let scalings: BTreeSet<bool> = state
            .component(component)
            .map(|(_, m)| m.scaling == Scaling::RankStabilized)
            .collect();
        if scalings.len() > 1 && format != Format::Kohya {
            return Err(Error::InvalidConfig {
                field: format!("{component} scaling"),
                reason: "mixes rsLoRA and plain modules, which one LoraConfig cannot describe"
                    .into(),
            });
        }
    }
    for ((component, module), lora) in &state.modules {
        let mut put = |part: Part, tensor: Tensor| {
            let key = match format {
                Format::Diffusers => diffusers::key(*component, module, part),
                Format::Peft => peft::key(*component, module, part),
                Format::Kohya => Some(kohya::key(*component, module, part, options.block_renames)),
            };
            if let Some(key) = key {
                tensors.insert(key, tensor);
            }
        };
        put(Part::Down, lora.down.shallow_clone());
        put(Part::Up, lora.up.shallow_clone());
        if let Some(magnitude) = &lora.magnitude {
            let magnitude = match (format, lora.is_conv()) {
                (Format::Kohya, false) => magnitude.unsqueeze(1),
                (Format::Kohya, true) => magnitude.view([-1, 1, 1, 1]),
                (_, false) => magnitude.shallow_clone(),
                (_, true) => magnitude.view([1, -1, 1, 1]),
            };
            put(Part::Magnitude, magnitude);
        }
        if format == Format::Kohya {
            let alpha = match lora.scaling {
                Scaling::Standard => lora.alpha,
                Scaling::RankStabilized => lora.alpha * (lora.rank() as f64).sqrt(),
            };
            put(Part::Alpha, Tensor::from(alpha as f32).to_kind(Kind::Float));
        }
    }
    match format {
        Format::Diffusers | Format::Peft => {
            let mut config = Map::new();
            for component in Component::ALL {
                component_adapter_metadata(state, component, &mut config);
            }
            let text = serde_json::to_string_pretty(&Value::Object(config)).map_err(|e| {
                Error::InvalidConfig {
                    field: ADAPTER_METADATA_KEY.into(),
                    reason: e.to_string(),
                }
            })?;
            metadata.insert(ADAPTER_METADATA_KEY.into(), text);
        }
        Format::Kohya => {
            let ranks: Vec<i64> = state.modules.values().map(ModuleLora::rank).collect();
            let alphas: Vec<f64> = state.modules.values().map(|m| m.alpha).collect();
            metadata.insert("ss_network_module".into(), "networks.lora".into());
            metadata.insert(
                "ss_network_dim".into(),
                most_common(&ranks).unwrap_or(0).to_string(),
            );
            metadata.insert(
                "ss_network_alpha".into(),
                most_common(&alphas).unwrap_or(0.0).to_string(),
            );
        }
    }
    if let Some(config) = &state.training_config {
        metadata.insert(TRAINING_CONFIG_KEY.into(), config.to_string());
    }
    metadata.extend(options.extra_metadata.clone());
    if format == Format::Kohya {
        let hashes = hashes::training_hashes(path, &tensors, &metadata)?;
        metadata.insert(hashes::MODEL_HASH_KEY.into(), hashes.model_hash);
        metadata.insert(hashes::LEGACY_HASH_KEY.into(), hashes.legacy_hash);
    }
    io::write_bytes_atomic(path, &io::serialize(path, &tensors, &metadata)?)
}

/// A short description of a LoRA file that needs no model: layout, modules per key prefix, ranks,
/// alphas, DoRA, header entries.
///
/// # Errors
/// I/O, safetensors and [`detect`] errors.
pub fn summary(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let raw = io::read(path)?;
    let format = detect(path, raw.tensors.keys().map(String::as_str))?;
    let down_suffixes = [
        ".lora_A.weight",
        ".lora.down.weight",
        ".lora_linear_layer.down.weight",
        ".lora_down.weight",
    ];
    let mut per_prefix: BTreeMap<String, (usize, BTreeSet<i64>)> = BTreeMap::new();
    for (key, tensor) in &raw.tensors {
        let Some(module) = down_suffixes.iter().find_map(|s| key.strip_suffix(s)) else {
            continue;
        };
        let prefix = match format {
            Format::Kohya => module.split('_').take(2).collect::<Vec<_>>().join("_"),
            _ => module.split('.').next().unwrap_or_default().to_owned(),
        };
        let entry = per_prefix.entry(prefix).or_default();
        entry.0 += 1;
        entry.1.extend(tensor.size().first().copied());
    }
    let mut text = format!(
        "{}: {format} LoRA, {} tensors\n",
        path.display(),
        raw.tensors.len()
    );
    for (prefix, (count, ranks)) in &per_prefix {
        text += &format!("  {prefix}: {count} modules, rank {ranks:?}\n");
    }
    let alphas: BTreeSet<String> = raw
        .tensors
        .iter()
        .filter(|(k, _)| k.ends_with(".alpha"))
        .filter_map(|(_, t)| t.f_double_value(&[]).ok())
        .map(|a| a.to_string())
        .collect();
    if !alphas.is_empty() {
        text += &format!("  alpha tensors: {alphas:?}\n");
    }
    let dora = raw
        .tensors
        .keys()
        .filter(|k| k.ends_with(".lora_magnitude_vector") || k.ends_with(".dora_scale"))
        .count();
    if dora > 0 {
        text += &format!("  DoRA magnitudes: {dora}\n");
    }
    for (key, value) in &raw.metadata {
        let shown: String = value.chars().take(200).collect();
        text += &format!("  header {key} = {shown}\n");
    }
    Ok(text)
}
