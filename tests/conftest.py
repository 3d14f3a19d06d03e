"""Shared pytest options: `--runslow` enables the long soak/fuzz runs marked `slow` and
scales up the example counts of fuzzers that always run a bounded amount in CI."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run long soak and fuzz tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long-running: use --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def runslow(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--runslow"))
