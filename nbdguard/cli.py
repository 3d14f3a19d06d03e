"""Command line: `nbdguard serve`, `check-config`, `inspect`, `pin`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from nbdguard.config import (
    DEFAULT_MAX_CHAIN_DEPTH,
    FORMATS,
    Config,
    ConfigError,
    ExportConfig,
    ServerConfig,
    load_config,
    parse_listen_address,
    with_overrides,
)
from nbdguard.errors import NbdguardError
from nbdguard.inspection import inspect_chain, pin_stanza
from nbdguard.observability.logging import configure_logging, get_logger
from nbdguard.server.app import Server
from nbdguard.server.exports import CloseFailed
from nbdguard.server.malloc import keep_freed_buffers
from nbdguard.storage.stack import build_device

SCRATCH_SIZE = 1 << 30

# Exit statuses of `serve` (README, "Exit statuses"); 3 is app.EXIT_FORCED.
EXIT_OK = 0
EXIT_FAILED = 1  # could not start (or a fatal error while serving)
EXIT_CONFIG = 2  # the config file is invalid
EXIT_CLOSE_FAILED = 4  # stopped, but an export failed to flush or close (see the log)
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
        return EXIT_CONFIG
    configure_logging(args.log_format or config.server.log_format, config.server.log_level)
    log = get_logger()
    if config.source is None:
        log.warning(
            "server.scratch_mode",
            message="no --config given: serving a scratch raw export",
            path=str(config.exports[0].path),
            listen=[str(address) for address in config.server.listen],
        )
    keep_freed_buffers()
    try:
        uvloop.run(_run(config))
    except CloseFailed:
        return EXIT_CLOSE_FAILED  # each failure was logged as export.close_failed
    except NbdguardError as err:
        log.error("server.failed", error=str(err))
        return EXIT_FAILED
    return EXIT_OK


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


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_chain(
        Path(args.path),
        args.format,
        allow_dirs=tuple(Path(d) for d in args.allow_dir),
        max_chain_depth=args.max_chain_depth,
    )
    print(report.as_json() if args.json else report.as_text())
    return 1 if report.refused is not None else 0


def _pin(args: argparse.Namespace) -> int:
    path = Path(args.path)
    report = inspect_chain(
        path,
        args.format,
        allow_dirs=tuple(Path(d) for d in args.allow_dir),
        max_chain_depth=args.max_chain_depth,
    )
    if report.refused is not None:
        print(f"nbdguard: {report.refused}", file=sys.stderr)
        return 1
    print(pin_stanza(report, args.name or path.stem, path), end="")
    return 0


def _add_chain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the image (the top of the chain)")
    parser.add_argument("--format", "-f", required=True, choices=FORMATS, help="its format")
    parser.add_argument(
        "--allow-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory backing files may live in besides the image's own; repeatable",
    )
    parser.add_argument("--max-chain-depth", type=int, default=DEFAULT_MAX_CHAIN_DEPTH)


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
    inspect = commands.add_parser(
        "inspect", help="show a chain as nbdguard would open it (nothing is served or locked)"
    )
    _add_chain_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_inspect)
    pin = commands.add_parser("pin", help="print the [[exports]] stanza pinning a whole chain")
    _add_chain_arguments(pin)
    pin.add_argument("--name", help="the export name (default: the image's file name stem)")
    pin.set_defaults(func=_pin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
