//! What Lion, Prodigy and Adafactor share: parameter checks, device scalars, gated writes and
//! their state files.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::adamw::{assign, check_group_value};
use crate::{Error, ParamGroup, Result};

/// The device of the first parameter, after checking that every parameter is a defined
/// floating-point tensor on that device and every group's lr and weight decay are finite and ≥ 0.
pub(crate) fn check_groups(groups: &[ParamGroup]) -> Result<Device> {
    let device = groups
        .iter()
        .flat_map(|g| g.params.first())
        .map(Tensor::device)
        .next()
        .unwrap_or(Device::Cpu);
    for (group_index, group) in groups.iter().enumerate() {
        check_group_value(group_index, "lr", group.lr)?;
        check_group_value(group_index, "weight_decay", group.weight_decay)?;
        for (index, param) in group.params.iter().enumerate() {
            let unsupported = |reason: String| Error::UnsupportedParameter {
                group: group_index,
                index,
                reason,
            };
            if !param.defined() {
                return Err(unsupported("undefined tensor".into()));
            }
            if param.kind() != Kind::Float {
                return Err(unsupported(format!(
                    "element type {:?}; this optimizer updates float32 parameters",
                    param.kind()
                )));
            }
            if param.device() != device {
                return Err(unsupported(format!(
                    "lives on {:?}, the first parameter on {device:?}",
                    param.device()
                )));
            }
        }
    }
    Ok(device)
}

/// A 0-dim float64 tensor on `device`.
pub(crate) fn scalar(value: f64, device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&[value])?
        .f_reshape([] as [i64; 0])?
        .f_to_device(device)?)
}

/// Checks a `step_if` condition (metadata only: no synchronisation) and returns it as bool.
pub(crate) fn check_condition(apply: &Tensor, device: Device) -> Result<Tensor> {
    let real = apply.defined()
        && !matches!(
            apply.kind(),
            Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble
        );
    if !real || apply.dim() != 0 || apply.device() != device {
        return Err(Error::StepCondition {
            shape: if apply.defined() {
                apply.size()
            } else {
                Vec::new()
            },
            kind: if apply.defined() {
                apply.kind()
            } else {
                Kind::Bool
            },
            device: if apply.defined() {
                apply.device()
            } else {
                device
            },
            expected: device,
        });
    }
    Ok(apply.f_to_kind(Kind::Bool)?)
}

/// Writes `new` into `dst`, or keeps `dst` where the gate (0-dim bool) is false.
pub(crate) fn put(dst: &Tensor, new: &Tensor, gate: Option<&Tensor>) -> Result<()> {
    match gate {
        Some(gate) => assign(dst, &new.f_where_self(gate, dst)?),
        None => assign(dst, new),
    }
}

/// The two gates of a step combined: `a and b`, either of them optional.
pub(crate) fn and(a: Option<&Tensor>, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(a.f_logical_and(b)?),
        (Some(g), None) | (None, Some(g)) => Some(g.shallow_clone()),
        (None, None) => None,
    })
}

/// An entry of a state file.
pub(crate) enum Entry {
    /// A device tensor of the state: saved, and restored on load.
    State(Tensor),
    /// A setting: saved as float64, and on load the file must hold the same value.
    Setting(f64),
    /// A constant tensor (a code table): saved, and on load the file must hold the same bits.
    Fixed(Tensor),
}

/// Bytes of the per-parameter state tensors among `entries` (keys `state.*`).
pub(crate) fn per_parameter_bytes(entries: &[(String, Entry)]) -> i64 {
    entries
        .iter()
        .filter(|(key, _)| key.starts_with("state."))
        .map(|(_, entry)| match entry {
            Entry::State(t) => t.numel() as i64 * t.kind().elt_size_in_bytes() as i64,
            Entry::Setting(_) | Entry::Fixed(_) => 0,
        })
        .sum()
}

/// Writes `entries` as safetensors to a temporary name next to `path` and renames it.
pub(crate) fn save_entries(path: &Path, entries: &[(String, Entry)]) -> Result<()> {
    let mut named = Vec::with_capacity(entries.len());
    for (key, entry) in entries {
        let tensor = match entry {
            Entry::State(t) | Entry::Fixed(t) => t.f_to_device(Device::Cpu)?.f_contiguous()?,
            Entry::Setting(v) => Tensor::f_from_slice(&[*v])?.f_reshape([] as [i64; 0])?,
        };
        named.push((key.clone(), tensor));
    }
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    let temporary = path.with_file_name(name);
    Tensor::write_safetensors(&named, &temporary).map_err(|source| Error::Io {
        path: temporary.clone(),
        source: std::io::Error::other(source.to_string()),
    })?;
    std::fs::rename(&temporary, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a file written by [`save_entries`] for the same `entries`: every key must be there with
/// the element type and shape of the state tensor, and every setting must be equal. Checks all
/// entries before it changes any state.
pub(crate) fn load_entries(path: &Path, entries: &[(String, Entry)]) -> Result<()> {
    let tensors = Tensor::read_safetensors(path).map_err(|source| Error::UnreadableStateFile {
        path: path.to_path_buf(),
        source,
    })?;
    let mut file: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    let mismatch = |key: &str, reason: String| Error::StateMismatch {
        path: path.to_path_buf(),
        key: key.into(),
        reason,
    };
    let mut restores = Vec::new();
    for (key, entry) in entries {
        let stored = file
            .remove(key)
            .ok_or_else(|| mismatch(key, "missing".into()))?;
        let (kind, shape) = match entry {
            Entry::State(t) | Entry::Fixed(t) => (t.kind(), t.size()),
            Entry::Setting(_) => (Kind::Double, Vec::new()),
        };
        if stored.kind() != kind || stored.size() != shape {
            return Err(mismatch(
                key,
                format!(
                    "{:?} of shape {:?}, expected {kind:?} of shape {shape:?}",
                    stored.kind(),
                    stored.size()
                ),
            ));
        }
        match entry {
            Entry::State(t) => restores.push((t, stored)),
            Entry::Fixed(t) => {
                if !stored.f_equal(&t.f_to_device(Device::Cpu)?)? {
                    return Err(mismatch(key, "differs from this optimizer's".into()));
                }
            }
            Entry::Setting(v) => {
                let found = stored.f_double_value(&[])?;
                if found.to_bits() != v.to_bits() {
                    return Err(mismatch(key, format!("{found}, this optimizer has {v}")));
                }
            }
        }
    }
    if let Some(key) = file.keys().next() {
        return Err(mismatch(key, "not a state of this optimizer".into()));
    }
    for (dst, stored) in restores {
        assign(dst, &stored.f_to_device(dst.device())?)?;
    }
    Ok(())
}

/// One parameter group with per-parameter states `S`.
#[derive(Debug)]
pub(crate) struct Group<S> {
    pub(crate) params: Vec<Tensor>,
    pub(crate) states: Vec<S>,
    /// The learning rate as a 0-dim float64 tensor on the device, read by the step.
    pub(crate) lr: Tensor,
    pub(crate) lr_value: f64,
    pub(crate) weight_decay: f64,
}

/// The groups of an optimizer, with what every optimizer here does with them.
#[derive(Debug)]
pub(crate) struct Groups<S> {
    pub(crate) groups: Vec<Group<S>>,
    pub(crate) device: Device,
}

impl<S> Groups<S> {
    /// Checks `groups` and makes each parameter's state with `init`.
    pub(crate) fn new(
        groups: Vec<ParamGroup>,
        mut init: impl FnMut(&Tensor) -> Result<S>,
    ) -> Result<Self> {
        let device = check_groups(&groups)?;
        let mut built = Vec::with_capacity(groups.len());
        for group in groups {
            let states = group.params.iter().map(&mut init).collect::<Result<_>>()?;
            built.push(Group {
                params: group.params,
                states,
                lr: scalar(group.lr, device)?,
                lr_value: group.lr,
                weight_decay: group.weight_decay,
            });
        }
        Ok(Self {
            groups: built,
            device,
        })
    }

    pub(crate) fn group(&self, group: usize) -> Result<&Group<S>> {
        let groups = self.groups.len();
        self.groups
            .get(group)
            .ok_or(Error::NoSuchGroup { group, groups })
    }

    pub(crate) fn set_learning_rate(&mut self, group: usize, lr: f64) -> Result<()> {
        check_group_value(group, "lr", lr)?;
        let groups = self.groups.len();
        let entry = self
            .groups
            .get_mut(group)
            .ok_or(Error::NoSuchGroup { group, groups })?;
        let _ = entry.lr.f_fill_(lr)?;
        entry.lr_value = lr;
        Ok(())
    }

    pub(crate) fn zero_grad(&self) -> Result<()> {
        for param in self.groups.iter().flat_map(|g| &g.params) {
            let mut grad = param.grad();
            if grad.defined() {
                let _ = grad.f_zero_()?;
            }
        }
        Ok(())
    }

    /// The entries every state file has: per group lr (restored) and weight decay (must match).
    pub(crate) fn group_entries(&self) -> Vec<(String, Entry)> {
        let mut entries = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            entries.push((
                format!("group.{g}.lr"),
                Entry::State(group.lr.shallow_clone()),
            ));
            entries.push((
                format!("group.{g}.weight_decay"),
                Entry::Setting(group.weight_decay),
            ));
        }
        entries
    }

    /// After a load: the host copies of the learning rates from their device tensors.
    pub(crate) fn sync_lr_values(&mut self) -> Result<()> {
        for group in &mut self.groups {
            group.lr_value = group.lr.f_double_value(&[])?;
        }
        Ok(())
    }
}

/// Generates the methods every optimizer of this crate has besides `new`, `step_if` and its
/// state file: learning rates, step count, `zero_grad`, `step`.
macro_rules! shared_methods {
    () => {
        /// The device the parameters and states live on.
        pub fn device(&self) -> tch::Device {
            self.groups.device
        }

        /// Number of parameter groups.
        pub fn group_count(&self) -> usize {
            self.groups.groups.len()
        }

        /// The learning rate of a group.
        pub fn learning_rate(&self, group: usize) -> $crate::Result<f64> {
            Ok(self.groups.group(group)?.lr_value)
        }

        /// The weight decay of a group.
        pub fn weight_decay(&self, group: usize) -> $crate::Result<f64> {
            Ok(self.groups.group(group)?.weight_decay)
        }

        /// Sets a group's learning rate. This writes the device tensor the step reads, so call
        /// it between steps (outside a captured graph); a replayed graph then uses the new value.
        pub fn set_learning_rate(&mut self, group: usize, lr: f64) -> $crate::Result<()> {
            self.groups.set_learning_rate(group, lr)
        }

        /// Number of parameter elements the optimizer updates.
        pub fn param_count(&self) -> i64 {
            self.groups
                .groups
                .iter()
                .flat_map(|g| &g.params)
                .map(|p| p.numel() as i64)
                .sum()
        }

        /// Bytes held by the per-parameter states (the tensors its state file keeps under
        /// `state.*`), not counting a few scalars; the config's `state_bytes` gives the same
        /// count from a parameter's shape alone.
        pub fn state_bytes(&self) -> i64 {
            $crate::common::per_parameter_bytes(&self.entries())
        }

        /// Steps taken, as the device tensor the step updates (0-dim float64).
        pub fn step_count(&self) -> &tch::Tensor {
            &self.step
        }

        /// Sets every parameter's gradient to zero (parameters without a gradient are left alone).
        pub fn zero_grad(&mut self) -> $crate::Result<()> {
            self.groups.zero_grad()
        }

        /// One step over every parameter that has a gradient; parameters without one are
        /// skipped, as in the reference. Nothing is read back to the host.
        pub fn step(&mut self) -> $crate::Result<()> {
            tch::no_grad(|| self.step_inner(None))
        }

        /// [`step`](Self::step) if `apply` holds, decided on the device: `apply` is a 0-dim bool
        /// (or 0/1 number) on the optimizer's device. When it is false, parameters, states and the
        /// step count keep their exact values; when true the result is that of `step`.
        pub fn step_if(&mut self, apply: &tch::Tensor) -> $crate::Result<()> {
            let apply = $crate::common::check_condition(apply, self.groups.device)?;
            tch::no_grad(|| self.step_inner(Some(&apply)))
        }
    };
}
pub(crate) use shared_methods;
