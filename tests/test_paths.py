"""``wanlite.paths.cache_dir``: WANLITE_CACHE, else $XDG_CACHE_HOME/wanlite, else ~/.cache."""

from pathlib import Path

from wanlite.paths import cache_dir


def test_cache_dir_follows_wanlite_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANLITE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "wanlite"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "wanlite"
    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"  # WANLITE_CACHE wins over XDG


def test_empty_or_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    # The XDG base directory spec: a relative path in $XDG_CACHE_HOME is invalid, ignore it.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANLITE_CACHE", raising=False)
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert cache_dir() == tmp_path / ".cache" / "wanlite"
    monkeypatch.setenv("WANLITE_CACHE", "")  # empty: unset
    assert cache_dir() == tmp_path / ".cache" / "wanlite"
    monkeypatch.setenv("WANLITE_CACHE", "~/c")
    assert cache_dir() == Path(tmp_path) / "c"
