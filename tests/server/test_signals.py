"""Signals on the server object: the first SIGTERM starts the drain, a second one forces
an immediate exit (the drain may be stuck behind a slow disk)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from nbdguard.config import Config, ExportConfig, ServerConfig
from nbdguard.server import app
from nbdguard.server.app import EXIT_FORCED, Server


async def test_second_signal_forces_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []

    def fake_exit(status: int) -> None:
        exits.append(status)

    monkeypatch.setattr(app.os, "_exit", fake_exit)
    export = ExportConfig(name="a", path=Path("/nonexistent"), format="raw")
    server = Server(Config(ServerConfig(listen=()), (export,)))
    server._on_signal(signal.SIGTERM)
    assert server._stop.is_set() and exits == []
    server._on_signal(signal.SIGINT)
    assert exits == [EXIT_FORCED]


async def test_reload_without_a_config_file_changes_nothing() -> None:
    export = ExportConfig(name="a", path=Path("/nonexistent"), format="raw")
    server = Server(Config(ServerConfig(listen=()), (export,)))
    server.reload()
    assert server.config.exports == (export,)
