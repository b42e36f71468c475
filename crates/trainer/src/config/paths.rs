//! Checks of the paths a run reads and writes, before any model or dataset is opened: a value that
//! cannot be a hub id is a local path, and one that does not exist is refused naming the flag,
//! rather than sent to the hub as a request that fails on DNS.
//!
//! The rule (huggingface_hub's `validate_repo_id`): a hub id is `name` or `owner/name`, each part
//! letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit (or `_`), without
//! `--` or `..`, at most 96 characters. Anything else (`/abs/path`, `./data`, `../data`, `~/data`,
//! `a/b/c`, `data/`, a Windows path) is a local path. An existing file or folder always wins, so a
//! local folder `owner/name` is read as a folder, as diffusers' `from_pretrained` does.

use std::path::Path;

use super::TrainConfig;
use crate::{Error, Result};

/// Whether `name` has the form of a hub repository id (see the module documentation):
/// [`sdxl_model::hub::is_repo_id`], which the models' `from_pretrained` use too.
pub fn is_hub_id(name: &str) -> bool {
    sdxl_model::hub::is_repo_id(name)
}

fn missing(option: &'static str, path: &str, hint: &str) -> Error {
    Error::InvalidOption {
        option,
        problem: format!("no such folder or file: {path} ({hint})"),
    }
}

fn not_a_folder(option: &'static str, path: &Path) -> Result<()> {
    if path.is_file() {
        return Err(Error::InvalidOption {
            option,
            problem: format!("{} is a file, not a folder", path.display()),
        });
    }
    Ok(())
}

const HUB_HINT: &str = "a local path; a hub id has the form `owner/name`";

impl TrainConfig {
    /// Checks the paths of the run on the file system (see the module documentation): local model
    /// and dataset paths that do not exist, a `--dataset_config` that is no file, and output
    /// folders that are files.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming the flag and the path.
    pub fn validate_paths(&self) -> Result<()> {
        let model = self.pretrained_model_name_or_path.as_str();
        let hub_file = crate::model_files::hub_file(model).is_some();
        if !Path::new(model).exists() && !hub_file && !is_hub_id(model) {
            return Err(missing("--pretrained_model_name_or_path", model, HUB_HINT));
        }
        if let Some(configs) = &self.single_file_config
            && !Path::new(configs).exists()
            && !is_hub_id(configs)
        {
            return Err(missing("--single_file_config", configs, HUB_HINT));
        }
        match &self.dataset_config {
            Some(file) if !file.is_file() => {
                return Err(missing(
                    "--dataset_config",
                    &file.display().to_string(),
                    "a kohya dataset TOML file",
                ));
            }
            Some(_) => {}
            None => {
                let dataset = self.dataset_name.as_str();
                if !Path::new(dataset).exists() && !is_hub_id(dataset) {
                    return Err(missing("--dataset_name", dataset, HUB_HINT));
                }
                if Path::new(dataset).is_file() {
                    return Err(Error::InvalidOption {
                        option: "--dataset_name",
                        problem: format!(
                            "{dataset} is a file, not a folder (a dataset is a folder of parquet \
                             files, an imagefolder with metadata.jsonl, or images with captions)"
                        ),
                    });
                }
            }
        }
        not_a_folder("--output_dir", &self.output_dir)?;
        if let Some(folder) = &self.class_data_dir {
            not_a_folder("--class_data_dir", folder)?;
        }
        if let Some(folder) = &self.latents_cache_dir {
            not_a_folder("--latents_cache_dir", folder)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_local_paths() {
        for id in [
            "stabilityai/stable-diffusion-xl-base-1.0",
            "lambdalabs/naruto-blip-captions",
            "gpt2",
            "my_data",
            "o/r.v1",
        ] {
            assert!(is_hub_id(id), "{id}");
        }
        for path in [
            "/data/naruto",
            "./naruto",
            "../naruto",
            "~/naruto",
            "a/b/c",
            "naruto/",
            ".hidden",
            "C:\\data",
            "o--x/r",
            "o/r..s",
            "",
            &"x".repeat(97),
        ] {
            assert!(!is_hub_id(path), "{path}");
        }
    }

    #[test]
    fn missing_local_paths_and_files_as_folders_name_their_flag() {
        let dir = std::env::temp_dir().join(format!("trainer-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let gone = dir.join("gone");
        let gone = gone.to_str().unwrap();
        let check = |edit: &dyn Fn(&mut TrainConfig)| {
            let mut config = TrainConfig {
                output_dir: dir.join("out"),
                ..TrainConfig::default()
            };
            edit(&mut config);
            config.validate_paths().map_err(|e| e.to_string())
        };
        // The defaults (hub ids) pass without asking the hub.
        check(&|_| {}).unwrap();
        let message = check(&|c| c.dataset_name = gone.into()).unwrap_err();
        assert_eq!(
            message,
            format!("--dataset_name: no such folder or file: {gone} ({HUB_HINT})")
        );
        let message =
            check(&|c| c.pretrained_model_name_or_path = "./no-model".into()).unwrap_err();
        assert!(
            message
                .starts_with("--pretrained_model_name_or_path: no such folder or file: ./no-model"),
            "{message}"
        );
        // A hub file is the hub's to find.
        check(&|c| c.pretrained_model_name_or_path = "o/r/m.safetensors".into()).unwrap();
        let message = check(&|c| c.single_file_config = Some("~/configs".into())).unwrap_err();
        assert!(message.starts_with("--single_file_config"), "{message}");
        let message = check(&|c| c.dataset_config = Some(dir.join("none.toml"))).unwrap_err();
        assert!(
            message.starts_with("--dataset_config: no such folder or file"),
            "{message}"
        );
        // With a dataset config, --dataset_name is not used.
        std::fs::write(dir.join("d.toml"), b"").unwrap();
        check(&|c| {
            c.dataset_config = Some(dir.join("d.toml"));
            c.dataset_name = gone.into();
        })
        .unwrap();
        let message = check(&|c| c.dataset_name = file.to_str().unwrap().into()).unwrap_err();
        assert!(
            message.starts_with("--dataset_name: ") && message.contains("is a file"),
            "{message}"
        );
        let message = check(&|c| c.output_dir = file.clone()).unwrap_err();
        assert_eq!(
            message,
            format!("--output_dir: {} is a file, not a folder", file.display())
        );
        let message = check(&|c| c.class_data_dir = Some(file.clone())).unwrap_err();
        assert!(message.starts_with("--class_data_dir"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
