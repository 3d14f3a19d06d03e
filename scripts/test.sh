#!/usr/bin/env bash
# The project's checks: lint, format, types, then the whole test suite (real clients included).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check nbdguard tests bench
.venv/bin/ruff format --check nbdguard tests bench
.venv/bin/mypy --strict nbdguard
exec .venv/bin/python -m pytest -q "$@"
