//! The kohya layout, read by ComfyUI and A1111: one flat module name per adapted layer,
//! `lora_unet_<path>` / `lora_te1_<path>` / `lora_te2_<path>` with every `.` of the module path turned
//! into `_`, and three tensors per module: `.lora_down.weight` `[r, in]`, `.lora_up.weight`
//! `[out, r]` and `.alpha` (a scalar; absent or zero means alpha = r). DoRA adds `.dora_scale`
//! `[out, 1]`: peft's magnitude, one per output row. ComfyUI loads that key but decomposes the weight
//! LyCORIS' way, one norm per input column, which is another function (docs/FORMATS.md, section 4);
//! diffusers drops the key. A convolution's (LoCon, kohya's `conv_dim`) are kernels:
//! `.lora_down.weight` `[r, in, kh, kw]`, `.lora_up.weight` `[out, r, 1, 1]`. Every kohya file also
//! carries kohya's training hashes ([`super::hashes`]).
//!
//! UNet paths come in two spellings: diffusers block names (`down_blocks_1_attentions_0_…`, what
//! diffusers' `convert_state_dict_to_kohya` writes) and SGM block names (`input_blocks_4_1_…`, what
//! kohya's own trainer writes). The SGM spelling needs a [`BlockRenames`] table from the caller: in
//! [`super::ReadOptions::block_renames`], or attached to the model's names
//! ([`ModuleNames::set_block_renames`], which `sdxl_model`'s pipeline does with its UNet's SGM table),
//! so that every reader given the model's names accepts both spellings, as ComfyUI's loader does.
//!
//! Turning `_` back into `.` is ambiguous (`to_out_0`, `ff_net_0_proj`), so reading uses the
//! model's own module paths ([`ModuleNames`]) and matches names exactly, as ComfyUI does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use super::Part;
use crate::layer::for_each_layer;
use crate::linear::HasLinears;
use crate::state::Component;
use crate::{Error, Result};

const SUFFIXES: [(&str, Part); 4] = [
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
    (".dora_scale", Part::Magnitude),
];

/// The level transformers 4's `CLIPTextModel` (and so kohya's names) put above its modules.
const TEXT_MODEL_LEVEL: &str = "text_model.";

/// SD1's single text-encoder prefix; read as [`Component::TextEncoder`].
const SD1_TEXT_ENCODER_PREFIX: &str = "lora_te";

/// A prefix renaming table between diffusers module paths and another block layout (e.g.
/// `down_blocks.1.attentions.0` ↔ `input_blocks.4.1`), supplied by the code that knows the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockRenames {
    /// `(diffusers prefix, renamed prefix)` pairs.
    pairs: Vec<(String, String)>,
}

impl BlockRenames {
    /// A table from `(diffusers prefix, renamed prefix)` pairs.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            pairs: pairs.into_iter().collect(),
        }
    }

    /// A table from a JSON file holding a list of `[diffusers prefix, renamed prefix]` pairs.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read, [`Error::BadMetadata`] when it is not such a list.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let pairs: Vec<(String, String)> =
            serde_json::from_str(&text).map_err(|e| Error::BadMetadata {
                path: path.to_owned(),
                key: "block renames".into(),
                reason: format!("expected [[diffusers prefix, renamed prefix], ...]: {e}"),
            })?;
        Ok(Self::new(pairs))
    }

    /// The pairs.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// `path` with its longest matching diffusers prefix replaced, if one matches at a `.` boundary.
    pub fn rename(&self, path: &str) -> Option<String> {
        replace_prefix(
            self.pairs
                .iter()
                .map(|(from, to)| (from.as_str(), to.as_str())),
            path,
        )
    }

    /// The inverse of [`BlockRenames::rename`].
    pub fn to_diffusers(&self, path: &str) -> Option<String> {
        replace_prefix(
            self.pairs
                .iter()
                .map(|(from, to)| (to.as_str(), from.as_str())),
            path,
        )
    }
}

fn replace_prefix<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
    path: &str,
) -> Option<String> {
    pairs
        .filter_map(|(from, to)| {
            let rest = path.strip_prefix(from)?;
            (rest.is_empty() || rest.starts_with('.')).then(|| (from.len(), format!("{to}{rest}")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, renamed)| renamed)
}

/// The module paths of the adaptable layers (linear layers and convolutions) of each component of a
/// model: what kohya names are matched against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleNames {
    paths: BTreeMap<Component, BTreeSet<String>>,
    /// The UNet's other block spelling (SGM), when the code that built the names knows it.
    block_renames: Option<BlockRenames>,
}

impl ModuleNames {
    /// No names yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every linear layer and convolution of `model` as a module of `component`.
    pub fn add_model(&mut self, component: Component, model: &mut dyn HasLinears) -> &mut Self {
        let set = self.paths.entry(component).or_default();
        for_each_layer(model, &mut |path, _| {
            set.insert(path.to_owned());
        });
        self
    }

    /// Adds module paths of `component` directly (e.g. the `.weight` keys of a model file without
    /// their suffix).
    pub fn add_paths<S: Into<String>>(
        &mut self,
        component: Component,
        paths: impl IntoIterator<Item = S>,
    ) -> &mut Self {
        self.paths
            .entry(component)
            .or_default()
            .extend(paths.into_iter().map(Into::into));
        self
    }

    /// Adds the linear layers and convolutions of a model's safetensors file (diffusers /
    /// transformers layout) as modules of `component`: every 2-D or 4-D tensor whose key ends in
    /// `.weight`. Only the header is parsed.
    ///
    /// # Errors
    /// [`Error::Io`] and [`Error::SafeTensors`] naming the file.
    pub fn add_model_file(&mut self, component: Component, path: &Path) -> Result<&mut Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|source| {
            Error::SafeTensors {
                path: path.to_owned(),
                source,
            }
        })?;
        let paths = header
            .tensors()
            .into_iter()
            .filter(|(_, info)| matches!(info.shape.len(), 2 | 4))
            .filter_map(|(key, _)| key.strip_suffix(".weight").map(str::to_owned))
            .collect::<Vec<_>>();
        Ok(self.add_paths(component, paths))
    }

    /// Accepts the UNet's modules also under `renames`' spelling (e.g. SGM block names, from
    /// `sdxl_model::unet::sgm_unet_table`) when reading kohya files with these names; an explicit
    /// [`super::ReadOptions::block_renames`] takes precedence.
    pub fn set_block_renames(&mut self, renames: BlockRenames) -> &mut Self {
        self.block_renames = Some(renames);
        self
    }

    /// The UNet's other block spelling attached by [`ModuleNames::set_block_renames`].
    pub fn block_renames(&self) -> Option<&BlockRenames> {
        self.block_renames.as_ref()
    }

    /// Whether `component` has any names.
    pub fn has_component(&self, component: Component) -> bool {
        self.paths
            .get(&component)
            .is_some_and(|paths| !paths.is_empty())
    }

    /// The model's path for a file's module path: the same path, else the only model path that
    /// ends with `.<path>` (transformers 5 saves `CLIPTextModel` LoRAs without the `text_model.`
    /// level, e.g. `encoder.layers.0.self_attn.q_proj`).
    ///
    /// # Errors
    /// Why it cannot be placed: no such module, or several candidates.
    pub fn resolve(&self, component: Component, path: &str) -> Result<String, &'static str> {
        let paths = self
            .paths
            .get(&component)
            .ok_or("the model has no modules for this component")?;
        resolve_in(paths.iter().map(String::as_str), path)
    }

    /// Whether no component has names.
    pub fn is_empty(&self) -> bool {
        self.paths.values().all(BTreeSet::is_empty)
    }
}

/// The path among `paths` equal to `path`, else the only one ending with `.<path>`.
pub(crate) fn resolve_in<'a>(
    paths: impl Iterator<Item = &'a str> + Clone,
    path: &str,
) -> Result<String, &'static str> {
    if paths.clone().any(|p| p == path) {
        return Ok(path.to_owned());
    }
    let mut candidates =
        paths.filter(|p| p.strip_suffix(path).is_some_and(|head| head.ends_with('.')));
    match (candidates.next(), candidates.next()) {
        (Some(only), None) => Ok(only.to_owned()),
        (Some(_), Some(_)) => Err("ambiguous: several modules of the model end with this path"),
        (None, _) => Err("no module of the model has this path"),
    }
}

/// `lora_unet_down_blocks_0_…`: the kohya module name of a module path.
pub fn module_name(component: Component, path: &str) -> String {
    format!("{}_{}", component.kohya_prefix(), path.replace('.', "_"))
}

/// The key of `part` of `module`, with the UNet path renamed by `renames` when given.
pub(crate) fn key(
    component: Component,
    module: &str,
    part: Part,
    renames: Option<&BlockRenames>,
) -> String {
    let path = match (component, renames) {
        (Component::Unet, Some(renames)) => {
            renames.rename(module).unwrap_or_else(|| module.to_owned())
        }
        _ => module.to_owned(),
    };
    let suffix = SUFFIXES
        .iter()
        .find(|(_, p)| *p == part)
        .map_or("", |(s, _)| *s);
    format!("{}{suffix}", module_name(component, &path))
}

/// Whether every key is a kohya key (diffusers' own test for "non-diffusers" LoRA files).
pub(crate) fn is_kohya_file<'a>(mut keys: impl Iterator<Item = &'a str>) -> bool {
    keys.all(|key| {
        ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"]
            .iter()
            .any(|p| key.starts_with(p))
    })
}

/// Maps kohya module names back to `(component, module path)`.
pub(crate) struct Resolver {
    /// Full names; `None` marks a name that two module paths produce.
    names: HashMap<String, Option<(Component, String)>>,
    /// Names of path suffixes (a module path without its first levels, as transformers 5 writes
    /// `CLIPTextModel` paths), used when no full name matches.
    suffix_names: HashMap<String, Option<(Component, String)>>,
    /// Whether UNet names in another block spelling were added.
    has_renames: bool,
}

/// The starts of kohya UNet names in SGM block spelling (`lora_unet_input_blocks_4_1_…`).
const SGM_NAME_STARTS: [&str; 6] = [
    "lora_unet_input_blocks_",
    "lora_unet_middle_block_",
    "lora_unet_output_blocks_",
    "lora_unet_time_embed_",
    "lora_unet_label_emb_",
    "lora_unet_out_",
];

fn add_name(
    names: &mut HashMap<String, Option<(Component, String)>>,
    name: String,
    target: (Component, String),
) {
    names
        .entry(name)
        .and_modify(|existing| {
            if existing.as_ref() != Some(&target) {
                *existing = None;
            }
        })
        .or_insert(Some(target));
}

impl Resolver {
    /// `renames` (else the table attached to `modules`) adds the UNet's other block spelling.
    pub(crate) fn new(modules: &ModuleNames, renames: Option<&BlockRenames>) -> Self {
        let renames = renames.or(modules.block_renames.as_ref());
        let (mut names, mut suffix_names) = (HashMap::new(), HashMap::new());
        for (component, paths) in &modules.paths {
            for path in paths {
                let target = (*component, path.clone());
                add_name(&mut names, module_name(*component, path), target.clone());
                // kohya's text-encoder names keep transformers' `text_model.` level, which the
                // module paths of a transformers 5 `CLIPTextModel` file lack.
                if *component != Component::Unet && !path.starts_with(TEXT_MODEL_LEVEL) {
                    add_name(
                        &mut names,
                        module_name(*component, &format!("{TEXT_MODEL_LEVEL}{path}")),
                        target.clone(),
                    );
                }
                if *component == Component::TextEncoder {
                    add_name(
                        &mut names,
                        format!("{SD1_TEXT_ENCODER_PREFIX}_{}", path.replace('.', "_")),
                        target.clone(),
                    );
                }
                if let (Component::Unet, Some(renamed)) =
                    (component, renames.and_then(|r| r.rename(path)))
                {
                    add_name(
                        &mut names,
                        module_name(*component, &renamed),
                        target.clone(),
                    );
                }
                for (dot, _) in path.match_indices('.') {
                    add_name(
                        &mut suffix_names,
                        module_name(*component, &path[dot + 1..]),
                        target.clone(),
                    );
                }
            }
        }
        Self {
            names,
            suffix_names,
            has_renames: renames.is_some_and(|r| !r.pairs.is_empty()),
        }
    }

    /// The component, module path and part of `key`, or why it cannot be placed.
    pub(crate) fn place(&self, key: &str) -> Result<(Component, String, Part), &'static str> {
        let (name, part) = SUFFIXES
            .iter()
            .find_map(|(suffix, part)| key.strip_suffix(suffix).map(|name| (name, *part)))
            .ok_or("unknown suffix")?;
        match self.names.get(name).or_else(|| self.suffix_names.get(name)) {
            Some(Some((component, path))) => Ok((*component, path.clone(), part)),
            Some(None) => Err("ambiguous: several module paths give this name"),
            None if !self.has_renames && SGM_NAME_STARTS.iter().any(|s| name.starts_with(s)) => {
                Err(
                    "an SGM block name, and the UNet's SGM names are unknown here (its config is needed)",
                )
            }
            None => Err("no module of the model has this name"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renames() -> BlockRenames {
        BlockRenames::new([
            (
                "down_blocks.1.attentions.0".to_owned(),
                "input_blocks.4.1".to_owned(),
            ),
            (
                "mid_block.attentions.0".to_owned(),
                "middle_block.1".to_owned(),
            ),
            (
                "up_blocks.0.attentions.1".to_owned(),
                "output_blocks.1.1".to_owned(),
            ),
        ])
    }

    #[test]
    fn renames_by_longest_prefix_at_dot_boundaries() {
        let table = renames();
        let path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
        assert_eq!(
            table.rename(path).as_deref(),
            Some("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
        );
        assert_eq!(
            table.to_diffusers("input_blocks.4.1.proj_in").as_deref(),
            Some("down_blocks.1.attentions.0.proj_in")
        );
        assert_eq!(table.rename("down_blocks.1.attentions.01.proj_in"), None);
        assert_eq!(table.rename("conv_in"), None);
    }

    #[test]
    fn keys_follow_the_kohya_grammar_in_both_spellings() {
        let path = "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0";
        assert_eq!(
            key(Component::Unet, path, Part::Down, None),
            "lora_unet_mid_block_attentions_0_transformer_blocks_1_attn2_to_out_0.lora_down.weight"
        );
        assert_eq!(
            key(Component::Unet, path, Part::Alpha, Some(&renames())),
            "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.alpha"
        );
        assert_eq!(
            key(
                Component::TextEncoder2,
                "text_model.encoder.layers.31.mlp.fc2",
                Part::Up,
                Some(&renames())
            ),
            "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_up.weight"
        );
    }

    #[test]
    fn resolver_places_both_spellings_and_names_what_it_cannot() {
        let mut names = ModuleNames::new();
        let unet_path = "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj";
        names.add_paths(Component::Unet, [unet_path]);
        names.add_paths(
            Component::TextEncoder,
            ["text_model.encoder.layers.0.self_attn.q_proj"],
        );
        // Two paths that flatten to the same kohya name.
        names.add_paths(Component::TextEncoder2, ["a_b.c", "a.b_c"]);
        let resolver = Resolver::new(&names, Some(&renames()));
        let unet = (Component::Unet, unet_path.to_owned(), Part::Down);
        assert_eq!(resolver.place("lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_down.weight"), Ok(unet.clone()));
        assert_eq!(
            resolver.place(
                "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_0_proj.lora_down.weight"
            ),
            Ok(unet)
        );
        assert_eq!(
            resolver.place("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"),
            Ok((
                Component::TextEncoder,
                "text_model.encoder.layers.0.self_attn.q_proj".to_owned(),
                Part::Alpha
            ))
        );
        assert!(resolver.place("lora_te2_a_b_c.alpha").is_err());
        assert!(
            resolver
                .place("lora_unet_conv_in.lora_down.weight")
                .is_err()
        );
        assert!(resolver.place("lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.hada_w1_a").is_err());

        // The same table attached to the names places SGM names without read options; without
        // any table an SGM name is reported as such.
        let sgm = "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight";
        let without = Resolver::new(&names, None);
        assert_eq!(
            without.place(sgm),
            Err(
                "an SGM block name, and the UNet's SGM names are unknown here (its config is needed)"
            )
        );
        names.set_block_renames(renames());
        assert_eq!(
            Resolver::new(&names, None).place(sgm),
            Ok((Component::Unet, unet_path.to_owned(), Part::Up))
        );
    }
}
