from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from batchd import logs
from batchd.logs import log_event, redact, register_secret, setup_logging

FAKE_KEY = "sk-ant-api03-" + "A1b2C3d4" * 10


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Route root logging into a buffer; put the root logger back as it was afterwards."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    noisy = {
        name: logging.getLogger(name).level for name in ("httpx", "httpx2", "anthropic", "aiohttp.access")
    }
    buf = io.StringIO()
    yield buf
    for name, level in noisy.items():
        logging.getLogger(name).setLevel(level)
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved_level)


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    yield
    logs._secrets.clear()
    logs._secrets_re = None


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_json_one_object_per_line_with_extra_fields(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream=stream)
    log = logging.getLogger("batchd.test")
    log.info("made %s", "a batch", extra={"event": "batch.created", "batch_id": "msgbatch_1", "requests": 3})
    log.debug("hidden at INFO")
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["level"] == "INFO"
    assert record["logger"] == "batchd.test"
    assert record["msg"] == "made a batch"
    assert record["event"] == "batch.created"
    assert record["batch_id"] == "msgbatch_1"
    assert record["requests"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])


def test_json_traceback_stays_on_one_line(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream=stream)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("batchd.test").exception("failed")
    (line,) = lines(stream)
    record = json.loads(line)
    assert "RuntimeError: boom" in record["exc"]
    assert "Traceback" in record["exc"]


def test_json_field_cannot_overwrite_envelope(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream=stream)
    log_event(logging.getLogger("batchd.test"), "x.y", ts="mine", level_name="fine")
    record = json.loads(lines(stream)[0])
    assert record["ts"] != "mine"
    assert record["ts_"] == "mine"


def test_text_is_one_readable_line(stream: io.StringIO) -> None:
    setup_logging("text", "DEBUG", stream=stream)
    log_event(
        logging.getLogger("batchd.acc"), "batch.created", batch_id="msgbatch_1", requests=2, note="two words"
    )
    logging.getLogger("batchd.acc").warning("multi\nline")
    first, second = lines(stream)
    assert re.fullmatch(
        r"\S+Z INFO batchd\.acc: batch\.created batch_id=msgbatch_1 requests=2 note=\"two words\"", first
    )
    assert second.endswith("WARNING batchd.acc: multi\\nline")


def test_log_event_fields_named_like_record_attributes(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream=stream)
    log_event(logging.getLogger("batchd.test"), "thing.done", name="n", msg="m", module="x", count=1)
    record = json.loads(lines(stream)[0])
    assert record["msg"] == "thing.done"
    assert (record["name_"], record["msg_"], record["module_"], record["count"]) == ("n", "m", "x", 1)


def test_log_event_respects_level_and_names_caller(stream: io.StringIO) -> None:
    setup_logging("json", "WARNING", stream=stream)
    log = logging.getLogger("batchd.test")
    log_event(log, "quiet.event", n=1)
    assert lines(stream) == []
    captured: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    keeper = Keep()
    log.addHandler(keeper)
    try:
        log_event(log, "loud.event", level=logging.ERROR, n=2)
    finally:
        log.removeHandler(keeper)
    assert json.loads(lines(stream)[0])["event"] == "loud.event"
    assert captured[0].funcName == "test_log_event_respects_level_and_names_caller"


def test_non_json_fields_are_logged_as_text(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream=stream)
    log_event(logging.getLogger("batchd.test"), "odd", thing=object())
    assert json.loads(lines(stream)[0])["thing"].startswith("<object object")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"key is {FAKE_KEY}.", "key is sk-ant-***."),
        ("Authorization: Bearer abc.def-123", "Authorization: Bearer ***"),
        ('{"x-api-key": "hunter22"}', '{"x-api-key": "***"}'),
        ("redis://default:s3cret@redis:6379/0", "redis://default:***@redis:6379/0"),
        ("rediss://:s3cret@redis:6379", "rediss://:***@redis:6379"),
        ("nothing secret here: redis://redis:6379/0", "nothing secret here: redis://redis:6379/0"),
    ],
)
def test_redact_patterns(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_registered_secret_is_masked_in_message_fields_and_traceback(stream: io.StringIO) -> None:
    register_secret("my-emulator-key-42")
    register_secret(None)  # ignored
    register_secret("ab")  # too short to mask safely: ignored
    setup_logging("json", "INFO", stream=stream)
    log = logging.getLogger("batchd.test")
    log.info(
        "using %s", "my-emulator-key-42", extra={"headers": {"auth": "my-emulator-key-42"}, "k": [FAKE_KEY]}
    )
    try:
        raise ValueError(f"bad key {FAKE_KEY} / my-emulator-key-42")
    except ValueError:
        log.exception("oops")
    text = stream.getvalue()
    assert "my-emulator-key-42" not in text
    assert FAKE_KEY not in text
    first, second = (json.loads(line) for line in lines(stream))
    assert first["msg"] == "using ***"
    assert first["headers"] == {"auth": "***"}
    assert first["k"] == ["sk-ant-***"]
    assert "bad key sk-ant-*** / ***" in second["exc"]
    assert redact("about a tab") == "about a tab"  # the too-short "ab" is not masked


def test_filter_masks_records_for_other_handlers_too() -> None:
    register_secret("super-secret-value")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "value=%s", ("super-secret-value",), None)
    record.__dict__["token"] = "super-secret-value"
    assert logs.RedactingFilter().filter(record)
    assert record.getMessage() == "value=***"
    assert record.__dict__["token"] == "***"


def test_filter_leaves_broken_format_args_to_the_handler() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d", ("not a number",), None)
    assert logs.RedactingFilter().filter(record)
    assert record.args == ("not a number",)


def test_setup_is_idempotent_and_validates(stream: io.StringIO) -> None:
    setup_logging("json", "INFO", stream=stream)
    setup_logging("text", "INFO", stream=stream)
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "batchd"]
    assert len(ours) == 1
    assert isinstance(ours[0].formatter, logs.TextFormatter)
    bad_fmt: Any = "xml"
    with pytest.raises(ValueError, match="log format"):
        setup_logging(bad_fmt, "INFO", stream=stream)
    with pytest.raises(ValueError, match="log level"):
        setup_logging("text", "LOUD", stream=stream)


def test_sdk_request_logs_are_quieted_at_info(stream: io.StringIO) -> None:
    setup_logging("text", "INFO", stream=stream)
    logging.getLogger("httpx2").info("HTTP Request: GET /v1/messages/batches")
    assert lines(stream) == []
    setup_logging("text", "DEBUG", stream=stream)
    logging.getLogger("httpx2").info("HTTP Request: GET /v1/messages/batches")
    assert len(lines(stream)) == 1
