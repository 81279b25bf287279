"""Link into SITE the installed distributions that ROOTS need (their requirement closure,
extras left out), taken from this interpreter's environment:

    python .ci/bare_site.py SITE torch wanlite

A venv whose site-packages holds only these links has what ``pip install torch==X`` and
``pip install -e .`` (no extras) would put there, in the same versions, without reinstalling
torch (minutes on a busy CI machine).  Used by ``.ci/gpu_check_bare``.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement


def closure(roots: list[str]) -> list[md.Distribution]:
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a platform-only requirement that is not installed here
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def link(dists: list[md.Distribution], site: Path) -> list[str]:
    """Symlink each distribution's top-level entries (packages, modules, .dist-info) into
    ``site``; an editable install (a .pth or finder) is left out: its source is on PYTHONPATH."""
    site.mkdir(parents=True, exist_ok=True)
    linked = []
    for dist in dists:
        for f in dist.files or []:
            top = f.parts[0]
            if top == ".." or top == "__pycache__" or top.endswith(".pth"):
                continue
            if top.startswith("__editable__"):
                continue
            src, dst = Path(dist.locate_file(top)), site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
                linked.append(top)
    return linked


def main(argv: list[str]) -> int:
    site, roots = Path(argv[0]), argv[1:]
    linked = link(closure(roots), site)
    print(f"bare_site: {len(linked)} entries of {', '.join(roots)} and their requirements")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
