//! A `tokenizer.json` from the files of a transformers-4 CLIP tokenizer folder: `vocab.json` (token →
//! id), `merges.txt` (`#version` header, then one merge `a b` per line), and the added tokens of
//! `tokenizer_config.json` (`added_tokens_decoder`: id → content and matching flags) or, in older
//! folders, `added_tokens.json` (content → id).
//!
//! Follows transformers `tokenization_utils_base.py` (`_from_pretrained`: `added_tokens_decoder` wins
//! over `added_tokens.json`; tokens from the latter are `normalized` unless special). The pipeline
//! around the model (normaliser, pre-tokeniser, decoder) is the shipped CLIP one; the post-processor
//! takes the ids `<|startoftext|>` and `<|endoftext|>` have in this vocabulary.

use std::path::Path;

use serde_json::{Value, json};

use crate::{Error, Result};

const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::TokenizerFiles {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read(path)?).map_err(|e| bad(path, format!("not JSON: {e}")))
}

/// `merges.txt` as the `[a, b]` pairs of a `tokenizer.json` BPE model.
fn merges(path: &Path) -> Result<Vec<Value>> {
    let text = read(path)?;
    let mut pairs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let Some((a, b)) = line.split_once(' ') else {
            return Err(bad(path, format!("line {}: not a merge `a b`", number + 1)));
        };
        pairs.push(json!([a, b]));
    }
    Ok(pairs)
}

/// The added tokens of the folder as `tokenizer.json` `added_tokens` entries, ids ascending.
fn added_tokens(folder: &Path) -> Result<Vec<Value>> {
    let config = folder.join("tokenizer_config.json");
    let mut tokens = Vec::new();
    let decoder = if config.is_file() {
        read_json(&config)?.get("added_tokens_decoder").cloned()
    } else {
        None
    };
    if let Some(decoder) = decoder {
        let map = decoder
            .as_object()
            .ok_or_else(|| bad(&config, "`added_tokens_decoder` is not an object"))?;
        for (id, token) in map {
            let id: u64 = id.parse().map_err(|_| {
                bad(
                    &config,
                    format!("`added_tokens_decoder` key `{id}` is no id"),
                )
            })?;
            let flag = |name: &str, default: bool| {
                token.get(name).and_then(Value::as_bool).unwrap_or(default)
            };
            let content = token
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&config, format!("added token {id} has no `content`")))?;
            let special = flag("special", false);
            tokens.push(json!({
                "id": id, "content": content, "single_word": flag("single_word", false),
                "lstrip": flag("lstrip", false), "rstrip": flag("rstrip", false),
                "normalized": flag("normalized", !special), "special": special,
            }));
        }
    } else {
        let file = folder.join("added_tokens.json");
        if file.is_file() {
            let map = read_json(&file)?;
            let map = map
                .as_object()
                .ok_or_else(|| bad(&file, "not an object of token → id"))?;
            for (content, id) in map {
                let id = id
                    .as_u64()
                    .ok_or_else(|| bad(&file, format!("`{content}` maps to no id")))?;
                tokens.push(json!({
                    "id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": true, "special": false,
                }));
            }
        }
    }
    tokens.sort_by_key(|t| t["id"].as_u64());
    Ok(tokens)
}

/// The `tokenizer.json` text for the CLIP vocabulary files in `folder`, built on `shipped` (the
/// crate's own CLIP `tokenizer.json`) for everything but the vocabulary, merges and added tokens;
/// and the added tokens with the ids the folder gives them.
pub(super) fn tokenizer_json(
    folder: &Path,
    shipped: &[u8],
) -> Result<(String, Vec<(String, u64)>)> {
    let (vocab_path, merges_path) = (folder.join("vocab.json"), folder.join("merges.txt"));
    if !vocab_path.is_file() || !merges_path.is_file() {
        return Err(bad(
            folder,
            "no tokenizer: neither `tokenizer.json` nor `vocab.json` with `merges.txt`",
        ));
    }
    let vocab = read_json(&vocab_path)?;
    let vocab_map = vocab
        .as_object()
        .ok_or_else(|| bad(&vocab_path, "not an object of token → id"))?;
    let id_of = |token: &str| {
        vocab_map
            .get(token)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(&vocab_path, format!("no `{token}`")))
    };
    let (start, end) = (id_of(START)?, id_of(END)?);
    let mut added = vec![
        json!({"id": start, "content": START, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true}),
        json!({"id": end, "content": END, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true}),
    ];
    for token in added_tokens(folder)? {
        // The special tokens are in the vocabulary already; the folder may list them again.
        if token["content"] != START && token["content"] != END {
            added.push(token);
        }
    }
    let mut json: Value = serde_json::from_slice(shipped)
        .map_err(|e| bad(Path::new("the shipped clip-tokenizer.json"), e.to_string()))?;
    json["model"]["vocab"] = vocab;
    json["model"]["merges"] = Value::Array(merges(&merges_path)?);
    json["post_processor"]["cls"] = json!([START, start]);
    json["post_processor"]["sep"] = json!([END, end]);
    let ids = added
        .iter()
        .filter_map(|t| Some((t["content"].as_str()?.to_owned(), t["id"].as_u64()?)))
        .collect();
    json["added_tokens"] = Value::Array(added);
    Ok((json.to_string(), ids))
}
