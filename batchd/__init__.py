"""batchd: call Claude one request at a time and pay Message Batches prices."""

from .client import AsyncClient, Client
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

__version__ = "0.1.0"

__all__ = [
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
