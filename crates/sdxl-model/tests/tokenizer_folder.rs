//! A model folder's own tokenizers with added tokens (textual inversion, pivotal tuning) against the
//! ids transformers' `CLIPTokenizer` gives after loading the same folders (fixture
//! `tokenizer_added_tokens`): the transformers-4 layout (`vocab.json`, `merges.txt`, added tokens in
//! `tokenizer_config.json`) and the transformers-5 one (`tokenizer.json`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use common::fixture;

use sdxl_model::Error;
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::prompt::PromptEncoder;
use sdxl_model::tokenizer::{ClipTokenizer, Padding};
use sdxl_model::weights::TensorFile;
use tch::{Device, Kind, Tensor};

fn prompts() -> Vec<String> {
    let path = fixture("tokenizer-added-tokens/ids.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&meta.metadata().as_ref().unwrap()["prompts"]).unwrap()
}

fn golden(name: &str) -> Tensor {
    TensorFile::open(fixture("tokenizer-added-tokens/ids.safetensors"))
        .unwrap()
        .tensor(name, Device::Cpu, Some(Kind::Int64))
        .unwrap()
}

#[test]
fn added_tokens_encode_as_transformers_in_both_layouts() {
    let prompts = prompts();
    for (name, padding) in [
        ("tokenizer", Padding::EndOfText),
        ("tokenizer_2", Padding::Zero),
    ] {
        let tokenizer =
            ClipTokenizer::from_folder(fixture("tokenizer-added-tokens").join(name), padding)
                .unwrap();
        assert_eq!(tokenizer.vocab_size(), 49408 + 4, "{name}");
        let ids = tokenizer.encode_batch(&prompts, Device::Cpu).unwrap();
        let expected = golden(name);
        assert!(ids.equal(&expected), "{name}: {ids} vs {expected}");
    }
    // The shipped tokenizer splits the added tokens into BPE pieces: the folder's matter.
    let shipped = ClipTokenizer::sdxl_first()
        .unwrap()
        .encode_batch(&prompts, Device::Cpu)
        .unwrap();
    assert!(!shipped.equal(&golden("tokenizer")));
}

fn temp_folder(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tokenizer-folder-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn broken_tokenizer_folders_are_named() {
    let source = fixture("tokenizer-added-tokens/tokenizer");
    let dir = temp_folder("broken");
    std::fs::copy(source.join("vocab.json"), dir.join("vocab.json")).unwrap();
    let msg = ClipTokenizer::from_folder(&dir, Padding::EndOfText)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("tokenizer-folder-broken") && msg.contains("merges.txt"),
        "{msg}"
    );

    std::fs::copy(source.join("merges.txt"), dir.join("merges.txt")).unwrap();
    // An added token whose id leaves a gap after the vocabulary.
    std::fs::write(dir.join("added_tokens.json"), r#"{"<cat-toy>": 49410}"#).unwrap();
    let msg = ClipTokenizer::from_folder(&dir, Padding::EndOfText)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`<cat-toy>` has id 49410"), "{msg}");
    // Without added tokens the folder's vocabulary is the shipped one.
    std::fs::remove_file(dir.join("added_tokens.json")).unwrap();
    let plain = ClipTokenizer::from_folder(&dir, Padding::EndOfText).unwrap();
    let prompt = "a photo of a cat, wow!! ﬁne";
    assert_eq!(
        plain.encode(prompt).unwrap(),
        ClipTokenizer::sdxl_first().unwrap().encode(prompt).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_model_folder_with_added_tokens_needs_their_embedding_rows() {
    // The tiny text encoders have CLIP's 49408 rows; the folder's tokenizers four more tokens.
    let root = temp_folder("model");
    for (name, from) in [
        ("text_encoder", "tiny-sdxl/text_encoder"),
        ("text_encoder_2", "tiny-sdxl/text_encoder_2"),
        ("tokenizer", "tokenizer-added-tokens/tokenizer"),
        ("tokenizer_2", "tokenizer-added-tokens/tokenizer_2"),
    ] {
        std::os::unix::fs::symlink(fixture(from), root.join(name)).unwrap();
    }
    let err = PromptEncoder::from_pretrained(&root, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Incompatible { .. })
            && msg.contains("tokenizer vocabulary")
            && msg.contains("expected at most 49408 tokens, got 49412"),
        "{msg}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
