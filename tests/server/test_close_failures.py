"""A flush or close that fails at shutdown (ENOSPC or EIO on a qcow2 table, a corrupt
image) is logged with its export and step; every other export is still flushed and closed,
and `serve` exits with its own status (4), never a traceback."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import Any

import pytest

from nbdguard import cli
from nbdguard.config import Config, ExportConfig, ServerConfig
from nbdguard.errors import ExportOpenError, NbdguardError
from nbdguard.observability.metrics import Metrics
from nbdguard.server.app import Server
from nbdguard.server.exports import CloseFailed, Export, ExportRegistry, open_export


class Recorder:
    """Stands in for the structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append((level, event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.events if name == event]


class Failing:
    """Wraps a device whose `flush` or `close` raises (close after really closing, as a
    qcow2 image's close does when its last metadata write fails)."""

    def __init__(
        self, inner: Any, *, flush: Exception | None = None, close: Exception | None = None
    ) -> None:
        self.inner = inner
        self.flush_error = flush
        self.close_error = close
        self.calls: list[str] = []

    def flush(self) -> None:
        self.calls.append("flush")
        if self.flush_error is not None:
            raise self.flush_error
        self.inner.flush()

    def close(self) -> None:
        self.calls.append("close")
        self.inner.close()
        if self.close_error is not None:
            raise self.close_error


def configs(tmp_path: Path, names: str) -> list[ExportConfig]:
    result = []
    for name in names:
        image = tmp_path / f"{name}.raw"
        image.write_bytes(bytes(1 << 20))
        result.append(ExportConfig(name=name, path=image, format="raw"))
    return result


def opened(export_configs: list[ExportConfig]) -> list[Export]:
    metrics = Metrics()
    return [open_export(config, metrics.for_export(config.name)) for config in export_configs]


def assert_released(export_configs: list[ExportConfig]) -> None:
    """Each image can be opened (and locked) again: its descriptors were really closed."""
    for export in opened(export_configs):
        export.close()


def test_close_all_closes_every_export_past_one_that_raises(tmp_path: Path) -> None:
    export_configs = configs(tmp_path, "abc")
    exports = opened(export_configs)
    exports[0].device = Failing(exports[0].device, close=OSError(errno.EIO, "I/O error"))  # type: ignore[assignment]
    failures = ExportRegistry(exports).close_all()
    assert [(f.export, f.step) for f in failures] == [("a", "close")]
    assert all(export.closed for export in exports)
    assert_released(export_configs)


async def test_shutdown_flushes_and_closes_every_export_past_failures(tmp_path: Path) -> None:
    export_configs = configs(tmp_path, "abc")
    server = Server(Config(ServerConfig(listen=()), tuple(export_configs)))
    server.log = Recorder()
    exports = opened(export_configs)
    full = Failing(exports[0].device, flush=OSError(errno.ENOSPC, "No space left on device"))
    corrupt = Failing(exports[1].device, close=NbdguardError("qcow2: refcount block overlaps L1"))
    healthy = Failing(exports[2].device)
    for export, device in zip(exports, (full, corrupt, healthy), strict=True):
        export.device = device  # type: ignore[assignment]
    server.registry = ExportRegistry(exports)

    with pytest.raises(CloseFailed) as raised:
        await server.shutdown()

    assert [(f.export, f.step) for f in raised.value.failures] == [("a", "flush"), ("b", "close")]
    assert full.calls == ["flush", "close"]  # a failed flush does not skip the close
    assert corrupt.calls == healthy.calls == ["flush", "close"]
    assert all(export.closed for export in exports)
    assert_released(export_configs)
    failed = server.log.named("export.close_failed")
    assert failed == [
        {
            "export": "a",
            "step": "flush",
            "error": "[Errno 28] No space left on device",
            "errno": "ENOSPC",
            "error_type": "OSError",
        },
        {
            "export": "b",
            "step": "close",
            "error": "qcow2: refcount block overlaps L1",
            "errno": None,
            "error_type": "NbdguardError",
        },
    ]
    assert server.log.named("server.stopped") == [{"failed_exports": ["a", "b"]}]


async def test_a_clean_shutdown_raises_nothing(tmp_path: Path) -> None:
    export_configs = configs(tmp_path, "ab")
    server = Server(Config(ServerConfig(listen=()), tuple(export_configs)))
    server.log = Recorder()
    server.registry = ExportRegistry(opened(export_configs))
    await server.shutdown()
    assert server.log.named("export.close_failed") == []
    assert server.log.named("server.stopped") == [{"failed_exports": []}]
    assert_released(export_configs)


async def test_failed_start_closes_every_opened_export_and_reports_close_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that fails after the exports opened (nothing to listen on) closes them all,
    logs a close that fails, and still raises the reason the start failed."""
    export_configs = configs(tmp_path, "ab")
    server = Server(Config(ServerConfig(listen=()), tuple(export_configs)))
    server.log = Recorder()
    exports = opened(export_configs)
    exports[0].device = Failing(exports[0].device, close=OSError(errno.EIO, "I/O error"))  # type: ignore[assignment]
    monkeypatch.setattr(server, "_open_exports", lambda: exports)
    with pytest.raises(NbdguardError, match="nothing to listen on"):
        await server.start()
    assert all(export.closed for export in exports)
    [failed] = server.log.named("export.close_failed")
    assert failed["export"] == "a" and failed["errno"] == "EIO"
    assert_released(export_configs)


def serve_args(tmp_path: Path) -> argparse.Namespace:
    (tmp_path / "a.raw").write_bytes(bytes(4096))
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\nlisten = []\nlog_format = "json"\n'
        '[[exports]]\nname = "a"\npath = "a.raw"\nformat = "raw"\n'
    )
    return cli.build_parser().parse_args(["serve", "--config", str(config)])


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (CloseFailed([]), cli.EXIT_CLOSE_FAILED),
        (ExportOpenError("locked"), cli.EXIT_FAILED),
        (None, cli.EXIT_OK),
    ],
)
def test_serve_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception | None, status: int
) -> None:
    async def run(config: Config) -> None:
        if error is not None:
            raise error

    monkeypatch.setattr(cli, "_run", run)
    assert cli._serve(serve_args(tmp_path)) == status
    assert cli.EXIT_CLOSE_FAILED not in (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_CONFIG, 3)
