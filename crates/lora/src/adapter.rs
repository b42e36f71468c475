//! One LoRA or DoRA adapter of one linear layer.
//!
//! Follows peft's `LoraLayer` (`peft/tuners/lora/layer.py`) and `DoraLinearLayer`
//! (`peft/tuners/lora/dora.py`): `ΔW = scaling · B · A` with `scaling = alpha / r` (or `alpha / √r`
//! with rsLoRA); DoRA adds a per-output-row magnitude `m` and rescales the adapted weight to
//! `m · (W + ΔW) / ‖W + ΔW‖_row`.

use tch::{Kind, Tensor};

use crate::copies::AdapterCopy;

/// How the adapter's scale follows from alpha and the rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Scaling {
    /// `alpha / r` (LoRA paper, peft's default).
    #[default]
    Standard,
    /// `alpha / √r` (rsLoRA, peft's `use_rslora=True`).
    RankStabilized,
}

impl Scaling {
    /// The factor applied to `B · A` for this rank and alpha.
    pub fn factor(self, rank: i64, alpha: f64) -> f64 {
        match self {
            Scaling::Standard => alpha / rank as f64,
            Scaling::RankStabilized => alpha / (rank as f64).sqrt(),
        }
    }
}

/// The tensors and hyper-parameters of one adapter on one linear layer or convolution.
///
/// On a linear layer `down` (peft's `lora_A`) is `[r, in]` and `up` (`lora_B`) is `[out, r]`; on a
/// convolution ([`crate::Conv2d`]) `down` is a kernel `[r, in, kh, kw]` and `up` a 1×1 kernel
/// `[out, r, 1, 1]`. `magnitude` (DoRA's `lora_magnitude_vector`, linear layers only) is `[out]`. They are usually fp32 and trainable while the base weight
/// is frozen and may be bf16.
#[derive(Debug)]
pub struct Adapter {
    /// The adapter's name (peft's adapter name; `"default"` for a single LoRA).
    pub name: String,
    /// `A`, `[r, in_features]` (`[r, in, kh, kw]` on a convolution).
    pub down: Tensor,
    /// `B`, `[out_features, r]` (`[out, r, 1, 1]` on a convolution).
    pub up: Tensor,
    /// DoRA's magnitude vector `[out_features]`; `None` for plain LoRA.
    pub magnitude: Option<Tensor>,
    /// The LoRA alpha.
    pub alpha: f64,
    /// How alpha and the rank give the scale.
    pub scaling: Scaling,
    /// A user multiplier on top of the scale (the "LoRA weight" of ComfyUI / A1111, peft's
    /// `set_scale`); 1 by default.
    pub multiplier: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f64,
    /// The type a plain LoRA computes in. `None` (the default): the adapter's own type, as peft
    /// without autocast. `Some(kind)`: as under `torch.autocast(kind)`, which is how diffusers'
    /// training scripts run with mixed precision: the input, `A` and `B` are cast to `kind`, and
    /// both products, the scaling and the sum with the base output are done in it; gradients reach
    /// `A` and `B` in their own type through the casts. DoRA adapters ignore it.
    pub compute_kind: Option<Kind>,
    /// Its compute copies, when a [`crate::ComputeCopies`] holds them.
    pub(crate) copy: Option<AdapterCopy>,
    pub(crate) enabled: bool,
    pub(crate) merged: bool,
}

impl Adapter {
    /// A plain LoRA adapter from its two matrices.
    pub fn new(name: impl Into<String>, down: Tensor, up: Tensor, alpha: f64) -> Self {
        Self {
            name: name.into(),
            down,
            up,
            magnitude: None,
            alpha,
            scaling: Scaling::Standard,
            multiplier: 1.0,
            dropout: 0.0,
            compute_kind: None,
            copy: None,
            enabled: true,
            merged: false,
        }
    }

    /// The rank `r`.
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    /// The factor on `B · A`: alpha over the rank (or its square root) times the multiplier.
    pub fn scale(&self) -> f64 {
        self.scaling.factor(self.rank(), self.alpha) * self.multiplier
    }

    /// Whether the adapter takes part in the forward pass (as a side path or merged).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the adapter is currently merged into the base weight.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Whether this is a DoRA adapter.
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// The element type the adapter computes in (that of `A`).
    pub fn kind(&self) -> Kind {
        self.down.kind()
    }

    /// The trainable tensors: `A`, `B` and, for DoRA, the magnitude.
    pub fn parameters(&self) -> Vec<Tensor> {
        let mut params = vec![self.down.shallow_clone(), self.up.shallow_clone()];
        params.extend(self.magnitude.as_ref().map(Tensor::shallow_clone));
        params
    }

    /// `scale · B · A` in fp32, the weight delta of a plain LoRA: `[out, in]` on a linear layer,
    /// `[out, in, kh, kw]` on a convolution (`B`'s 1×1 kernel mixes the `r` channels of every tap
    /// of `A`'s kernel, as peft's `lora.Conv2d.get_delta_weight`).
    pub(crate) fn delta_weight_f32(&self) -> Tensor {
        let mut shape = self.up.size()[..1].to_vec();
        shape.extend_from_slice(&self.down.size()[1..]);
        self.up
            .to_kind(Kind::Float)
            .flatten(1, -1)
            .matmul(&self.down.to_kind(Kind::Float).flatten(1, -1))
            .view(shape.as_slice())
            * self.scale()
    }

    /// DoRA's row norms `‖W + scale · B · A‖` over the input axis, `[out]`, detached.
    pub(crate) fn dora_weight_norm(&self, weight: &Tensor, delta: &Tensor) -> Tensor {
        (weight + delta).norm_scalaropt_dim(2, [1], false).detach()
    }
}
