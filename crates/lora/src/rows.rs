//! Several adapter sets on one model at once, each applied to its own rows of the batch.
//!
//! [`attach_rows`] puts the adapters taken off by [`crate::detach`] back on their layers as *row
//! adapters*: an adapter that adds its product only to rows `start..end` of the layer's input (its
//! first dimension, the batch in every model of this workspace), so that K training runs sharing
//! one frozen model (a sweep's variants) compute their micro-steps in one forward pass. The base
//! product stays one matrix product over every row; each row adapter then adds `scale · B·A·x` to
//! its own rows, one small product per slice (so the ranks of the sets may differ), and rows that no
//! row adapter covers keep the base output. Each slice's arithmetic is the one the layer's ordinary
//! single-adapter path does on those rows, so the gradients of a row adapter come only from its
//! own rows, and the rows are independent of one another. [`detach_rows`] takes them off again.
//!
//! Row adapters are transient: they are not listed by [`crate::trainable_variables`], merged,
//! saved, or seen by [`crate::packing::fused_forward`] (which declines a layer that has any).

use std::collections::BTreeMap;
use std::ops::Range;

use tch::{Kind, Tensor};

use crate::adapter::Adapter;
use crate::inject::DetachedAdapters;
use crate::layer::{AdaptedLayer, for_each_layer};
use crate::linear::HasLinears;
use crate::{Error, Result};

/// One adapter applied to rows `rows` of its layer's input.
#[derive(Debug)]
pub(crate) struct RowAdapter {
    pub(crate) rows: Range<i64>,
    pub(crate) adapter: Adapter,
}

/// Why `adapter` cannot be a row adapter of a layer of `shape` whose row adapters are `existing`.
fn refusal(
    layer: &dyn AdaptedLayer,
    existing: &[RowAdapter],
    rows: &Range<i64>,
    adapter: &Adapter,
) -> Option<String> {
    let shape = layer.shape();
    let (down, up) = shape.adapter_shapes(adapter.rank());
    if adapter.down.size() != down || adapter.up.size() != up {
        return Some(format!(
            "down {:?} and up {:?} do not fit the layer (need {down:?} and {up:?})",
            adapter.down.size(),
            adapter.up.size()
        ));
    }
    if adapter.is_dora() {
        return Some("is a DoRA adapter; row adapters are plain LoRA only".into());
    }
    if adapter.dropout > 0.0 {
        return Some(format!(
            "has dropout {}; row adapters apply none (each run's masks come from its own generator)",
            adapter.dropout
        ));
    }
    if adapter.is_merged() {
        return Some("is merged into the base weight".into());
    }
    existing
        .iter()
        .find(|r| r.rows.start < rows.end && rows.start < r.rows.end)
        .map(|r| {
            format!(
                "rows {}..{} overlap the rows {}..{} of another row adapter",
                rows.start, rows.end, r.rows.start, r.rows.end
            )
        })
}

/// Puts adapters taken off by [`crate::detach`] back on the layers they came from as row
/// adapters of rows `rows` (module documentation): each adds its product to those rows of its
/// layer's input only. Several sets, of disjoint rows, can be on a model at once, beside its
/// ordinary adapters (which apply to every row).
///
/// Everything is checked before anything is attached: on success `detached` is left empty; on an
/// error nothing was attached and `detached` keeps every adapter.
///
/// # Errors
/// [`Error::InvalidConfig`] for empty or negative rows, a DoRA adapter, an adapter with dropout,
/// a merged adapter or rows that overlap another row adapter of the layer;
/// [`Error::ShapeMismatch`] for an adapter that does not fit its layer;
/// [`Error::ModulesNotInModel`] naming the modules `model` does not have.
///
/// # Panics
/// The forward pass of an adapted layer panics (libtorch's `split_with_sizes`) when its input has fewer
/// rows than `rows.end`.
pub fn attach_rows(
    model: &mut dyn HasLinears,
    rows: Range<i64>,
    detached: &mut DetachedAdapters,
) -> Result<()> {
    if rows.start < 0 || rows.end <= rows.start {
        return Err(Error::InvalidConfig {
            field: "row adapters' rows".into(),
            reason: format!(
                "{}..{} is empty or negative; rows are a non-empty range of the batch",
                rows.start, rows.end
            ),
        });
    }
    let waiting: BTreeMap<&str, &Adapter> = detached
        .adapters
        .iter()
        .map(|(module, adapter)| (module.as_str(), adapter))
        .collect();
    let mut found = 0;
    let mut failure = None;
    for_each_layer(model, &mut |module, layer| {
        let Some(adapter) = waiting.get(module) else {
            return;
        };
        found += 1;
        if failure.is_some() {
            return;
        }
        if let Some(reason) = refusal(&*layer, layer.row_adapters(), &rows, adapter) {
            failure = Some(if reason.starts_with("down ") {
                Error::ShapeMismatch {
                    module: module.to_owned(),
                    reason,
                }
            } else {
                Error::InvalidConfig {
                    field: format!("row adapter `{}` of `{module}`", adapter.name),
                    reason,
                }
            });
        }
    });
    if let Some(error) = failure {
        return Err(error);
    }
    if found < waiting.len() {
        let mut present = Vec::new();
        for_each_layer(model, &mut |module, _| {
            if waiting.contains_key(module) {
                present.push(module.to_owned());
            }
        });
        return Err(Error::ModulesNotInModel {
            modules: waiting
                .keys()
                .filter(|m| !present.iter().any(|p| p == *m))
                .map(|m| (*m).to_owned())
                .collect(),
        });
    }
    let mut adapters: BTreeMap<String, Adapter> =
        std::mem::take(&mut detached.adapters).into_iter().collect();
    for_each_layer(model, &mut |module, layer| {
        if let Some(adapter) = adapters.remove(module) {
            let list = layer.row_adapters_mut();
            let at = list.partition_point(|r| r.rows.start < rows.start);
            list.insert(
                at,
                RowAdapter {
                    rows: rows.clone(),
                    adapter,
                },
            );
        }
    });
    Ok(())
}

/// Takes the row adapters of rows `rows` (as [`attach_rows`] put them) off every layer that has
/// them, for [`crate::attach`] or [`attach_rows`] later.
///
/// # Errors
/// [`Error::InvalidConfig`] when no layer has row adapters of those rows.
pub fn detach_rows(model: &mut dyn HasLinears, rows: Range<i64>) -> Result<DetachedAdapters> {
    let mut detached = DetachedAdapters::default();
    for_each_layer(model, &mut |module, layer| {
        let list = layer.row_adapters_mut();
        if let Some(at) = list.iter().position(|r| r.rows == rows) {
            let removed = list.remove(at);
            detached.adapters.push((module.to_owned(), removed.adapter));
        }
    });
    if detached.is_empty() {
        return Err(Error::InvalidConfig {
            field: "row adapters' rows".into(),
            reason: format!(
                "no layer has row adapters of rows {}..{}",
                rows.start, rows.end
            ),
        });
    }
    Ok(detached)
}

/// `result` with each enabled row adapter's slice replaced by `product(result rows, input rows,
/// adapter)` (the layer's single-adapter arithmetic on those rows, in `result`'s type); the rows no
/// row adapter covers are `result`'s. One concatenation along the first dimension, whose backward
/// hands each slice its own rows' gradient.
pub(crate) fn apply_row_adapters(
    result: Tensor,
    xs: &Tensor,
    row_adapters: &[RowAdapter],
    product: impl Fn(&Tensor, &Tensor, &Adapter) -> Tensor,
) -> Tensor {
    let mut active = row_adapters
        .iter()
        .filter(|r| r.adapter.is_enabled())
        .peekable();
    if active.peek().is_none() {
        return result;
    }
    // One split of the output and of the input into the adapters' rows and the gaps between
    // them, not a `narrow` per adapter: the backward pass of a split is one concatenation of its
    // pieces' gradients, where each `narrow`'s backward fills a zero tensor of every row and adds
    // it to the others' — work that grew with K² in a batched sweep of K sets of rows.
    let total = result.size()[0];
    let kind: Kind = result.kind();
    let mut sizes = Vec::new();
    let mut owners = Vec::new();
    let mut at = 0;
    for row in active {
        let (start, len) = (row.rows.start, row.rows.end - row.rows.start);
        if start > at {
            sizes.push(start - at);
            owners.push(None);
        }
        sizes.push(len);
        owners.push(Some(row));
        at = row.rows.end;
    }
    if at < total {
        sizes.push(total - at);
        owners.push(None);
    }
    let results = result.split_with_sizes(sizes.as_slice(), 0);
    let inputs = xs.split_with_sizes(sizes.as_slice(), 0);
    let pieces: Vec<Tensor> = owners
        .iter()
        .zip(results.iter().zip(&inputs))
        .map(|(owner, (result, xs))| match owner {
            Some(row) => product(result, xs, &row.adapter).to_kind(kind),
            None => result.shallow_clone(),
        })
        .collect();
    Tensor::cat(&pieces, 0)
}

#[cfg(test)]
#[path = "rows/tests.rs"]
mod tests;
