"""`wanlite bench`: mode parsing, and one real run on the tiny checkpoint."""

import json

import pytest
import torch

from wanlite import bench
from wanlite.bench import parse_modes, within_noise
from wanlite.cli import main


def test_parse_modes():
    modes = parse_modes(
        "exact, exact:aten,compile,teacache:0.08,firstblock:0.1,cfg-skip:0.25,vae:float32"
    )
    assert modes == {
        "exact": {},
        "exact:aten": {"linear": "aten"},
        "compile": {"compile": True},
        "teacache:0.08": {"cache": "teacache", "cache_threshold": 0.08},
        "firstblock:0.1": {"cache": "firstblock", "cache_threshold": 0.1},
        "cfg-skip:0.25": {"cfg_skip_last": 0.25},
        "vae:float32": {"vae_dtype": "float32"},
    }
    for bad in ("", "fast", "teacache", "teacache:x", "exact:1", "vae:float16"):
        with pytest.raises(ValueError, match="mode"):
            parse_modes(bad)


def test_bench_command_writes_table_json_and_chart(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["bench", "--model", str(tiny_checkpoint), "--modes", "exact,firstblock:1e6"]
    argv += ["--height", "32", "--width", "32", "--num-frames", "5", "--num-inference-steps", "4"]
    assert main([*argv, "--device", "cpu", "--out-dir", str(out), "--repeat", "2"]) == 0
    printed = capsys.readouterr().out
    assert "firstblock:1e6" in printed and "s/step" in printed
    result = json.loads(printed.strip().splitlines()[-1])
    exact, cached = result["results"]["exact"], result["results"]["firstblock:1e6"]
    assert exact["fidelity_vs_exact"]["psnr_db"] == float("inf")
    assert cached["stats"]["dit_forwards_skipped"] == 4  # steps 2 and 3 of 4, both branches
    assert cached["fidelity_vs_exact"]["latents_max_abs_diff"] > 0
    assert json.loads((out / "bench.json").read_text())["params"]["num_frames"] == 5
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(exact["denoise_s_each"]) == 2 and exact["speedup_within_noise"]  # itself
    assert isinstance(cached["speedup_within_noise"], bool)


def test_within_noise():
    assert within_noise([1.0], [2.0])  # one run each: no spread measured, nothing to claim
    assert within_noise([1.0, 1.2], [1.1, 1.5])  # overlapping ranges
    assert not within_noise([1.0, 1.1], [1.5, 1.6])


def test_bench_without_matplotlib_prints_and_writes_json(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(bench, "_pyplot", lambda: None)
    out = tmp_path / "b"
    argv = ["bench", "--model", str(tiny_checkpoint), "--modes", "exact", "--repeat", "1"]
    argv += ["--height", "16", "--width", "16", "--num-frames", "1", "--num-inference-steps", "1"]
    assert main([*argv, "--device", "cpu", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no chart: pip install 'wanlite[bench]'" in printed and "s/step" in printed
    assert (out / "bench.json").is_file() and not (out / "bench.png").exists()


def test_bench_bad_mode_is_a_clear_error(capsys):
    assert main(["bench", "--model", "random:tiny", "--modes", "warp"]) == 2
    assert "unknown bench mode 'warp'" in capsys.readouterr().err


def test_read_set_is_what_a_call_reads(tiny_checkpoint, tmp_path, monkeypatch):
    """The page-cache warm-up of a wanlite row: its tensors' byte ranges, the narrowed DiT
    weights from the cast cache, the rest from the checkpoint, no umT5 token embedding."""
    from wanlite.pipeline import load
    from wanlite.weights import castcache

    monkeypatch.setattr(castcache, "MIN_BYTES", 0)  # the tiny DiT is far below the real bar
    opts = dict(device="cpu", dtype="bfloat16", embed_cache=False, cast_cache=str(tmp_path))
    places = bench.read_set(str(tiny_checkpoint), opts | {"lora": [("x.safetensors", 1.0)]})
    ranges = [p for p in places if isinstance(p, tuple)]
    cast = next(tmp_path.glob("transformer-*.safetensors"))
    comps = load(str(tiny_checkpoint), **opts).components

    def covered(e):
        return any(
            p == e.path and o <= e.offset and e.offset + e.nbytes <= o + n for p, o, n in ranges
        )

    dit = comps["transformer"]
    for name, key in dit.names.items():
        cast_copy = dit.store.entries[key].dtype == torch.float32 and not dit.fp32(name)
        assert covered(dit.store.entries[key]) != cast_copy, name
    assert any(p == cast for p, _, _ in ranges)
    t5 = comps["text_encoder"]
    assert not covered(t5.store.entries[t5.names["token_embedding.weight"]])
    assert covered(t5.store.entries[t5.names["blocks.0.attn.q.weight"]])
    assert len(ranges) < len(dit.names) // 4  # adjacent tensors read as one range
    assert bench.warm_page_cache(*places) >= 0
