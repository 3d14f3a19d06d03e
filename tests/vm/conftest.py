"""The VM suite: a `vm` marker, the guest image built once per session, and the suite's
total duration printed at the end of every run (its budget is ~3 minutes on 2 cores)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.vm.harness import GuestImage, guest_image

TOOLS = ("qemu-system-x86_64", "busybox", "socat", "nbd-client", "mke2fs", "e2fsck", "debugfs")
_durations: dict[str, float] = {}
_booting: set[str] = set()  # node ids of the tests marked `vm`


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots a Linux kernel in QEMU against nbdguard")


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    """The cached kernel and initramfs. Missing tools skip outside CI; in CI (CI=true, where
    scripts/install.sh installed them) they fail, as does a failed download: never silent."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None and not _sbin(tool)]
    if missing:
        message = f"VM tests need: {', '.join(missing)} (scripts/install.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return guest_image()


def _sbin(tool: str) -> bool:
    return any(os.access(f"{d}/{tool}", os.X_OK) for d in ("/usr/sbin", "/sbin"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _booting.update(item.nodeid for item in items if item.get_closest_marker("vm"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid in _booting:
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _durations:
        total = sum(_durations.values())
        terminalreporter.write_line(f"VM suite: {len(_durations)} tests in {total:.1f} s")
