"""Counters served at GET /_emulator/stats: what clients did and which faults were injected."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

__all__ = ["Stats"]


@dataclass
class Stats:
    batches_created: int = 0
    batches_rejected: int = 0  # creates answered 400/413 (bad body), nothing created
    batches_canceled: int = 0  # cancel calls that moved a batch to canceling
    batches_deleted: int = 0
    batches_forgotten: int = 0  # dropped by DELETE /_emulator/batches/{id} (the API "lost" them)
    requests_received: int = 0  # requests inside created batches
    # custom ids seen in more than one created batch: work the user pays for twice
    duplicate_custom_ids: int = 0
    realtime_requests: int = 0  # POST /v1/messages calls that reached the handler
    list_calls: int = 0  # GET /v1/messages/batches answered (a page each)
    retrieve_calls: int = 0  # GET /v1/messages/batches/{id} answered
    results_downloads: int = 0  # results downloads started
    results_cut: int = 0  # of which broken off on purpose
    auth_failures: int = 0
    api_calls: int = 0  # authenticated calls to the batch endpoints (what the RPM limit counts)
    rate_limited_rpm: int = 0  # of which answered 429 by rpm_limit
    rate_limited_queue: int = 0  # creates answered 429 by queue_limit
    prompt_cache_writes: int = 0  # requests (batch or real time) that wrote a cache prefix
    prompt_cache_reads: int = 0  # requests that read one
    faults_create_error: int = 0
    faults_create_lost_response: int = 0
    faults_rate_limit: int = 0
    faults_transient_404: int = 0
    faults_errored: int = 0  # requests drawn to end api_error/overloaded_error
    faults_expired: int = 0  # requests drawn to end expired
    # Every custom id of every created batch, to count duplicates across batches.
    seen_custom_ids: set[str] = field(default_factory=set, repr=False)
    repeated_custom_ids: set[str] = field(default_factory=set, repr=False)

    def counters(self) -> dict[str, int]:
        # Not dataclasses.asdict: it would deep-copy the (possibly million-entry) id sets on every call.
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), int)}

    def note_cache(self, read: bool) -> None:
        if read:
            self.prompt_cache_reads += 1
        else:
            self.prompt_cache_writes += 1

    def note_custom_ids(self, custom_ids: list[str]) -> None:
        seen, repeated = self.seen_custom_ids, self.repeated_custom_ids
        for custom_id in custom_ids:
            if custom_id in seen:
                repeated.add(custom_id)
            else:
                seen.add(custom_id)
        self.duplicate_custom_ids = len(repeated)
