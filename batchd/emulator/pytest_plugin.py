"""pytest fixtures that point the official SDK at batchd's emulator: test code that calls Claude, offline.

Installed with batchd (entry point ``pytest11``), so any test suite in an environment with batchd gets:

- ``anthropic_emulator``: the emulator (an ``EmulatorThread`` on a free port, fast batches). One server
  serves the whole session; each test starts with no batches, default knobs, empty caches and no canned
  responses. Reach the knobs with ``anthropic_emulator.configure(...)``, the counters with ``.stats()``.
- ``anthropic_client``: an ``anthropic.Anthropic`` pointed at it.
- ``async_anthropic_client``: an ``anthropic.AsyncAnthropic`` pointed at it (needs pytest-asyncio).
- the marker ``@pytest.mark.anthropic_emulator(**knobs)`` sets knobs for one test, e.g.
  ``@pytest.mark.anthropic_emulator(errored_rate=1.0)``.

The names are prefixed ``anthropic_`` so they cannot clash with a suite's own ``emulator`` fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import pytest

from .config import EmulatorConfig
from .server import EmulatorThread

__all__ = ["API_KEY", "DEFAULT_KNOBS"]

API_KEY = "test-key"
"""The key the client fixtures send (add it to ``valid_api_keys`` if a test restricts keys)."""
DEFAULT_KNOBS: dict[str, Any] = {"processing_seconds": 0.1, "cancel_seconds": 0.02}
"""Knobs each test starts with, on top of the emulator's own defaults: batches end in 0.1 s."""
_MARKER = "anthropic_emulator"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{_MARKER}(**knobs): emulator knobs for this test (batchd.emulator.pytest_plugin)"
    )


@pytest.fixture(scope="session")
def _anthropic_emulator_server() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(**DEFAULT_KNOBS)) as server:
        yield server


@pytest.fixture
def anthropic_emulator(
    _anthropic_emulator_server: EmulatorThread, request: pytest.FixtureRequest
) -> EmulatorThread:
    """The emulator, fresh for this test: no batches, default knobs (plus the test's marker knobs)."""
    server = _anthropic_emulator_server
    server.reset()
    server.configure(**EmulatorConfig(**DEFAULT_KNOBS).as_dict())
    for marker in reversed(list(request.node.iter_markers(_MARKER))):  # the closest marker wins
        if marker.args:
            raise pytest.UsageError(f"@pytest.mark.{_MARKER} takes knobs as keywords, got {marker.args!r}")
        server.configure(**marker.kwargs)
    return server


@pytest.fixture
def anthropic_client(anthropic_emulator: EmulatorThread) -> Iterator[anthropic.Anthropic]:
    """The official sync SDK client, pointed at the emulator."""
    with anthropic.Anthropic(base_url=anthropic_emulator.base_url, api_key=API_KEY) as client:
        yield client


def _async_fixture(function: Any) -> Any:
    """pytest-asyncio's fixture decorator; without pytest-asyncio, a fixture that says it is needed."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - depends on the user's environment

        @pytest.fixture(name=function.__name__)
        def missing() -> None:
            raise pytest.UsageError(f"{function.__name__} needs pytest-asyncio (pip install pytest-asyncio)")

        return missing
    return pytest_asyncio.fixture(function)


@_async_fixture
async def async_anthropic_client(
    anthropic_emulator: EmulatorThread,
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The official async SDK client, pointed at the emulator (closed on the test's own event loop)."""
    async with anthropic.AsyncAnthropic(base_url=anthropic_emulator.base_url, api_key=API_KEY) as client:
        yield client
