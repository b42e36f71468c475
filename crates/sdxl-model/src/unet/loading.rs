//! Filling a UNet's variables from the layouts its weights are published in.
//!
//! Follows diffusers' `ModelMixin.from_pretrained` file resolution (`diffusion_pytorch_model.safetensors`,
//! the `.fp16` variant, sharded files listed in `diffusion_pytorch_model.safetensors.index.json`) and its
//! single-file loader for SGM checkpoints (`model.diffusion_model.*`, renamed by [`super::sgm`]).
//!
//! Variables are created directly in the requested element type and device and each tensor is converted
//! on its own, so loading never holds an fp32 copy of the whole model besides the model itself.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind};

use super::config::UNetConfig;
use super::sgm::{SGM_UNET_PREFIX, sgm_unet_table, to_sgm};
use super::unet_2d_condition::UNet2DConditionModel;
use crate::pretrained::{LoadOptions, Loaded, Source, locate, pick_folder, with_variant};
use crate::weights::{LoadReport, TensorFile, load_into};
use crate::{Error, Result};

/// Where a UNet's weights are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UNetWeights {
    /// A diffusers `unet/` folder, optionally a variant such as `fp16`
    /// (`diffusion_pytorch_model.fp16.safetensors`), single or sharded.
    Diffusers {
        /// The folder.
        folder: PathBuf,
        /// The variant, if any.
        variant: Option<String>,
    },
    /// An SGM / A1111 single-file checkpoint; only its `model.diffusion_model.*` tensors are read.
    SingleFile(PathBuf),
}

/// The safetensors files of a diffusers model folder: the single weights file, or the shards its
/// index lists.
///
/// # Errors
/// [`Error::WeightFiles`] naming the folder and the names tried when neither exists, or the index
/// when it is not a diffusers/transformers index.
pub fn diffusers_weight_files(folder: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let single = folder.join(with_variant("diffusion_pytorch_model.safetensors", variant));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = folder.join(with_variant(
        "diffusion_pytorch_model.safetensors.index.json",
        variant,
    ));
    if !index.is_file() {
        return Err(Error::WeightFiles {
            path: folder.to_path_buf(),
            reason: format!(
                "neither `{}` nor `{}` exists",
                file_name(&single),
                file_name(&index)
            ),
        });
    }
    Ok(index_shards(&index)?
        .into_iter()
        .map(|shard| folder.join(shard))
        .collect())
}

/// The shard file names a diffusers/transformers weights index lists (`weight_map` values), each
/// a plain file name next to the index.
///
/// # Errors
/// [`Error::Io`] or [`Error::WeightFiles`] naming the index when it cannot be read, is not such an
/// index, or points outside its folder.
pub(crate) fn index_shards(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_owned(),
        source,
    })?;
    let bad = |reason: String| Error::WeightFiles {
        path: index.to_owned(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".to_owned()))?;
    let mut shards = BTreeSet::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`{key}` maps to a non-string")))?;
        // Shards sit next to their index; anything else would let an index point outside the folder.
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!(
                "`{key}` maps to `{file}`, which is not a file in the folder"
            )));
        }
        shards.insert(file.to_owned());
    }
    if shards.is_empty() {
        return Err(bad("`weight_map` is empty".to_owned()));
    }
    Ok(shards)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Copies `weights` into the variables of `vs`, which must hold exactly the variables of a
/// [`UNet2DConditionModel`] built from `config` at its root.
///
/// # Errors
/// [`Error::Load`] naming every missing, unused and mis-shaped key (e.g. the weights of a UNet of
/// another shape), file errors as [`TensorFile::open`], [`Error::WeightFiles`] as
/// [`diffusers_weight_files`].
pub fn load_unet_weights(
    vs: &VarStore,
    config: &UNetConfig,
    weights: &UNetWeights,
) -> Result<LoadReport> {
    match weights {
        UNetWeights::Diffusers { folder, variant } => {
            let files = diffusers_weight_files(folder, variant.as_deref())?
                .iter()
                .map(TensorFile::open)
                .collect::<Result<Vec<_>>>()?;
            load_into(vs, &files, str::to_owned)
        }
        UNetWeights::SingleFile(path) => {
            let file = TensorFile::open(path)?;
            let table = sgm_unet_table(config);
            let key = |name: &str| {
                format!(
                    "{SGM_UNET_PREFIX}{}",
                    to_sgm(&table, name).unwrap_or_else(|| name.to_owned())
                )
            };
            match load_into(vs, std::slice::from_ref(&file), key) {
                // The VAE and text encoders of the same file are not the UNet's business.
                Err(Error::Load { files, mut report }) => {
                    report.unused.retain(|k| k.starts_with(SGM_UNET_PREFIX));
                    if report.is_complete() {
                        Ok(*report)
                    } else {
                        Err(Error::Load { files, report })
                    }
                }
                other => other,
            }
        }
    }
}

/// Builds a [`UNet2DConditionModel`] for `config` with its variables in `kind` on `device` and loads
/// `weights` into them: the lower level of [`UNet2DConditionModel::from_pretrained`], for a config
/// built in code rather than read from the weights' folder. The var store is returned too: it owns
/// the variables (freeze it for LoRA training).
///
/// # Errors
/// As [`load_unet_weights`].
pub fn load_unet(
    config: &UNetConfig,
    weights: &UNetWeights,
    device: Device,
    kind: Kind,
) -> Result<(VarStore, UNet2DConditionModel)> {
    let loaded = load_unet_reporting(config, weights, device, kind)?;
    Ok((loaded.store, loaded.model))
}

fn load_unet_reporting(
    config: &UNetConfig,
    weights: &UNetWeights,
    device: Device,
    kind: Kind,
) -> Result<Loaded<UNet2DConditionModel>> {
    let mut store = VarStore::new(device);
    // An empty store only changes the kind new variables are created in: no fp32 model ever exists.
    store.set_kind(kind);
    let model = tch::no_grad(|| UNet2DConditionModel::new(&store.root(), config));
    let report = load_unet_weights(&store, config, weights)?;
    Ok(Loaded {
        model,
        store,
        report,
    })
}

/// The UNet's weight file name in a diffusers folder.
const UNET_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

impl UNet2DConditionModel {
    /// Loads a UNet as diffusers' `UNet2DConditionModel.from_pretrained` and `from_single_file` do.
    /// `name` is one of (see [`crate::pretrained`] for how names are told apart):
    /// - a diffusers `unet/` folder (`config.json` and the weights of [`LoadOptions::variant`], single
    ///   or sharded), or a diffusers SDXL folder holding one (or [`LoadOptions::subfolder`]);
    /// - a hub repository id of either, whose UNet files alone are fetched;
    /// - an SGM single-file `.safetensors` checkpoint (local, or a hub file), described by the
    ///   `config.json` of [`LoadOptions::single_file_config`] (a `unet/` folder or an SDXL folder or
    ///   repository holding one; SDXL base 1.0's config when `None`).
    ///
    /// # Errors
    /// [`Error::NoSuchFolder`] for a local path that does not exist; [`Error::Hub`] naming the
    /// repository and file; [`Error::WeightFiles`] naming the folder when it holds no UNet; config
    /// errors naming the `config.json`; as [`load_unet_weights`].
    pub fn from_pretrained(name: impl AsRef<Path>, options: &LoadOptions) -> Result<Loaded<Self>> {
        let part = [crate::hub::Part {
            subfolder: options.subfolder.as_deref(),
            default: Some("unet"),
            weights: UNET_WEIGHTS,
        }];
        let wanted = crate::hub::Wanted::Parts {
            parts: &part,
            variant: options.variant.as_deref(),
            optional: &[],
        };
        let (config, weights) = match locate(name.as_ref(), options, &wanted)? {
            Source::File(path) => {
                let config = match crate::pretrained::single_file_configs(options)? {
                    Some(root) => UNetConfig::from_file(
                        pick_folder(&root, None, Some("unet"))?.join("config.json"),
                    )?,
                    None => UNetConfig::sdxl_base(),
                };
                (config, UNetWeights::SingleFile(path))
            }
            Source::Folder(root) => {
                let folder = pick_folder(&root, options.subfolder.as_deref(), Some("unet"))?;
                let config = UNetConfig::from_file(folder.join("config.json"))?;
                let weights = UNetWeights::Diffusers {
                    folder,
                    variant: options.variant.clone(),
                };
                (config, weights)
            }
        };
        load_unet_reporting(&config, &weights, options.device, options.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_follow_diffusers() {
        use crate::pretrained::with_variant;
        assert_eq!(
            with_variant("diffusion_pytorch_model.safetensors", Some("fp16")),
            "diffusion_pytorch_model.fp16.safetensors"
        );
        assert_eq!(
            with_variant(
                "diffusion_pytorch_model.safetensors.index.json",
                Some("fp16")
            ),
            "diffusion_pytorch_model.safetensors.index.fp16.json"
        );
        assert_eq!(
            with_variant("diffusion_pytorch_model.safetensors", None),
            "diffusion_pytorch_model.safetensors"
        );
    }

    #[test]
    fn missing_and_malformed_folders_are_named() {
        let dir = std::env::temp_dir().join(format!("unet-loading-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let msg = diffusers_weight_files(&dir, Some("fp16"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("unet-loading-test")
                && msg.contains("diffusion_pytorch_model.fp16.safetensors"),
            "{msg}"
        );
        std::fs::write(
            dir.join("diffusion_pytorch_model.safetensors.index.json"),
            r#"{"weight_map": {"a.weight": "../x.safetensors"}}"#,
        )
        .unwrap();
        let msg = diffusers_weight_files(&dir, None).unwrap_err().to_string();
        assert!(
            msg.contains("index.json") && msg.contains("`a.weight`"),
            "{msg}"
        );
        std::fs::write(
            dir.join("diffusion_pytorch_model.safetensors.index.json"),
            r#"{"metadata": {}}"#,
        )
        .unwrap();
        assert!(
            diffusers_weight_files(&dir, None)
                .unwrap_err()
                .to_string()
                .contains("weight_map")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
