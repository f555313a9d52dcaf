"""batchd's public surface, as httpx keeps its own: one ``__all__``, and nothing else public at the top."""

from __future__ import annotations

import types

import batchd

PUBLIC = {
    "Anthropic",
    "AsyncAnthropic",
    "AsyncClient",
    "Client",
    "BatchdError",
    "BudgetExceeded",
    "ClientClosed",
    "ConfigError",
    "InvalidParams",
    "InvalidRequest",
    "InvalidRequestId",
    "QueueFull",
    "RedisUnavailable",
    "ReplicationTimeout",
    "RequestCanceled",
    "RequestConflict",
    "RequestErrored",
    "RequestExpired",
    "RequestFailed",
    "RequestNotFound",
    "RequestTooLarge",
    "ResultTimeout",
    "Settings",
    "__version__",
    "load_settings",
}


def test_all_names_the_public_surface() -> None:
    assert set(batchd.__all__) == PUBLIC
    assert len(batchd.__all__) == len(set(batchd.__all__))


def test_every_public_name_resolves() -> None:
    for name in batchd.__all__:
        assert getattr(batchd, name) is not None, name


def test_nothing_else_is_public_at_the_top() -> None:
    # Submodules are reachable (batchd.store, batchd.emulator, ...) but are not the API.
    exposed = {
        name
        for name in dir(batchd)
        if not name.startswith("_") and not isinstance(getattr(batchd, name), types.ModuleType)
    }
    assert exposed <= PUBLIC, sorted(exposed - PUBLIC)


def test_errors_form_one_tree() -> None:
    for name in batchd.__all__:
        value = getattr(batchd, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, batchd.BatchdError), name
