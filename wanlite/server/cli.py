"""``wanlite serve``: argument parsing, JSON-lines logging, and running uvicorn.

Design
------
* :func:`add_parser` adds the ``serve`` sub-command to an argparse sub-parsers object and
  :func:`run` runs it; ``wanlite/cli.py`` wires them in, and ``python -m wanlite.server`` uses
  them on their own.
* Logs are JSON lines on stderr (one object per line: ts, level, logger, msg, plus the
  record's structured ``fields``), uvicorn's included; uvicorn's own access log is off because
  the app logs every request itself.
* The HTTP side starts at once; the model loads in the worker thread (``/ready`` tells when).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..options import Options, add_runtime_options, runtime_options
from ..params import MODEL_ID
from ..paths import DEFAULT_MODEL


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``).  Light: it
    imports neither FastAPI nor torch, so ``wanlite --help`` works without the server extra."""
    p = subparsers.add_parser(
        "serve",
        help="serve the hosted video API locally (sync, async queue, SSE)",
        description="Serve the hosted API's video endpoints from one local model.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="local folder, hub id, or random:tiny")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--data-dir",
        default="wanlite-data",
        help="folder for the job database and the MP4 results (default ./wanlite-data)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: env WANLITE_API_KEY; unset = open)",
    )
    p.add_argument(
        "--model-id",
        default=MODEL_ID,
        help=f"model id that clients send (default {MODEL_ID})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="max generations waiting; more are refused with 429 (default 64)",
    )
    p.add_argument(
        "--public-url",
        default=None,
        help="base of result URLs, e.g. behind a proxy (default: the request's host)",
    )
    add_runtime_options(p)  # the same runtime flags as `wanlite generate`
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads for the model (default: torch's)"
    )
    p.add_argument("--log-level", default="info", help="debug | info | warning | error")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the server until interrupted.  Returns the process exit code."""
    setup_logging(args.log_level)
    log = logging.getLogger("wanlite.server")
    if args.max_queue < 1:
        print("error: --max-queue must be at least 1", file=sys.stderr)
        return 2
    try:
        Options(**runtime_options(args))  # a bad flag is one line now, not a failed /ready later
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ImportError as e:
        print(f"error: {e.name} is missing: pip install 'wanlite[server]'", file=sys.stderr)
        return 1
    config = ServerConfig(
        model=args.model,
        model_id=args.model_id,
        data_dir=Path(args.data_dir),
        api_key=args.api_key or os.environ.get("WANLITE_API_KEY") or None,
        max_queue=args.max_queue,
        public_url=args.public_url,
        options=runtime_options(args),
        threads=args.threads,
    )
    try:  # fail early, in one line, on a data dir that is busy or not writable
        from .store import lock_data_dir

        config.data_dir.mkdir(parents=True, exist_ok=True)
        lock_data_dir(config.data_dir).close()
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info(
        "starting",
        extra={
            "fields": {
                "host": args.host,
                "port": args.port,
                "checkpoint": args.model,
                "model_id": args.model_id,
                "data_dir": str(config.data_dir.resolve()),
                "auth": config.api_key is not None,
            }
        },
    )
    app = create_app(config)
    uv = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=3,  # SSE streams never end on their own
    )
    try:
        uvicorn.Server(uv).run()
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanlite.server")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        argv = ["serve", *argv]
    return run(parser.parse_args(argv))
