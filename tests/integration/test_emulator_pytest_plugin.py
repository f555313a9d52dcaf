"""The pytest plugin users get with batchd: its fixtures, run the way a user's suite runs them (a separate
pytest process in a directory of its own, the plugin found through its pytest11 entry point)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

USER_TESTS = """
import anthropic
import pytest


def test_sync_client_round_trip(anthropic_client, anthropic_emulator):
    message = anthropic_client.messages.create(
        model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "echo: hi"
    batch = anthropic_client.messages.batches.create(
        requests=[{"custom_id": "a", "params": {"model": "claude-haiku-4-5", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "x"}]}}]
    )
    from batchd.emulator.testing import wait_for_batch
    assert wait_for_batch(anthropic_client, batch.id).request_counts.succeeded == 1
    assert anthropic_emulator.stats()["batches_created"] == 1
    anthropic_emulator.configure(errored_rate=1.0)  # must not leak into the next test


def test_each_test_starts_fresh(anthropic_client, anthropic_emulator):
    assert anthropic_emulator.stats()["batches_created"] == 0
    assert anthropic_emulator.config.errored_rate == 0.0
    assert anthropic_emulator.config.processing_seconds == 0.1
    assert list(anthropic_client.messages.batches.list()) == []


@pytest.mark.anthropic_emulator(rpm_limit=1)
def test_marker_sets_knobs(anthropic_client):
    anthropic_client.with_options(max_retries=0).messages.batches.list()
    with pytest.raises(anthropic.RateLimitError):
        anthropic_client.with_options(max_retries=0).messages.batches.list()


@pytest.mark.asyncio
async def test_async_client(async_anthropic_client):
    message = await async_anthropic_client.messages.create(
        model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "async hi"}]
    )
    assert message.content[0].text == "echo: async hi"


def test_own_fixtures_keep_their_names(emulator):
    assert emulator == "the suite's own"


@pytest.fixture
def emulator():
    return "the suite's own"
"""


def test_the_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    found = [e for e in entry_points(group="pytest11") if e.value == "batchd.emulator.pytest_plugin"]
    assert len(found) == 1


def test_a_users_suite_gets_the_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    # A strict suite: any warning (from the plugin, the SDK, an unclosed client) fails it.
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\nfilterwarnings = error\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "ANTHROPIC_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed" in done.stdout
