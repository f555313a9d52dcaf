"""The Redis key schema and the custom_id <-> (request id, attempt) mapping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchd.store import Keys, custom_id_for, split_custom_id
from batchd.validation import MAX_REQUEST_ID_LEN

_RID = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=MAX_REQUEST_ID_LEN)


@given(_RID, st.integers(min_value=1, max_value=20))
def test_custom_id_round_trips(rid: str, attempt: int) -> None:
    assert split_custom_id(custom_id_for(rid, attempt)) == (rid, attempt)


@pytest.mark.parametrize("rid", ["a-b", "a-1", "-", "--", "a-", "-a", "x-2-3"])
def test_request_ids_containing_dashes_round_trip(rid: str) -> None:
    # The attempt is after the LAST dash, so a rid with dashes (even digit ones) survives.
    for attempt in (1, 2, 20):
        assert split_custom_id(custom_id_for(rid, attempt)) == (rid, attempt)


def test_custom_id_format() -> None:
    assert custom_id_for("abc", 1) == "abc-1"
    assert custom_id_for("a-b", 12) == "a-b-12"


@pytest.mark.parametrize("custom_id", ["abc", "abc-", "-1", "abc-x", "abc-1a", "", "abc- 1"])
def test_split_refuses_ids_batchd_did_not_make(custom_id: str) -> None:
    with pytest.raises(ValueError, match="not a batchd custom_id"):
        split_custom_id(custom_id)


def test_control_keys_share_one_hash_tag() -> None:
    keys = Keys()
    control = [
        keys.intake,
        keys.queue_stats,
        keys.request("r1"),
        keys.flush("f1"),
        keys.flush_rids("f1"),
        keys.flushes,
        keys.recent_flushes,
        keys.open_batches,
        keys.batch("b1"),
        keys.known_batches,
        keys.delivered_channel,
        keys.replicas,
        keys.metrics_leader,
        keys.reconcile_lock,
        keys.arq_queue,
    ]
    for key in control:
        assert key.startswith("{batchd}:"), key
    assert len(set(control)) == len(control)  # no two roles share a key


def test_result_keys_are_tagged_by_request_id() -> None:
    # Replies spread over a cluster by rid instead of piling onto the control slot.
    assert Keys().result("r1") == "batchd:res:{r1}"
    assert Keys("other").result("r1") == "other:res:{r1}"


def test_prefix_namespaces_every_key() -> None:
    a, b = Keys("one"), Keys("two")
    assert a.intake == "{one}:intake"
    assert a.request("r") != b.request("r")
    assert a.result("r") != b.result("r")
