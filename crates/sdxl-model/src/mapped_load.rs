//! Loading weights whose file layout differs from the model's: each variable names the file key it
//! comes from and how the stored tensor becomes the variable (as stored, one third of a fused q/k/v
//! tensor, a transpose, a 1×1 convolution kernel read as a matrix).
//!
//! Used by the single-file (SGM / LDM) loaders of the text encoders and the VAE. Like
//! [`crate::weights::load_into`] it fails with a report naming every missing, unused and mis-shaped
//! key; only keys under the component's prefix count, so one checkpoint holding several models loads
//! each of them separately.

use std::collections::BTreeSet;

use tch::Tensor;
use tch::nn::VarStore;

use crate::weights::{LoadReport, TensorFile};
use crate::{Error, Result};

/// Where a variable's value is in the file (keys relative to the component's prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// The tensor as stored.
    Same(String),
    /// Rows `[part·n, (part+1)·n)` of a fused q/k/v tensor of `3n` rows.
    FusedPart(String, i64),
    /// The transpose of a stored matrix.
    Transposed(String),
    /// A `[out, in, 1, 1]` convolution kernel used as an `[out, in]` linear weight.
    PointwiseConv(String),
}

impl Source {
    pub(crate) fn key(&self) -> &str {
        match self {
            Source::Same(k)
            | Source::FusedPart(k, _)
            | Source::Transposed(k)
            | Source::PointwiseConv(k) => k,
        }
    }

    /// The variable's value from the stored tensor, or `None` when the stored shape cannot give one.
    fn extract(&self, stored: Tensor) -> Option<Tensor> {
        match self {
            Source::Same(_) => Some(stored),
            Source::Transposed(_) => (stored.dim() == 2).then(|| stored.tr()),
            Source::FusedPart(_, part) => {
                let rows = stored.size().first().copied().unwrap_or(0);
                (rows % 3 == 0 && rows > 0).then(|| stored.narrow(0, part * rows / 3, rows / 3))
            }
            Source::PointwiseConv(_) => match *stored.size().as_slice() {
                [out, input, 1, 1] => Some(stored.reshape([out, input])),
                [_, _] => Some(stored),
                _ => None,
            },
        }
    }
}

/// Fills every variable of `vs` from `file`: `source_of` maps a variable name to its [`Source`]
/// (relative to `prefix`); keys under `prefix` listed in `ignored` may stay unused.
///
/// # Errors
/// [`Error::Load`] unless every variable is loaded and every other key under `prefix` used.
pub(crate) fn load_mapped(
    vs: &VarStore,
    file: &TensorFile,
    prefix: &str,
    ignored: &[&str],
    source_of: impl Fn(&str) -> Option<Source>,
) -> Result<LoadReport> {
    let in_file: BTreeSet<String> = file
        .keys()?
        .into_iter()
        .filter(|k| k.starts_with(prefix))
        .collect();
    let mut report = LoadReport::default();
    let mut used = BTreeSet::new();
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in variables {
        let Some(source) = source_of(&name) else {
            report
                .missing
                .push(format!("{prefix}<no mapping for `{name}`>"));
            continue;
        };
        let key = format!("{prefix}{}", source.key());
        if !in_file.contains(&key) {
            report.missing.push(key);
            continue;
        }
        used.insert(key.clone());
        let stored = file.tensor(&key, var.device(), Some(var.kind()))?;
        crate::weights::check_finite(&stored, file.path(), &key)?;
        match source.extract(stored) {
            Some(value) if value.size() == var.size() => {
                tch::no_grad(|| var.f_copy_(&value))?;
                report.loaded += 1;
            }
            _ => {
                let file_shape = file.shape(&key)?;
                report.mismatched.push((key, var.size(), file_shape));
            }
        }
    }
    report.unused = in_file
        .into_iter()
        .filter(|k| {
            !used.contains(k) && !ignored.iter().any(|i| k.strip_prefix(prefix) == Some(*i))
        })
        .collect();
    if report.is_complete() {
        Ok(report)
    } else {
        Err(Error::Load {
            files: vec![file.path().to_path_buf()],
            report: Box::new(report),
        })
    }
}
