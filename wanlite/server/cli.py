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
* ``--store redis://HOST:PORT/DB`` shares jobs between processes: ``serve`` processes (with a
  worker thread, or ``--workers 0`` for HTTP only) and ``worker`` processes (the model and no
  HTTP: :func:`add_worker_parser`, :func:`run_worker`), results in one ``--results`` folder
  that all of them reach (e.g. a network share).
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

from ..options import (
    HelpFormatter,
    Options,
    add_logging_options,
    add_runtime_options,
    add_single_file_flags,
    arg_group,
    runtime_options,
    single_files,
)
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
        help="at most N long-lived requests at once (event streams, downloads, sync calls; "
        "more get 503), and N more connections still sending a request (when full, the one "
        "waiting longest is closed); /health and /ready are always answered (default 100)",
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


def _add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default="sqlite",
        help="where jobs live: 'sqlite' (in the data dir, default: one process) or "
        "redis://HOST:PORT/DB (shared by several serve and worker processes)",
    )
    p.add_argument(
        "--results",
        default=None,
        metavar="DIR",
        help="folder of the MP4 results, the same for every process on one Redis "
        "(default: DATA_DIR/results)",
    )
    p.add_argument(
        "--claim-timeout",
        type=float,
        default=30.0,
        help="Redis: seconds without a heartbeat after which a worker's job is taken over by "
        "another worker (default 30)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="Redis: times a job is started before it ends failed (default 3)",
    )


def _add_model_options(p) -> None:
    """The model process's flags, shared by ``serve`` and ``worker``, in the sections of
    ``wanlite generate``'s --help."""
    arg_group(p, "request")  # --limits: first, as in generate
    files = arg_group(p, "model and files")
    files.add_argument(
        "--model", default=DEFAULT_MODEL, help="local folder, hub id, or random:tiny"
    )
    add_single_file_flags(files)  # --transformer self_forcing.pt: a causal model that streams
    add_runtime_options(p)  # the same runtime flags as `wanlite generate`
    arg_group(p, "speed").add_argument(
        "--threads", type=int, default=0, help="CPU threads for the model (default: torch's)"
    )
    output = arg_group(p, "output and logging")
    add_logging_options(output)
    output.add_argument(
        "--previews",
        type=int,
        nargs="?",
        const=5,
        default=0,
        metavar="EVERY",
        help="progress events carry a small JPEG data URL of the current prediction every "
        "EVERY steps (--previews alone: 5; default off)",
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``).  Light: it
    imports neither FastAPI nor torch, so ``wanlite --help`` works without the server extra."""
    p = subparsers.add_parser(
        "serve",
        help="serve the hosted video API locally (sync, async queue, SSE)",
        description="Serve the hosted API's video endpoints from one local model.",
        formatter_class=HelpFormatter,
    )
    server = arg_group(p, "server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    server.add_argument(
        "--data-dir",
        default="wanlite-data",
        help="folder for the job database and the MP4 results (default ./wanlite-data)",
    )
    _add_store_options(arg_group(p, "job store"))
    server.add_argument(
        "--workers",
        type=int,
        default=1,
        choices=(0, 1),
        help="model threads in this process: 1 (default), or 0 for the HTTP side alone "
        "(with --store redis://; jobs run in 'wanlite worker' processes)",
    )
    server.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY'; prefer the environment variable "
        "WANLITE_API_KEY, which other local users cannot read in 'ps' as they can this flag "
        "(default: env WANLITE_API_KEY; unset = open)",
    )
    server.add_argument(
        "--model-id",
        default=MODEL_ID,
        help=f"model id that clients send (default {MODEL_ID})",
    )
    server.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="max generations waiting; more are refused with 429 (default 64)",
    )
    server.add_argument(
        "--public-url",
        default=None,
        help="base of result URLs, e.g. behind a proxy; its host is also accepted as Host "
        "(default: the address the client connected to)",
    )
    _add_guard_options(arg_group(p, "connections and browsers"))
    _add_model_options(p)
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    """The error of a bad flag, found now in one line rather than later as a failed /ready."""
    if args.max_queue < 1:
        return "--max-queue must be at least 1"
    if args.previews < 0:
        return "--previews must be 0 (off) or a number of steps"
    if args.limit_concurrency < 1 or args.request_timeout <= 0 or args.result_ttl <= 0:
        return "--limit-concurrency, --request-timeout and --result-ttl must be positive"
    error = _check_store_args(args)
    if error:
        return error
    if args.workers == 0 and args.store == "sqlite":
        return "--workers 0 needs --store redis://... (with SQLite nothing else can run the jobs)"
    if args.retention < 0:
        return "--retention must be 0 (keep forever) or a positive number of seconds"
    try:
        Options(**runtime_options(args))
    except ValueError as e:
        return str(e)
    return None


def _check_store_args(args: argparse.Namespace) -> str | None:
    if args.store != "sqlite" and not args.store.startswith(("redis://", "rediss://")):
        return f"--store must be 'sqlite' or a redis:// URL, got {args.store!r}"
    if args.claim_timeout <= 0 or args.max_attempts < 1:
        return "--claim-timeout must be positive and --max-attempts at least 1"
    return None


def _check_redis(url: str) -> str | None:
    """The error of a Redis that cannot be used, in one line."""
    try:
        import redis
    except ImportError:
        return "--store redis:// needs the redis package: pip install 'wanlite[redis]'"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError) as e:
        return f"cannot use the Redis store {url!r}: {e}"
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
        max_active=args.limit_concurrency,
        public_url=args.public_url,
        options=runtime_options(args) | single_files(args),
        threads=args.threads,
        allowed_hosts=allowed_hosts(args.host, args.port, args.public_url),
        allowed_origins=tuple(args.allow_origin),
        result_ttl=args.result_ttl,
        previews=args.previews,
        retention=args.retention,
        store=args.store,
        results=Path(args.results) if args.results else None,
        workers=args.workers,
        claim_timeout=args.claim_timeout,
        max_attempts=args.max_attempts,
    )


def _check_data_dir(data_dir: Path, results: Path | None = None, lock: bool = True) -> str | None:
    """The error of a data dir or results folder that is busy or not writable, in one line.
    ``lock``: SQLite's one-server-per-data-dir lock (not taken with Redis)."""
    from .private import private_dir
    from .store import lock_data_dir

    results = results or data_dir / "results"
    folders = {"data dir": data_dir, "results folder": results} if lock else {}
    folders["results folder"] = results
    what = "data dir" if lock and results == data_dir / "results" else "results folder"
    try:
        if lock or results == data_dir / "results":
            private_dir(data_dir)  # 0700: prompts and videos are not for other local users
        private_dir(results)
        if lock:
            lock_data_dir(data_dir).close()
        for name, folder in folders.items():  # the lock file may be there already
            what = name
            with tempfile.TemporaryFile(dir=folder):
                pass
    except RuntimeError as e:
        return str(e)
    except OSError as e:  # one line, whatever the folder: no traceback
        return f"{what} {str(folders.get(what, results))!r} is not usable: {e.strerror or e}"
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
    log = logging.getLogger("wanlite.server")
    log.info("starting", extra={"fields": fields})
    if args.api_key:
        log.warning("--api-key shows in 'ps' to every local user: prefer env WANLITE_API_KEY")


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
    redis_store = config.store != "sqlite"
    error = _check_data_dir(config.data_dir, config.results, lock=not redis_store)
    if not error and redis_store:
        error = _check_redis(config.store)
    if error:
        return _fail(error, 2)
    _log_start(args, config)
    return _serve(args, config)


# -- wanlite worker -------------------------------------------------------------------------------
def add_worker_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``worker`` to ``subparsers``: a model process on a Redis store, without HTTP."""
    p = subparsers.add_parser(
        "worker",
        help="run jobs of a Redis job store (no HTTP side): one model, one job at a time",
        description="Run the jobs queued in a Redis store by 'wanlite serve --store redis://...' "
        "processes: any number of workers, on any machines that reach the Redis and the "
        "results folder.",
        formatter_class=HelpFormatter,
    )
    store = arg_group(p, "job store")
    store.add_argument(
        "--data-dir",
        default="wanlite-data",
        help="folder whose results/ holds the MP4s unless --results is given "
        "(default ./wanlite-data)",
    )
    _add_store_options(store)
    store.add_argument(
        "--name", default=None, help="this worker's consumer name in Redis (default: random)"
    )
    _add_model_options(p)
    return p


def run_worker(args: argparse.Namespace) -> int:
    """Run a worker until SIGTERM/SIGINT (its running job goes back to the queue) or until its
    model fails to load (exit 1).  Returns the process exit code."""
    import signal
    import socket

    setup_logging(args.log_level)
    error = _check_store_args(args)
    if not error and args.store == "sqlite":
        error = "wanlite worker needs --store redis://HOST:PORT/DB"
    if not error and args.previews < 0:
        error = "--previews must be 0 (off) or a number of steps"
    if not error:
        try:
            Options(**runtime_options(args))
        except ValueError as e:
            error = str(e)
    results = Path(args.results) if args.results else Path(args.data_dir) / "results"
    error = error or _check_data_dir(Path(args.data_dir), results, lock=False)
    error = error or _check_redis(args.store)
    if error:
        return _fail(error, 2)

    from .redis_store import RedisBus, RedisStore
    from .worker import Worker, load_model

    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    store = RedisStore(
        args.store, consumer=name, claim_timeout=args.claim_timeout, max_attempts=args.max_attempts
    )
    options = runtime_options(args) | single_files(args)

    def loader():
        return load_model(args.model, options, args.threads)

    worker = Worker(store, results, loader, RedisBus(store), previews=args.previews)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.interrupt())
    fields = {"store": args.store, "consumer": name, "checkpoint": args.model}
    fields["results"] = str(results.resolve())
    logging.getLogger("wanlite.server").info("worker starting", extra={"fields": fields})
    worker.start()
    while worker.alive():
        time.sleep(0.2)
    worker.stop()
    store.close()
    if worker.state == "failed":
        return _fail(f"the model failed to load: {worker.load_error}", 1)
    logging.getLogger("wanlite.server").info("worker stopped", extra={"fields": fields})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m wanlite.server [serve] ...`` or ``python -m wanlite.server worker ...``."""
    parser = argparse.ArgumentParser(prog="python -m wanlite.server")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    add_worker_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "worker"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    return run_worker(args) if args.command == "worker" else run(args)
