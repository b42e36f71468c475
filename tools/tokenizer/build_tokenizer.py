#!/usr/bin/env python3
"""Builds the CLIP BPE `tokenizer.json` shipped in crates/sdxl-model/assets/tokenizer/.

The vocabulary and merges come from `bpe_simple_vocab_16e6.txt.gz`, the MIT-licensed CLIP BPE file
that `open_clip_torch` ships (originally openai/CLIP). The result is a Hugging Face `tokenizers`
pipeline equivalent to transformers' `CLIPTokenizer`:

- vocabulary (49,408): the 256 byte characters of GPT-2's byte-to-unicode table, the same with `</w>`,
  the 48,894 merges joined, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407);
- normaliser: NFC, runs of whitespace to one space, lower-case;
- pre-tokeniser: CLIP's word regex (contractions, letter runs, single digits, punctuation runs;
  whitespace dropped), then the byte-level mapping;
- BPE with `</w>` marking the end of a word; `<|startoftext|>` ... `<|endoftext|>` added around.

Padding and truncation are not stored: the two SDXL tokenizers differ only there, and the Rust side
(`sdxl_model::tokenizer`) applies them.

Usage (from the repository root, with any Python that has `tokenizers`; the fixtures venv has it):
    python tools/tokenizer/build_tokenizer.py [--bpe PATH] [--out PATH]
Without `--bpe` the file is taken from the installed `open_clip` package.
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

START, END = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-token pattern (open_clip `SimpleTokenizer.pat`, with the special tokens as alternatives).
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
DEFAULT_OUT = Path("crates/sdxl-model/assets/tokenizer/clip-tokenizer.json")


def byte_characters() -> list[str]:
    """GPT-2's reversible byte→character table, in CLIP's vocabulary order.

    The 188 printable bytes stand for themselves; the other 68 bytes take U+0100 onwards in ascending
    byte order. The list is ordered printables first, then the remapped bytes.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    # Line 0 is a version header; CLIP uses the next 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    tokens = byte_characters()
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += [START, END]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise SystemExit(f"{bpe_path}: expected 49408 distinct tokens, got {len(vocab)}")
    return vocab, merges


def build(bpe_path: Path) -> Tokenizer:
    vocab, merges = vocab_and_merges(bpe_path)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=END))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((END, vocab[END]), (START, vocab[START]),
                                                      trim_offsets=False, add_prefix_space=False)
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(START, special=True, normalized=False),
                            AddedToken(END, special=True, normalized=False)])
    return tok


def default_bpe() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise SystemExit("open_clip is not installed: pass --bpe PATH to bpe_simple_vocab_16e6.txt.gz")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bpe", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    tok = build(args.bpe or default_bpe())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tok.save(str(tmp), pretty=False)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
