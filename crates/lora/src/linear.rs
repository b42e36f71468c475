//! A linear layer that can carry adapters.
//!
//! Every linear layer of the models in this workspace is a [`Linear`], so LoRA/DoRA adapters can be
//! attached to any of them by module path. Models expose their linear layers through
//! [`HasLinears`]; injection, merging and the file formats work on that alone and know nothing of
//! the model they adapt.
//!
//! A frozen base weight can be stored in fp8 ([`Linear::quantize_fp8`], see [`crate::fp8`]) and is
//! then widened to its compute type inside `forward`.

use std::sync::Arc;

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::adapter::Adapter;
use crate::fp8::{Fp8Products, quantize_e4m3, scaled_product, tensor_bytes};
use crate::randomness::Randomness;
use crate::rows::{RowAdapter, apply_row_adapters};
use crate::{Error, Result};

/// `y = x Wᵀ + b`, the equivalent of `torch.nn.Linear` (weight `[out, in]`, optional bias `[out]`),
/// plus any number of LoRA / DoRA adapters (peft's `lora.Linear`).
///
/// The variables are created under the given path as `weight` and `bias`, so a model's variable
/// names equal the keys of a diffusers / transformers safetensors file. Adapters live elsewhere
/// (their own variable store, usually fp32) and are added with [`Linear::add_adapter`], normally by
/// [`crate::inject`] or a LoRA file loader.
#[derive(Debug)]
pub struct Linear {
    /// The base weight, `[out_features, in_features]`, as stored: after
    /// [`Linear::quantize_fp8`] it is `float8_e4m3fn` and [`Linear::base_weight`] gives its value.
    /// Private: replacing the tensor would silently end weight packing and fp8 bookkeeping.
    pub(crate) weight: Tensor,
    /// The base bias, `[out_features]`.
    pub(crate) bias: Option<Tensor>,
    adapters: Vec<Adapter>,
    /// What each merge did, newest last, so that unmerging can undo them in reverse order.
    merges: Vec<MergeRecord>,
    training: bool,
    /// Where dropout draws its masks (libtorch's default generator when `None`).
    randomness: Option<Arc<dyn Randomness>>,
    /// Set when `weight` is stored in fp8.
    fp8: Option<Fp8Weight>,
    /// Set by [`pack_weights`]: where the shared buffer started and this layer's place in it.
    pack: Option<PackMark>,
    /// Adapters applied to some rows of the input only ([`crate::attach_rows`]), by first row.
    pub(crate) row_adapters: Vec<RowAdapter>,
}

/// What [`pack_weights`] laid out: the buffer's address when packed, this layer's index among the
/// layers packed together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackMark {
    pub(crate) buffer: usize,
    pub(crate) member: usize,
}

/// How to widen an fp8 base weight.
#[derive(Debug)]
pub(crate) struct Fp8Weight {
    /// `amax / 448`, a 0-dim fp32 tensor on the weight's device.
    pub(crate) scale: Tensor,
    /// The type the layer computes in (the weight's type before quantizing, or the one asked for).
    pub(crate) compute_kind: Kind,
    /// How a linear layer computes its base product (convolutions always widen).
    pub(crate) products: Fp8Products,
}

impl Fp8Weight {
    /// Quantizes a layer's base `weight` in place (its data replaced, so the variable store frees
    /// the full-precision bytes; it stops requiring gradients) and converts a `bias` of another type
    /// to the compute type: what [`Linear::quantize_fp8`] and [`crate::Conv2d::quantize_fp8`] share.
    /// `merged` says whether an adapter is merged into the weight (refused).
    pub(crate) fn quantize(
        weight: &mut Tensor,
        bias: Option<&mut Tensor>,
        merged: bool,
        module: &str,
        compute_kind: Option<Kind>,
    ) -> Result<Self> {
        if merged {
            return Err(Error::QuantizeMerged {
                module: module.to_owned(),
            });
        }
        let compute_kind = compute_kind.unwrap_or_else(|| weight.kind());
        if !matches!(
            compute_kind,
            Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
        ) {
            return Err(Error::InvalidConfig {
                field: format!("fp8 compute type of `{module}`"),
                reason: format!("is {compute_kind:?}; it must be fp32, bf16, fp16 or fp64"),
            });
        }
        let (quantized, scale) = quantize_e4m3(weight)?;
        let _ = weight.f_requires_grad_(false)?;
        weight.set_data(&quantized);
        if let Some(bias) = bias
            && bias.kind() != compute_kind
        {
            // The bias joins the widened weight in one kernel, so it moves to the compute type.
            let converted = bias.f_to_kind(compute_kind)?;
            bias.set_data(&converted);
        }
        Ok(Self {
            scale,
            compute_kind,
            products: Fp8Products::Widened,
        })
    }
}

/// The undo information of one merged adapter.
#[derive(Debug)]
pub(crate) struct MergeRecord {
    pub(crate) adapter: usize,
    /// `scale · B · A` in fp32 as it was merged.
    pub(crate) delta: Tensor,
    /// DoRA's `m / ‖W + ΔW‖` (`[out, 1]`, fp32) that multiplied the weight.
    pub(crate) dora_factor: Option<Tensor>,
}

impl Linear {
    /// Creates the variables `weight` (and `bias`) under `path`, initialised as PyTorch does
    /// (uniform in ±1/√in); loading weights overwrites them.
    pub fn new(path: &nn::Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let weight = path.var(
            "weight",
            &[out_features, in_features],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let bias = bias.then(|| {
            path.var(
                "bias",
                &[out_features],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )
        });
        Self::from_tensors(weight, bias)
    }

    /// Wraps existing tensors (weight `[out, in]`, bias `[out]`) without adapters.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapters: Vec::new(),
            merges: Vec::new(),
            training: false,
            randomness: None,
            fp8: None,
            pack: None,
            row_adapters: Vec::new(),
        }
    }

    /// The base weight `[out_features, in_features]` as stored (`float8_e4m3fn` after
    /// [`Linear::quantize_fp8`]; [`Linear::base_weight`] gives its value then). It shares its
    /// storage with the variable store's `weight`: load weights through the store (or `copy_` into
    /// a shallow clone under `tch::no_grad`), never by replacing the tensor.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The base bias `[out_features]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The input width.
    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    /// The output width.
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// The type the layer computes in: the base weight's element type, or for an fp8 weight the
    /// type it is widened to.
    pub fn kind(&self) -> Kind {
        self.fp8
            .as_ref()
            .map_or_else(|| self.weight.kind(), |fp8| fp8.compute_kind)
    }

    /// Whether the base weight is stored in fp8.
    pub fn is_fp8(&self) -> bool {
        self.fp8.is_some()
    }

    /// Where the base weight starts and ends in memory, when it is a contiguous matrix stored in its
    /// compute type (fp8 weights never share a product): what tells layers packed together apart.
    pub(crate) fn weight_span(&self) -> Option<(usize, usize)> {
        if self.fp8.is_some() || !self.weight.is_contiguous() || self.weight.dim() != 2 {
            return None;
        }
        let start = self.weight.data_ptr() as usize;
        Some((
            start,
            start + self.weight.numel() * self.weight.kind().elt_size_in_bytes(),
        ))
    }

    /// This layer's place among the layers [`pack_weights`] laid out together, while its weight is
    /// still where that put it.
    pub(crate) fn pack_mark(&self) -> Option<PackMark> {
        let mark = self.pack?;
        let (start, _) = self.weight_span()?;
        (mark.member > 0 || start == mark.buffer).then_some(mark)
    }

    /// The base weight's value in the compute type: the weight itself (shared, not copied), or for
    /// an fp8 weight its widened value (a new tensor). Graph-capturable.
    pub fn base_weight(&self) -> Tensor {
        match &self.fp8 {
            None => self.weight.shallow_clone(),
            // Casting and scaling a well-formed fp8 tensor cannot fail; keeping forward infallible
            // (`Module`) means going through the panicking twins here.
            Some(fp8) => self.weight.to_kind(fp8.compute_kind) * &fp8.scale,
        }
    }

    /// Sets how the base product is computed when the base weight is stored in fp8 (see
    /// [`Fp8Products`]); returns whether it is (a full-precision layer is left as it is).
    pub fn set_fp8_products(&mut self, products: Fp8Products) -> bool {
        self.fp8
            .as_mut()
            .map(|fp8| fp8.products = products)
            .is_some()
    }

    /// The base product by an fp8 × fp8 product, where [`Fp8Products::Scaled`] or
    /// [`Fp8Products::ScaledBy`] applies to `xs`.
    fn scaled_base(&self, xs: &Tensor) -> Option<Tensor> {
        let fp8 = self.fp8.as_ref()?;
        let product = match fp8.products {
            Fp8Products::Widened => return None,
            Fp8Products::Scaled => None,
            Fp8Products::ScaledBy(product) => Some(product),
        };
        let (out, width) = (self.out_features(), self.in_features());
        let applies = (product.is_some() || !xs.requires_grad())
            && xs.kind() == fp8.compute_kind
            && matches!(fp8.compute_kind, Kind::BFloat16 | Kind::Half)
            && xs.size().last() == Some(&width)
            && width % 16 == 0
            && out % 16 == 0;
        if !applies {
            return None;
        }
        // Shapes and types are checked above; where libtorch still refuses (a GPU without fp8
        // tensor cores), the layer widens instead.
        match product {
            Some(product) => product(xs, &self.weight, &fp8.scale, self.bias.as_ref()).ok(),
            None => scaled_product(
                xs,
                &self.weight,
                &fp8.scale,
                self.bias.as_ref(),
                fp8.compute_kind,
            )
            .ok(),
        }
    }

    /// The bytes the base weight occupies (with its fp8 scale), bias excluded.
    pub fn base_weight_bytes(&self) -> i64 {
        tensor_bytes(&self.weight) + self.fp8.as_ref().map_or(0, |fp8| tensor_bytes(&fp8.scale))
    }

    /// Stores the base weight as `float8_e4m3fn` with one fp32 scale (`amax / 448`), widened to
    /// `compute_kind` (default: the weight's current type) in every forward; a bias of another type
    /// is converted to `compute_kind` in place. The weight tensor's data is replaced in place, so the
    /// variable store that created it frees the full-precision bytes too. The weight stops requiring
    /// gradients. A layer already in fp8 is left as it is.
    ///
    /// Afterwards [`Linear::merge`] and [`Linear::unmerge`] refuse: folding a delta into an fp8
    /// weight would round it to 3 mantissa bits.
    ///
    /// # Errors
    /// [`Error::QuantizeMerged`] when an adapter is merged into the weight (unmerge first),
    /// [`Error::InvalidConfig`] when `compute_kind` is not a floating-point type wider than fp8.
    pub fn quantize_fp8(&mut self, module: &str, compute_kind: Option<Kind>) -> Result<()> {
        if self.fp8.is_none() {
            self.fp8 = Some(Fp8Weight::quantize(
                &mut self.weight,
                self.bias.as_mut(),
                !self.merges.is_empty(),
                module,
                compute_kind,
            )?);
        }
        Ok(())
    }

    /// The adapters, in the order they were added (the order their outputs are summed in).
    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    /// The adapter called `name`, if any.
    pub fn adapter(&self, name: &str) -> Option<&Adapter> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// The adapter called `name` for changing its multiplier or dropout, if any.
    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut Adapter> {
        self.adapters.iter_mut().find(|a| a.name == name)
    }

    /// Attaches `adapter` after checking that its shapes fit this layer. `module` names the layer
    /// in errors.
    ///
    /// # Errors
    /// [`Error::DuplicateAdapter`] when the name is taken, [`Error::ShapeMismatch`] when `A` is not
    /// `[r, in]`, `B` not `[out, r]` or the magnitude not `[out]`.
    pub fn add_adapter(&mut self, module: &str, adapter: Adapter) -> Result<()> {
        if self.adapter(&adapter.name).is_some() {
            return Err(Error::DuplicateAdapter {
                module: module.to_owned(),
                adapter: adapter.name,
            });
        }
        let (down, up) = (adapter.down.size(), adapter.up.size());
        let (in_features, out_features) = (self.in_features(), self.out_features());
        let fits = down.len() == 2
            && up.len() == 2
            && down[1] == in_features
            && up[0] == out_features
            && up[1] == down[0]
            && down[0] > 0;
        if !fits {
            return Err(Error::ShapeMismatch {
                module: module.to_owned(),
                reason: format!(
                    "down {down:?} and up {up:?} do not fit a layer of {in_features} → {out_features} \
                     (need [r, {in_features}] and [{out_features}, r])"
                ),
            });
        }
        if let Some(magnitude) = &adapter.magnitude
            && magnitude.size() != [out_features]
        {
            return Err(Error::ShapeMismatch {
                module: module.to_owned(),
                reason: format!(
                    "DoRA magnitude {:?} is not [{out_features}]",
                    magnitude.size()
                ),
            });
        }
        self.adapters.push(adapter);
        Ok(())
    }

    /// Detaches and returns the adapter `name`, unmerging everything first if it is merged.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when there is none of that name.
    pub fn remove_adapter(&mut self, module: &str, name: &str) -> Result<Adapter> {
        let index = self.index_of(module, name)?;
        if self.adapters[index].merged {
            self.unmerge(module)?;
        }
        Ok(self.adapters.remove(index))
    }

    fn index_of(&self, module: &str, name: &str) -> Result<usize> {
        self.adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::UnknownAdapter {
                module: module.to_owned(),
                adapter: name.to_owned(),
            })
    }

    /// Switches adapter `name` on or off without merging. Switching off a merged adapter unmerges
    /// the layer first (as peft does).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when there is none of that name.
    pub fn set_adapter_enabled(&mut self, module: &str, name: &str, enabled: bool) -> Result<()> {
        let index = self.index_of(module, name)?;
        if !enabled && self.adapters[index].merged {
            self.unmerge(module)?;
        }
        self.adapters[index].enabled = enabled;
        Ok(())
    }

    /// Training mode applies the adapters' dropout (PyTorch's `module.train()`).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Where the adapters' dropout draws its masks: `randomness`, or libtorch's default generator
    /// (`None`, the default). See [`crate::set_randomness`].
    pub fn set_randomness(&mut self, randomness: Option<Arc<dyn Randomness>>) {
        self.randomness = randomness;
    }

    /// Folds the enabled, not yet merged adapters (all of them, or those named) into the base
    /// weight: `W ← W + scale · B · A` for LoRA, `W ← m / ‖W + ΔW‖ · (W + ΔW)` for DoRA. The
    /// arithmetic is done in fp32 and the result is stored in the base weight's type.
    ///
    /// Not for the training step: it reads back whether the result is finite.
    ///
    /// # Errors
    /// [`Error::NonFiniteMerge`] (weight left untouched) when the merged weight has NaN or infinity,
    /// [`Error::UnknownAdapter`] for a name the layer lacks, [`Error::Fp8BaseWeight`] when the base
    /// weight is stored in fp8.
    pub fn merge(&mut self, module: &str, names: Option<&[&str]>) -> Result<()> {
        if self.fp8.is_some() {
            return Err(Error::Fp8BaseWeight {
                module: module.to_owned(),
                operation: "merging an adapter",
            });
        }
        let indices: Vec<usize> = match names {
            Some(names) => names
                .iter()
                .map(|name| self.index_of(module, name))
                .collect::<Result<_>>()?,
            None => (0..self.adapters.len()).collect(),
        };
        for index in indices {
            let adapter = &self.adapters[index];
            if adapter.merged || !adapter.enabled {
                continue;
            }
            let weight = self.weight.to_kind(Kind::Float);
            let delta = adapter.delta_weight_f32();
            let (merged, dora_factor) = match &adapter.magnitude {
                None => (&weight + &delta, None),
                Some(magnitude) => {
                    // The norm is that of the weight without any adapter merged, as in forward.
                    let base = self.unmerged_weight_f32();
                    let norm = adapter.dora_weight_norm(&base, &delta);
                    let factor = (magnitude.to_kind(Kind::Float) / norm).view([-1, 1]);
                    ((&weight + &delta) * &factor, Some(factor))
                }
            };
            if merged.isfinite().all().f_int64_value(&[])? == 0 {
                return Err(Error::NonFiniteMerge {
                    module: module.to_owned(),
                    adapter: adapter.name.clone(),
                });
            }
            tch::no_grad(|| self.weight.f_copy_(&merged))?;
            self.adapters[index].merged = true;
            self.merges.push(MergeRecord {
                adapter: index,
                delta,
                dora_factor,
            });
        }
        Ok(())
    }

    /// Undoes every merge, newest first, restoring the base weight (up to fp32 rounding of the
    /// delta; exact structure for DoRA's rescaling). `module` names the layer in errors.
    ///
    /// # Errors
    /// [`Error::Fp8BaseWeight`] when the base weight is stored in fp8 (such a layer never has
    /// merges: the request is a mistake worth reporting), libtorch errors.
    pub fn unmerge(&mut self, module: &str) -> Result<()> {
        if self.fp8.is_some() {
            return Err(Error::Fp8BaseWeight {
                module: module.to_owned(),
                operation: "unmerging",
            });
        }
        while let Some(record) = self.merges.pop() {
            let restored = Self::undo(&self.weight.to_kind(Kind::Float), &record);
            tch::no_grad(|| self.weight.f_copy_(&restored))?;
            self.adapters[record.adapter].merged = false;
        }
        Ok(())
    }

    fn undo(weight: &Tensor, record: &MergeRecord) -> Tensor {
        match &record.dora_factor {
            None => weight - &record.delta,
            Some(factor) => weight / factor - &record.delta,
        }
    }

    /// The base weight with every merge undone, in fp32 (the weight itself is not changed).
    fn unmerged_weight_f32(&self) -> Tensor {
        let mut weight = self.weight.to_kind(Kind::Float);
        for record in self.merges.iter().rev() {
            weight = Self::undo(&weight, record);
        }
        weight
    }
}

/// Lays the base weights of `layers` out one after another in one buffer: each weight becomes a view
/// of it, with unchanged values, so that [`fused_forward`] multiplies by all of them at once without
/// copying them. Returns false, touching nothing, when the layers cannot share a buffer (fewer than
/// two, different input widths, types or devices, non-contiguous or fp8-stored weights).
///
/// The layout survives in-place writes (loading weights with `copy_`, merging); whatever replaces a
/// weight tensor instead (a variable store's `set_kind`, fp8 quantization) undoes it, and
/// [`fused_forward`] then declines.
pub fn pack_weights(layers: &mut [&mut Linear]) -> bool {
    let Some(first) = layers.first() else {
        return false;
    };
    let (kind, device, width) = (
        first.weight.kind(),
        first.weight.device(),
        first.weight.size().get(1).copied(),
    );
    let fits = layers.len() >= 2
        && layers.iter().all(|l| {
            let size = l.weight.size();
            l.fp8.is_none()
                && size.len() == 2
                && Some(size[1]) == width
                && l.weight.kind() == kind
                && l.weight.device() == device
        });
    if !fits {
        return false;
    }
    let weights: Vec<Tensor> = layers.iter().map(|l| l.weight.detach()).collect();
    let Ok(packed) = tch::no_grad(|| Tensor::f_cat(&weights, 0)) else {
        return false;
    };
    let mut start = 0;
    let buffer = packed.data_ptr() as usize;
    for (member, layer) in layers.iter_mut().enumerate() {
        let rows = layer.weight.size()[0];
        let Ok(view) = packed.f_narrow(0, start, rows) else {
            return false;
        };
        // set_data swaps the storage under the variable itself, so the variable store's handle and
        // every shallow clone see the view.
        if layer.weight.f_set_data(&view).is_err() {
            return false;
        }
        layer.pack = Some(PackMark { buffer, member });
        start += rows;
    }
    true
}

/// The base weights of `layers` as one `[Σ out, in]` matrix, when [`pack_weights`] laid them out so and
/// they still are.
fn packed_weight(layers: &[&Linear]) -> Option<Tensor> {
    let first = &layers.first()?.weight;
    let size = first.size();
    if size.len() != 2 {
        return None;
    }
    let mut next = first.data_ptr() as usize;
    let mut rows = 0;
    for layer in layers {
        let w = &layer.weight;
        let (start, end) = layer.weight_span()?;
        if start != next || w.size()[1] != size[1] || w.kind() != first.kind() {
            return None;
        }
        next = end;
        rows += w.size()[0];
    }
    first.f_as_strided([rows, size[1]], [size[1], 1], None).ok()
}

/// `layers[i].forward(xs)` for layers that read the same input (a self-attention's `to_q`, `to_k`,
/// `to_v`), computed together: one matrix product for the base weights (laid out by
/// [`pack_weights`]) and, when every layer has one active plain LoRA adapter computing in the base
/// output's type, one down-projection by the stacked `A`s, one batched up-projection and one sum.
/// The stacked matrices come from a [`crate::ComputeCopies`] when it holds the group, else they are
/// cast and stacked here. Fewer, larger kernels; the same values up to rounding.
///
/// `None` when the layers do not qualify (weights not packed, a bias, several or DoRA adapters, dropout
/// while training, an adapter computing in another type, some layers adapted and others not); the
/// caller then runs them one by one. Adapters of different ranks or widths take one block-diagonal
/// up-projection instead of the batched one.
///
/// # Shapes
/// `xs` `[..., in]` → one `[..., out_i]` per layer (views into one buffer).
pub fn fused_forward(layers: &[&Linear], xs: &Tensor) -> Option<Vec<Tensor>> {
    if layers
        .iter()
        .any(|l| l.bias.is_some() || !l.row_adapters.is_empty())
    {
        return None;
    }
    let weight = packed_weight(layers)?;
    let kind = weight.kind();
    let active: Vec<Vec<&Adapter>> = layers
        .iter()
        .map(|l| {
            l.adapters
                .iter()
                .filter(|a| a.enabled && !a.merged)
                .collect()
        })
        .collect();
    let outs: Vec<i64> = layers.iter().map(|l| l.weight.size()[0]).collect();
    // One split (its backward is one concatenation), not a narrow per layer (whose backward would
    // fill a full-width zero gradient for each).
    let split = |y: Tensor| -> Vec<Tensor> { y.split_with_sizes(outs.as_slice(), -1) };
    if active.iter().all(Vec::is_empty) {
        return Some(split(xs.linear::<Tensor>(&weight, None)));
    }
    let mut adapters = Vec::with_capacity(layers.len());
    for (layer, found) in layers.iter().zip(&active) {
        let [adapter] = found.as_slice() else {
            return None;
        };
        let compute = adapter.compute_kind.unwrap_or_else(|| adapter.kind());
        if adapter.magnitude.is_some()
            || (layer.training && adapter.dropout > 0.0)
            || compute != kind
        {
            return None;
        }
        adapters.push(*adapter);
    }
    let base = xs.linear::<Tensor>(&weight, None);
    let (down, up) = match group_copies(&adapters, kind) {
        Some(copies) => copies,
        None => {
            let (downs, ups): (Vec<Tensor>, Vec<Tensor>) =
                adapters.iter().map(|a| compute_matrices(a, kind)).unzip();
            match downs.len() {
                // One adapter: its own matrices, without the copies `cat` and `stack` would make.
                1 => (downs[0].shallow_clone(), ups[0].shallow_clone()),
                _ if ups.iter().all(|u| u.size() == ups[0].size()) => {
                    (Tensor::cat(&downs, 0), Tensor::stack(&ups, 0))
                }
                // Adapters of different ranks or widths: a block-diagonal up-projection.
                _ => (Tensor::cat(&downs, 0), Tensor::block_diag(&ups)),
            }
        }
    };
    Some(if up.dim() == 2 {
        split(add_lora_products(&base, &xs.to_kind(kind), &down, &up))
    } else {
        add_group_products(&base, &xs.to_kind(kind), &down, &up)
    })
}

/// `B` times the adapter's scale (the tensor itself when the scale is 1).
fn scaled_up(adapter: &Adapter) -> Tensor {
    if adapter.scale() == 1.0 {
        adapter.up.shallow_clone()
    } else {
        &adapter.up * adapter.scale()
    }
}

/// An adapter's `A` and scaled `B` in `kind`: views of its compute copies where it has them (so the
/// gradients reach those), else casts of its own matrices.
fn compute_matrices(adapter: &Adapter, kind: Kind) -> (Tensor, Tensor) {
    match adapter.copy.as_ref().filter(|c| c.down.kind() == kind) {
        Some(copy) => copy.own(),
        None => (adapter.down.to_kind(kind), scaled_up(adapter).to_kind(kind)),
    }
}

/// The compute copies of a whole group, when `adapters` are exactly the members of one group held by
/// a [`crate::ComputeCopies`] in `kind`, in order: its stacked `A`s and its scaled `B`s.
fn group_copies(adapters: &[&Adapter], kind: Kind) -> Option<(Tensor, Tensor)> {
    let first = adapters.first()?.copy.as_ref()?;
    let whole = first.members == adapters.len() as i64
        && first.down.kind() == kind
        && adapters.iter().enumerate().all(|(i, a)| {
            a.compute_kind == Some(kind)
                && a.copy.as_ref().is_some_and(|c| {
                    c.member == i as i64 && c.down.data_ptr() == first.down.data_ptr()
                })
        });
    whole.then(|| (first.down.shallow_clone(), first.up.shallow_clone()))
}

/// `base + x·Aᵀ·Bᵀ` in `kind` for one plain LoRA adapter (`B` already scaled, both in `kind`): the
/// up-projection and the sum with the base output are one matrix product with accumulation (one
/// rounding, where peft's separate scale and add round twice).
///
/// # Shapes
/// `base` `[..., out]`, `x` `[..., in]`, `down` `[r, in]`, `up` `[out, r]` → `[..., out]`.
fn add_lora_products(base: &Tensor, x: &Tensor, down: &Tensor, up: &Tensor) -> Tensor {
    let hidden = x.linear::<Tensor>(down, None);
    let shape = base.size();
    let (out, rank) = (up.size()[0], down.size()[0]);
    base.reshape([-1, out])
        .addmm(&hidden.reshape([-1, rank]), &up.tr())
        .reshape(shape.as_slice())
}

/// `base_i + x·A_iᵀ·B_iᵀ` for the `g` adapters of a group whose outputs lie side by side in `base`'s
/// last dimension: one down-projection by the stacked `A`s, one batched up-projection, one sum
/// (rounded after the product and after the sum, as peft's `result + lora_B(lora_A(x))` under
/// autocast). Each output is a view whose backward is one stacking.
///
/// # Shapes
/// `base` `[..., g·out]`, `x` `[..., in]`, `down` `[g·r, in]`, `up` `[g, out, r]` → `g` × `[..., out]`.
fn add_group_products(base: &Tensor, x: &Tensor, down: &Tensor, up: &Tensor) -> Vec<Tensor> {
    let size = up.size();
    let (g, out, rank) = (size[0], size[1], size[2]);
    let hidden = x.linear::<Tensor>(down, None);
    let rows = hidden.numel() as i64 / (g * rank);
    let lora = hidden
        .view([rows, g, rank])
        .transpose(0, 1)
        .bmm(&up.transpose(1, 2));
    let mut shape = base.size();
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    let sum = base.view([rows, g, out]) + lora.transpose(0, 1);
    sum.unbind(1)
        .into_iter()
        .map(|y| y.view(shape.as_slice()))
        .collect()
}

impl Module for Linear {
    /// `base(x) + Σ scale · B(A(dropout(x)))` over enabled, unmerged adapters (DoRA: peft's
    /// `DoraLinearLayer.forward`). The adapters compute in their own type (fp32) and the sum is
    /// returned in the base output's type, as peft does; an adapter with a
    /// [`compute_kind`](crate::Adapter::compute_kind) computes as peft under autocast. Row adapters
    /// ([`crate::attach_rows`]) then add their products to their own rows.
    ///
    /// # Shapes
    /// `[..., in_features]` → `[..., out_features]`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let result = self.forward_all_rows(xs);
        if self.row_adapters.is_empty() {
            return result;
        }
        apply_row_adapters(result, xs, &self.row_adapters, |result, xs, adapter| {
            let autocast = adapter.compute_kind;
            let x = xs.to_kind(autocast.unwrap_or_else(|| adapter.kind()));
            add_plain_lora(result, &x, adapter, autocast)
        })
    }
}

/// `result + scale · B·A·x` for one plain LoRA adapter (`x` its input, already in the type it
/// computes in; `autocast` its compute type): under autocast in `result`'s type, the up-projection
/// and the sum in one matrix product with accumulation; otherwise as peft, the product scaled and
/// added out of place (a bf16 base output promoted to the adapter's fp32).
fn add_plain_lora(
    result: &Tensor,
    x: &Tensor,
    adapter: &Adapter,
    autocast: Option<Kind>,
) -> Tensor {
    match autocast {
        // Under autocast: the up-projection and the sum with the base output in one
        // matrix product with accumulation.
        Some(kind) if result.kind() == kind => {
            let (down, up) = compute_matrices(adapter, kind);
            add_lora_products(result, x, &down, &up)
        }
        _ => {
            let (down, up) = match autocast {
                Some(kind) => (adapter.down.to_kind(kind), adapter.up.to_kind(kind)),
                None => (adapter.down.shallow_clone(), adapter.up.shallow_clone()),
            };
            let lora_out = x.linear::<Tensor>(&down, None).linear::<Tensor>(&up, None);
            let scale = adapter.scale();
            // A scale of exactly 1 (alpha = rank) multiplies nothing: skip the kernel.
            let scaled = if scale == 1.0 {
                lora_out
            } else {
                lora_out * scale
            };
            // Out of place, so a bf16 base output is promoted to fp32 for the sum (as in
            // peft) instead of rounding after each adapter.
            scaled + result
        }
    }
}

impl Linear {
    /// The forward pass of the base weight and the ordinary adapters, over every row.
    fn forward_all_rows(&self, xs: &Tensor) -> Tensor {
        // The base weight's value, widened at most once (an fp8 weight's widening is a new tensor).
        let weight = std::cell::OnceCell::new();
        let weight = || weight.get_or_init(|| self.base_weight());
        let base = self
            .scaled_base(xs)
            .unwrap_or_else(|| xs.linear(weight(), self.bias.as_ref()));
        let mut active = self
            .adapters
            .iter()
            .filter(|a| a.enabled && !a.merged)
            .peekable();
        if active.peek().is_none() {
            return base;
        }
        let result_kind = base.kind();
        let mut result = base;
        for adapter in active {
            let autocast = adapter.compute_kind.filter(|_| adapter.magnitude.is_none());
            let x = xs.to_kind(autocast.unwrap_or_else(|| adapter.kind()));
            let dropout_active = self.training && adapter.dropout > 0.0;
            let dropped = if dropout_active {
                match &self.randomness {
                    Some(randomness) => randomness.dropout(&x, adapter.dropout),
                    None => x.dropout(adapter.dropout, true),
                }
            } else {
                x.shallow_clone()
            };
            let scale = adapter.scale();
            match &adapter.magnitude {
                None => result = add_plain_lora(&result, &dropped, adapter, autocast),
                Some(magnitude) => {
                    let weight = weight().to_kind(x.kind());
                    let delta = adapter.up.matmul(&adapter.down).detach() * scale;
                    let norm = adapter.dora_weight_norm(&weight, &delta);
                    let magnitude_scale = (magnitude / norm).view([1, -1]);
                    let lora_result = dropped
                        .linear::<Tensor>(&adapter.down, None)
                        .linear::<Tensor>(&adapter.up, None);
                    // Without dropout the base output is reused (minus its bias); with dropout the
                    // base path is recomputed on the dropped input, as in peft.
                    let base_result = if dropout_active {
                        dropped.linear::<Tensor>(&weight, None)
                    } else {
                        match &self.bias {
                            Some(bias) => &result - bias,
                            None => result.shallow_clone(),
                        }
                    };
                    result = &result
                        + (&magnitude_scale - 1.0) * base_result
                        + magnitude_scale * lora_result * scale;
                }
            }
        }
        result.to_kind(result_kind)
    }
}

/// A module tree that lets callers visit its linear layers, and its convolutions if it has any, by
/// module path: every layer visited can carry adapters.
///
/// Paths are the dotted attribute paths of the reference implementation relative to the model's
/// root (e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` in a diffusers UNet),
/// i.e. the safetensors key of the layer's weight without the trailing `.weight`.
pub trait HasLinears {
    /// Calls `f` once for every linear layer, in a fixed order, with its path.
    fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear));

    /// Calls `f` once for every convolution ([`crate::Conv2d`]), in a fixed order, with its path.
    /// Models without convolutions keep this default, which visits none.
    fn for_each_conv(&mut self, f: &mut dyn FnMut(&str, &mut crate::Conv2d)) {
        let _ = f;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// A 5 → 3 layer with bias and a random input batch.
    fn layer_and_input(seed: i64) -> (Linear, Tensor) {
        tch::manual_seed(seed);
        let layer = Linear::from_tensors(
            Tensor::randn([3, 5], (Kind::Float, Device::Cpu)),
            Some(Tensor::randn([3], (Kind::Float, Device::Cpu))),
        );
        (layer, Tensor::randn([4, 2, 5], (Kind::Float, Device::Cpu)))
    }

    fn random_adapter(name: &str, rank: i64, alpha: f64) -> Adapter {
        Adapter::new(
            name,
            Tensor::randn([rank, 5], (Kind::Float, Device::Cpu)),
            Tensor::randn([3, rank], (Kind::Float, Device::Cpu)),
            alpha,
        )
    }

    #[test]
    fn computes_x_wt_plus_b_with_torch_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let layer = Linear::new(&(vs.root() / "to_out" / 0), 3, 2, true);
        let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
        assert_eq!(
            names,
            ["to_out.0.bias", "to_out.0.weight"]
                .map(String::from)
                .into()
        );
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3]);
        let expected = x.matmul(&layer.weight.tr()) + layer.bias.as_ref().unwrap();
        assert!(layer.forward(&x).allclose(&expected, 1e-6, 1e-6, false));
        assert_eq!((layer.in_features(), layer.out_features()), (3, 2));
    }

    #[test]
    fn lora_adds_scaled_b_a_and_can_be_switched_off() {
        let (mut layer, x) = layer_and_input(1);
        let base = layer.forward(&x);
        let adapter = random_adapter("a", 2, 6.0);
        let delta = adapter.up.matmul(&adapter.down) * 3.0;
        layer.add_adapter("m", adapter).unwrap();
        let expected = x.linear(&(&layer.weight + &delta), layer.bias.as_ref());
        // Two summation orders of the same products: a few float32 roundings of the largest sum of
        // magnitudes (the random values come from the shared generator, whichever test drew last).
        let weight = layer.weight.abs();
        let bound = |delta: &Tensor| {
            let magnitudes = x.abs().matmul(&(&weight + delta.abs()).tr());
            8.0 * f64::from(f32::EPSILON) * (magnitudes.max().double_value(&[]) + 1.0)
        };
        assert!(max_diff(&layer.forward(&x), &expected) < bound(&delta));
        layer.set_adapter_enabled("m", "a", false).unwrap();
        assert_eq!(max_diff(&layer.forward(&x), &base), 0.0);
        layer.set_adapter_enabled("m", "a", true).unwrap();
        layer.adapter_mut("a").unwrap().scaling = crate::Scaling::RankStabilized;
        let rs_delta = &delta / 3.0 * (6.0 / 2f64.sqrt());
        let expected = x.linear(&(&layer.weight + &rs_delta), layer.bias.as_ref());
        assert!(max_diff(&layer.forward(&x), &expected) < bound(&rs_delta));
    }

    #[test]
    fn merge_equals_side_path_and_unmerge_restores_the_weight() {
        for dora in [false, true] {
            let (mut layer, x) = layer_and_input(2);
            let original = layer.weight.copy();
            let mut first = random_adapter("first", 2, 4.0);
            if dora {
                first.magnitude = Some(Tensor::rand([3], (Kind::Float, Device::Cpu)) + 0.5);
            }
            let mut second = random_adapter("second", 3, 1.5);
            second.multiplier = 0.7;
            // Error model: the values come from the shared generator (whichever test drew last), so
            // the bounds scale with them. A merge and an unmerge each round every weight a few times
            // (the delta's product and sum; DoRA's norm and rescale, undone by its inverse), so the
            // weight comes back within a few float32 roundings of the largest |W| + Σ|ΔW|; a forward
            // pass sums x·W over 5 inputs, so its outputs differ by a few roundings of Σ|x||W|.
            let deltas = (first.up.matmul(&first.down) * first.scale()).abs()
                + (second.up.matmul(&second.down) * second.scale() * 0.7).abs();
            let magnitude = original.abs() + &deltas;
            let eps = f64::from(f32::EPSILON);
            let weight_bound = 32.0 * eps * magnitude.max().double_value(&[]);
            let forward_bound = 32.0
                * eps
                * (x.abs().matmul(&magnitude.tr()).max().double_value(&[])
                    + layer.bias.as_ref().unwrap().abs().max().double_value(&[]));
            layer.add_adapter("m", first).unwrap();
            layer.add_adapter("m", second).unwrap();
            let unmerged = layer.forward(&x);
            layer.merge("m", None).unwrap();
            assert!(layer.adapters().iter().all(Adapter::is_merged));
            let merged = layer.forward(&x);
            let diff = max_diff(&merged, &unmerged);
            assert!(
                diff <= forward_bound,
                "dora={dora}: {diff} > {forward_bound}"
            );
            layer.unmerge("m").unwrap();
            let diff = max_diff(&layer.weight, &original);
            assert!(diff <= weight_bound, "dora={dora}: {diff} > {weight_bound}");
            let diff = max_diff(&layer.forward(&x), &unmerged);
            assert!(
                diff <= forward_bound,
                "dora={dora}: {diff} > {forward_bound}"
            );
        }
    }

    #[test]
    fn merging_one_of_two_keeps_the_other_on_the_side_path() {
        let (mut layer, x) = layer_and_input(3);
        let (a, b) = (random_adapter("a", 2, 2.0), random_adapter("b", 1, 1.0));
        // A few float32 roundings of the sums of |x| (|W| + Σ|ΔW|) the outputs add up (the values
        // come from the shared generator, whichever test drew last).
        let magnitude = layer.weight.abs()
            + (a.up.matmul(&a.down) * a.scale()).abs()
            + (b.up.matmul(&b.down) * b.scale()).abs();
        let bound = 32.0
            * f64::from(f32::EPSILON)
            * (x.abs().matmul(&magnitude.tr()).max().double_value(&[])
                + layer.bias.as_ref().unwrap().abs().max().double_value(&[]));
        layer.add_adapter("m", a).unwrap();
        layer.add_adapter("m", b).unwrap();
        let both = layer.forward(&x);
        layer.merge("m", Some(&["b"])).unwrap();
        assert!(
            !layer.adapter("a").unwrap().is_merged() && layer.adapter("b").unwrap().is_merged()
        );
        assert!(max_diff(&layer.forward(&x), &both) <= bound);
        // Switching a merged adapter off unmerges it.
        layer.set_adapter_enabled("m", "b", false).unwrap();
        let only_a = layer.forward(&x);
        layer.remove_adapter("m", "b").unwrap();
        assert!(max_diff(&layer.forward(&x), &only_a) <= bound);
    }

    #[test]
    fn refuses_non_finite_merges_and_misfit_adapters() {
        let (mut layer, _) = layer_and_input(4);
        let original = layer.weight.copy();
        let mut broken = random_adapter("nan", 2, 2.0);
        broken.up = broken.up.fill_(f64::NAN);
        layer.add_adapter("blocks.0.to_q", broken).unwrap();
        let error = layer.merge("blocks.0.to_q", None).unwrap_err();
        assert!(
            matches!(error, Error::NonFiniteMerge { ref module, .. } if module == "blocks.0.to_q"),
            "{error}"
        );
        assert_eq!(max_diff(&layer.weight, &original), 0.0);
        let misfit = Adapter::new(
            "x",
            Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)),
            Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
            1.0,
        );
        assert!(matches!(
            layer.add_adapter("m", misfit),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            layer.add_adapter("m", random_adapter("nan", 1, 1.0)),
            Err(Error::DuplicateAdapter { .. })
        ));
        assert!(matches!(
            layer.merge("m", Some(&["missing"])),
            Err(Error::UnknownAdapter { .. })
        ));
    }

    #[test]
    fn bf16_base_with_fp32_adapter_returns_bf16() {
        let (layer, x) = layer_and_input(5);
        let mut half = Linear::from_tensors(
            layer.weight.to_kind(Kind::BFloat16),
            layer.bias.as_ref().map(|b| b.to_kind(Kind::BFloat16)),
        );
        half.add_adapter("m", random_adapter("a", 2, 2.0)).unwrap();
        let y = half.forward(&x.to_kind(Kind::BFloat16));
        assert_eq!(y.kind(), Kind::BFloat16);
        let adapter = half.adapter("a").unwrap();
        let reference = x
            .to_kind(Kind::BFloat16)
            .linear(&half.weight, half.bias.as_ref())
            .to_kind(Kind::Float)
            + x.to_kind(Kind::BFloat16)
                .to_kind(Kind::Float)
                .matmul(&adapter.down.tr())
                .matmul(&adapter.up.tr());
        assert!(
            max_diff(
                &y.to_kind(Kind::Float),
                &reference.to_kind(Kind::BFloat16).to_kind(Kind::Float)
            ) < 1e-6
        );
    }

    #[test]
    fn autocast_compute_kind_matches_peft_under_autocast_and_trains_the_fp32_matrices() {
        let (layer, x) = layer_and_input(6);
        for alpha in [2.0, 3.0] {
            let mut half = Linear::from_tensors(
                layer.weight.to_kind(Kind::BFloat16),
                layer.bias.as_ref().map(|b| b.to_kind(Kind::BFloat16)),
            );
            let mut adapter = random_adapter("a", 2, alpha);
            adapter.down = adapter.down.set_requires_grad(true);
            adapter.up = adapter.up.set_requires_grad(true);
            adapter.compute_kind = Some(Kind::BFloat16);
            let (down, up) = (adapter.down.shallow_clone(), adapter.up.shallow_clone());
            half.add_adapter("m", adapter).unwrap();
            let xb = x.to_kind(Kind::BFloat16);
            let y = half.forward(&xb);
            assert_eq!(y.kind(), Kind::BFloat16);
            // peft under torch.autocast(bf16): both products in bf16, scaled in bf16, added in bf16.
            let base = xb.linear(&half.weight, half.bias.as_ref());
            let lora = xb
                .linear::<Tensor>(&down.to_kind(Kind::BFloat16), None)
                .linear::<Tensor>(&up.to_kind(Kind::BFloat16), None);
            let expected = lora * (alpha / 2.0) + base;
            // One rounding (a product with accumulation) instead of peft's two: the results differ
            // by at most two bf16 steps (2 · 2⁻⁷ relative) of the largest output.
            let scale_of = expected.to_kind(Kind::Float).abs().max().double_value(&[]);
            let diff = max_diff(&y.to_kind(Kind::Float), &expected.to_kind(Kind::Float));
            assert!(
                diff <= 2.0 * scale_of / 128.0,
                "alpha {alpha}: max |Δ| {diff} of {scale_of}"
            );
            // Not trivially: the LoRA term moves the output by far more than that.
            let without = half.weight.shallow_clone();
            let base_only = xb.linear(&without, half.bias.as_ref()).to_kind(Kind::Float);
            assert!(
                max_diff(&y.to_kind(Kind::Float), &base_only) > 10.0 * diff.max(scale_of / 128.0)
            );
            y.to_kind(Kind::Float).sum(Kind::Float).backward();
            for grad in [down.grad(), up.grad()] {
                assert_eq!(grad.kind(), Kind::Float);
                assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
            }
        }
    }

    /// Three bias-free layers reading one 8-wide input (outputs 6, 6 and 5), packed, each with a LoRA
    /// of its own rank and alpha; returns the layers and their adapters' matrices.
    fn packed_trio(compute: Option<Kind>) -> (Vec<Linear>, Vec<(Tensor, Tensor)>) {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut layers: Vec<Linear> = [6i64, 6, 5]
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let layer = Linear::new(&(vs.root() / format!("p{i}")), 8, out, false);
                tch::no_grad(|| {
                    layer
                        .weight
                        .shallow_clone()
                        .copy_(&Tensor::randn([out, 8], (Kind::Float, Device::Cpu)))
                });
                layer
            })
            .collect();
        let before: Vec<Tensor> = layers.iter().map(|l| l.weight.copy()).collect();
        {
            let mut refs: Vec<&mut Linear> = layers.iter_mut().collect();
            assert!(pack_weights(&mut refs));
        }
        for (layer, old) in layers.iter().zip(&before) {
            assert!(layer.weight.equal(old), "packing changed a weight");
        }
        // The variable store sees the packed views too.
        let stored = vs.variables()["p1.weight"].shallow_clone();
        assert_eq!(stored.data_ptr(), layers[1].weight.data_ptr());
        let mut matrices = Vec::new();
        for (i, (layer, (rank, alpha))) in layers
            .iter_mut()
            .zip([(2i64, 2.0), (3, 6.0), (1, 0.5)])
            .enumerate()
        {
            let out = layer.weight.size()[0];
            let down = Tensor::randn([rank, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let up = Tensor::randn([out, rank], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let mut adapter = Adapter::new("a", down.shallow_clone(), up.shallow_clone(), alpha);
            adapter.compute_kind = compute;
            layer.add_adapter(&format!("p{i}"), adapter).unwrap();
            matrices.push((down, up));
        }
        (layers, matrices)
    }

    #[test]
    fn fused_forward_matches_the_layers_one_by_one_in_values_and_gradients() {
        for (kind, compute, tolerance) in [
            (Kind::Float, None, 1e-5),
            (Kind::BFloat16, Some(Kind::BFloat16), 6e-2),
        ] {
            let (layers, matrices) = packed_trio(compute);
            let layers: Vec<Linear> = if kind == Kind::Float {
                layers
            } else {
                // bf16 weights: pack again after the conversion (a conversion by replacement undoes it).
                let mut layers = layers;
                for layer in &mut layers {
                    layer.weight = layer.weight.to_kind(kind);
                }
                assert!(
                    fused_forward(
                        &layers.iter().collect::<Vec<_>>(),
                        &Tensor::zeros([1, 8], (kind, Device::Cpu))
                    )
                    .is_none()
                );
                let mut refs: Vec<&mut Linear> = layers.iter_mut().collect();
                assert!(pack_weights(&mut refs));
                layers
            };
            let refs: Vec<&Linear> = layers.iter().collect();
            let x = Tensor::randn([2, 4, 8], (Kind::Float, Device::Cpu)).to_kind(kind);
            let fused = fused_forward(&refs, &x).expect("packed, one plain adapter each");
            let single: Vec<Tensor> = layers.iter().map(|l| l.forward(&x)).collect();
            let loss = |ys: &[Tensor]| {
                ys.iter()
                    .map(|y| y.to_kind(Kind::Float).square().sum(Kind::Float))
                    .fold(Tensor::from(0f32), |a, b| a + b)
            };
            let grads = |ys: &[Tensor]| -> Vec<Tensor> {
                for (d, u) in &matrices {
                    d.shallow_clone().zero_grad();
                    u.shallow_clone().zero_grad();
                }
                loss(ys).backward();
                matrices
                    .iter()
                    .flat_map(|(d, u)| [d.grad().copy(), u.grad().copy()])
                    .collect()
            };
            for (f, s) in fused.iter().zip(&single) {
                assert_eq!(f.size(), s.size());
                let scale = s.to_kind(Kind::Float).abs().max().double_value(&[]);
                let diff = max_diff(&f.to_kind(Kind::Float), &s.to_kind(Kind::Float));
                assert!(
                    diff <= tolerance * scale,
                    "{kind:?}: output max |Δ| {diff} of {scale}"
                );
            }
            let (g_fused, g_single) = (grads(&fused), grads(&single));
            for (f, s) in g_fused.iter().zip(&g_single) {
                assert_eq!(f.kind(), Kind::Float);
                let scale = s.abs().max().double_value(&[]);
                let diff = max_diff(f, s);
                assert!(
                    diff <= tolerance * scale,
                    "{kind:?}: gradient max |Δ| {diff} of {scale}"
                );
            }
        }
    }

    #[test]
    fn fused_forward_declines_what_it_does_not_cover() {
        let x = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        // A weight replaced by another tensor: no longer packed.
        let (mut layers, _) = packed_trio(None);
        layers[2].weight = layers[2].weight.copy();
        assert!(fused_forward(&layers.iter().collect::<Vec<_>>(), &x).is_none());
        // A layer without its adapter.
        let (mut layers, _) = packed_trio(None);
        layers[0].adapters.clear();
        assert!(fused_forward(&layers.iter().collect::<Vec<_>>(), &x).is_none());
        // An adapter computing in another type than the base.
        let (layers, _) = packed_trio(Some(Kind::BFloat16));
        assert!(fused_forward(&layers.iter().collect::<Vec<_>>(), &x).is_none());
        // No adapters at all: the base product alone, equal to the layers'.
        let (mut layers, _) = packed_trio(None);
        for layer in &mut layers {
            layer.adapters.clear();
        }
        let fused = fused_forward(&layers.iter().collect::<Vec<_>>(), &x).unwrap();
        for (f, layer) in fused.iter().zip(&layers) {
            assert!(max_diff(f, &layer.forward(&x)) < 1e-5);
        }
        // Layers of different input widths cannot be packed.
        let mut a = Linear::from_tensors(Tensor::randn([2, 8], (Kind::Float, Device::Cpu)), None);
        let mut b = Linear::from_tensors(Tensor::randn([2, 7], (Kind::Float, Device::Cpu)), None);
        assert!(!pack_weights(&mut [&mut a, &mut b]));
    }

    fn store_bytes(vs: &nn::VarStore) -> i64 {
        vs.variables().values().map(tensor_bytes).sum()
    }

    fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
        let (actual, expected) = (actual.to_kind(Kind::Float), expected.to_kind(Kind::Float));
        (&actual - &expected).norm().double_value(&[]) / expected.norm().double_value(&[])
    }

    #[test]
    fn fp8_base_frees_the_var_store_bytes_and_stays_close_to_the_original() {
        for compute in [Kind::Float, Kind::BFloat16] {
            tch::manual_seed(11);
            let mut vs = nn::VarStore::new(Device::Cpu);
            let mut layer = Linear::new(&(vs.root() / "proj"), 64, 32, true);
            vs.set_kind(compute);
            let x = Tensor::randn([5, 64], (compute, Device::Cpu));
            let original = layer.forward(&x);
            let before = store_bytes(&vs);
            layer.quantize_fp8("proj", None).unwrap();
            assert!(layer.is_fp8() && layer.kind() == compute);
            // The store holds the very same tensor, now fp8: 32·64 weight bytes at 1 byte each.
            assert_eq!(vs.variables()["proj.weight"].kind(), Kind::Float8e4m3fn);
            let bias_bytes = 32 * compute.elt_size_in_bytes() as i64;
            assert_eq!(store_bytes(&vs), 32 * 64 + bias_bytes, "{compute:?}");
            assert!(store_bytes(&vs) < before);
            assert_eq!(layer.base_weight_bytes(), 32 * 64 + 4);
            let y = layer.forward(&x);
            assert_eq!(y.kind(), compute);
            // 3 mantissa bits: ≈ 2.5 % relative error per weight, less on a sum over 64 of them.
            let error = relative_error(&y, &original);
            assert!(error > 0.0 && error < 0.04, "{compute:?}: {error}");
            // Quantizing twice changes nothing.
            let again = layer.weight.to_kind(Kind::Float);
            layer.quantize_fp8("proj", None).unwrap();
            assert!(layer.weight.to_kind(Kind::Float).equal(&again));
        }
    }

    /// fp8 × fp8 products against the widened weight's, by the error model of the input's
    /// rounding: each input value moves by at most 2⁻⁴ of itself (3 mantissa bits), or by half the
    /// subnormal step, 2⁻¹⁰ of its scale; both outputs are rounded to bf16 once (2⁻⁸ of
    /// themselves). The fp32 accumulation's own error is far below these.
    #[test]
    fn fp8_products_stay_within_the_rounding_of_the_input_and_apply_only_where_they_may() {
        tch::manual_seed(21);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let mut layer = Linear::new(&(vs.root() / "proj"), 64, 48, true);
        vs.set_kind(Kind::BFloat16);
        // Spread over several orders of magnitude, some exactly zero.
        let x = (Tensor::randn([2, 7, 64], (Kind::Float, Device::Cpu))
            * Tensor::randn([2, 7, 64], (Kind::Float, Device::Cpu)).exp()
            * Tensor::rand([2, 7, 64], (Kind::Float, Device::Cpu)).gt(0.1))
        .to_kind(Kind::BFloat16);
        assert!(!layer.set_fp8_products(Fp8Products::Scaled), "not fp8 yet");
        layer.quantize_fp8("proj", None).unwrap();
        let widened = layer.forward(&x);
        assert!(layer.set_fp8_products(Fp8Products::Scaled));
        let scaled = layer.forward(&x);
        assert_eq!(
            (scaled.size(), scaled.kind()),
            (vec![2, 7, 48], Kind::BFloat16)
        );
        assert!(!scaled.equal(&widened), "the scaled product did not run");
        let weight = layer.base_weight().to_kind(Kind::Float).abs();
        let x32 = x.to_kind(Kind::Float);
        let x_scale = x32.abs().max().double_value(&[]) / 448.0;
        let input_bound = x32.abs().matmul(&weight.tr()) * 2f64.powi(-4)
            + weight.sum_dim_intlist(1, false, Kind::Float) * (x_scale * 2f64.powi(-10));
        let (scaled32, widened32) = (scaled.to_kind(Kind::Float), widened.to_kind(Kind::Float));
        let bound = input_bound + (scaled32.abs() + widened32.abs()) * 2f64.powi(-8) + 1e-6;
        let excess = ((&scaled32 - &widened32).abs() - &bound)
            .max()
            .double_value(&[]);
        assert!(excess <= 0.0, "past the bound by {excess}");
        // Where the input needs a gradient, or the widths are not multiples of 16, the layer widens.
        let tracked = x.detach().set_requires_grad(true);
        assert!(layer.forward(&tracked).equal(&widened));
        let mut narrow =
            Linear::from_tensors(Tensor::randn([40, 24], (Kind::BFloat16, Device::Cpu)), None);
        narrow.quantize_fp8("narrow", None).unwrap();
        let input = Tensor::randn([3, 24], (Kind::BFloat16, Device::Cpu));
        let plain = narrow.forward(&input);
        assert!(narrow.set_fp8_products(Fp8Products::Scaled));
        assert!(narrow.forward(&input).equal(&plain));
        // Back to widening.
        assert!(layer.set_fp8_products(Fp8Products::Widened));
        assert!(layer.forward(&x).equal(&widened));
    }

    /// torch-cuda's differentiable fp8 product, as the trainer hands it to the layers.
    fn trainable_product(
        x: &Tensor,
        weight: &Tensor,
        scale: &Tensor,
        bias: Option<&Tensor>,
    ) -> std::result::Result<Tensor, String> {
        torch_cuda::fp8::linear(x, weight, scale, bias, torch_cuda::fp8::Backward::Widened)
            .map_err(|e| e.to_string())
    }

    /// `ScaledBy` multiplies in fp8 where the input needs a gradient too: the output is the
    /// no-gradient `Scaled` output exactly, the input's gradient is the widened layer's (the
    /// product's backward is the widened one), and an adapter on the layer gets the gradients it
    /// gets over the widened base (its own path does not see the base product). Without the shim
    /// (no differentiable product) the layer widens.
    #[test]
    fn fp8_trainable_products_keep_the_widened_gradients() {
        tch::manual_seed(22);
        let mut layer = Linear::from_tensors(
            Tensor::randn([48, 32], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16),
            Some(Tensor::randn([48], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)),
        );
        layer.quantize_fp8("proj", None).unwrap();
        let down = Tensor::randn([4, 32], (Kind::Float, Device::Cpu)) * 0.1;
        let up = Tensor::randn([48, 4], (Kind::Float, Device::Cpu)) * 0.1;
        let mut adapter = Adapter::new("a", down, up, 4.0);
        adapter.compute_kind = Some(Kind::BFloat16);
        layer.add_adapter("proj", adapter).unwrap();
        let x = Tensor::randn([2, 6, 32], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let upstream =
            Tensor::randn([2, 6, 48], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);

        // Forward and backward from a fresh leaf and fresh adapter gradients: the output and the
        // gradients of the input, `A` and `B`.
        let run = |layer: &Linear| {
            let adapter = layer.adapter("a").unwrap();
            for t in [&adapter.down, &adapter.up] {
                let _ = t.set_requires_grad(true);
                let mut grad = t.grad();
                if grad.defined() {
                    let _ = grad.zero_();
                }
            }
            let leaf = x.detach().set_requires_grad(true);
            let y = layer.forward(&leaf);
            (&y * &upstream).sum(Kind::Float).backward();
            let adapter = layer.adapter("a").unwrap();
            (
                y.detach(),
                leaf.grad(),
                adapter.down.grad().copy(),
                adapter.up.grad().copy(),
            )
        };
        let widened = run(&layer);
        assert!(layer.set_fp8_products(Fp8Products::ScaledBy(trainable_product)));
        let trainable = run(&layer);
        if !torch_cuda::shim_compiled() {
            assert!(
                trainable.0.equal(&widened.0),
                "without the shim the layer widens"
            );
            return;
        }
        assert!(
            !trainable.0.equal(&widened.0),
            "the fp8 product did not run"
        );
        assert!(trainable.1.equal(&widened.1), "the input's gradient");
        assert!(trainable.2.equal(&widened.2), "A's gradient");
        assert!(trainable.3.equal(&widened.3), "B's gradient");
        // The same output as the no-gradient fp8 product.
        assert!(layer.set_fp8_products(Fp8Products::Scaled));
        assert!(layer.forward(&x).equal(&trainable.0));
        assert_eq!(
            Fp8Products::ScaledBy(trainable_product),
            Fp8Products::ScaledBy(trainable_product)
        );
        assert_ne!(
            Fp8Products::ScaledBy(trainable_product),
            Fp8Products::Scaled
        );
    }

    #[test]
    fn fp8_base_trains_only_the_adapters_and_refuses_merges() {
        for dora in [false, true] {
            let (mut layer, x) = layer_and_input(12);
            let mut adapter = random_adapter("a", 2, 2.0);
            if dora {
                adapter.magnitude = Some(Tensor::rand([3], (Kind::Float, Device::Cpu)) + 0.5);
            }
            for tensor in [&adapter.down, &adapter.up]
                .into_iter()
                .chain(adapter.magnitude.as_ref())
            {
                let _ = tensor.set_requires_grad(true);
            }
            layer.add_adapter("blocks.0.to_q", adapter).unwrap();
            let full_precision = layer.forward(&x);
            layer.quantize_fp8("blocks.0.to_q", None).unwrap();
            let x = x.set_requires_grad(true);
            let y = layer.forward(&x);
            assert!(relative_error(&y, &full_precision) < 0.05, "dora={dora}");
            y.sum(Kind::Float).backward();
            assert!(!layer.weight.requires_grad() && !layer.weight.grad().defined());
            let adapter = layer.adapter("a").unwrap();
            assert!(adapter.up.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
            assert!(adapter.down.grad().defined() && x.grad().defined());
            let error = layer.merge("blocks.0.to_q", None).unwrap_err();
            assert!(
                matches!(error, Error::Fp8BaseWeight { ref module, .. } if module == "blocks.0.to_q"),
                "{error}"
            );
            assert!(
                error.to_string().contains("blocks.0.to_q") && error.to_string().contains("fp8")
            );
            assert!(matches!(
                layer.unmerge("blocks.0.to_q"),
                Err(Error::Fp8BaseWeight { .. })
            ));
            assert!(!layer.adapter("a").unwrap().is_merged());
        }
    }

    #[test]
    fn fp8_refuses_a_merged_layer_and_a_non_float_compute_type() {
        let (mut layer, _) = layer_and_input(13);
        layer.add_adapter("m", random_adapter("a", 2, 2.0)).unwrap();
        layer.merge("m", None).unwrap();
        assert!(
            matches!(layer.quantize_fp8("m", None), Err(Error::QuantizeMerged { ref module }) if module == "m")
        );
        layer.unmerge("m").unwrap();
        assert!(matches!(
            layer.quantize_fp8("m", Some(Kind::Int8)),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(!layer.is_fp8());
        layer.quantize_fp8("m", Some(Kind::BFloat16)).unwrap();
        assert_eq!(
            layer
                .forward(&Tensor::ones([1, 5], (Kind::BFloat16, Device::Cpu)))
                .kind(),
            Kind::BFloat16
        );
    }
}
