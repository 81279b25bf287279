"""Tokenizer and prompt cleaning against transformers / diffusers (the reference pipeline)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from wanlite.tokenizer import SPECIALS, Tokenizer, clean_prompt, write_random_tokenizer

transformers = pytest.importorskip("transformers")

TRICKY = [
    "",
    " ",
    "   ",
    "A cat walking on the grass, realistic",
    "  leading and trailing spaces  ",
    "\tTabs\tand\nnew\r\nlines\x0bvt\x0cff ",
    "日本語のテキスト 中文提示词：一只猫在草地上行走",
    "emoji 😀🎬🐈‍⬛ flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "Ünïcödé façade naïve résumé — “quotes” ‘single’ …",
    "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;x&quot; &#39;y&#39; &#x1F600; &nbsp;nbsp",
    "mojibake: cafÃ© crÃ¨me â€œhiâ€\x9d",
    "\u3000ideographic\u3000space\u2003em\u00a0nbsp\u200bzwsp\u2028ls\u2029ps\x85nel",
    "separators\x1c\x1d\x1e\x1fhere &#28;&#x1d; end",
    "</s> <pad> <unk> special tokens typed by a user</s>",
    "control \x00\x01\x07\x7f\x9f chars",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and ligature ﬁ",
    "combining e\u0301 vs \u00e9, Hangul 한국어, Arabic العربية, Hindi हिन्दी",
    "lone surrogate-free astral 𝕬𝖇𝖈 𓀀",
    "word " * 700,  # > 512 tokens: truncation
    "x" * 3000,  # one huge unknown-heavy word
    "The quick brown fox jumps over the lazy dog. " * 40,
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_random_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=512)


def reference_call(ref, texts, max_length=512):
    out = ref(
        texts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out.input_ids, out.attention_mask


def assert_same(ours, ref, texts, max_length=512):
    ids, mask = ours(texts, max_length=max_length)
    rids, rmask = reference_call(ref, texts, max_length)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (len(texts), max_length)
    for i, text in enumerate(texts):
        assert ids[i].tolist() == rids[i].tolist(), repr(text[:60])
        assert mask[i].tolist() == rmask[i].tolist(), repr(text[:60])
    return ids, mask


@pytest.mark.parametrize("clean", [False, True])
def test_ids_and_masks_match_transformers(tok_dir, clean):
    texts = [clean_prompt(t) for t in TRICKY] if clean else TRICKY
    ours = Tokenizer.from_dir(tok_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ids, mask = assert_same(ours, ref, texts)
    lengths = mask.sum(1)
    assert lengths.min() >= 1 and lengths.max() == 512  # "" -> just </s>; long ones truncated
    for i in range(len(texts)):  # </s> closes every row, pads follow
        n = int(lengths[i])
        assert ids[i, n - 1] == 1 and (ids[i, n:] == 0).all() and (mask[i, :n] == 1).all()
    assert ids[0, 0] == 1 and lengths[0] == 1


def test_diffusers_loading_class_and_short_max_length(tok_dir):
    """diffusers loads the tokenizer as ``T5TokenizerFast``; also a short max_length."""
    ref = transformers.T5TokenizerFast.from_pretrained(str(tok_dir))
    assert_same(Tokenizer.from_dir(tok_dir), ref, TRICKY, max_length=16)
    assert_same(Tokenizer.from_dir(tok_dir), ref, ["a b c d e f g h"], max_length=5)


def test_random_strings_match_transformers(tok_dir):
    pool = (
        list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"-()[]<>/&#")
        + list(" \t\n\u3000\u00a0\u2003\u200b")
        + list("éèüßñøåç日本中文한😀🎬\u0301ﬁＡ")
        + ["</s>", "<pad>", "<unk>", "&amp;", "the ", "cat "]
    )
    rng = random.Random(1234)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    ours = Tokenizer.from_dir(tok_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert_same(ours, ref, texts, max_length=64)
    assert_same(ours, ref, [clean_prompt(t) for t in texts], max_length=64)


def test_clean_prompt_matches_diffusers():
    wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
    rng = random.Random(99)
    pool = list("ab &;#x1c \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200a\u200b")
    pool += list("\u2028\u2029\u202f\u205f\u3000\u180e\ufeffé😀") + ["&amp;", "&#28;", "&lt;"]
    fuzz = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(500)]
    for text in TRICKY + fuzz:
        assert clean_prompt(text) == wan.prompt_clean(text), repr(text)


def test_random_tokenizer_is_deterministic(tmp_path):
    a = write_random_tokenizer(tmp_path / "a", vocab_size=512)
    b = write_random_tokenizer(tmp_path / "b", vocab_size=512)
    code = (
        "import sys; from wanlite.tokenizer import write_random_tokenizer as w; "
        "w(sys.argv[1], vocab_size=512)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True)
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    for name in names:
        data = (a / name).read_bytes()
        assert data == (b / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    assert sorted(p.name for p in a.iterdir()) == sorted(names)


@pytest.mark.parametrize("vocab_size", [64, 512, 32000])
def test_random_tokenizer_vocab(tmp_path, vocab_size):
    from tokenizers import Tokenizer as Backend

    tok = Backend.from_file(str(write_random_tokenizer(tmp_path, vocab_size) / "tokenizer.json"))
    assert tok.get_vocab_size() <= vocab_size
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    ids, mask = Tokenizer.from_dir(tmp_path)(["the cat 😀"], max_length=8)
    assert ids.max() < vocab_size
    if vocab_size >= 512:  # whole words win over spelling; unknown characters -> <unk>
        pieces = [tok.id_to_token(i) for i in ids[0, : int(mask.sum())].tolist()]
        assert pieces == ["\u2581the", "\u2581cat", "\u2581", "<unk>", "</s>"]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError):
        write_random_tokenizer(tmp_path, vocab_size=2)
