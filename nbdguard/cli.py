"""Command line: `nbdguard serve`, `nbdguard check-config`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from nbdguard.config import (
    Config,
    ConfigError,
    ExportConfig,
    ServerConfig,
    load_config,
    parse_listen_address,
    with_overrides,
)
from nbdguard.errors import NbdguardError
from nbdguard.observability.logging import configure_logging, get_logger
from nbdguard.server.app import Server
from nbdguard.storage.stack import build_device

SCRATCH_SIZE = 1 << 30
DEFAULT_TCP = "tcp://127.0.0.1:10809"


def state_dir() -> Path:
    """Where `serve` without a config keeps its scratch image and socket."""
    explicit = os.environ.get("NBDGUARD_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nbdguard"


def scratch_config() -> Config:
    """A first-run config: one sparse 1 GiB raw export named "scratch"."""
    directory = state_dir().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "scratch.raw"
    if not image.exists():
        with open(image, "wb") as handle:
            handle.truncate(SCRATCH_SIZE)
    listen = (
        parse_listen_address(DEFAULT_TCP, directory),
        parse_listen_address(f"unix://{directory / 'nbd.sock'}", directory),
    )
    export = ExportConfig(
        name="scratch", path=image, format="raw", description="nbdguard scratch disk"
    )
    return Config(server=ServerConfig(listen=listen), exports=(export,), source=None)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(Path(args.config)) if args.config else scratch_config()
        config = with_overrides(config, listen=args.listen, metrics_listen=args.metrics_listen)
    except ConfigError as err:
        print(f"nbdguard: {err}", file=sys.stderr)
        return 2
    configure_logging(args.log_format or config.server.log_format, config.server.log_level)
    log = get_logger()
    if config.source is None:
        log.warning(
            "server.scratch_mode",
            message="no --config given: serving a scratch raw export",
            path=str(config.exports[0].path),
            listen=[str(address) for address in config.server.listen],
        )
    try:
        uvloop.run(_run(config))
    except NbdguardError as err:
        log.error("server.failed", error=str(err))
        return 1
    return 0


async def _run(config: Config) -> None:
    server = Server(config)
    await server.start()
    await server.serve()


def _check_config(args: argparse.Namespace) -> int:
    """Validate the file and open every export exactly as `serve` would, then close."""
    try:
        config = load_config(Path(args.file))
    except ConfigError as err:
        print(f"nbdguard: {err}", file=sys.stderr)
        return 2
    failures = 0
    for export in config.exports:
        try:
            build_device(export).close()
        except NbdguardError as err:
            print(f"nbdguard: {err}", file=sys.stderr)
            failures += 1
    if failures:
        return 1
    print(f"{args.file}: OK ({len(config.exports)} export(s))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdguard", description="NBD server for disk images whose formats are pinned."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the exports of a config file")
    serve.add_argument("--config", "-c", help="TOML config (default: a scratch raw export)")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="tcp://HOST:PORT or unix:///PATH; repeatable; replaces the config's list",
    )
    serve.add_argument("--metrics-listen", metavar="HOST:PORT", help="Prometheus endpoint")
    serve.add_argument("--log-format", choices=("json", "console", "auto"))
    serve.set_defaults(func=_serve)
    check = commands.add_parser("check-config", help="validate a config and open its exports")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
