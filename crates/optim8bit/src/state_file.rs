//! Saving and loading the complete optimizer state as safetensors, for an exact resume.
//!
//! The per-parameter tensors use bitsandbytes' state names (`state1`/`state2` for the moments,
//! `absmax1`/`absmax2` for the block scales, `qmap1`/`qmap2` for the code tables; see
//! `Optimizer2State.init_state` in `bitsandbytes/optim/optimizer.py`), keyed by group and position:
//!
//! | key | content |
//! |---|---|
//! | `step` | steps taken, int64 |
//! | `beta1`, `beta2`, `eps` | float64 |
//! | `min_8bit_size` | int64 |
//! | `precision` | int64, 8 or 32 |
//! | `qmap1`, `qmap2` | the signed and unsigned code tables, float32 `[256]` |
//! | `group.{g}.lr`, `group.{g}.weight_decay` | float64 |
//! | `state.{g}.{i}.state1`, `.state2` | uint8 codes (8-bit) or float32 moments, the parameter's shape |
//! | `state.{g}.{i}.absmax1`, `.absmax2` | float32 `[ceil(numel / 256)]`, 8-bit states only |
//!
//! Files are written to a temporary name next to the target and renamed, so a crash never leaves a
//! half-written state behind. Loading checks every key, element type and shape before it changes
//! anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::adamw::{AdamW, M_PAD_CODE, Moments, StatePrecision, assign};
use crate::quantize::{BLOCK_SIZE, block_count};
use crate::{Error, Result};

fn scalar_f64(value: f64) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&[value])?.f_reshape([] as [i64; 0])?)
}

fn scalar_i64(value: i64) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&[value])?.f_reshape([] as [i64; 0])?)
}

fn precision_bits(precision: StatePrecision) -> i64 {
    match precision {
        StatePrecision::EightBit => 8,
        StatePrecision::Fp32 => 32,
    }
}

impl AdamW {
    /// Writes the complete state (step, hyper-parameters, learning rates, moments) to `path`
    /// atomically. This reads the device tensors, so it synchronises with the device.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let cpu =
            |t: &Tensor| -> Result<Tensor> { Ok(t.f_to_device(Device::Cpu)?.f_contiguous()?) };
        let mut named: Vec<(String, Tensor)> = vec![
            (
                "step".into(),
                self.step.f_to_kind(Kind::Int64)?.f_to_device(Device::Cpu)?,
            ),
            ("beta1".into(), scalar_f64(self.config.beta1)?),
            ("beta2".into(), scalar_f64(self.config.beta2)?),
            ("eps".into(), scalar_f64(self.config.eps)?),
            (
                "min_8bit_size".into(),
                scalar_i64(self.config.min_8bit_size)?,
            ),
            (
                "precision".into(),
                scalar_i64(precision_bits(self.config.precision))?,
            ),
            ("qmap1".into(), cpu(self.signed_map.code())?),
            ("qmap2".into(), cpu(self.unsigned_map.code())?),
        ];
        for (g, group) in self.groups.iter().enumerate() {
            named.push((format!("group.{g}.lr"), scalar_f64(group.lr_value)?));
            named.push((
                format!("group.{g}.weight_decay"),
                scalar_f64(group.weight_decay)?,
            ));
            for (i, slot) in group.slots.iter().enumerate() {
                let shape = slot.param.size();
                let unpadded = |t: &Tensor| -> Result<Tensor> {
                    cpu(&t.f_narrow(0, 0, slot.numel)?.f_reshape(&shape)?)
                };
                let key = |name: &str| format!("state.{g}.{i}.{name}");
                match &slot.moments {
                    Moments::Blockwise {
                        m_codes,
                        v_codes,
                        m_absmax,
                        v_absmax,
                    } => {
                        named.push((key("state1"), unpadded(m_codes)?));
                        named.push((key("state2"), unpadded(v_codes)?));
                        named.push((key("absmax1"), cpu(m_absmax)?));
                        named.push((key("absmax2"), cpu(v_absmax)?));
                    }
                    Moments::Full { m, v } => {
                        named.push((key("state1"), unpadded(m)?));
                        named.push((key("state2"), unpadded(v)?));
                    }
                }
            }
        }
        let temporary = temporary_path(path);
        Tensor::write_safetensors(&named, &temporary).map_err(|source| Error::Io {
            path: temporary.clone(),
            source: std::io::Error::other(source.to_string()),
        })?;
        std::fs::rename(&temporary, path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Restores a state written by [`AdamW::save`] for the same parameters (same groups, same
    /// parameter sizes, same precision and `min_8bit_size`). Step count, betas, eps, learning
    /// rates and weight decays are taken from the file. Nothing changes if any check fails.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tensors =
            Tensor::read_safetensors(path).map_err(|source| Error::UnreadableStateFile {
                path: path.to_path_buf(),
                source,
            })?;
        let mut file = StateFile {
            path,
            tensors: tensors.into_iter().collect(),
        };

        let precision = file.scalar_i64("precision")?;
        if precision != precision_bits(self.config.precision) {
            return Err(file.mismatch(
                "precision",
                format!(
                    "the file has {precision}-bit states, this optimizer {}-bit",
                    precision_bits(self.config.precision)
                ),
            ));
        }
        let min_8bit_size = file.scalar_i64("min_8bit_size")?;
        if min_8bit_size != self.config.min_8bit_size {
            return Err(file.mismatch(
                "min_8bit_size",
                format!(
                    "the file has {min_8bit_size}, this optimizer {}",
                    self.config.min_8bit_size
                ),
            ));
        }
        let step = file.scalar_i64("step")?;
        let (beta1, beta2, eps) = (
            file.scalar_f64("beta1")?,
            file.scalar_f64("beta2")?,
            file.scalar_f64("eps")?,
        );
        for name in ["qmap1", "qmap2"] {
            let ours = if name == "qmap1" {
                self.signed_map.code()
            } else {
                self.unsigned_map.code()
            };
            let theirs = file.tensor(name, Kind::Float, &[256])?;
            if !theirs.f_equal(&ours.f_to_device(Device::Cpu)?)? {
                return Err(file.mismatch(
                    name,
                    "the code table differs from bitsandbytes' dynamic map".into(),
                ));
            }
        }

        // Everything is read and checked into `staged` before anything is assigned.
        let mut hyper = Vec::with_capacity(self.groups.len());
        let mut staged: Vec<(&Tensor, Tensor)> = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            hyper.push((
                file.scalar_f64(&format!("group.{g}.lr"))?,
                file.scalar_f64(&format!("group.{g}.weight_decay"))?,
            ));
            for (i, slot) in group.slots.iter().enumerate() {
                let shape = slot.param.size();
                let key = |name: &str| format!("state.{g}.{i}.{name}");
                match &slot.moments {
                    Moments::Blockwise {
                        m_codes,
                        v_codes,
                        m_absmax,
                        v_absmax,
                    } => {
                        let blocks = block_count(slot.numel, BLOCK_SIZE);
                        let padding = blocks * BLOCK_SIZE - slot.numel;
                        let pad = |codes: Tensor, fill: f64| -> Result<Tensor> {
                            let tail = Tensor::f_full([padding], fill, (Kind::Uint8, Device::Cpu))?;
                            Ok(Tensor::f_cat(&[codes.f_reshape([-1])?, tail], 0)?)
                        };
                        staged.push((
                            m_codes,
                            pad(
                                file.tensor(&key("state1"), Kind::Uint8, &shape)?,
                                M_PAD_CODE,
                            )?,
                        ));
                        staged.push((
                            v_codes,
                            pad(file.tensor(&key("state2"), Kind::Uint8, &shape)?, 0.0)?,
                        ));
                        staged.push((
                            m_absmax,
                            file.tensor(&key("absmax1"), Kind::Float, &[blocks])?,
                        ));
                        staged.push((
                            v_absmax,
                            file.tensor(&key("absmax2"), Kind::Float, &[blocks])?,
                        ));
                    }
                    Moments::Full { m, v } => {
                        staged.push((
                            m,
                            file.tensor(&key("state1"), Kind::Float, &shape)?
                                .f_reshape([-1])?,
                        ));
                        staged.push((
                            v,
                            file.tensor(&key("state2"), Kind::Float, &shape)?
                                .f_reshape([-1])?,
                        ));
                    }
                }
            }
        }
        if let Some(extra) = file.tensors.keys().min() {
            return Err(file.mismatch(
                extra,
                format!(
                    "not a state of this optimizer ({} unexpected tensors)",
                    file.tensors.len()
                ),
            ));
        }

        for (target, value) in staged {
            assign(target, &value)?;
        }
        let _ = self.step.f_fill_(step as f64)?;
        self.config.beta1 = beta1;
        self.config.beta2 = beta2;
        self.config.eps = eps;
        for (group, (lr, weight_decay)) in self.groups.iter_mut().zip(hyper) {
            let _ = group.lr.f_fill_(lr)?;
            group.lr_value = lr;
            group.weight_decay = weight_decay;
        }
        Ok(())
    }
}

/// `file.safetensors` → `file.safetensors.tmp` in the same folder (same file system, so the
/// rename is atomic).
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The tensors of a state file, taken out one by one with their checks.
struct StateFile<'a> {
    path: &'a Path,
    tensors: HashMap<String, Tensor>,
}

impl StateFile<'_> {
    fn mismatch(&self, key: &str, reason: String) -> Error {
        Error::StateMismatch {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason,
        }
    }

    fn tensor(&mut self, key: &str, kind: Kind, shape: &[i64]) -> Result<Tensor> {
        let tensor = self
            .tensors
            .remove(key)
            .ok_or_else(|| self.mismatch(key, "missing".into()))?;
        if tensor.kind() != kind {
            return Err(self.mismatch(
                key,
                format!("element type {:?}, expected {kind:?}", tensor.kind()),
            ));
        }
        if tensor.size() != shape {
            return Err(self.mismatch(
                key,
                format!("shape {:?}, expected {shape:?}", tensor.size()),
            ));
        }
        Ok(tensor)
    }

    fn scalar_f64(&mut self, key: &str) -> Result<f64> {
        Ok(self.tensor(key, Kind::Double, &[])?.f_double_value(&[])?)
    }

    fn scalar_i64(&mut self, key: &str) -> Result<i64> {
        Ok(self.tensor(key, Kind::Int64, &[])?.f_int64_value(&[])?)
    }
}
