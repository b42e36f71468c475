//! The two SDXL tokenizers: CLIP's byte-level BPE with SDXL's truncation and padding.
//!
//! Follows transformers `models/clip/tokenization_clip.py` (`CLIPTokenizer`) for the pipeline —
//! NFC, whitespace runs to one space, lower-case, CLIP's word regex, BPE with `</w>` word ends,
//! `<|startoftext|>` … `<|endoftext|>` — and open_clip `tokenizer.py` for the second tokenizer's
//! zero padding. The vocabulary is the MIT-licensed `bpe_simple_vocab_16e6.txt.gz` of openai/CLIP
//! (shipped by `open_clip_torch`), turned into `assets/tokenizer/clip-tokenizer.json` by
//! `tools/tokenizer/build_tokenizer.py` and compiled into the crate.
//!
//! Not applied: open_clip's `ftfy.fix_text` and `html.unescape` (transformers does not apply them
//! either). Text they would change — HTML entities, full-width letters, ligatures, mojibake — can
//! tokenize differently from open_clip.

mod vocab_files;

use std::path::Path;
use std::str::FromStr;

use tch::{Device, Tensor};

use crate::{Error, Result};

/// The tokenizer pipeline, built by `tools/tokenizer/build_tokenizer.py`.
const CLIP_TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/tokenizer/clip-tokenizer.json");

/// Token ids per prompt, start and end tokens included.
pub const MAX_LENGTH: usize = 77;
/// `<|startoftext|>`.
pub const START_OF_TEXT: u32 = 49406;
/// `<|endoftext|>`.
pub const END_OF_TEXT: u32 = 49407;

/// What fills a prompt's ids after its end token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// `<|endoftext|>` (49407): SDXL's first tokenizer (CLIP-L), as transformers' `CLIPTokenizer`.
    EndOfText,
    /// Id 0 (`!`): SDXL's second tokenizer (OpenCLIP bigG), as `open_clip.tokenize`. Only the
    /// padding is 0; a `!` inside the prompt keeps its BPE ids (diffusers' `tokenizer_2` would turn
    /// it into 0 as well, a known quirk, diffusers issue #4153).
    Zero,
}

impl Padding {
    fn id(self) -> u32 {
        match self {
            Padding::EndOfText => END_OF_TEXT,
            Padding::Zero => 0,
        }
    }
}

/// A CLIP tokenizer with SDXL's truncation (77 ids, the last one always `<|endoftext|>`) and padding.
///
/// ```
/// use sdxl_model::tokenizer::{ClipTokenizer, END_OF_TEXT};
///
/// let ids = ClipTokenizer::sdxl_second()?.encode("a photo of a cat")?;
/// assert_eq!(ids[..7], [49406, 320, 1125, 539, 320, 2368, END_OF_TEXT]);
/// assert!(ids[7..].iter().all(|&id| id == 0)); // bigG's tokenizer pads with id 0
/// # Ok::<(), sdxl_model::Error>(())
/// ```
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    padding: Padding,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("padding", &self.padding)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// The shipped CLIP BPE tokenizer with the given padding.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the embedded JSON cannot be read (a build defect).
    pub fn new(padding: Padding) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(CLIP_TOKENIZER_JSON).map_err(|source| {
            Error::Tokenizer {
                what: "reading the shipped clip-tokenizer.json".into(),
                source,
            }
        })?;
        Ok(Self { inner, padding })
    }

    /// SDXL's `tokenizer` (for CLIP-L): padded with `<|endoftext|>`.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn sdxl_first() -> Result<Self> {
        Self::new(Padding::EndOfText)
    }

    /// SDXL's `tokenizer_2` (for OpenCLIP bigG): padded with id 0.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn sdxl_second() -> Result<Self> {
        Self::new(Padding::Zero)
    }

    /// A tokenizer from another `tokenizer.json` (e.g. a hub `tokenizer/tokenizer.json`).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] naming the file when it cannot be read or parsed.
    pub fn from_file(path: impl AsRef<Path>, padding: Padding) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|source| Error::Tokenizer {
            what: format!("reading {}", path.display()),
            source,
        })?;
        Ok(Self { inner, padding })
    }

    /// The tokenizer of a model folder's `tokenizer/` or `tokenizer_2/`, as transformers'
    /// `CLIPTokenizer.from_pretrained` reads it: `tokenizer.json` when the folder has one (what
    /// transformers 5 saves), else CLIP's `vocab.json` and `merges.txt` with the added tokens of
    /// `tokenizer_config.json` (`added_tokens_decoder`) or `added_tokens.json` (what SDXL repositories
    /// and textual-inversion or pivotal-tuning runs under transformers 4 save). The text pipeline
    /// around the vocabulary (normalisation, CLIP's word regex, byte-level BPE) is the shipped one.
    ///
    /// # Errors
    /// [`Error::TokenizerFiles`] naming the folder or file that is missing or malformed;
    /// [`Error::Tokenizer`] when the `tokenizers` crate refuses the result.
    pub fn from_folder(folder: impl AsRef<Path>, padding: Padding) -> Result<Self> {
        let folder = folder.as_ref();
        let json = folder.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(json, padding);
        }
        let (json, added) = vocab_files::tokenizer_json(folder, CLIP_TOKENIZER_JSON)?;
        let inner = tokenizers::Tokenizer::from_str(&json).map_err(|source| Error::Tokenizer {
            what: format!("building the tokenizer of {}", folder.display()),
            source,
        })?;
        // `tokenizers` numbers added tokens itself, after the vocabulary: a folder whose ids leave
        // gaps would silently encode to other ids than transformers gives.
        for (content, id) in added {
            let got = inner.token_to_id(&content);
            if got.map(u64::from) != Some(id) {
                return Err(Error::TokenizerFiles {
                    path: folder.to_owned(),
                    reason: format!(
                        "added token `{content}` has id {id}, but follows the vocabulary at {got:?}"
                    ),
                });
            }
        }
        Ok(Self { inner, padding })
    }

    /// Every id the tokenizer can produce is below this: its vocabulary with the added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The padding this tokenizer applies.
    pub fn padding(&self) -> Padding {
        self.padding
    }

    /// The ids of one prompt: `<|startoftext|>`, at most 75 BPE ids, `<|endoftext|>`, padding; always
    /// [`MAX_LENGTH`] long.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the tokenizer fails on the text.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(prompt, true)
            .map_err(|source| Error::Tokenizer {
                what: format!("encoding {prompt:?}"),
                source,
            })?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > MAX_LENGTH {
            ids.truncate(MAX_LENGTH - 1);
            ids.push(END_OF_TEXT);
        }
        ids.resize(MAX_LENGTH, self.padding.id());
        Ok(ids)
    }

    /// The ids of a batch of prompts as an int64 tensor.
    ///
    /// # Shapes
    /// `n` prompts → `[n, 77]`.
    ///
    /// # Errors
    /// As [`Self::encode`].
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S], device: Device) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * MAX_LENGTH);
        for prompt in prompts {
            ids.extend(self.encode(prompt.as_ref())?.into_iter().map(i64::from));
        }
        Ok(Tensor::from_slice(&ids)
            .view([prompts.len() as i64, MAX_LENGTH as i64])
            .to_device(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_truncation_and_both_paddings() {
        let first = ClipTokenizer::sdxl_first().unwrap();
        let ids = first.encode("a photo of a cat").unwrap();
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(ids[7..].iter().all(|&id| id == END_OF_TEXT));
        let second = ClipTokenizer::sdxl_second().unwrap();
        let ids = second.encode("a photo of a cat").unwrap();
        assert!(ids[7..].iter().all(|&id| id == 0) && ids[6] == END_OF_TEXT);

        let long = "word ".repeat(200);
        let ids = first.encode(&long).unwrap();
        assert_eq!(ids.len(), MAX_LENGTH);
        assert_eq!(
            (ids[0], ids[75], ids[76]),
            (START_OF_TEXT, first.encode("word").unwrap()[1], END_OF_TEXT)
        );
    }
}
