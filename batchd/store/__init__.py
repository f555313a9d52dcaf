"""batchd's storage layer: every Redis key, record, state and Lua script, and nothing else.

Nothing outside this package spells a key, a record field or a state; see docs/design.md for the key table.
"""

from .connection import CLIENT_SOCKET_TIMEOUT, connect, connection_pool
from .intake import ConsumerInfo, Intake
from .keys import CONSUMER_GROUP, SCHEMA_VERSION, Keys, custom_id_for, split_custom_id
from .records import (
    BatchHeaders,
    BatchRecord,
    BatchState,
    Charge,
    FlushRecord,
    FlushState,
    FlushSummary,
    IntakeEntry,
    LedgerRow,
    RequestRecord,
    RequestState,
    Trigger,
    now_ms,
    text,
    utc_day,
)
from .scripts import (
    BudgetLimits,
    BudgetRefused,
    CancelOutcome,
    DeliverOutcome,
    DeliverReply,
    Delivery,
    EnqueueConflict,
    EnqueueOutcome,
    EnqueueRefused,
    NewRequest,
    Scripts,
)
from .store import FlushChanged, FlushEntry, FlushItem, QueueSnapshot, SchemaMismatch, Store

__all__ = [
    "CLIENT_SOCKET_TIMEOUT",
    "CONSUMER_GROUP",
    "SCHEMA_VERSION",
    "BatchHeaders",
    "BatchRecord",
    "BatchState",
    "BudgetLimits",
    "BudgetRefused",
    "CancelOutcome",
    "Charge",
    "ConsumerInfo",
    "DeliverOutcome",
    "DeliverReply",
    "Delivery",
    "EnqueueConflict",
    "EnqueueOutcome",
    "EnqueueRefused",
    "FlushChanged",
    "FlushEntry",
    "FlushItem",
    "FlushRecord",
    "FlushState",
    "FlushSummary",
    "Intake",
    "IntakeEntry",
    "Keys",
    "LedgerRow",
    "NewRequest",
    "QueueSnapshot",
    "RequestRecord",
    "RequestState",
    "SchemaMismatch",
    "Scripts",
    "Store",
    "Trigger",
    "connect",
    "connection_pool",
    "custom_id_for",
    "now_ms",
    "split_custom_id",
    "text",
    "utc_day",
]
