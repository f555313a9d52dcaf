"""The ``batchd`` command line: help, version, exit codes and one-line errors, submit FILE, and the demo.

Commands that exercise the entry point, exit codes or other processes run as real subprocesses (several at
once, since each pays the interpreter's and the SDK's import time); the per-subcommand help, which is pure
argparse, runs ``batchd.cli.main`` in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from anthropic.types.messages import MessageBatchIndividualResponse

import batchd
from batchd.cli import main
from batchd.emulator import EmulatorConfig
from batchd.settings import Settings
from tests.daemon_harness import running_daemon
from tests.redis_server import free_port

_BATCHD = Path(sys.executable).with_name("batchd")
_LEAKY_PREFIXES = ("BATCHD_", "ANTHROPIC_")
_LEAKY_NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")
SUBCOMMANDS = ("run", "demo", "emulator", "submit", "status", "costs", "cancel")
# The fault knobs the emulator's --help must name (the list), whatever else it grows.
FAULT_KNOBS = (
    "processing-seconds",
    "create-error-rate",
    "rate-limit-rate",
    "transient-404-seconds",
    "errored-rate",
    "expired-rate",
    "results-cut-rate",
)


@dataclass
class Ran:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def one_error_line(self) -> str:
        """The single stderr line of a failed command; fails the test on a traceback or several lines."""
        lines = self.err.splitlines()
        assert "Traceback" not in self.err, f"{self.args}: traceback on stderr:\n{self.err}"
        assert len(lines) == 1, f"{self.args}: expected one line on stderr, got {len(lines)}:\n{self.err}"
        assert lines[0].startswith("batchd: "), lines[0]
        return lines[0]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES) and k not in _LEAKY_NAMES}
    env.update(extra)
    return env


async def batchd_cli(*args: str, env: dict[str, str], timeout: float = 60.0, cwd: Path | None = None) -> Ran:
    command = [str(_BATCHD)] if _BATCHD.exists() else [sys.executable, "-m", "batchd.cli"]
    proc = await asyncio.create_subprocess_exec(
        *command,
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"batchd {' '.join(args)} still running after {timeout}s:\n{err.decode()}"
        ) from None
    assert proc.returncode is not None
    return Ran(args, proc.returncode, out.decode(), err.decode())


async def run_all(*calls: tuple[Sequence[str], dict[str, str]]) -> list[Ran]:
    return list(await asyncio.gather(*(batchd_cli(*args, env=env) for args, env in calls)))


def request_line(custom_id: str, text: str, **params: Any) -> dict[str, Any]:
    body = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    body.update(params)
    return {"custom_id": custom_id, "params": body}


def write_jsonl(path: Path, lines: Sequence[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --- help and version --------------------------------------------------------------------------------------
async def test_installed_command_prints_help_and_version() -> None:
    helped, version = await run_all((["--help"], clean_env()), (["--version"], clean_env()))
    assert helped.code == 0, helped.err
    assert helped.out.startswith("usage: batchd")
    for command in SUBCOMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", helped.out, re.M), f"{command} missing from --help"
    assert version.code == 0, version.err
    assert version.out.strip() == f"batchd {batchd.__version__}"


SUBCOMMAND_HELP = {
    "run": ("--config", "--debug", "SIGTERM"),
    "demo": ("--requests", "--redis-url", "--config"),
    "emulator": ("--host", "--port", *(f"--{knob}" for knob in FAULT_KNOBS)),
    "submit": ("file", "--out", "--wait", "--timeout", "idempotent"),
    "status": ("--json", "--config"),
    "costs": ("--json", "--since", "--until", "--by", "model,tag,day"),
    "cancel": ("request_id", "--config"),
}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: batchd {command}")
    for needle in SUBCOMMAND_HELP[command]:
        assert needle in out, f"batchd {command} --help does not mention {needle}"
    if command == "emulator":
        # Every knob the emulator has is a flag, each with its help text.
        for knob in fields(EmulatorConfig):
            assert "--" + knob.name.replace("_", "-") in out, knob.name


# --- exit codes and one-line errors ------------------------------------------------------------------------
BAD_SETTINGS = {
    "requests-0": ({"BATCHD_MAX_BATCH_REQUESTS": "0"}, ["run"], "BATCHD_MAX_BATCH_REQUESTS"),
    "requests-100001": ({"BATCHD_MAX_BATCH_REQUESTS": "100001"}, ["run"], "BATCHD_MAX_BATCH_REQUESTS"),
    "bytes-300MB": ({"BATCHD_MAX_BATCH_BYTES": "300000000"}, ["run"], "BATCHD_MAX_BATCH_BYTES"),
    "missing-config": ({}, ["status", "--config", "{missing}"], "{missing}"),
    "missing-BATCHD_CONFIG": ({"BATCHD_CONFIG": "{missing}"}, ["status"], "BATCHD_CONFIG"),
    "bad-value-in-toml": ({}, ["status", "--config", "{bad}"], "MAX_BATCH_AGE_SECONDS"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_a_bad_setting_exits_2_with_one_line_naming_it(
    case: str,
    tmp_path: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In-process (the exit-code plumbing of the real command is covered by the subprocess tests)."""
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("max_batch_age_seconds = -1\n")
    paths = {"missing": str(tmp_path / "missing.toml"), "bad": str(bad_toml)}
    env, args, name = BAD_SETTINGS[case]
    # The private Redis, so a setting wrongly accepted can never reach the machine's shared instance; no
    # API key, so a `run` that got past the bad setting stops at once, with the wrong message.
    monkeypatch.setenv("BATCHD_REDIS_URL", redis_url)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(**paths))
    argv = [arg.format(**paths) for arg in args]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, f"{argv}: exit {code}\n{captured.err}"
    Ran(tuple(argv), code, captured.out, captured.err).one_error_line()
    assert name.format(**paths) in captured.err
    assert captured.out == ""


async def test_runtime_failures_exit_1_with_one_line(redis_url: str) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    status_down, cancel_unknown = await run_all(
        (["status"], clean_env(BATCHD_REDIS_URL=nowhere)),
        (["cancel", "no-such-request"], clean_env(BATCHD_REDIS_URL=redis_url)),
    )
    assert status_down.code == 1, status_down.err
    assert "unreachable" in status_down.one_error_line()
    assert status_down.out == ""
    assert cancel_unknown.code == 1, cancel_unknown.err
    assert "no-such-request" in cancel_unknown.one_error_line()
    assert cancel_unknown.out == ""


# --- submit FILE -------------------------------------------------------------------------------------------
async def test_submit_wait_writes_results_and_running_the_file_again_is_idempotent(
    tmp_path: Path, make_settings: Callable[..., Settings], emulator: Any
) -> None:
    settings = make_settings(emulator=True, max_batch_age_seconds=0.3)
    ids = [f"row-{i:03d}" for i in range(12)]
    source = write_jsonl(tmp_path / "in.jsonl", [request_line(cid, f"question {cid}") for cid in ids])
    env = clean_env(BATCHD_REDIS_URL=settings.redis_url)
    async with running_daemon(settings):
        first = await batchd_cli("submit", str(source), "--wait", "--out", str(tmp_path / "1.jsonl"), env=env)
        assert first.code == 0, first.err
        received = emulator.stats()["requests_received"]
        again = await batchd_cli("submit", str(source), "--wait", "--out", str(tmp_path / "2.jsonl"), env=env)
        assert again.code == 0, again.err
    assert first.out == again.out == ""  # with --out, results go to the file only
    assert f"{len(ids)}/{len(ids)}" in first.err  # the progress bar reached the end

    def answers(path: Path) -> dict[str, MessageBatchIndividualResponse]:
        lines = path.read_text().splitlines()
        parsed = [MessageBatchIndividualResponse.model_validate_json(line) for line in lines]
        assert len(parsed) == len(ids)
        return {p.custom_id: p for p in parsed}

    one, two = answers(tmp_path / "1.jsonl"), answers(tmp_path / "2.jsonl")
    assert sorted(one) == ids
    for cid, line in one.items():
        assert line.result.type == "succeeded"
        assert line.result.message.content[0].text == f"echo: question {cid}"  # type: ignore[union-attr]
        # The second run collected the same answers: nothing was asked again.
        assert two[cid].result.message.id == line.result.message.id  # type: ignore[union-attr]
    assert received == len(ids)
    assert emulator.stats()["requests_received"] == received


# Runs `batchd submit` in a process that reports its own peak RSS (KiB) on its last stderr line. VmHWM,
# not getrusage's ru_maxrss: that one survives exec, so it would report the (large) test process's size.
_MEASURED = (
    "import atexit, re, sys\n"
    "def peak():\n"
    "    status = open('/proc/self/status').read()\n"
    "    print('peak-rss-kib', re.search(r'VmHWM:\\s+(\\d+)', status).group(1), file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "from batchd.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.timeout(400)
async def test_submit_wait_collects_a_100000_line_file_in_bounded_memory(
    tmp_path: Path, make_settings: Callable[..., Settings], emulator: Any
) -> None:
    """The file is streamed (read twice, never held) and --wait awaits a window of answers at a time, so a
    100,000-line file costs the command about what a 10,000-line one does, not ten times as much."""
    settings = make_settings(emulator=True, max_batch_age_seconds=0.3)
    env = clean_env(BATCHD_REDIS_URL=settings.redis_url)
    peaks: dict[int, int] = {}
    async with running_daemon(settings):
        for n in (10_000, 100_000):
            source = write_jsonl(
                tmp_path / f"in-{n}.jsonl", [request_line(f"r{n}-{i}", f"question {i}") for i in range(n)]
            )
            out = tmp_path / f"out-{n}.jsonl"
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _MEASURED,
                "submit",
                str(source),
                "--wait",
                "--out",
                str(out),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(proc.communicate(), 360)
            assert proc.returncode == 0, err.decode()[-2000:]
            with out.open("rb") as fh:
                assert sum(1 for _ in fh) == n
            last = err.decode().strip().splitlines()[-1].split()
            assert last[0] == "peak-rss-kib", last
            peaks[n] = int(last[1])
    ratio = peaks[100_000] / peaks[10_000]
    print(
        f"\nbatchd submit --wait peak RSS: {peaks[10_000] // 1024} MiB for 10,000 lines, "
        f"{peaks[100_000] // 1024} MiB for 100,000 ({ratio:.2f}x)"
    )
    assert ratio < 1.3, peaks


async def test_submit_a_line_that_is_not_a_request_exits_2_naming_the_line(
    tmp_path: Path, redis_url: str
) -> None:
    good = [request_line("a", "fine"), request_line("b", "fine")]
    files: dict[str, list[object]] = {
        "not_json.jsonl": [*good, '{"custom_id": "c",'],
        "no_params.jsonl": [*good, {"custom_id": "c"}],
    }
    await _submit_fails_naming_line_3(tmp_path, redis_url, files)


async def test_submit_a_line_with_bad_params_or_id_exits_2_naming_the_line(
    tmp_path: Path, redis_url: str
) -> None:
    good = [request_line("a", "fine"), request_line("b", "fine")]
    files: dict[str, list[object]] = {
        "no_model.jsonl": [*good, {"custom_id": "c", "params": {"max_tokens": 5, "messages": []}}],
        "bad_id.jsonl": [*good, request_line("has space", "fine")],
    }
    await _submit_fails_naming_line_3(tmp_path, redis_url, files)


async def test_submit_a_repeated_or_non_string_custom_id_exits_2_naming_the_line(
    tmp_path: Path, redis_url: str
) -> None:
    good = [request_line("a", "fine"), request_line("b", "fine")]
    files: dict[str, list[object]] = {
        "repeated.jsonl": [*good, request_line("a", "fine")],  # even with the same params: one row, one id
        "null_id.jsonl": [*good, {"custom_id": None, "params": request_line("c", "x")["params"]}],
        "number_id.jsonl": [*good, {"custom_id": 7, "params": request_line("c", "x")["params"]}],
    }
    await _submit_fails_naming_line_3(tmp_path, redis_url, files)


async def test_submit_a_known_id_with_other_params_exits_2_naming_the_line(
    tmp_path: Path, redis_url: str
) -> None:
    env = clean_env(BATCHD_REDIS_URL=redis_url)
    first = write_jsonl(tmp_path / "first.jsonl", [request_line("a", "one"), request_line("b", "two")])
    assert (await batchd_cli("submit", str(first), env=env)).code == 0
    changed = write_jsonl(
        tmp_path / "changed.jsonl",
        [request_line("c", "three"), request_line("d", "four"), request_line("b", "not two any more")],
    )
    ran = await batchd_cli("submit", str(changed), env=env)
    assert ran.code == 2, ran.err
    line = ran.one_error_line()
    assert f"{changed}:3:" in line and "'b'" in line and "other params" in line


async def _submit_fails_naming_line_3(tmp_path: Path, redis_url: str, files: dict[str, list[object]]) -> None:
    env = clean_env(BATCHD_REDIS_URL=redis_url)
    paths = [write_jsonl(tmp_path / name, lines) for name, lines in files.items()]
    results = await run_all(*((["submit", str(path)], env) for path in paths))
    for path, ran in zip(paths, results, strict=True):
        assert ran.code == 2, f"{path.name}: exit {ran.code}\n{ran.err}"
        line = ran.one_error_line()
        assert f"{path}:3:" in line, f"{path.name}: {line!r} does not name line 3"
    async with aioredis.Redis.from_url(redis_url) as r:
        assert await r.dbsize() == 0  # nothing queued: the whole file is checked before anything is written


# --- the demo ----------------------------------------------------------------------------------------------
async def test_demo_runs_the_whole_path_and_reports_batches_answers_latency_and_cost() -> None:
    ran = await batchd_cli("demo", "--requests", "60", env=clean_env(), timeout=90)
    assert ran.code == 0, ran.out + ran.err
    out = ran.out
    batches = re.findall(r"^\s+(msgbatch_\w+)\s+(\d+) requests\s+(\d+) bytes\s+flushed by (\w+)$", out, re.M)
    assert re.search(rf"^batches \({len(batches)}\):$", out, re.M), out
    assert batches, out
    answers_line = re.search(r"^answers: (.*)$", out, re.M)
    assert answers_line is not None, out
    answers = {kind: int(n) for kind, n in re.findall(r"(\w+) (\d+)", answers_line[1])}
    # One request in 50 is invalid on purpose: refused at submit with the API's message, never batched.
    assert answers.get("refused") == 1 and "refused at submit, as the API would: 1 (max_tokens" in out
    assert sum(int(n) for _, n, _, _ in batches) == 60 - answers["refused"]
    assert {trigger for *_, trigger in batches} <= {"count", "bytes", "age"}
    assert re.search(r"^\s+triggers: \w+ \d+", out, re.M), out
    assert sum(answers.values()) == 60 and answers["succeeded"] >= 55, answers
    assert "every caller got its own answer: yes" in out
    assert re.search(r"^latency, call to answer: median [\d.]+s, p95 [\d.]+s, max [\d.]+s", out, re.M), out
    cost = re.search(
        r"^cost of these tokens: \$([\d.]+) at standard price, \$([\d.]+) at batch price: "
        r"saved \$([\d.]+) \((\d+)%\)$",
        out,
        re.M,
    )
    assert cost is not None, out
    standard, batch, saved, percent = float(cost[1]), float(cost[2]), float(cost[3]), int(cost[4])
    assert standard > batch > 0
    assert saved == pytest.approx(standard - batch, abs=2e-6)
    assert percent == 50
