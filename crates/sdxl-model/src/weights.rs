//! Reading safetensors files into libtorch tensors.
//!
//! The whole file is read once; each tensor is then copied out of that buffer straight into the
//! requested device and element type, so a load never keeps a second full-precision copy on the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// A safetensors file held in memory.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    /// Reads `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read, [`Error::SafeTensors`] when its header is malformed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let file = Self { path, bytes };
        file.parse()?;
        Ok(file)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes)
            .map_err(|source| Error::SafeTensors { path: self.path.clone(), source })
    }

    /// The tensor keys, sorted.
    ///
    /// # Errors
    /// Never in practice: the header was checked by [`TensorFile::open`].
    pub fn keys(&self) -> Result<Vec<String>> {
        let mut keys: Vec<String> = self.parse()?.names().into_iter().map(str::to_owned).collect();
        keys.sort();
        Ok(keys)
    }

    /// The tensor `key` on `device`, converted to `kind` (`None` keeps the file's element type).
    ///
    /// # Errors
    /// [`Error::MissingTensor`] when the key is absent, [`Error::UnsupportedDtype`] for element
    /// types libtorch has no equivalent of.
    pub fn tensor(&self, key: &str, device: Device, kind: Option<Kind>) -> Result<Tensor> {
        let st = self.parse()?;
        let view = st
            .tensor(key)
            .map_err(|_| Error::MissingTensor { path: self.path.clone(), key: key.to_owned() })?;
        let file_kind = kind_of(view.dtype()).ok_or_else(|| Error::UnsupportedDtype {
            path: self.path.clone(),
            key: key.to_owned(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let host = Tensor::f_from_data_size(view.data(), &shape, file_kind)?;
        Ok(host.f_to_device(device)?.f_to_kind(kind.unwrap_or(file_kind))?)
    }

    /// Every tensor of the file, by key, on `device` in `kind` (`None` keeps each file type).
    ///
    /// # Errors
    /// As [`TensorFile::tensor`].
    pub fn load_all(&self, device: Device, kind: Option<Kind>) -> Result<BTreeMap<String, Tensor>> {
        self.keys()?
            .into_iter()
            .map(|key| {
                let tensor = self.tensor(&key, device, kind)?;
                Ok((key, tensor))
            })
            .collect()
    }
}

/// The libtorch element type of a safetensors dtype, if it has one.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F8_E4M3 => Kind::Float8e4m3fn,
        Dtype::F8_E5M2 => Kind::Float8e5m2,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_names_the_path() {
        let err = TensorFile::open("/nonexistent/model.safetensors").err().map(|e| e.to_string());
        assert!(err.is_some_and(|msg| msg.contains("/nonexistent/model.safetensors")));
    }

    #[test]
    fn garbage_is_rejected_with_the_path() {
        let dir = std::env::temp_dir().join(format!("sdxl-weights-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage.safetensors");
        std::fs::write(&path, b"\x08\x00\x00\x00\x00\x00\x00\x00not json").unwrap();
        let msg = TensorFile::open(&path).err().unwrap().to_string();
        assert!(msg.contains("garbage.safetensors") && msg.contains("not a valid safetensors"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
