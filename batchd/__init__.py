"""batchd: call Claude one request at a time and pay Message Batches prices."""

from typing import TYPE_CHECKING

from .errors import (
    BatchdError,
    ConfigError,
    InvalidParams,
    InvalidRequest,
    InvalidRequestId,
    QueueFull,
    RedisUnavailable,
    RequestCanceled,
    RequestErrored,
    RequestExpired,
    RequestFailed,
    RequestNotFound,
    RequestTooLarge,
    ResultTimeout,
)
from .settings import Settings, load_settings

if TYPE_CHECKING:
    from .client import AsyncClient, Client
    from .sdk import Anthropic, AsyncAnthropic

__version__ = "0.1.0"

__all__ = [
    "Anthropic",
    "AsyncAnthropic",
    "AsyncClient",
    "BatchdError",
    "Client",
    "ConfigError",
    "InvalidParams",
    "InvalidRequest",
    "InvalidRequestId",
    "QueueFull",
    "RedisUnavailable",
    "RequestCanceled",
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
    if name in ("AsyncClient", "Client"):
        from . import client

        return getattr(client, name)
    if name in ("AsyncAnthropic", "Anthropic"):
        from . import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'batchd' has no attribute {name!r}")
