"""Command-line glue: `batchd emulator ...` (wired by batchd.cli) and `python -m batchd.emulator ...`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import fields

from .config import INT_KNOBS, KNOB_HELP, LIST_KNOBS, TIERS, EmulatorConfig
from .server import DEFAULT_PORT, serve

__all__ = ["add_arguments", "run"]

log = logging.getLogger("batchd.emulator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --host, --port, --access-log, --tier and one flag per knob (--processing-seconds, ...)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port to listen on, 0 for any free one (default: %(default)s)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request to stderr")
    parser.add_argument(
        "--tier",
        type=int,
        choices=sorted(TIERS),
        default=None,
        help="preset rpm_limit and queue_limit to a usage tier's: "
        + "; ".join(f"{n} = {t['rpm_limit']:,} RPM / {t['queue_limit']:,}" for n, t in TIERS.items())
        + " (--rpm-limit / --queue-limit given too win)",
    )
    defaults = EmulatorConfig()
    for knob in fields(EmulatorConfig):
        name = knob.name
        # None means "not given", so only flags the user passed override the dataclass defaults.
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_flag_type(name),
            default=None,
            metavar=_metavar(name),
            help=KNOB_HELP[name]
            + ("" if name == "seed" else f" (default: {_shown(getattr(defaults, name))})"),
        )


def _flag_type(name: str) -> Callable[[str], object]:
    if name in LIST_KNOBS:
        return lambda text: [part.strip() for part in text.split(",") if part.strip()]
    return int if name == "seed" or name in INT_KNOBS else float


def _metavar(name: str) -> str:
    if name in LIST_KNOBS:
        return "KEY[,KEY...]"
    if name == "seed" or name in INT_KNOBS:
        return "N"
    return "P" if name.endswith("_rate") else "S"


def _shown(value: object) -> str:
    return "none" if value == [] else str(value)


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The config the flags describe; ValueError naming the bad flag's knob."""
    config = EmulatorConfig()
    given: dict[str, object] = {}
    if getattr(args, "tier", None) is not None:
        given["tier"] = args.tier
    given.update(
        {
            k.name: getattr(args, k.name)
            for k in fields(EmulatorConfig)
            if getattr(args, k.name, None) is not None
        }
    )
    config.update(given)
    return config


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop, 2 on bad flags, 1 if the port cannot be bound."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"batchd emulator: {exc}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(_serve_until_signal(config, args.host, args.port, args.access_log))
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    return 0


def _announce(url: str) -> None:
    # Printed, not logged: scripts and tests read this line whatever the logging level.
    print(f"batchd emulator listening on {url} (set ANTHROPIC_BASE_URL={url})", file=sys.stderr, flush=True)


async def _serve_until_signal(config: EmulatorConfig, host: str, port: int, access_log: bool) -> None:
    loop = asyncio.get_running_loop()
    server = asyncio.create_task(
        serve(
            config,
            host,
            port,
            access_log=access_log,
            on_ready=_announce,
        )
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.cancel)
    try:
        await server
    except asyncio.CancelledError:
        # Our own cancel from the signal handler is the normal way out.
        log.info("emulator stopped")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
