"""Signals on the server object: the first SIGTERM starts the drain, a second one forces
an immediate exit (the drain may be stuck behind a slow disk)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from nbdguard.config import Config, ExportConfig, ServerConfig, load_config
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


async def test_sighup_opens_exports_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export that takes long to open (check_on_open = "full" on a large image) is
    opened in a worker thread: the loop keeps running meanwhile, and a SIGHUP that comes
    during the reload runs one more reload after it."""
    config = tmp_path / "nbdguard.toml"
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(1 << 20))
    config.write_text(
        f'[server]\nlisten = []\n[[exports]]\nname = "a"\npath = "{image}"\nformat = "raw"\n'
    )
    server = Server(load_config(config))
    opens: list[str] = []

    def slow_open(export_config: ExportConfig) -> None:
        opens.append(export_config.name)
        time.sleep(0.3)  # a long open, in whatever thread runs it

    monkeypatch.setattr(server, "_open_export", slow_open)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    running = asyncio.ensure_future(ticker())
    server._on_hangup()
    server._on_hangup()  # during the first: one more afterwards, not two at once
    assert server._reloading is not None
    await server._reloading
    running.cancel()
    assert opens == ["a", "a"]  # refused (None) the first time, so tried again
    assert ticks >= 30  # ~0.6 s of opens, and the loop ticked through them
