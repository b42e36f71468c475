//! Reading a model's `config.json` (diffusers or transformers) into its serde struct.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads `path` and parses it as `T`.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read, [`Error::ConfigJson`] when it does not parse as `T`.
pub(crate) fn read_config_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::ConfigJson {
        path: path.to_path_buf(),
        source,
    })
}
