"""Retention: finished generations older than ``--retention`` seconds go, with their files.

Design
------
* A row is old when its ``completed_at`` is more than ``retention`` seconds ago; active rows
  (queued, processing) are never touched.  ``retention == 0`` keeps everything forever.
* The purge runs once at start (a server that was down for a week frees its disk at once),
  then every :func:`interval` seconds, in a thread (the store's calls block).
* Rows go first, then files: a row never points at a deleted file, and a crash between the two
  leaves at worst an orphan file, which the next start's sweep of ``results/`` removes (a file
  whose id has no row).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from .store import Store

log = logging.getLogger("wanlite.server")
UUID_MP4 = 36 + len(".mp4")  # result files are "<uuid4>.mp4"


def interval(retention: float) -> float:
    """Seconds between purges: often enough that a row outlives its period by at most half of
    it, never more than an hour apart nor more than once a second."""
    return min(max(retention / 2, 1.0), 3600.0)


def purge_expired(store: Store, results_dir: Path, retention: float) -> int:
    """Delete the rows finished more than ``retention`` seconds ago and their files."""
    rows = store.purge(time.time() - retention)
    for row in rows:
        if row["result_file"]:
            (Path(results_dir) / row["result_file"]).unlink(missing_ok=True)
    if rows:
        log.info("retention: generations deleted", extra={"fields": {"count": len(rows)}})
    return len(rows)


def sweep_orphans(store: Store, results_dir: Path) -> None:
    """At start: result files whose generation is gone (a purge cut short by a crash)."""
    for path in Path(results_dir).glob("*.mp4"):
        if len(path.name) == UUID_MP4 and store.get(path.stem) is None:
            path.unlink(missing_ok=True)


async def run(store: Store, results_dir: Path, retention: float) -> None:
    """The purge loop (an asyncio task, cancelled at shutdown); returns at once if off."""
    if retention <= 0:
        return
    await run_in_threadpool(sweep_orphans, store, results_dir)
    while True:
        try:
            await run_in_threadpool(purge_expired, store, results_dir, retention)
        except Exception:  # noqa: BLE001 - e.g. a busy disk: log and try again next time
            log.exception("retention purge failed")
        await asyncio.sleep(interval(retention))
