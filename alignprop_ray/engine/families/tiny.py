"""Building blocks of the offline tiny presets: seeded init, and real tokenizers built without a download.

Every tiny pipeline uses the genuine CLIP BPE tokenizer (from the vocabulary file open_clip ships) and,
for SD3's T5, a genuine Unigram tokenizer (T5's model type) over words of that same vocabulary; the
networks are random-init from diffusers/transformers configs at toy width.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import math
import tempfile
from pathlib import Path

import torch

CLIP_VOCAB = 49408  # openai/clip-vit-large-patch14: 256 bytes x 2 + 48894 merges + 2 specials


class seeded:
    """Fork the global torch RNG, seed it, and restore it afterwards (model init uses the global RNG)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def clip_text_config(
    width: int,
    *,
    projection: int | None = None,
    act: str = "quick_gelu",
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
):
    """A CLIP text tower's config: 2 layers at toy width by default (2: SDXL and SD3 read the penultimate
    hidden state), or any size (CLIP ViT-L/14's: width 768, 12 layers, 12 heads, intermediate 3072)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=intermediate or 2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        vocab_size=CLIP_VOCAB,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection or width,
        hidden_act=act,
    )


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The genuine CLIP BPE tokenizer, built offline from the vocabulary file open_clip ships.

    Reproduces the vocabulary layout of `openai/clip-vit-large-patch14`: byte symbols, their `</w>`
    forms, one entry per merge, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407). SDXL's and
    SD3's second tokenizer (OpenCLIP bigG) is the same with `pad_token="!"`.
    """
    from transformers import CLIPTokenizer

    vocab_json, merges_txt = _clip_texts()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(vocab_json, encoding="utf-8")
        merges_file.write_text(merges_txt, encoding="utf-8")
        return CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            model_max_length=model_max_length,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token=pad_token,
            unk_token="<|endoftext|>",
        )


@functools.cache
def _clip_texts() -> tuple[str, str]:
    """The texts of CLIP's vocab.json and merges.txt, made once a process: a tiny pipeline builds two or
    three tokenizers, and a test session hundreds."""
    merges = _clip_merges()
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_json = json.dumps({token: i for i, token in enumerate(vocab)})
    return vocab_json, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"


def t5_tokenizer(words: int = 2000):
    """A T5 (SentencePiece Unigram) tokenizer: T5's special tokens, single characters, and the `words`
    most frequent whole words of CLIP's BPE vocabulary as `▁word` pieces, scored by frequency rank."""
    from transformers import T5Tokenizer

    whole = [("".join(m))[: -len("</w>")] for m in _clip_merges() if "".join(m).endswith("</w>")]
    chars = [chr(c) for c in range(33, 127)]
    pieces = list(dict.fromkeys(["▁" + w for w in whole[:words]] + chars + ["▁" + c for c in chars]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(piece, -3.0 - math.log1p(rank)) for rank, piece in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


@functools.cache
def _clip_merges() -> tuple[tuple[str, ...], ...]:
    # The file, not the package: importing open_clip (and timm with it) takes a second a process.
    (package,) = importlib.util.find_spec("open_clip").submodule_search_locations
    path = Path(package) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # Same slice as CLIP's SimpleTokenizer: skip the header, keep 49152 - 256 - 2 merges.
    return tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))
