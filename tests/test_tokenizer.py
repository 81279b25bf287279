"""Tokenizer and prompt cleaning against transformers / diffusers (the reference pipeline)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from wanlite.models.tokenizer import SPECIALS, Tokenizer, clean_prompt, write_random_tokenizer

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


def assert_same(ours, ref, texts, max_length=512, unk_fix=False):
    ids, mask = ours(texts, max_length=max_length)
    rids, rmask = reference_call(ref, texts, max_length)
    if unk_fix:  # transformers 5 gives unknown characters id 2 (umT5's <s>); we give <unk> (3)
        rids = torch.where((rids == 2) & (ids == 3), ids, rids)
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
        "import sys; from wanlite.models.tokenizer import write_random_tokenizer as w; "
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


# ---- the real umT5-XXL tokenizer (the Wan Diffusers repositories' files) ----------------------


def _real_tokenizer_dir():
    """/work/shared/reference/umt5-tokenizer, found next to the repository (or at /work)."""
    from pathlib import Path

    here = Path(__file__).resolve().parents[2] / "shared/reference/umt5-tokenizer"
    for path in (here, Path("/work/shared/reference/umt5-tokenizer")):
        if (path / "tokenizer.json").is_file():
            return path
    return None


REAL_DIR = _real_tokenizer_dir()
needs_real = pytest.mark.skipif(
    REAL_DIR is None, reason="the real umT5 tokenizer files (../shared/reference) are absent"
)
SPECIAL_TEXT = "special tokens </s> <pad> <unk> <s> <extra_id_0> in text"

REAL_PROMPTS = TRICKY + [
    SPECIAL_TEXT,
    " <pad>x",
    "a <extra_id_0>  b <extra_id_299> c<extra_id_12>d",
    "<s>start and end</s>",
    "Русский текст: кот идёт по траве",
    "ภาษาไทย แมวเดินบนหญ้า",
    "Ελληνικά γάτα, עברית חתול, Tiếng Việt con mèo đi trên cỏ",
    "A woman in a red dress dances in the rain, 4K, cinematic lighting, slow motion. "
    "Camera pans left. 一个穿红裙子的女人在雨中跳舞。",
    "emoji only 🦊❄️🏃‍♂️🎥",
    "&lt;extra_id_0&gt; &amp;amp; &#8212; &hellip; &eacute;",
    "numbers 3.14159 1,000,000 2026-01-01 12:30 #hashtag @user http://x.y/z?a=1&b=2",
    "多语言 mixed 日本語 and English — « guillemets » ¿qué? ¡sí!",
    "   many     spaces    between   words   ",
    "\n\nnew\n\nlines\n\n",
    "猫" * 600,  # > 512 tokens of CJK
    ("a fox " + "<extra_id_1> ") * 200,  # > 512 tokens with special tokens
]


@pytest.fixture(scope="module")
def real_pair():
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the reference is transformers 5's T5Tokenizer (4's ran the file as is)")
    import time

    t0 = time.perf_counter()
    ours = Tokenizer.from_dir(REAL_DIR)
    seconds = time.perf_counter() - t0
    print(f"\nreal umT5 tokenizer.json (16 MB) loaded in {seconds:.2f} s")
    return ours, transformers.AutoTokenizer.from_pretrained(str(REAL_DIR)), seconds


@needs_real
def test_real_tokenizer_files_are_the_published_ones():
    import hashlib

    digest = hashlib.sha256((REAL_DIR / "tokenizer.json").read_bytes()).hexdigest()
    assert digest == "20a46ac256746594ed7e1e3ef733b83fbc5a6f0922aa7480eda961743de080ef"


@needs_real
@pytest.mark.parametrize("clean", [False, True])
def test_real_tokenizer_matches_transformers(real_pair, clean):
    ours, ref, _ = real_pair
    texts = [clean_prompt(t) for t in REAL_PROMPTS] if clean else REAL_PROMPTS
    ids, mask = assert_same(ours, ref, texts, unk_fix=True)
    assert mask.sum(1).max() == 512  # the long ones were truncated, </s> kept
    assert_same(ours, ref, texts, max_length=24, unk_fix=True)


@needs_real
def test_real_tokenizer_literal_special_tokens(real_pair):
    """No lone '▁' (id 273) before a special token typed in the text (the file's own
    pre-tokenizer would emit one; transformers 5 does not)."""
    ours, _, _ = real_pair
    ids, mask = ours([SPECIAL_TEXT], max_length=16)
    assert ids[0, : int(mask.sum())].tolist() == [
        *(4389, 58393, 281),  # ▁special ▁token s
        *(1, 0, 3, 2, 256299),  # </s> <pad> <unk> <s> <extra_id_0>
        *(301, 5088, 1),  # ▁in ▁text </s>
    ]


@needs_real
def test_real_tokenizer_random_strings(real_pair):
    ours, ref, _ = real_pair
    pool = list("abcxyz ABC019.,!?'\"-()<>/&#;\t\n\u3000\u00a0\u200b日本中한😀🦊\u0301ﬁＡжπ")
    pool += ["</s>", "<pad>", "<unk>", "<s>", "<extra_id_0>", "<extra_id_7>", "&amp;", " the "]
    rng = random.Random(7)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    assert_same(ours, ref, texts, max_length=64, unk_fix=True)
    assert_same(ours, ref, [clean_prompt(t) for t in texts], max_length=64, unk_fix=True)


@needs_real
def test_real_tokenizer_unknown_characters_are_unk(real_pair):
    """A character missing from the vocabulary is <unk> (3), as in the file; transformers 5
    says 2 (<s>), the only difference ``unk_fix`` allows."""
    ours, ref, _ = real_pair
    ids, mask = ours(["a \x00 troll \U0001f9cc"], max_length=12)
    assert ref.unk_token_id == 3
    assert 3 in ids[0].tolist() and 2 not in ids[0].tolist()
    ids, _ = ours(["<s> x"], max_length=4)  # a literal <s> is still <s>
    assert ids[0, 0] == 2


@needs_real
def test_real_tokenizer_load_time(real_pair):
    *_, seconds = real_pair
    assert seconds < 20, f"loading tokenizer.json took {seconds:.1f} s"
