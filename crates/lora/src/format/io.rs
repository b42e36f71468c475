//! Reading and atomically writing safetensors files with header metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// The tensors of a file, by key, and its header metadata.
pub(crate) struct RawFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        _ => return None,
    })
}

/// Reads every tensor of `path` onto the CPU in its stored type, with the header metadata.
pub(crate) fn read(path: &Path) -> Result<RawFile> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let malformed = |source| Error::SafeTensors {
        path: path.to_owned(),
        source,
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(malformed)?;
    let metadata = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let file = SafeTensors::deserialize(&bytes).map_err(malformed)?;
    let mut tensors = BTreeMap::new();
    for (key, view) in file.iter() {
        let kind = kind_of(view.dtype()).ok_or_else(|| Error::UnsupportedDtype {
            path: path.to_owned(),
            key: key.to_owned(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        let count = non_finite_count(&tensor)?;
        if count > 0 {
            return Err(Error::NonFiniteTensor {
                path: path.to_owned(),
                key: key.to_owned(),
                count,
            });
        }
        tensors.insert(key.to_owned(), tensor);
    }
    Ok(RawFile { tensors, metadata })
}

/// How many values of a floating-point `tensor` (on the CPU) are NaN or infinite; 0 for integers.
pub(crate) fn non_finite_count(tensor: &Tensor) -> Result<i64> {
    if !tensor.f_is_floating_point()? {
        return Ok(0);
    }
    let finite = tensor
        .f_isfinite()?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    Ok(tensor.numel() as i64 - finite)
}

/// The bytes of a safetensors file holding `tensors` and `metadata` (`path` only names the file in
/// errors).
pub(crate) fn serialize(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (key, tensor) in tensors {
        let tensor = tensor.f_to_device(Device::Cpu)?.f_contiguous()?;
        let kind = tensor.f_kind()?;
        let dtype = dtype_of(kind).ok_or_else(|| Error::UnsupportedDtype {
            path: path.to_owned(),
            key: key.clone(),
            dtype: format!("{kind:?}"),
        })?;
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut bytes, numel)?;
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        buffers.push((key.clone(), dtype, shape, bytes));
    }
    let malformed = |source| Error::SafeTensors {
        path: path.to_owned(),
        source,
    };
    let views = buffers
        .iter()
        .map(|(key, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (key.as_str(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(malformed)?;
    let header: HashMap<String, String> = metadata.clone().into_iter().collect();
    safetensors::serialize(views, Some(header)).map_err(malformed)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees half a
/// file.
pub(crate) fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut temp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    temp_name.push(format!(".tmp{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let io_error = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    if let Err(error) = std::fs::write(&temp, bytes) {
        // A failed write (a full disk) leaves no temporary file behind.
        let _ = std::fs::remove_file(&temp);
        return Err(io_error(error));
    }
    std::fs::rename(&temp, path).map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        Error::Io {
            path: path.to_owned(),
            source,
        }
    })
}
