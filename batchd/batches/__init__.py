"""The batch lifecycle: create (and orphan adoption), the poller, fan-out and delivery, lost batches,
reconcile; and the real-time sender of routed requests.

Each job is idempotent: the job runner (arq, see ``batchd/jobs.py``) runs jobs at least once, so a job
killed half-way simply runs again. A job asks to run again later by raising RetryLater.
"""

from .context import Context, RetryLater, Scheduler
from .create import submit_flush
from .deliver import deliver_lines
from .fanout import fanout_results
from .poller import poll_open_batches
from .realtime import RealtimeSender
from .reconciler import reconcile

__all__ = [
    "Context",
    "RealtimeSender",
    "RetryLater",
    "Scheduler",
    "deliver_lines",
    "fanout_results",
    "poll_open_batches",
    "reconcile",
    "submit_flush",
]
