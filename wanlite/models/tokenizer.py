"""Prompt cleaning and the umT5 tokenizer, on the ``tokenizers`` library alone.

- ``clean_prompt`` is diffusers' ``WanPipeline`` ``prompt_clean``: ``ftfy.fix_text``, HTML
  unescaped twice, strip, whitespace runs -> one space, strip.  diffusers matches ``\\s`` with
  the third-party ``regex`` module (Unicode White_Space); the character class below is exactly
  that set, so we need neither ``regex`` nor a guess about how ``re`` differs (it also matches
  U+001C..U+001F).
- ``Tokenizer`` loads the checkpoint's own ``tokenizer.json`` (vocabulary, scores, added
  tokens) and reproduces ``AutoTokenizer(...)(texts, padding="max_length", max_length=L,
  truncation=True, add_special_tokens=True)``: the post-processor appends ``</s>``, truncation
  keeps room for it, right padding with the pad id, mask 1 on real tokens (including ``</s>``).
  For a ``T5Tokenizer`` checkpoint, transformers 5 does *not* run the file's normalizer and
  pre-tokenizer: it keeps only a ``Precompiled`` normalizer and installs WhitespaceSplit +
  Metaspace.  We do the same (``_as_transformers_t5``).  It matters for the real umT5 file,
  whose Metaspace alone turns the space before a literal special token ("a </s>") into a lone
  ``▁`` (id 273) that transformers 5 never emits.  (transformers 4's ``T5TokenizerFast`` and the
  original Wan code ran the file as is, so they did emit it: a version difference of the
  reference, on prompts that contain special-token text only.)  One thing we keep from the
  file on purpose: its ``unk_id``.  transformers 5 rebuilds the model with ``unk_id=2``, right
  for T5 but ``<s>`` in umT5 (whose ``<unk>`` is 3), so it turns a character the vocabulary
  lacks (a control character, a new emoji) into ``<s>``; we give ``<unk>``, as the file does.
- ``write_random_tokenizer`` writes a small, deterministic T5-style Unigram tokenizer for random
  checkpoints.  Its pipeline is chosen to be *exactly* what transformers 5's ``T5Tokenizer``
  rebuilds from a tokenizer.json (it keeps only the vocab, ``unk_id=2`` without byte fallback, a
  ``Precompiled`` normalizer if any -- we have none -- and installs WhitespaceSplit + Metaspace
  ("always" prepend, split) and a ``$A </s>`` template), so ``tokenizers`` on our file and
  transformers give identical ids on any unicode input (unknown characters -> ``<unk>``).
"""

from __future__ import annotations

import base64
import html
import json
import re
import threading
from pathlib import Path

import torch

# Unicode White_Space (what ``regex``'s \s matches); Python's ``re`` would add U+001C..U+001F.
_WHITESPACE = re.compile(
    "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)
_SP = "\u2581"  # "▁", SentencePiece's word-boundary mark


def clean_prompt(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy fix, double HTML unescape, collapse whitespace."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


def _token_name(value, default: str) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def _as_transformers_t5(backend) -> None:
    """Give a Unigram backend the text pipeline transformers 5's ``T5Tokenizer`` builds around
    the file's vocabulary: the file's ``Precompiled`` normalizer if it has one (else none), and
    WhitespaceSplit + Metaspace("always", split).  Other model types are left as they are."""
    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    if not isinstance(backend.model, Unigram):
        return
    state = json.loads(backend.normalizer.__getstate__()) if backend.normalizer else {}
    found = state.get("normalizers", [state]) if state.get("type") == "Sequence" else [state]
    charsmap = next((n for n in found if n.get("type") == "Precompiled"), None)
    if charsmap is not None and "precompiled_charsmap" in charsmap:
        raw = base64.b64decode(charsmap["precompiled_charsmap"])
        backend.normalizer = normalizers.Precompiled(raw)
    else:
        backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_SP, prepend_scheme="always", split=True),
        ]
    )


class Tokenizer:
    """``Tokenizer.from_dir(path)(texts, max_length) -> (ids, mask)``, both LongTensor [B, L]."""

    def __init__(self, backend, pad_token: str = "<pad>"):
        self.backend = backend
        self.pad_token = pad_token
        self._lock = threading.Lock()  # padding/truncation are settings of the shared backend
        self.pad_id = backend.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (a tokenizer.json is required)")
        config = path / "tokenizer_config.json"
        config_data = json.loads(config.read_text()) if config.is_file() else {}
        pad = _token_name(config_data.get("pad_token"), "<pad>")
        backend = Backend.from_file(str(file))
        if config_data.get("tokenizer_class", "T5Tokenizer").startswith("T5Tokenizer"):
            _as_transformers_t5(backend)
        return cls(backend, pad_token=pad)

    def __call__(
        self, texts: list[str] | str, max_length: int = 512
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        tok = self.backend
        with self._lock:
            # Truncation leaves room for what the post-processor adds (</s>), as transformers.
            tok.enable_truncation(max_length=max_length)
            tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad_token)
            encodings = tok.encode_batch(list(texts), add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids.reshape(len(encodings), max_length), mask.reshape(len(encodings), max_length)


# ---- a deterministic random-checkpoint tokenizer ----------------------------------------------

SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5

# Common English words and subwords (prompt-flavoured); the vocabulary takes a prefix of them.
_WORD_TEXT = """
the a an and of in on to with at by for from is are was be as it its this that his her their
man woman person people child dog cat bird horse fish car city street road house room water
sky sun moon light night day tree trees forest flower grass mountain river sea ocean beach
snow rain cloud clouds fire smoke wind walking running flying standing sitting looking
holding wearing playing dancing camera shot close view slow motion scene background style
red blue green yellow white black golden bright dark soft warm cold small large big old young
beautiful cinematic realistic detailed quality high low fast slowly gently under over into
through behind front side left right up down top bottom one two three video film photo
"""
_SUBWORD_TEXT = "ing ed er ly es s tion ness ment est al ful less ous ive able en"
_WORDS, _SUBWORDS = _WORD_TEXT.split(), _SUBWORD_TEXT.split()
_LATIN1 = [chr(c) for c in range(0xA1, 0x100)]
_ASCII = [chr(c) for c in range(0x21, 0x7F)]


def _pieces(vocab_size: int) -> list[tuple[str, float]]:
    """(piece, log-prob score) list: specials, ▁, ASCII chars (with and without ▁), words,
    subwords, Latin-1 chars; cut at ``vocab_size``.  Scores make whole words beat spelling."""
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in SPECIALS] + [(_SP, -3.0)]
    for c in _ASCII:
        pieces += [(_SP + c, -9.0), (c, -10.0)]
    pieces += [(_SP + w, -6.0 - 0.001 * i) for i, w in enumerate(_WORDS)]
    pieces += [(w, -7.0 - 0.001 * i) for i, w in enumerate(_SUBWORDS)]
    for c in _LATIN1:
        pieces += [(_SP + c, -11.0), (c, -12.0)]
    seen: set[str] = set()
    unique = [(p, s) for p, s in pieces if not (p in seen or seen.add(p))]
    return unique[:vocab_size]


def build_random_tokenizer(vocab_size: int):
    """The ``tokenizers.Tokenizer`` that ``write_random_tokenizer`` saves."""
    from tokenizers import AddedToken, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import Unigram

    if vocab_size < len(SPECIALS) + 1:
        raise ValueError(f"vocab_size must be >= {len(SPECIALS) + 1}, got {vocab_size}")
    # No normalizer: transformers' T5Tokenizer would drop any but a Precompiled one.
    tok = Backend(Unigram(_pieces(vocab_size), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_SP, prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=_SP, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def write_random_tokenizer(out_dir: str | Path, vocab_size: int) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (same bytes on
    every call) that both ``Tokenizer.from_dir`` and ``transformers.AutoTokenizer`` load."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_random_tokenizer(vocab_size)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIALS)
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": 0,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    special_map = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
