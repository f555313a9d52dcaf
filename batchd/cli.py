"""``batchd``: run | front | demo | emulator | submit | status | costs | cancel.

Exit codes: 0 success, 1 a runtime failure (Redis unreachable, a request failed, ...), 2 bad usage or
configuration. Errors print as one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import orjson

from .errors import BatchdError, ConfigError, InvalidRequest, RequestNotFound
from .logs import setup_logging
from .settings import Settings, load_settings
from .version import __version__

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchd",
        description="Call Claude one request at a time and pay Message Batches prices.",
    )
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="TOML settings file (else $BATCHD_CONFIG)")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "run",
        parents=[common],
        help="run the daemon (one replica)",
        description="Run one daemon replica: accumulate, submit, poll, answer. "
        "Settings from BATCHD_* / --config. Stops on SIGTERM within the grace period.",
    )

    front = sub.add_parser(
        "front",
        parents=[common],
        help="serve the Anthropic-compatible HTTP front",
        description="Serve POST /v1/messages (and the API's side endpoints) over batchd's queue, so any "
        "client gets batch prices with base_url=http://HOST:PORT. Callers present a token from "
        "BATCHD_HTTP_TOKENS / BATCHD_HTTP_TOKEN_FILE; without tokens only a loopback address is allowed. "
        "See docs/front.md.",
    )
    front.add_argument("--host", help="listen address (default: BATCHD_HTTP_HOST, 127.0.0.1)")
    front.add_argument("--port", type=int, help="listen port (default: BATCHD_HTTP_PORT, else 8787)")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="the whole path on this machine, then a report",
        description="Start Redis (unless named) and the emulator (unless an API key and "
        "base URL are configured), run the daemon in-process, send requests from many "
        "concurrent callers, and report batches, answers, latency and cost.",
    )
    demo.add_argument("--redis-url", help="use this Redis instead of a private one")
    demo.add_argument("--requests", type=int, default=300, help="how many requests (default: %(default)s)")

    emulator = sub.add_parser(
        "emulator",
        help="run the Message Batches API emulator",
        description="An HTTP emulator of the Anthropic Message Batches API (and POST "
        "/v1/messages) for the unchanged SDK (base_url=http://HOST:PORT). Fault knobs "
        "below can also be changed at run time: POST /_emulator/config with JSON.",
    )
    from .emulator.cli import add_arguments as add_emulator_arguments

    add_emulator_arguments(emulator)
    emulator.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    submit = sub.add_parser(
        "submit",
        parents=[common],
        help="queue a JSONL file of batch requests",
        description="Queue each line {custom_id, params} (the Batches request shape); "
        "custom_id becomes the request id, so running the same file again is idempotent.",
    )
    submit.add_argument("file", type=Path, help="JSONL file")
    submit.add_argument("--out", type=Path, help="write results (the Batches results shape) here, not stdout")
    submit.add_argument("--wait", action="store_true", help="wait for every answer, with a progress bar")
    submit.add_argument("--timeout", type=float, default=None, help="give up waiting after S seconds")

    status = sub.add_parser("status", parents=[common], help="queue, open batches, recent flushes, replicas")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    costs = sub.add_parser(
        "costs",
        parents=[common],
        help="what was spent and saved, from the cost ledger",
        description="Requests, tokens, cost_usd (what the API billed, at batch prices), savings_usd (against "
        "standard prices, plus answers reused by dedupe) and the cache hit rate, per UTC day, from the "
        "ledger in Redis (docs/spend.md).",
    )
    costs.add_argument("--json", action="store_true", help="machine-readable output")
    costs.add_argument(
        "--since", metavar="T", help="first day: YYYY-MM-DD, an RFC 3339 time, today, yesterday, Nd"
    )
    costs.add_argument("--until", metavar="T", help="last day (inclusive), same forms as --since")
    costs.add_argument("--by", choices=("model", "tag", "day"), help="one row per model, tag or day")

    cancel = sub.add_parser("cancel", parents=[common], help="cancel one request by id")
    cancel.add_argument("request_id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        if args.command == "emulator":
            from .emulator.cli import run as run_emulator

            setup_logging("text", "DEBUG" if debug else "INFO")
            return run_emulator(args)
        settings = load_settings(args.config)
        # The demo prints its own report; its daemon's INFO events would bury it (--debug shows them).
        quiet = "WARNING" if args.command == "demo" else settings.log_level
        setup_logging(settings.log_format, "DEBUG" if debug else quiet)
        handler: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]] = _COMMANDS[args.command]
        return asyncio.run(handler(args, settings))
    except ConfigError as exc:
        return _fail(exc, EXIT_USAGE, debug)
    except InvalidRequest as exc:
        return _fail(exc, EXIT_USAGE, debug)
    except BatchdError as exc:
        return _fail(exc, EXIT_FAILURE, debug)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _fail(exc, EXIT_FAILURE, debug, prefix=type(exc).__name__ + ": ")


def _fail(exc: BaseException, code: int, debug: bool, prefix: str = "") -> int:
    if debug:
        import traceback

        traceback.print_exception(exc)
    print(f"batchd: error: {prefix}{exc}", file=sys.stderr)
    return code


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from .daemon import Daemon

    return await Daemon(settings).run()


async def _front(args: argparse.Namespace, settings: Settings) -> int:
    from .front import run_front

    return await run_front(settings, host=args.host, port=args.port)


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return await run_demo(requests=args.requests, redis_url=args.redis_url, config=args.config)


async def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from .bulk import submit_file
    from .client import AsyncClient

    if not args.file.is_file():
        raise InvalidRequest(f"{args.file}: no such file")
    async with AsyncClient(settings=settings) as client:
        if args.out is not None:
            with args.out.open("wb") as out:
                return await submit_file(client, args.file, wait=args.wait, out=out, timeout=args.timeout)
        return await submit_file(client, args.file, wait=args.wait, out=None, timeout=args.timeout)


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from .client import redis_errors
    from .status import collect_status, format_status
    from .store import Keys, Store, connect

    redis = connect(settings.redis_url, "client")
    try:
        async with redis_errors():
            status = await collect_status(
                Store(redis, Keys(settings.key_prefix)), queue_limit=settings.effective_api_queue_limit
            )
    finally:
        await redis.aclose(close_connection_pool=True)
    if args.json:
        sys.stdout.write(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_status(status))
    return EXIT_OK


async def _costs(args: argparse.Namespace, settings: Settings) -> int:
    from .client import redis_errors
    from .ledger import costs_report, format_report, parse_day
    from .store import Keys, Store, connect

    try:
        since = None if args.since is None else parse_day(args.since)
        until = None if args.until is None else parse_day(args.until)
    except ValueError as exc:
        raise ConfigError(f"--since/--until: {exc}") from None
    redis = connect(settings.redis_url, "client")
    try:
        async with redis_errors():
            report = await costs_report(
                Store(redis, Keys(settings.key_prefix)), since=since, until=until, by=args.by
            )
    finally:
        await redis.aclose(close_connection_pool=True)
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_report(report))
    return EXIT_OK


async def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    from .client import AsyncClient

    async with AsyncClient(settings=settings) as client:
        try:
            removed = await client.cancel(args.request_id)
        except RequestNotFound as exc:
            print(f"batchd: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    if removed:
        print(f"{args.request_id}: removed from the queue; it will not be sent")
    else:
        print(
            f"{args.request_id}: already in a batch or answered; "
            "its caller gets 'canceled' unless it already had an answer"
        )
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]] = {
    "run": _run,
    "front": _front,
    "demo": _demo,
    "submit": _submit,
    "status": _status,
    "costs": _costs,
    "cancel": _cancel,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
