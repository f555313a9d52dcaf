from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd import systemd

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="sd_notify needs AF_UNIX sockets")


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd, at a short path (sun_path is limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sd", dir="/tmp") as tmp:
        path = str(Path(tmp) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        try:
            yield sock
        finally:
            sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_the_socket(listener: socket.socket) -> None:
    assert systemd.ready()
    assert received(listener) == "READY=1"
    assert systemd.status("accumulating\n812 queued")
    assert received(listener) == "STATUS=accumulating 812 queued"
    assert systemd.watchdog()
    assert received(listener) == "WATCHDOG=1"
    assert systemd.stopping()
    assert received(listener) == "STOPPING=1"
    assert systemd.notify("READY=1\nSTATUS=up")
    assert received(listener) == "READY=1\nSTATUS=up"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"batchd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready()
        assert received(sock) == "READY=1"


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert systemd.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not supported: no send, no error
    assert systemd.notify("READY=1") is False


def test_missing_socket_is_false_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.ready() is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None
