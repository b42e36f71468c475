//! The CLIP text encoders of SDXL: CLIP ViT-L/14 (`CLIPTextModel`) and OpenCLIP ViT-bigG/14
//! (`CLIPTextModelWithProjection`).
//!
//! Follows transformers `models/clip/modeling_clip.py` (`CLIPTextEmbeddings`, `CLIPAttention`,
//! `CLIPMLP`, `CLIPEncoderLayer`, `CLIPTextTransformer`, `CLIPTextModelWithProjection`). Variable
//! names equal the keys of the hub's `text_encoder*/model.safetensors` (`text_model.…`,
//! `text_projection.weight`); [`single_file`] maps the SGM single-file layouts onto them.

mod checkpoint;
pub mod single_file;

pub use checkpoint::CheckpointedTextForward;

use std::path::Path;

use serde::Deserialize;
use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::pretrained::{LoadOptions, Loaded, model_folder, with_variant};
use crate::weights::{TensorFile, load_into};
use crate::{Error, Result};

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · σ(1.702 x)`, CLIP ViT-L's.
    QuickGelu,
    /// The exact (erf) GELU, OpenCLIP bigG's.
    Gelu,
}

/// A transformers `CLIPTextConfig` (`text_encoder*/config.json`), field names as there. Unknown keys
/// are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct ClipTextConfig {
    /// Token vocabulary size (49408).
    pub vocab_size: i64,
    /// Model width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Transformer layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Sequence length (77).
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: i64,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Epsilon of every layer norm.
    #[serde(default = "layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (used only by the model with projection).
    #[serde(default = "projection_dim")]
    pub projection_dim: i64,
    /// The end token id. The legacy value 2 (SDXL's configs) means "pool at the highest id", which is
    /// where `<|endoftext|>` (49407) first appears; other values pool at their first occurrence.
    #[serde(default = "legacy_eos")]
    pub eos_token_id: i64,
}

fn seventy_seven() -> i64 {
    77
}
fn layer_norm_eps() -> f64 {
    1e-5
}
fn projection_dim() -> i64 {
    512
}
fn legacy_eos() -> i64 {
    2
}

impl ClipTextConfig {
    /// SDXL's `text_encoder`: CLIP ViT-L/14 (hidden 768, 12 layers, 12 heads, quick-GELU).
    pub fn clip_l() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 768,
            eos_token_id: 2,
        }
    }

    /// SDXL's `text_encoder_2`: OpenCLIP ViT-bigG/14 (hidden 1280, 32 layers, 20 heads, GELU,
    /// projection 1280).
    pub fn open_clip_big_g() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: Activation::Gelu,
            projection_dim: 1280,
            ..Self::clip_l()
        }
    }

    /// Reads a transformers `config.json` and checks it.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::ConfigJson`], [`Error::InvalidConfig`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let config: Self = crate::config_file::read_config_json(path.as_ref())?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects configs no model can be built from.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the key.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("projection_dim", self.projection_dim),
        ] {
            if value <= 0 {
                return Err(Error::InvalidConfig {
                    field,
                    reason: format!("{value} is not positive"),
                });
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::InvalidConfig {
                field: "num_attention_heads",
                reason: format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            });
        }
        Ok(())
    }
}

/// transformers `CLIPAttention`: causal multi-head self-attention with q/k/v/out projections.
#[derive(Debug)]
struct ClipAttention {
    q_proj: lora::Linear,
    k_proj: lora::Linear,
    v_proj: lora::Linear,
    out_proj: lora::Linear,
    heads: i64,
}

impl ClipAttention {
    fn new(path: &nn::Path, config: &ClipTextConfig) -> Self {
        let d = config.hidden_size;
        Self {
            q_proj: lora::Linear::new(&(path / "q_proj"), d, d, true),
            k_proj: lora::Linear::new(&(path / "k_proj"), d, d, true),
            v_proj: lora::Linear::new(&(path / "v_proj"), d, d, true),
            out_proj: lora::Linear::new(&(path / "out_proj"), d, d, true),
            heads: config.num_attention_heads,
        }
    }

    /// # Shapes
    /// `[batch, tokens, hidden]` → same.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (batch, tokens, width) = xs.size3().unwrap_or((0, 0, 0));
        let split = |t: Tensor| {
            t.view([batch, tokens, self.heads, width / self.heads])
                .transpose(1, 2)
        };
        let query = split(xs.apply(&self.q_proj));
        let key = split(xs.apply(&self.k_proj));
        let value = split(xs.apply(&self.v_proj));
        // Text tokens only see earlier tokens; no padding mask (SDXL never passes one). SDPA's default
        // scale is 1/√head_dim, as CLIP's.
        let attended = crate::attention::fused(&query, &key, &value, true, None);
        attended
            .transpose(1, 2)
            .reshape([batch, tokens, width])
            .apply(&self.out_proj)
    }
}

/// transformers `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Debug)]
struct ClipEncoderLayer {
    layer_norm1: nn::LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: nn::LayerNorm,
    fc1: lora::Linear,
    fc2: lora::Linear,
    activation: Activation,
}

impl ClipEncoderLayer {
    fn new(path: &nn::Path, config: &ClipTextConfig) -> Self {
        let norm = |name: &str| {
            nn::layer_norm(
                path / name,
                vec![config.hidden_size],
                nn::LayerNormConfig {
                    eps: config.layer_norm_eps,
                    ..Default::default()
                },
            )
        };
        Self {
            layer_norm1: norm("layer_norm1"),
            self_attn: ClipAttention::new(&(path / "self_attn"), config),
            layer_norm2: norm("layer_norm2"),
            fc1: lora::Linear::new(
                &(path / "mlp" / "fc1"),
                config.hidden_size,
                config.intermediate_size,
                true,
            ),
            fc2: lora::Linear::new(
                &(path / "mlp" / "fc2"),
                config.intermediate_size,
                config.hidden_size,
                true,
            ),
            activation: config.hidden_act,
        }
    }

    /// # Shapes
    /// `[batch, tokens, hidden]` → same.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs + self.self_attn.forward(&xs.apply(&self.layer_norm1));
        let hidden = xs.apply(&self.layer_norm2).apply(&self.fc1);
        let hidden = match self.activation {
            Activation::QuickGelu => &hidden * (&hidden * 1.702).sigmoid(),
            Activation::Gelu => hidden.gelu("none"),
        };
        xs + hidden.apply(&self.fc2)
    }
}

/// What a text encoder returns for a batch of token ids.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// The embeddings followed by the output of every layer: `num_hidden_layers + 1` tensors
    /// `[batch, tokens, hidden]`, without the final layer norm. `hidden_states[len − 2]` is SDXL's
    /// per-token context.
    pub hidden_states: Vec<Tensor>,
    /// The last layer's output after the final layer norm, `[batch, tokens, hidden]`.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at each sequence's end token, `[batch, hidden]`.
    pub pooled: Tensor,
    /// `pooled` through `text_projection`, `[batch, projection_dim]` (model with projection only).
    pub text_embeds: Option<Tensor>,
}

/// transformers `CLIPTextModel`, or `CLIPTextModelWithProjection` when built with a projection.
#[derive(Debug)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    text_projection: Option<lora::Linear>,
}

impl ClipTextModel {
    /// Creates the variables under `path` (the root, for a hub file): `text_model.…` and, when
    /// `with_projection`, `text_projection.weight`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for configs [`ClipTextConfig::validate`] rejects.
    pub fn new(path: &nn::Path, config: &ClipTextConfig, with_projection: bool) -> Result<Self> {
        config.validate()?;
        let text = path / "text_model";
        let embeddings = &text / "embeddings";
        let embedding = |name: &str, rows: i64| {
            nn::embedding(
                &embeddings / name,
                rows,
                config.hidden_size,
                Default::default(),
            )
        };
        Ok(Self {
            config: config.clone(),
            token_embedding: embedding("token_embedding", config.vocab_size),
            position_embedding: embedding("position_embedding", config.max_position_embeddings),
            layers: (0..config.num_hidden_layers)
                .map(|i| ClipEncoderLayer::new(&(&text / "encoder" / "layers" / i), config))
                .collect(),
            final_layer_norm: nn::layer_norm(
                &text / "final_layer_norm",
                vec![config.hidden_size],
                nn::LayerNormConfig {
                    eps: config.layer_norm_eps,
                    ..Default::default()
                },
            ),
            text_projection: with_projection.then(|| {
                lora::Linear::new(
                    &(path / "text_projection"),
                    config.hidden_size,
                    config.projection_dim,
                    false,
                )
            }),
        })
    }

    /// Loads a text encoder as transformers' `CLIPTextModel(WithProjection).from_pretrained` does:
    /// `name` is a transformers folder (`config.json`, `model.safetensors` or the file of
    /// [`LoadOptions::variant`]), or a hub repository id of one, whose files alone are fetched (see
    /// [`crate::pretrained`]); in an SDXL folder or repository name the encoder with
    /// [`LoadOptions::subfolder`] (`text_encoder` or `text_encoder_2`). The weights go to
    /// [`LoadOptions::device`] in [`LoadOptions::kind`]. Builds the projection when the file has
    /// `text_projection.weight`. Accepts both the hub's keys (`text_model.…`) and the prefix-less keys
    /// transformers 5 writes for `CLIPTextModel`.
    ///
    /// # Errors
    /// [`Error::NoSuchFolder`], [`Error::Hub`], [`Error::WeightFiles`] naming the folder or
    /// repository; file and config errors; [`Error::Load`] unless the file matches the model one
    /// to one.
    pub fn from_pretrained(name: impl AsRef<Path>, options: &LoadOptions) -> Result<Loaded<Self>> {
        const WEIGHTS: &str = "model.safetensors";
        let folder = model_folder(name.as_ref(), options, None, WEIGHTS)?;
        Self::from_folder(&folder, options)
    }

    /// Loads the encoder of `folder`, which holds its `config.json`.
    pub(crate) fn from_folder(folder: &Path, options: &LoadOptions) -> Result<Loaded<Self>> {
        let config = ClipTextConfig::from_file(folder.join("config.json"))?;
        let file = TensorFile::open(folder.join(with_variant(
            "model.safetensors",
            options.variant.as_deref(),
        )))?;
        let keys = file.keys()?;
        let has = |key: &str| keys.binary_search_by(|k| k.as_str().cmp(key)).is_ok();
        let strip_prefix = !has("text_model.embeddings.token_embedding.weight")
            && has("embeddings.token_embedding.weight");
        let mut store = nn::VarStore::new(options.device);
        let model = Self::new(&store.root(), &config, has("text_projection.weight"))?;
        let report = load_into(&store, &[file], |name| {
            if strip_prefix {
                name.strip_prefix("text_model.").unwrap_or(name).to_owned()
            } else {
                name.to_owned()
            }
        })?;
        store.set_kind(options.kind);
        Ok(Loaded {
            model,
            store,
            report,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The device of the model's weights.
    pub fn device(&self) -> Device {
        self.token_embedding.ws.device()
    }

    /// Whether the model has `text_projection` (is a `CLIPTextModelWithProjection`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Runs the encoder on token ids.
    ///
    /// # Shapes
    /// `input_ids` `[batch, tokens]` (int64, `tokens ≤ max_position_embeddings`) → see [`ClipTextOutput`].
    ///
    /// # Errors
    /// [`Error::Shape`] when the ids are not a non-empty int64 `[batch, tokens]` within the position table.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let mut hidden = self.embed(input_ids)?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            let next = layer.forward(&hidden);
            hidden_states.push(hidden);
            hidden = next;
        }
        hidden_states.push(hidden.shallow_clone());
        let last_hidden_state = hidden.apply(&self.final_layer_norm);
        let pooled = self.pool(&last_hidden_state, input_ids);
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|projection| pooled.apply(projection));
        Ok(ClipTextOutput {
            hidden_states,
            last_hidden_state,
            pooled,
            text_embeds,
        })
    }

    /// Token plus position embeddings of checked ids.
    ///
    /// # Errors
    /// [`Error::Shape`] when the ids are not a non-empty int64 `[batch, tokens]` within the position table.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let tokens = match input_ids.size().as_slice() {
            &[batch, tokens]
                if batch > 0
                    && tokens > 0
                    && tokens <= self.config.max_position_embeddings
                    && input_ids.kind() == Kind::Int64 =>
            {
                tokens
            }
            other => {
                return Err(Error::Shape {
                    what: "text encoder input_ids".into(),
                    expected: format!(
                        "int64 [batch, tokens ≤ {}]",
                        self.config.max_position_embeddings
                    ),
                    actual: format!("{:?} {other:?}", input_ids.kind()),
                });
            }
        };
        let positions = Tensor::arange(tokens, (Kind::Int64, input_ids.device()));
        // The fallible lookup: an id outside the vocabulary is an error on the CPU, not a panic.
        let tokens_embedded =
            Tensor::f_embedding(&self.token_embedding.ws, input_ids, -1, false, false)?;
        Ok(tokens_embedded + positions.apply(&self.position_embedding))
    }

    /// `last_hidden_state` at each sequence's end token, without reading ids on the host
    /// (graph-capturable).
    fn pool(&self, last_hidden_state: &Tensor, input_ids: &Tensor) -> Tensor {
        let end_positions = if self.config.eos_token_id == 2 {
            input_ids.argmax(-1, false)
        } else {
            input_ids
                .eq(self.config.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let rows = Tensor::arange(input_ids.size()[0], (Kind::Int64, input_ids.device()));
        last_hidden_state.index(&[Some(rows), Some(end_positions)])
    }
}

impl lora::HasLinears for ClipTextModel {
    /// Paths as in transformers: `text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj`,
    /// `text_model.encoder.layers.{i}.mlp.fc{1,2}`, then `text_projection`.
    fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut lora::Linear)) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("text_model.encoder.layers.{i}");
            let attn = &mut layer.self_attn;
            for (name, linear) in [
                ("q_proj", &mut attn.q_proj),
                ("k_proj", &mut attn.k_proj),
                ("v_proj", &mut attn.v_proj),
                ("out_proj", &mut attn.out_proj),
            ] {
                f(&format!("{prefix}.self_attn.{name}"), linear);
            }
            f(&format!("{prefix}.mlp.fc1"), &mut layer.fc1);
            f(&format!("{prefix}.mlp.fc2"), &mut layer.fc2);
        }
        if let Some(projection) = &mut self.text_projection {
            f("text_projection", projection);
        }
    }
}
