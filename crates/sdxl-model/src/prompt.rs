//! SDXL prompt encoding: both tokenizers and text encoders → per-token context and pooled embedding,
//! plus the six micro-conditioning time ids.
//!
//! Follows diffusers `pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py`
//! (`encode_prompt`, `_get_add_time_ids`):
//!
//! 1. each prompt is tokenized twice (CLIP-L's tokenizer pads with `<|endoftext|>`, bigG's with 0);
//! 2. the context is the penultimate hidden state of both encoders (no final layer norm),
//!    concatenated on the channel axis: 768 + 1280 = 2048 wide for SDXL;
//! 3. the pooled embedding is bigG's `text_embeds` (final norm at the end token, projected), 1280 wide;
//! 4. without a negative prompt, the negative context and pooled embedding are zeros
//!    (`force_zeros_for_empty_prompt`), not the encoding of "".

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::clip::{ClipTextConfig, ClipTextModel, single_file};
use crate::hub::{Part, TOKENIZER_FILES_OF_BOTH, Wanted};
use crate::pretrained::{LoadOptions, Loaded, Source, locate, pick_folder};
use crate::tokenizer::{ClipTokenizer, Padding};
use crate::weights::LoadReport;
use crate::weights::TensorFile;
use crate::{Error, Result};

/// The text encoders of a diffusers SDXL folder.
pub(crate) const TEXT_ENCODER_PARTS: [Part<'static>; 2] = [
    Part {
        subfolder: Some("text_encoder"),
        default: None,
        weights: "model.safetensors",
    },
    Part {
        subfolder: Some("text_encoder_2"),
        default: None,
        weights: "model.safetensors",
    },
];

/// The text conditioning of a batch of prompts.
#[derive(Debug)]
pub struct PromptEmbeds {
    /// Per-token context for the UNet's cross-attention, `[batch, 77, hidden₁ + hidden₂]`.
    pub context: Tensor,
    /// bigG's projected pooled embedding, `[batch, projection_dim]`.
    pub pooled: Tensor,
}

impl PromptEmbeds {
    /// All-zero embeddings of the same shapes (SDXL's empty negative prompt).
    pub fn zeros_like(&self) -> Self {
        Self {
            context: self.context.zeros_like(),
            pooled: self.pooled.zeros_like(),
        }
    }
}

/// SDXL's two tokenizers and text encoders.
#[derive(Debug)]
pub struct PromptEncoder {
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextModel,
    text_encoder_2: ClipTextModel,
}

impl PromptEncoder {
    /// Pairs the encoders with SDXL's shipped tokenizers.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] when `text_encoder_2` has no `text_projection`; tokenizer errors.
    pub fn new(text_encoder: ClipTextModel, text_encoder_2: ClipTextModel) -> Result<Self> {
        if !text_encoder_2.has_projection() {
            return Err(Error::InvalidSetting {
                setting: "text_encoder_2",
                value: "CLIPTextModel".into(),
                expected: "a CLIPTextModelWithProjection (it provides the pooled embedding)",
            });
        }
        Ok(Self {
            tokenizer: ClipTokenizer::sdxl_first()?,
            tokenizer_2: ClipTokenizer::sdxl_second()?,
            text_encoder,
            text_encoder_2,
        })
    }

    /// Loads `text_encoder/` and `text_encoder_2/` of a diffusers SDXL folder, or of a hub
    /// repository id whose text encoders and tokenizers alone are fetched (see
    /// [`crate::pretrained`]), with the folder's tokenizers where it has them
    /// ([`Self::load_tokenizers`]). The weights (of [`LoadOptions::variant`]) go to
    /// [`LoadOptions::device`] in [`LoadOptions::kind`]. Returns the variable stores that own the
    /// two encoders' weights, and their reports together (keys prefixed with `text_encoder/` and
    /// `text_encoder_2/`).
    ///
    /// # Errors
    /// [`Error::NoSuchFolder`], [`Error::Hub`] naming the folder or repository; as
    /// [`ClipTextModel::from_pretrained`] for either folder; as [`Self::new`] and
    /// [`Self::load_tokenizers`].
    pub fn from_pretrained(
        name: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Loaded<Self, [VarStore; 2]>> {
        let wanted = Wanted::Parts {
            parts: &TEXT_ENCODER_PARTS,
            variant: options.variant.as_deref(),
            optional: &TOKENIZER_FILES_OF_BOTH,
        };
        let root = match locate(name.as_ref(), options, &wanted)? {
            Source::Folder(root) => root,
            Source::File(path) => {
                return Err(Error::WeightFiles {
                    path,
                    reason: "a file, not a diffusers SDXL folder (an SGM single file loads with \
                             `Pipeline::from_pretrained` or `SingleFileCheckpoint`)"
                        .into(),
                });
            }
        };
        Self::from_root(&root, options)
    }

    /// Loads the encoders and tokenizers of the local SDXL folder `root`.
    pub(crate) fn from_root(
        root: &Path,
        options: &LoadOptions,
    ) -> Result<Loaded<Self, [VarStore; 2]>> {
        let mut report = LoadReport::default();
        let mut load = |subfolder: &str| -> Result<Loaded<ClipTextModel>> {
            let folder = pick_folder(root, Some(subfolder), None)?;
            let loaded = ClipTextModel::from_folder(&folder, options)?;
            report.absorb(subfolder, loaded.report.clone());
            Ok(loaded)
        };
        let first = load("text_encoder")?;
        let second = load("text_encoder_2")?;
        let mut model = Self::new(first.model, second.model)?;
        model.load_tokenizers(root)?;
        Ok(Loaded {
            model,
            store: [first.store, second.store],
            report,
        })
    }

    /// Replaces the shipped tokenizers with those of a diffusers SDXL folder's `tokenizer/` and
    /// `tokenizer_2/` where the folder has them (see [`ClipTokenizer::from_folder`]), so that
    /// tokens added by textual inversion or pivotal tuning encode as transformers encodes them.
    /// A folder without `tokenizer/` keeps the shipped ones (the same vocabulary as SDXL's).
    ///
    /// # Errors
    /// As [`ClipTokenizer::from_folder`] and [`Self::set_tokenizers`]; nothing changes then.
    pub fn load_tokenizers(&mut self, root: impl AsRef<Path>) -> Result<()> {
        let root = root.as_ref();
        let load = |name: &str, padding| {
            let folder = root.join(name);
            folder
                .is_dir()
                .then(|| ClipTokenizer::from_folder(folder, padding))
                .transpose()
        };
        let first = load("tokenizer", Padding::EndOfText)?;
        let second = load("tokenizer_2", Padding::Zero)?;
        if first.is_none() && second.is_none() {
            return Ok(());
        }
        let first = first.map_or_else(ClipTokenizer::sdxl_first, Ok)?;
        let second = second.map_or_else(ClipTokenizer::sdxl_second, Ok)?;
        self.set_tokenizers(first, second)
    }

    /// Uses `tokenizer` for the first text encoder and `tokenizer_2` for the second.
    ///
    /// # Errors
    /// [`Error::Incompatible`] when a tokenizer can produce ids past its encoder's token embedding
    /// (added tokens without the embedding rows a textual inversion adds); nothing changes then.
    pub fn set_tokenizers(
        &mut self,
        tokenizer: ClipTokenizer,
        tokenizer_2: ClipTokenizer,
    ) -> Result<()> {
        for (name, tokenizer, encoder) in [
            ("tokenizer", &tokenizer, &self.text_encoder),
            ("tokenizer_2", &tokenizer_2, &self.text_encoder_2),
        ] {
            let rows = encoder.config().vocab_size;
            if tokenizer.vocab_size() as i64 > rows {
                return Err(Error::Incompatible {
                    what: format!(
                        "{name} vocabulary (with added tokens) vs its text encoder's `vocab_size`"
                    ),
                    expected: format!("at most {rows} tokens"),
                    actual: tokenizer.vocab_size().to_string(),
                });
            }
        }
        self.tokenizer = tokenizer;
        self.tokenizer_2 = tokenizer_2;
        Ok(())
    }

    /// Loads both encoders from an SGM single-file checkpoint (see [`crate::clip::single_file`]);
    /// `configs` are those of CLIP-L and bigG ([`ClipTextConfig::clip_l`] and
    /// [`ClipTextConfig::open_clip_big_g`] for SDXL 1.0).
    ///
    /// # Errors
    /// [`Error::Load`] naming the keys that do not match; as [`Self::new`].
    pub fn from_single_file(
        file: &TensorFile,
        configs: [&ClipTextConfig; 2],
        device: Device,
        kind: Kind,
    ) -> Result<(Self, [VarStore; 2])> {
        let (text_encoder, vs_1) = single_file::load_clip_l(file, configs[0], device, kind)?;
        let (text_encoder_2, vs_2) =
            single_file::load_open_clip_big_g(file, configs[1], device, kind)?;
        Ok((Self::new(text_encoder, text_encoder_2)?, [vs_1, vs_2]))
    }

    /// The first text encoder (CLIP-L).
    pub fn text_encoder_mut(&mut self) -> &mut ClipTextModel {
        &mut self.text_encoder
    }

    /// The second text encoder (OpenCLIP bigG).
    pub fn text_encoder_2_mut(&mut self) -> &mut ClipTextModel {
        &mut self.text_encoder_2
    }

    /// Both text encoders at once (CLIP-L, OpenCLIP bigG), e.g. to attach LoRAs to each.
    pub fn text_encoders_mut(&mut self) -> (&mut ClipTextModel, &mut ClipTextModel) {
        (&mut self.text_encoder, &mut self.text_encoder_2)
    }

    /// Both text encoders (CLIP-L, OpenCLIP bigG).
    pub fn text_encoders(&self) -> (&ClipTextModel, &ClipTextModel) {
        (&self.text_encoder, &self.text_encoder_2)
    }

    fn device(&self) -> Device {
        self.text_encoder_2.device()
    }

    /// Encodes a batch of prompts. `prompts_2` (same length) goes to the second encoder instead of
    /// `prompts`, as diffusers' `prompt_2`. `clip_skip = Some(k)` takes the hidden state `k` layers
    /// before the penultimate one, as diffusers.
    ///
    /// # Shapes
    /// `n` prompts → context `[n, 77, hidden₁ + hidden₂]`, pooled `[n, projection_dim]`.
    ///
    /// # Errors
    /// [`Error::Shape`] when `prompts_2` has another length; [`Error::InvalidSetting`] when
    /// `clip_skip` reaches past the embeddings; tokenizer errors.
    pub fn encode<S: AsRef<str>>(
        &self,
        prompts: &[S],
        prompts_2: Option<&[S]>,
        clip_skip: Option<usize>,
    ) -> Result<PromptEmbeds> {
        let prompts_2 = prompts_2.unwrap_or(prompts);
        if prompts_2.len() != prompts.len() || prompts.is_empty() {
            return Err(Error::Shape {
                what: "prompts for the second text encoder".into(),
                expected: format!("{} prompts (at least one)", prompts.len()),
                actual: format!("{}", prompts_2.len()),
            });
        }
        let ids = self.tokenizer.encode_batch(prompts, self.device())?;
        let ids_2 = self.tokenizer_2.encode_batch(prompts_2, self.device())?;
        self.encode_ids(&ids, &ids_2, clip_skip)
    }

    /// Token ids of `prompts` for each encoder (`[n, 77]` int64 each, on the encoders' device):
    /// what [`Self::encode_ids`] takes. A trainer of the text encoders keeps these instead of the
    /// embeddings (diffusers' `tokenize_prompt`).
    ///
    /// # Errors
    /// Tokenizer errors.
    pub fn tokenize<S: AsRef<str>>(&self, prompts: &[S]) -> Result<(Tensor, Tensor)> {
        Ok((
            self.tokenizer.encode_batch(prompts, self.device())?,
            self.tokenizer_2.encode_batch(prompts, self.device())?,
        ))
    }

    /// Encodes token ids already made by [`Self::tokenize`] (diffusers' `encode_prompt` with
    /// `text_input_ids_list`): device work only, so a training step that trains the encoders can
    /// be captured as a CUDA graph. Autograd records it unless under `no_grad`.
    ///
    /// # Shapes
    /// `ids`, `ids_2` `[n, tokens]` int64 → context `[n, tokens, hidden₁ + hidden₂]`, pooled
    /// `[n, projection_dim]`.
    ///
    /// # Errors
    /// As [`Self::encode`].
    pub fn encode_ids(
        &self,
        ids: &Tensor,
        ids_2: &Tensor,
        clip_skip: Option<usize>,
    ) -> Result<PromptEmbeds> {
        let out = self.text_encoder.forward(ids)?;
        let out_2 = self.text_encoder_2.forward(ids_2)?;
        let context_1 = pick_hidden_state(&out.hidden_states, clip_skip)?;
        let context_2 = pick_hidden_state(&out_2.hidden_states, clip_skip)?;
        let kind = context_2.kind();
        let context = Tensor::cat(&[context_1.to_kind(kind), context_2], -1);
        let pooled = out_2.text_embeds.ok_or(Error::InvalidSetting {
            setting: "text_encoder_2",
            value: "CLIPTextModel".into(),
            expected: "a CLIPTextModelWithProjection (it provides the pooled embedding)",
        })?;
        Ok(PromptEmbeds { context, pooled })
    }

    /// Encodes prompts and their negatives for classifier-free guidance: `None` gives zeros
    /// (`force_zeros_for_empty_prompt`); otherwise one negative per prompt.
    ///
    /// # Errors
    /// [`Error::Shape`] when the number of negatives differs from the number of prompts; as [`Self::encode`].
    pub fn encode_with_negative<S: AsRef<str>>(
        &self,
        prompts: &[S],
        negative: Option<&[S]>,
    ) -> Result<(PromptEmbeds, PromptEmbeds)> {
        let positive = self.encode(prompts, None, None)?;
        let negative = match negative {
            None => positive.zeros_like(),
            Some(negative) if negative.len() == prompts.len() => {
                self.encode(negative, None, None)?
            }
            Some(negative) => {
                return Err(Error::Shape {
                    what: "negative prompts".into(),
                    expected: format!("{} (one per prompt)", prompts.len()),
                    actual: format!("{}", negative.len()),
                });
            }
        };
        Ok((positive, negative))
    }
}

fn pick_hidden_state(hidden_states: &[Tensor], clip_skip: Option<usize>) -> Result<Tensor> {
    let back = clip_skip.unwrap_or(0) + 2;
    hidden_states
        .len()
        .checked_sub(back)
        .map(|i| hidden_states[i].shallow_clone())
        .ok_or_else(|| Error::InvalidSetting {
            setting: "clip_skip",
            value: format!("{}", clip_skip.unwrap_or(0)),
            expected: "fewer skipped layers than the text encoder has",
        })
}

/// SDXL's six micro-conditioning values `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`
/// (diffusers `_get_add_time_ids`). At inference original = target = the image size and the crop is (0, 0).
pub fn add_time_ids(
    original_size: (i64, i64),
    crop_top_left: (i64, i64),
    target_size: (i64, i64),
) -> [f64; 6] {
    [
        original_size.0,
        original_size.1,
        crop_top_left.0,
        crop_top_left.1,
        target_size.0,
        target_size.1,
    ]
    .map(|v| v as f64)
}

/// Rows of [`add_time_ids`] as a `[batch, 6]` tensor of `kind` on `device`.
pub fn add_time_ids_tensor(rows: &[[f64; 6]], kind: Kind, device: Device) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .view([rows.len() as i64, 6])
        .to_kind(kind)
        .to_device(device)
}
