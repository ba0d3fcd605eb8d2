#!/usr/bin/env python3
"""Writes tests/fixtures/clip_tokenizer_ids.json: CLIP token ids, from transformers, for a list of
sentences, which the Rust ClipTokenizer must reproduce exactly.

    python3 scripts/make_tokenizer_fixture.py [--bpe lib/assets/bpe_simple_vocab_16e6.txt.gz]
                                              [--out tests/fixtures/clip_tokenizer_ids.json]

Needs transformers (any version with CLIPTokenizer / CLIPTokenizerFast) and `regex`. The
vocabulary is OpenAI's bpe_simple_vocab_16e6.txt.gz (committed at lib/assets/; it also ships in
the open_clip_torch and clip wheels). From it the script derives vocab.json + merges.txt exactly
as OpenAI CLIP / open_clip build their encoder (256 byte characters, the same with "</w>", the
first 49152-256-2 merges joined, <|startoftext|>, <|endoftext|>: 49408 tokens), loads them with
transformers' CLIPTokenizer and CLIPTokenizerFast (in transformers >= 5 both are the same
tokenizers-backed class; in 4.x the first is the pure-Python one) and records
`tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids`.

As an independent check it also runs a pure-Python port of OpenAI's simple_tokenizer BPE (with
the text cleaning transformers applies: NFC, whitespace collapse, lower case; OpenAI's own
cleaning adds ftfy.fix_text and html.unescape, which none of these sentences exercise) and stops
if any sentence disagrees.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import unicodedata
from pathlib import Path

import regex
import transformers
from transformers import CLIPTokenizer, CLIPTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
MAX_LEN = 77

LONG = (
    "a photograph of a golden retriever puppy sitting on a wooden porch next to a red bicycle, "
    "with autumn leaves scattered around, soft morning light, shallow depth of field, "
    "highly detailed fur, bokeh background with trees and a white picket fence, "
    "taken with a vintage film camera, warm color grading, award winning composition, "
    "trending on artstation, ultra realistic, eight k resolution"
)

SENTENCES = [
    # DiffExplainer prompt templates, filled with class names.
    "A texture of dog sled",
    "A texture of {}",
    "A photo of a tabby cat",
    "a picture of a goldfish",
    "An image of a Great White Shark",
    "A texture of hen-of-the-woods",
    "A texture of jack-o'-lantern",
    # Plain ASCII and punctuation.
    "",
    " ",
    "hello",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "What?! No... way!!!",
    "(parentheses) [brackets] {braces} <angles>",
    "email@example.com and https://example.com/path?q=1&x=2",
    "snake_case and camelCase and kebab-case",
    "#hashtag @mention $100 50% a+b=c ~tilde `backtick` \\backslash",
    # Numbers: CLIP splits every digit.
    "1234567890",
    "3.14159 and 2,718",
    "in 2024 there were 365 days",
    # Contractions and apostrophes.
    "don't",
    "I'm sure they'll say it's what we've done and he'd agree, won't they?",
    "DON'T SHOUT",
    "rock 'n' roll",
    # Case and whitespace.
    "UPPERCASE WORDS",
    "MiXeD CaSe",
    "multiple    spaces   between",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nhere",
    # Unicode: accents (NFC and decomposed), other scripts, emoji.
    "café crème brûlée",
    "cafe\u0301 (decomposed accent)",
    "naïve résumé Ångström Øresund",
    "Straße über Müller",
    "日本語のテキスト",
    "Привет мир",
    "emoji 🐶🐱 and 👍🏽 thumbs",
    "a cat 😺 on a 🛷",
    # Special tokens written in the text (transformers maps them to their ids).
    "<|startoftext|> and <|endoftext|>",
    # Long text: 76, 77, 78 and 150 tokens; beyond 77 truncated with the end token kept.
    LONG,
    LONG + " ok",  # exactly 77 tokens
    LONG + " ok ok",  # 78 tokens: one too many
    LONG + " " + LONG,
]


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable unicode character table (simple_tokenizer.py)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    lines = lines[1 : 49152 - 256 - 2 + 1]
    return [tuple(line.split()) for line in lines]


def build_vocab(merges: list[tuple[str, str]]) -> list[str]:
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return vocab


class OpenAiBpe:
    """Port of OpenAI CLIP's SimpleTokenizer.encode (no ftfy / html.unescape, see module doc)."""

    def __init__(self, merges, vocab):
        self.byte_encoder = bytes_to_unicode()
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode_padded(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        text = regex.sub(r"\s+", " ", text).lower()
        ids = []
        for tok in regex.findall(self.pat, text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(tok).split(" "))
        sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        ids = [sot] + ids[: MAX_LEN - 2] + [eot]
        return ids + [eot] * (MAX_LEN - len(ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", type=Path, default=ROOT / "lib/assets/bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/clip_tokenizer_ids.json")
    args = ap.parse_args()

    merges = load_merges(args.bpe)
    vocab = build_vocab(merges)
    assert len(vocab) == 49408, len(vocab)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "vocab.json").write_text(
            json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
        )
        (tmp / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
        toks = {
            "CLIPTokenizer": CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt")),
            "CLIPTokenizerFast": CLIPTokenizerFast(
                vocab_file=str(tmp / "vocab.json"), merges_file=str(tmp / "merges.txt")
            )
            if int(transformers.__version__.split(".")[0]) < 5
            else CLIPTokenizerFast(str(tmp / "vocab.json"), str(tmp / "merges.txt")),
        }
    openai = OpenAiBpe(merges, vocab)

    cases = []
    for text in SENTENCES:
        per_impl = {
            name: tok(text, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
            for name, tok in toks.items()
        }
        ref = per_impl["CLIPTokenizerFast"]
        for name, ids in per_impl.items():
            if ids != ref:
                sys.exit(f"{name} disagrees with CLIPTokenizerFast on {text!r}:\n{ids}\n{ref}")
        ours = openai.encode_padded(text)
        if ours != ref:
            sys.exit(f"OpenAI BPE port disagrees on {text!r}:\n{ours}\n{ref}")
        fast = toks["CLIPTokenizerFast"]
        full = fast(text)["input_ids"]
        decoded = fast.decode(full, skip_special_tokens=True)
        cases.append({"text": text, "ids": full, "input_ids": ref, "decoded": decoded})

    out = {
        "source": (
            f"transformers {transformers.__version__} CLIPTokenizer and CLIPTokenizerFast on "
            "vocab.json/merges.txt derived from OpenAI's bpe_simple_vocab_16e6.txt.gz; "
            "ids = tokenizer(text).input_ids (no truncation), input_ids = tokenizer(text, "
            "padding='max_length', max_length=77, truncation=True).input_ids, decoded = "
            "tokenizer.decode(ids, skip_special_tokens=True); generated by "
            "scripts/make_tokenizer_fixture.py"
        ),
        "vocab_size": len(vocab),
        "bos_id": vocab.index("<|startoftext|>"),
        "eos_id": vocab.index("<|endoftext|>"),
        "pad_id": vocab.index("<|endoftext|>"),
        "max_length": MAX_LEN,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One line per case: readable diffs, a small file.
    head = json.dumps({k: v for k, v in out.items() if k != "cases"}, ensure_ascii=False, indent=1)
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    args.out.write_text(head[:-2] + ',\n "cases": [\n' + body + "\n ]\n}\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
