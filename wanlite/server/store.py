"""The job store: one SQLite table of generations, the single source of truth for the queue.

Design
------
* Every generation is one row, from ``queued`` to a terminal status (``succeeded``, ``failed``,
  ``cancelled``).  Rows go only by retention (:meth:`Store.purge`: finished rows older than
  ``--retention``) or by an explicit delete (:meth:`Store.delete`, ``DELETE /v1/videos/{id}``).
* Listings page on the sequence (:meth:`Store.page`): a cursor is a ``seq`` (or the ``seq`` of
  a known id), so a page boundary stays put while rows are added or purged.  A deleted or
  purged row leaves its ``seq`` behind for :data:`TOMBSTONE_TTL` (table ``deleted``), so an
  id cursor (``/v1/videos?after=``) still marks its place after its video is gone.
* The queue *is* the table: the worker claims the oldest ``queued`` row (FIFO by an
  autoincrement sequence), so a restart loses nothing: queued rows are simply still queued.
* Crash recovery (:meth:`Store.recover`, run at startup before the worker starts): a row that was
  ``processing`` when the process died cannot be resumed, so it ends ``failed`` with a message
  saying so.  Nothing is silently dropped or silently re-run.
* One connection shared by all threads behind a lock (WAL journal, ``synchronous=NORMAL``):
  every operation is a short transaction, so the HTTP threads and the worker never wait long.
* Rows come out as plain dicts; the HTTP layer decides how they look on the wire.
* One server per data dir: an exclusive ``flock`` on ``wanlite.lock`` (released by the OS when
  the process dies, however it dies), since a second server's recovery would fail the first
  one's running job.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .private import FILE_MODE, private_dir, private_file

ACTIVE = ("queued", "processing")
TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ACTIVE + TERMINAL
RESTART_ERROR = (
    "server restarted while this generation was running; it was not completed "
    "(enqueue it again to retry)"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    model            TEXT NOT NULL,
    status           TEXT NOT NULL,
    params           TEXT NOT NULL,      -- JSON: the validated request parameters
    response_format  TEXT NOT NULL DEFAULT 'url',
    seed             INTEGER,            -- the seed used (the requested one, or picked at start)
    step             INTEGER NOT NULL DEFAULT 0,
    total_steps      INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result_file      TEXT,               -- file name inside the results folder
    error_message    TEXT,
    metrics          TEXT,               -- JSON: timings and peak memory per phase
    enqueued_at      REAL NOT NULL,
    started_at       REAL,
    completed_at     REAL
);
CREATE INDEX IF NOT EXISTS generations_status ON generations (status, seq);
CREATE INDEX IF NOT EXISTS generations_completed ON generations (completed_at);
CREATE TABLE IF NOT EXISTS deleted (  -- where deleted rows were, for id cursors
    id         TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL,
    deleted_at REAL NOT NULL
);
"""
TOMBSTONE_TTL = 86400.0  # seconds a deleted id still works as a listing cursor


def lock_data_dir(data_dir: Path):
    """Take the data dir's exclusive lock; returns the open lock file (closing it unlocks).
    The OS drops the lock when the process dies, even by SIGKILL."""
    path = Path(data_dir) / "wanlite.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
    private_file(path)  # a lock file of an earlier version
    f = os.fdopen(fd, "a+")  # kept open on purpose
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RuntimeError(
            f"another wanlite server is using the data dir {str(path.parent)!r}"
        ) from None
    return f


class QueueFull(Exception):
    """Raised by :meth:`Store.enqueue` when the queue has no room for the request."""


class Store:
    shared = False  # one process: cancels reach the worker in memory, no claims to refresh

    def __init__(self, path: str | Path):
        self.path = Path(path)
        private_dir(self.path.parent)
        self._lockfile = lock_data_dir(self.path.parent)
        for suffix in ("", "-wal", "-shm"):  # SQLite gives -wal and -shm the database's mode
            private_file(f"{self.path}{suffix}", create=suffix == "")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lockfile.close()

    # -- helpers ----------------------------------------------------------------------------
    def _tx(self, fn):
        """Run ``fn(cursor)`` in one IMMEDIATE transaction under the lock."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                out = fn(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return out

    @staticmethod
    def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        d = dict(row)
        d["params"] = json.loads(d["params"])
        d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else None
        d["cancel_requested"] = bool(d["cancel_requested"])
        return d

    def _get(self, cur, gen_id: str) -> dict[str, Any] | None:
        return self._row(cur.execute("SELECT * FROM generations WHERE id=?", (gen_id,)).fetchone())

    # -- lifecycle --------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """At startup: rows left ``processing`` by a crash end ``failed``.  Returns their ids."""

        def fn(cur):
            rows = cur.execute("SELECT id FROM generations WHERE status='processing'")
            ids = [r[0] for r in rows]
            cur.execute(
                "UPDATE generations SET status='failed', error_message=?, completed_at=? "
                "WHERE status='processing'",
                (RESTART_ERROR, time.time()),
            )
            return ids

        return self._tx(fn)

    def enqueue(
        self, model: str, params: dict, n: int, response_format: str, max_queued: int
    ) -> list[dict[str, Any]]:
        """Insert ``n`` queued rows atomically, or raise :class:`QueueFull`."""

        def fn(cur):
            queued = cur.execute("SELECT COUNT(*) FROM generations WHERE status='queued'")
            waiting = queued.fetchone()[0]
            if waiting + n > max_queued:
                raise QueueFull(
                    f"the queue is full ({waiting} of {max_queued} places taken, {n} requested); "
                    "retry later"
                )
            now, rows = time.time(), []
            for _ in range(n):
                gen_id = str(uuid.uuid4())
                cur.execute(
                    "INSERT INTO generations (id, model, status, params, response_format, seed, "
                    "total_steps, enqueued_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                    (
                        gen_id,
                        model,
                        json.dumps(params),
                        response_format,
                        params.get("seed"),
                        params["num_inference_steps"],
                        now,
                    ),
                )
                rows.append(self._get(cur, gen_id))
            return rows

        return self._tx(fn)

    def claim_next(self, pick_seed) -> dict[str, Any] | None:
        """Move the oldest queued row to ``processing`` and return it (None if none)."""

        def fn(cur):
            row = cur.execute(
                "SELECT id, seed FROM generations WHERE status='queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            seed = row["seed"] if row["seed"] is not None else pick_seed()
            cur.execute(
                "UPDATE generations SET status='processing', started_at=?, seed=?, step=0 "
                "WHERE id=?",
                (time.time(), seed, row["id"]),
            )
            return self._get(cur, row["id"])

        return self._tx(fn)

    def progress(self, gen_id: str, step: int) -> None:
        self._tx(
            lambda cur: cur.execute(
                "UPDATE generations SET step=? WHERE id=? AND status='processing'", (step, gen_id)
            )
        )

    def finish(
        self,
        gen_id: str,
        status: str,
        *,
        result_file: str | None = None,
        error_message: str | None = None,
        metrics: dict | None = None,
    ) -> dict[str, Any] | None:
        """End a ``processing`` row in a terminal status and return it."""
        assert status in TERMINAL

        def fn(cur):
            cur.execute(
                "UPDATE generations SET status=?, result_file=?, error_message=?, metrics=?, "
                "completed_at=? WHERE id=? AND status='processing'",
                (
                    status,
                    result_file,
                    error_message,
                    json.dumps(metrics) if metrics else None,
                    time.time(),
                    gen_id,
                ),
            )
            return self._get(cur, gen_id)

        return self._tx(fn)

    def requeue(self, gen_id: str) -> None:
        """Put a ``processing`` row back at its place in the queue (clean shutdown)."""

        def fn(cur):
            row = cur.execute("SELECT params FROM generations WHERE id=?", (gen_id,)).fetchone()
            if row is None:  # deleted meanwhile
                return
            params = json.loads(row[0])
            cur.execute(
                "UPDATE generations SET status='queued', started_at=NULL, step=0, seed=? "
                "WHERE id=? AND status='processing'",
                (params.get("seed"), gen_id),
            )

        self._tx(fn)

    def fail_queued(self, error_message: str) -> list[dict[str, Any]]:
        """End every queued row ``failed`` (the model could not be loaded)."""

        def fn(cur):
            ids = [r[0] for r in cur.execute("SELECT id FROM generations WHERE status='queued'")]
            cur.execute(
                "UPDATE generations SET status='failed', error_message=?, completed_at=? "
                "WHERE status='queued'",
                (error_message, time.time()),
            )
            return [self._get(cur, i) for i in ids]

        return self._tx(fn)

    def cancel(self, gen_id: str) -> tuple[dict[str, Any] | None, str]:
        """Cancel a generation.  Returns (row, outcome) with outcome one of ``"cancelled"``
        (it was queued: now cancelled), ``"requested"`` (it is running: it stops at the next
        step), ``"terminal"`` (already finished: unchanged) or ``"missing"``."""

        def fn(cur):
            row = self._get(cur, gen_id)
            if row is None:
                return None, "missing"
            if row["status"] == "queued":
                cur.execute(
                    "UPDATE generations SET status='cancelled', cancel_requested=1, "
                    "error_message='cancelled by request', completed_at=? WHERE id=?",
                    (time.time(), gen_id),
                )
                return self._get(cur, gen_id), "cancelled"
            if row["status"] == "processing":
                cur.execute("UPDATE generations SET cancel_requested=1 WHERE id=?", (gen_id,))
                return self._get(cur, gen_id), "requested"
            return row, "terminal"

        return self._tx(fn)

    def delete(self, gen_id: str) -> dict[str, Any] | None:
        """Remove a row whatever its status; returns it as it was (None if unknown).  A running
        one must also be stopped by the worker, whose ``finish`` then finds no row."""

        def fn(cur):
            row = self._get(cur, gen_id)
            if row is not None:
                cur.execute("DELETE FROM generations WHERE id=?", (gen_id,))
                self._bury(cur, [row])
            return row

        return self._tx(fn)

    @staticmethod
    def _bury(cur, rows: list[dict[str, Any]]) -> None:
        """Remember where deleted rows were (and forget it after TOMBSTONE_TTL)."""
        now = time.time()
        cur.execute("DELETE FROM deleted WHERE deleted_at < ?", (now - TOMBSTONE_TTL,))
        cur.executemany(
            "INSERT OR REPLACE INTO deleted (id, seq, deleted_at) VALUES (?, ?, ?)",
            [(r["id"], r["seq"], now) for r in rows],
        )

    def purge(self, cutoff: float) -> list[dict[str, Any]]:
        """Remove the finished rows completed before ``cutoff``; returns them (the caller
        deletes their result files, after the rows, so no row ever points at a missing file)."""

        def fn(cur):
            where = "status IN ('succeeded','failed','cancelled') AND completed_at < ?"
            rows = cur.execute(f"SELECT * FROM generations WHERE {where}", (cutoff,)).fetchall()
            cur.execute(f"DELETE FROM generations WHERE {where}", (cutoff,))
            rows = [self._row(r) for r in rows]
            self._bury(cur, rows)
            return rows

        return self._tx(fn)

    # -- queries ----------------------------------------------------------------------------
    def get(self, gen_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._get(self._db, gen_id)

    def seq_of(self, gen_id: str) -> int | None:
        """The queue sequence of ``gen_id``, also for a row deleted in the last day."""
        sql = (
            "SELECT seq FROM generations WHERE id=? UNION ALL "
            "SELECT seq FROM deleted WHERE id=? AND deleted_at >= ?"
        )
        with self._lock:
            found = self._db.execute(sql, (gen_id, gen_id, time.time() - TOMBSTONE_TTL))
            row = found.fetchone()
        return None if row is None else row[0]

    def page(
        self,
        statuses: tuple[str, ...] = STATUSES,
        model: str | None = None,
        limit: int = 1000,
        *,
        below: int | None = None,
        above: int | None = None,
        descending: bool = True,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` rows with ``below > seq > above``, newest first if ``descending``;
        and whether more rows lie beyond the page (one extra row is read to know)."""
        sql = f"SELECT * FROM generations WHERE status IN ({','.join('?' * len(statuses))})"
        args: list[Any] = list(statuses)
        for clause, value in (("model=?", model), ("seq<?", below), ("seq>?", above)):
            if value is not None:
                sql += f" AND {clause}"
                args.append(value)
        sql += f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?"
        args.append(limit + 1)
        with self._lock:
            rows = [self._row(r) for r in self._db.execute(sql, args)]
        return rows[:limit], len(rows) > limit

    def list(
        self, statuses: tuple[str, ...] = ACTIVE, model: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` rows, oldest first."""
        return self.page(statuses, model, limit)[0][::-1]

    def finished_since(self, since: float) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM generations WHERE completed_at >= ? ORDER BY completed_at",
                (since,),
            )
            return [self._row(r) for r in rows]
