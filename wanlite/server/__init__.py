"""``wanlite serve``: a local HTTP server with the hosted API's video endpoints.

Layout: ``app.py`` (``create_app``: wires the pieces), ``context.py`` (configuration, shared
state, how a row looks on the wire), ``routes_*.py`` (one route family each: models and health,
queue, results, sync generate, events), ``jobs.py`` (request body -> queued rows),
``guard.py`` (auth, body bound, access log), ``errors.py`` (the error shape), ``signing.py``
(signed result links), ``store.py`` (the SQLite job store: queue, statuses, crash recovery),
``worker.py`` (the one thread that owns the model, and the event broadcast for SSE),
``routes_openai.py`` + ``openai_video.py`` + ``thumbnail.py`` (OpenAI's ``/v1/videos``),
``retention.py`` (deleting old finished jobs), ``cli.py`` (arguments, JSON logs, uvicorn),
``body.py`` (JSON and multipart bodies, bounded), ``protocol.py`` (request timeout and
connection budgets), ``origin.py`` (``Host`` and ``Origin``), ``filesend.py`` (result files sent
from one open handle), ``private.py`` (0700 folders, 0600 files), ``ints.py`` (ASCII-digit
integers), ``redis_store.py`` + ``redis_scripts.py`` (the Redis job store), ``streaming.py``
(a causal model's video served while it grows).

Wiring into the ``wanlite`` command line::

    from . import server
    server.add_parser(sub)                               # adds the "serve" sub-command
    server.add_worker_parser(sub)                        # adds "worker" (Redis store only)
    if args.command == "serve": return server.run(args)  # runs it, returns the exit code
    if args.command == "worker": return server.run_worker(args)

Importing this package is light: FastAPI and uvicorn load only in :func:`run`.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to ``subparsers`` and return its parser."""
    from .cli import add_parser as _add

    return _add(subparsers)


def run(args: argparse.Namespace) -> int:
    """Run ``wanlite serve`` with parsed ``args``; returns the process exit code."""
    from .cli import run as _run

    return _run(args)


def add_worker_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``worker`` sub-command (a model process on a Redis job store, no HTTP)."""
    from .cli import add_worker_parser as _add

    return _add(subparsers)


def run_worker(args: argparse.Namespace) -> int:
    """Run ``wanlite worker`` with parsed ``args``; returns the process exit code."""
    from .cli import run_worker as _run

    return _run(args)


__all__ = ["add_parser", "add_worker_parser", "run", "run_worker"]
