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
import tempfile
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


def _add_guard_options(p: argparse.ArgumentParser) -> None:
    """Flags of the connection and browser guards (see the server README's security model)."""
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin (e.g. http://localhost:3000) allowed to call the API, with CORS "
        "headers; repeatable (default: none, cross-site browser requests get 403)",
    )
    p.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="IPS",
        help="comma-separated proxy IPs whose X-Forwarded-Proto/-For are trusted "
        "(default: none are)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a whole request head and body; slower connections "
        "are closed (default 10)",
    )
    p.add_argument(
        "--limit-concurrency",
        type=int,
        default=100,
        help="max open connections; more get 503 at once (default 100)",
    )
    p.add_argument(
        "--result-ttl",
        type=float,
        default=6 * 3600.0,
        help="seconds a signed result link stays valid, with an API key (default 21600 = 6 h)",
    )
    p.add_argument(
        "--retention",
        type=float,
        default=7 * 86400.0,
        help="seconds finished generations and their files are kept, then deleted; "
        "0 = keep forever (default 604800 = 7 days)",
    )


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
        "--store",
        default="sqlite",
        help="where jobs live: 'sqlite' (in the data dir, default); redis://HOST:PORT/DB "
        "is planned for several processes and not built yet",
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
        help="base of result URLs, e.g. behind a proxy; its host is also accepted as Host "
        "(default: the address the client connected to)",
    )
    _add_guard_options(p)
    add_runtime_options(p)  # the same runtime flags as `wanlite generate`
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads for the model (default: torch's)"
    )
    p.add_argument("--log-level", default="info", help="debug | info | warning | error")
    p.add_argument(
        "--previews",
        type=int,
        nargs="?",
        const=5,
        default=0,
        metavar="EVERY",
        help="progress events carry a small JPEG data URL of the current prediction every "
        "EVERY steps (--previews alone: 5; default off)",
    )
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    """The error of a bad flag, found now in one line rather than later as a failed /ready."""
    if args.max_queue < 1:
        return "--max-queue must be at least 1"
    if args.previews < 0:
        return "--previews must be 0 (off) or a number of steps"
    if args.limit_concurrency < 1 or args.request_timeout <= 0 or args.result_ttl <= 0:
        return "--limit-concurrency, --request-timeout and --result-ttl must be positive"
    if args.store != "sqlite":
        if args.store.startswith(("redis://", "rediss://")):
            return "--store redis://: not implemented yet (wanlite.server.redis_store is the store)"
        return f"--store must be 'sqlite' or a redis:// URL, got {args.store!r}"
    if args.retention < 0:
        return "--retention must be 0 (keep forever) or a positive number of seconds"
    try:
        Options(**runtime_options(args))
    except ValueError as e:
        return str(e)
    return None


def _config(args: argparse.Namespace):
    from .app import ServerConfig
    from .origin import allowed_hosts

    return ServerConfig(
        model=args.model,
        model_id=args.model_id,
        data_dir=Path(args.data_dir),
        api_key=args.api_key or os.environ.get("WANLITE_API_KEY") or None,
        max_queue=args.max_queue,
        public_url=args.public_url,
        options=runtime_options(args),
        threads=args.threads,
        allowed_hosts=allowed_hosts(args.host, args.port, args.public_url),
        allowed_origins=tuple(args.allow_origin),
        result_ttl=args.result_ttl,
        previews=args.previews,
        retention=args.retention,
    )


def _check_data_dir(data_dir: Path) -> str | None:
    """The error of a data dir that is busy or not writable, in one line."""
    from .store import lock_data_dir

    try:
        (data_dir / "results").mkdir(parents=True, exist_ok=True)
        lock_data_dir(data_dir).close()
        for folder in (data_dir, data_dir / "results"):  # the lock file may be there already
            with tempfile.TemporaryFile(dir=folder):
                pass
    except RuntimeError as e:
        return str(e)
    except OSError as e:  # one line, whatever the folder: no traceback
        return f"data dir {str(data_dir)!r} is not usable: {e.strerror or e}"
    return None


def _log_start(args: argparse.Namespace, config) -> None:
    fields = {
        "host": args.host,
        "port": args.port,
        "checkpoint": args.model,
        "model_id": args.model_id,
        "data_dir": str(config.data_dir.resolve()),
        "auth": config.api_key is not None,
    }
    logging.getLogger("wanlite.server").info("starting", extra={"fields": fields})


def _serve(args: argparse.Namespace, config) -> int:
    import uvicorn

    from .app import create_app
    from .protocol import guarded_h11

    app = create_app(config)
    forwarded = args.forwarded_allow_ips
    uv = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="asyncio",
        http=guarded_h11(args.request_timeout, args.limit_concurrency),
        proxy_headers=bool(forwarded),  # uvicorn would trust 127.0.0.1 by default
        forwarded_allow_ips=forwarded or None,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=3,  # a last resort: jobs and SSE streams stop on the signal
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.ctx.begin_shutdown()  # before uvicorn starts waiting for connections
            super().handle_exit(sig, frame)

    try:
        Server(uv).run()
    except KeyboardInterrupt:
        return 130
    return 0


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """Run the server until interrupted.  Returns the process exit code."""
    setup_logging(args.log_level)
    error = _check_args(args)
    if error:
        return _fail(error, 2)
    try:
        import uvicorn  # noqa: F401

        from . import app  # noqa: F401
    except ImportError as e:
        return _fail(f"{e.name} is missing: pip install 'wanlite[server]'", 1)
    config = _config(args)
    error = _check_data_dir(config.data_dir)
    if error:
        return _fail(error, 2)
    _log_start(args, config)
    return _serve(args, config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanlite.server")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        argv = ["serve", *argv]
    return run(parser.parse_args(argv))
