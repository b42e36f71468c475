//! Reading safetensors files into libtorch tensors.
//!
//! Opening a file reads only its header; each tensor is then read from disk on its own and copied
//! straight into the requested device and element type, so a load never holds more than one tensor
//! of the file in host memory besides the model itself (no host copy of a whole fp32 checkpoint).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensorError};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Largest header accepted, as the safetensors crate does (100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A safetensors file whose header has been read and checked; tensors are read on demand.
pub struct TensorFile {
    path: PathBuf,
    /// Tensor entries by key, offsets relative to the start of the data section.
    entries: BTreeMap<String, TensorInfo>,
    /// Byte offset of the data section in the file.
    data_start: u64,
}

impl TensorFile {
    /// Reads and checks the header of `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read, [`Error::SafeTensors`] when its header is malformed or
    /// describes tensors outside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let bad = |source| Error::SafeTensors {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|_| bad(SafeTensorError::HeaderTooSmall))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES {
            return Err(bad(SafeTensorError::HeaderTooLarge));
        }
        if header_len > file_len - 8 {
            return Err(bad(SafeTensorError::InvalidHeaderLength));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let header =
            std::str::from_utf8(&header).map_err(|e| bad(SafeTensorError::InvalidHeader(e)))?;
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(header)
            .map_err(|e| bad(SafeTensorError::InvalidHeaderDeserialization(e)))?;
        let data_start = 8 + header_len;
        let data_len = (file_len - data_start) as usize;
        let mut entries = BTreeMap::new();
        for (key, value) in raw {
            if key == "__metadata__" {
                continue;
            }
            let info: TensorInfo = serde_json::from_value(value)
                .map_err(|e| bad(SafeTensorError::InvalidHeaderDeserialization(e)))?;
            let (start, end) = info.data_offsets;
            let bytes = info
                .shape
                .iter()
                .try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
                .map(|bits| bits.div_ceil(8));
            if start > end || end > data_len || bytes != Some(end - start) {
                return Err(bad(SafeTensorError::InvalidOffset(key)));
            }
            entries.insert(key, info);
        }
        Ok(Self {
            path,
            entries,
            data_start,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn entry(&self, key: &str) -> Result<&TensorInfo> {
        self.entries.get(key).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            key: key.to_owned(),
        })
    }

    /// The tensor keys, sorted.
    ///
    /// # Errors
    /// Never in practice: the header was checked by [`TensorFile::open`].
    pub fn keys(&self) -> Result<Vec<String>> {
        Ok(self.entries.keys().cloned().collect())
    }

    /// The shape of tensor `key`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] when the key is absent.
    pub fn shape(&self, key: &str) -> Result<Vec<i64>> {
        Ok(self.entry(key)?.shape.iter().map(|&d| d as i64).collect())
    }

    /// The tensor `key` on `device`, converted to `kind` (`None` keeps the file's element type).
    ///
    /// # Errors
    /// [`Error::MissingTensor`] when the key is absent, [`Error::UnsupportedDtype`] for element
    /// types libtorch has no equivalent of, [`Error::Io`] when the file cannot be read (e.g. it
    /// was truncated after opening).
    pub fn tensor(&self, key: &str, device: Device, kind: Option<Kind>) -> Result<Tensor> {
        let info = self.entry(key)?;
        let file_kind = kind_of(info.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: self.path.clone(),
            key: key.to_owned(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = std::fs::File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(self.data_start + start as u64))
            .map_err(io)?;
        file.read_exact(&mut bytes).map_err(io)?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let host = Tensor::f_from_data_size(&bytes, &shape, file_kind)?;
        Ok(host
            .f_to_device(device)?
            .f_to_kind(kind.unwrap_or(file_kind))?)
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

/// What loading a set of files into a model's variables found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadReport {
    /// Variables that received a tensor.
    pub loaded: usize,
    /// Variables of the model that no file provides.
    pub missing: Vec<String>,
    /// File keys that no variable takes.
    pub unused: Vec<String>,
    /// Keys present on both sides with different shapes: (key, model shape, file shape).
    pub mismatched: Vec<(String, Vec<i64>, Vec<i64>)>,
}

impl LoadReport {
    /// True when every variable was loaded and every file tensor used.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.unused.is_empty() && self.mismatched.is_empty()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 8;
        let list = |keys: &[String]| {
            let mut s = keys
                .iter()
                .take(SHOWN)
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ");
            if keys.len() > SHOWN {
                s.push_str(&format!(" and {} more", keys.len() - SHOWN));
            }
            s
        };
        write!(f, "{} loaded", self.loaded)?;
        if !self.missing.is_empty() {
            write!(
                f,
                "; {} missing: {}",
                self.missing.len(),
                list(&self.missing)
            )?;
        }
        if !self.unused.is_empty() {
            write!(f, "; {} unused: {}", self.unused.len(), list(&self.unused))?;
        }
        if !self.mismatched.is_empty() {
            let shown: Vec<String> = self
                .mismatched
                .iter()
                .take(SHOWN)
                .map(|(k, model, file)| format!("`{k}` (model {model:?}, file {file:?})"))
                .collect();
            write!(
                f,
                "; {} mis-shaped: {}",
                self.mismatched.len(),
                shown.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Copies tensors from `files` into the variables of `vs`, converting each to its variable's
/// element type and device.
///
/// `file_key` maps a variable name to the key it has in the files (identity for the diffusers
/// layout; a table for other layouts). Fails with [`Error::Load`] naming every missing, unused and
/// mis-shaped key unless all match; variables are then left partly loaded and should be dropped.
///
/// # Errors
/// [`Error::Load`] as above; libtorch or file errors while copying.
pub fn load_into(
    vs: &VarStore,
    files: &[TensorFile],
    file_key: impl Fn(&str) -> String,
) -> Result<LoadReport> {
    let mut sources: BTreeMap<String, usize> = BTreeMap::new();
    for (i, file) in files.iter().enumerate() {
        for key in file.keys()? {
            sources.insert(key, i);
        }
    }
    let mut report = LoadReport::default();
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let mut used = std::collections::BTreeSet::new();
    for (name, mut var) in variables {
        let key = file_key(&name);
        let Some(&i) = sources.get(&key) else {
            report.missing.push(key);
            continue;
        };
        used.insert(key.clone());
        let file_shape = files[i].shape(&key)?;
        if file_shape != var.size() {
            report.mismatched.push((key, var.size(), file_shape));
            continue;
        }
        let src = files[i].tensor(&key, var.device(), Some(var.kind()))?;
        check_finite(&src, files[i].path(), &key)?;
        tch::no_grad(|| var.f_copy_(&src))?;
        report.loaded += 1;
    }
    report.unused = sources.into_keys().filter(|k| !used.contains(k)).collect();
    if report.is_complete() {
        Ok(report)
    } else {
        Err(Error::Load {
            files: files.iter().map(|f| f.path().to_path_buf()).collect(),
            report: Box::new(report),
        })
    }
}

/// Refuses a weight tensor (as converted to its model's element type) holding NaN or infinity,
/// naming the file and key: one such tensor makes every output of the model NaN, which training
/// would only notice as steps skipped for a non-finite loss. One host read per tensor, at load time.
///
/// # Errors
/// [`Error::NonFiniteWeights`]; libtorch errors.
pub fn check_finite(tensor: &Tensor, path: &Path, key: &str) -> Result<()> {
    if !tensor.f_is_floating_point()? {
        return Ok(());
    }
    let kind = tensor.f_kind()?;
    // libtorch's isfinite has no fp8 kernels; every fp8 value is exact in fp16.
    let checked = match kind {
        Kind::Float8e4m3fn | Kind::Float8e5m2 => tensor.f_to_kind(Kind::Half)?,
        _ => tensor.shallow_clone(),
    };
    let finite = checked
        .f_isfinite()?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    let count = tensor.numel() as i64 - finite;
    if count > 0 {
        return Err(Error::NonFiniteWeights {
            path: path.to_owned(),
            key: key.to_owned(),
            count,
            kind,
        });
    }
    Ok(())
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

    fn write_file(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> TensorFile {
        let path = dir.join(name);
        Tensor::write_safetensors(tensors, &path).unwrap();
        TensorFile::open(&path).unwrap()
    }

    #[test]
    fn load_into_copies_and_reports_every_problem() {
        let dir = std::env::temp_dir().join(format!("sdxl-load-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let good = write_file(
            &dir,
            "good.safetensors",
            &[("lin.weight", w.shallow_clone())],
        );
        let vs = VarStore::new(Device::Cpu);
        let _ = vs.root().sub("lin").zeros_no_train("weight", &[2, 3]);
        let report = load_into(&vs, std::slice::from_ref(&good), str::to_owned).unwrap();
        assert_eq!(report.loaded, 1);
        assert!(vs.variables()["lin.weight"].equal(&w));

        let bad = write_file(
            &dir,
            "bad.safetensors",
            &[
                (
                    "lin.weight",
                    Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
                ),
                ("extra.bias", w.shallow_clone()),
            ],
        );
        let vs2 = VarStore::new(Device::Cpu);
        let _ = vs2.root().sub("lin").zeros_no_train("weight", &[2, 3]);
        let _ = vs2.root().sub("other").zeros_no_train("weight", &[1]);
        let msg = load_into(&vs2, &[bad], str::to_owned)
            .unwrap_err()
            .to_string();
        for needle in [
            "bad.safetensors",
            "`other.weight`",
            "`extra.bias`",
            "`lin.weight` (model [2, 3], file [3, 2])",
        ] {
            assert!(msg.contains(needle), "{needle} not in: {msg}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_finite_weights_are_refused_naming_file_and_tensor() {
        let dir = std::env::temp_dir().join(format!("sdxl-load-nan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let _ = vs.root().sub("lin").zeros_no_train("weight", &[2, 2]);
        for (name, value, kind) in [
            ("nan.safetensors", f32::NAN, Kind::Float),
            ("inf.safetensors", f32::NEG_INFINITY, Kind::Float),
            // Finite in fp32, infinite once converted to the model's fp16.
            ("overflow.safetensors", 1e6, Kind::Half),
        ] {
            let w = Tensor::from_slice(&[0.5f32, value, 1.0, 2.0]).view([2, 2]);
            let file = write_file(&dir, name, &[("lin.weight", w)]);
            let mut vs = VarStore::new(Device::Cpu);
            let _ = vs.root().sub("lin").zeros_no_train("weight", &[2, 2]);
            vs.set_kind(kind);
            let msg = load_into(&vs, &[file], str::to_owned)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(name) && msg.contains("`lin.weight` holds 1 non-finite value(s)"),
                "{msg}"
            );
        }
        let fine = write_file(
            &dir,
            "fine.safetensors",
            &[(
                "lin.weight",
                Tensor::ones([2, 2], (Kind::Float, Device::Cpu)),
            )],
        );
        load_into(&vs, &[fine], str::to_owned).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = TensorFile::open("/nonexistent/model.safetensors")
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|msg| msg.contains("/nonexistent/model.safetensors")));
    }

    #[test]
    fn reads_tensors_on_demand_and_rejects_offsets_outside_the_file() {
        let dir = std::env::temp_dir().join(format!("sdxl-weights-lazy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
        let b = Tensor::from_slice(&[1.5f32, -2.0]).to_kind(Kind::BFloat16);
        let file = write_file(
            &dir,
            "two.safetensors",
            &[("a", a.shallow_clone()), ("b", b.shallow_clone())],
        );
        assert_eq!(file.keys().unwrap(), ["a", "b"]);
        assert_eq!(file.shape("a").unwrap(), [3, 4]);
        assert!(file.tensor("a", Device::Cpu, None).unwrap().equal(&a));
        let b_read = file.tensor("b", Device::Cpu, Some(Kind::Float)).unwrap();
        assert!(b_read.equal(&Tensor::from_slice(&[1.5f32, -2.0])));
        // The same file cut short: the header now points past the end.
        let bytes = std::fs::read(file.path()).unwrap();
        let cut = dir.join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
        let msg = TensorFile::open(&cut).err().unwrap().to_string();
        assert!(
            msg.contains("cut.safetensors") && msg.contains("not a valid safetensors"),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_is_rejected_with_the_path() {
        let dir = std::env::temp_dir().join(format!("sdxl-weights-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage.safetensors");
        std::fs::write(&path, b"\x08\x00\x00\x00\x00\x00\x00\x00not json").unwrap();
        let msg = TensorFile::open(&path).err().unwrap().to_string();
        assert!(
            msg.contains("garbage.safetensors") && msg.contains("not a valid safetensors"),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
