"""keep_freed_buffers: glibc takes both thresholds (mallopt answers 0 to a value it
refuses; the effect itself is measured by bench/compare.py --image qcow2-allocated)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


def test_glibc_accepts_the_thresholds() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the tuning is for glibc")
    code = "from nbdguard.server.malloc import keep_freed_buffers; print(keep_freed_buffers())"
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    assert result.stdout.strip() == "True"
