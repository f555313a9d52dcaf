"""batchd: call Claude one request at a time and pay Message Batches prices.

The names in ``__all__`` are the public API. Every module and subpackage (``batchd.store``,
``batchd.batches``, ``batchd.emulator``, ...) is internal unless its own docs say otherwise.
"""

import typing

from .errors import (
    BatchdError,
    BudgetExceeded,
    ClientClosed,
    ConfigError,
    InvalidParams,
    InvalidRequest,
    InvalidRequestId,
    QueueFull,
    RedisUnavailable,
    ReplicationTimeout,
    RequestCanceled,
    RequestConflict,
    RequestErrored,
    RequestExpired,
    RequestFailed,
    RequestNotFound,
    RequestTooLarge,
    ResultTimeout,
)
from .settings import Settings, load_settings
from .version import __version__

if typing.TYPE_CHECKING:
    from .client import AsyncClient
    from .sdk import Anthropic, AsyncAnthropic
    from .syncclient import Client

__all__ = [
    "Anthropic",
    "AsyncAnthropic",
    "AsyncClient",
    "BatchdError",
    "BudgetExceeded",
    "Client",
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
]


def __getattr__(name: str) -> object:
    # The client pulls in the anthropic SDK (over a second to import): the CLI's --help should not wait.
    if name == "AsyncClient":
        from .client import AsyncClient

        return AsyncClient
    if name == "Client":
        from .syncclient import Client

        return Client
    if name in ("AsyncAnthropic", "Anthropic"):
        from . import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'batchd' has no attribute {name!r}")
