"""Command line: `nbdguard serve`, `check-config`, `inspect`, `pin`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import structlog
import uvloop

from nbdguard import __version__
from nbdguard.captive import run_captive, server_address
from nbdguard.config import (
    DEFAULT_MAX_CHAIN_DEPTH,
    FORMATS,
    MAX_STRING_BYTES,
    Config,
    ConfigError,
    ExportConfig,
    ServerConfig,
    load_config,
    parse_listen_address,
    with_overrides,
)
from nbdguard.errors import ExportOpenError, NbdguardError
from nbdguard.guard.datafile import DataFileGuard
from nbdguard.guard.sector0 import Sector0Guard
from nbdguard.inspection import existing_header_advice, inspect_chain, pin_stanza
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


QUICK_OPTIONS = ("format", "read_only", "name", "allow_dir")


def quick_config(args: argparse.Namespace, listen_dir: Path | None) -> Config:
    """`serve --format F IMAGE`: one export, no config file. The format is still stated by
    the operator, never probed. `listen_dir`: --run's private directory for its socket."""
    if args.format is None:
        raise ConfigError(
            f"--format is required with an image: one of {', '.join(FORMATS)} "
            "(nbdguard never guesses a format)"
        )
    if args.allow_dir and args.format != "qcow2":
        raise ConfigError("--allow-dir applies to qcow2 images only (a raw image has no chain)")
    if len(args.name.encode("utf-8", "surrogateescape")) > MAX_STRING_BYTES:
        raise ConfigError(f"--name must be at most {MAX_STRING_BYTES} bytes of UTF-8")
    export = ExportConfig(
        name=args.name,
        path=Path.cwd() / args.image,
        format=args.format,
        read_only=args.read_only,
        allow_dirs=tuple(Path.cwd() / d for d in args.allow_dir),
    )
    where = DEFAULT_TCP if listen_dir is None else f"unix://{listen_dir / 'nbd.sock'}"
    listen = (parse_listen_address(where, Path.cwd()),)
    return Config(server=ServerConfig(listen=listen), exports=(export,), source=None)


def _serve_config(args: argparse.Namespace, listen_dir: Path | None) -> Config:
    if args.image is not None:
        if args.config:
            raise ConfigError("give either --config FILE or an IMAGE to serve, not both")
        config = quick_config(args, None if args.listen else listen_dir)
    else:
        given = [f"--{o.replace('_', '-')}" for o in QUICK_OPTIONS if getattr(args, o)]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with an IMAGE to serve")
        config = load_config(Path(args.config)) if args.config else scratch_config()
    return with_overrides(config, listen=args.listen, metrics_listen=args.metrics_listen)


def _serve(args: argparse.Namespace) -> int:
    listen_dir = Path(tempfile.mkdtemp(prefix="nbdguard-run-")) if args.run is not None else None
    try:
        return _serve_in(args, listen_dir)
    finally:
        if listen_dir is not None:
            shutil.rmtree(listen_dir, ignore_errors=True)


def _serve_in(args: argparse.Namespace, listen_dir: Path | None) -> int:
    try:
        config = _serve_config(args, listen_dir)
    except ConfigError as err:
        print(f"nbdguard: {err}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(args.log_format or config.server.log_format, config.server.log_level)
    if config.source is not None:
        # Every line names the file, so an export refused at open points at its config.
        structlog.contextvars.bind_contextvars(config=str(config.source))
    log = get_logger()
    if config.source is None and args.image is None:
        log.warning(
            "server.scratch_mode",
            message="no --config given: serving a scratch raw export",
            path=str(config.exports[0].path),
            listen=[str(address) for address in config.server.listen],
        )
    keep_freed_buffers()
    try:
        if args.print_uri or args.run is not None:
            status: int = uvloop.run(_run_telling(config, args.print_uri, args.run))
            return status
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


async def _run_telling(config: Config, print_uri: bool, command: str | None) -> int:
    """Serve, printing the URI clients should use and/or running `command` against it."""
    if not config.server.listen:
        # Socket activation only: the address is systemd's, not ours to tell.
        raise NbdguardError("--print-uri and --run need a listen address (--listen)")
    server = Server(config)
    await server.start()
    address = server_address(server, config.exports[0].name)
    if print_uri:
        print(address.uri, flush=True)
    if command is None:
        await server.serve()
        return EXIT_OK
    return await run_captive(server, command, address)


def _check_config(args: argparse.Namespace) -> int:
    """Validate the file and open every export exactly as `serve` would, then close. Every
    message names the file, so a wrapper's log says which config was wrong."""
    try:
        config = load_config(Path(args.file))
    except ConfigError as err:
        print(f"nbdguard: {err}", file=sys.stderr)
        return EXIT_CONFIG
    failures = 0
    for index, export in enumerate(config.exports):
        problem = _check_export(export)
        if problem is not None:
            print(f"nbdguard: {args.file}: exports[{index}]: {problem}", file=sys.stderr)
            failures += 1
    if failures:
        return EXIT_FAILED
    print(f"{args.file}: OK ({len(config.exports)} export(s))")
    return EXIT_OK


def _check_export(export: ExportConfig) -> str | None:
    """Open as `serve` does, except that an existing header is looked at here, so the
    message can say what was found and what to change."""
    try:
        device = build_device(replace(export, on_existing_header="warn"))
    except NbdguardError as err:
        return str(err)
    try:
        found = device.existing_header() if isinstance(device, Sector0Guard) else None
    finally:
        device.close()
    if found is None:
        return None
    where = str(device.data_file.path) if isinstance(device, DataFileGuard) else str(export.path)
    if export.on_existing_header == "warn":
        print(
            f"nbdguard: warning: export {export.name!r}: sector 0 of {where} holds a {found} "
            'header; served anyway (on_existing_header = "warn")',
            file=sys.stderr,
        )
        return None
    return str(
        ExportOpenError(
            f"export {export.name!r}: sector 0 of {where} already holds a {found} header, "
            f"so serve would refuse it; {_existing_header_fix(export, found)}",
            reason="existing_header",
        )
    )


def _existing_header_fix(export: ExportConfig, found: str) -> str:
    warn = 'set on_existing_header = "warn" to serve it as it is'
    if export.format == "qcow2":
        return f"if the guest wrote this header, {warn}"
    if found == "qcow2":
        return f'if this is a qcow2 image, set format = "qcow2"; if the guest wrote it, {warn}'
    return (
        f"if this is a {found} image, convert it (qemu-img convert -f {found} -O qcow2); "
        f"if the guest wrote it, {warn}"
    )


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_chain(
        Path(args.path),
        args.format,
        allow_dirs=tuple(Path(d) for d in args.allow_dir),
        max_chain_depth=args.max_chain_depth,
    )
    print(report.as_json() if args.json else report.as_text())
    return EXIT_OK if report.servable else EXIT_FAILED


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
    if report.existing_header is not None:
        advice = existing_header_advice(report.existing_header)
        print(f"nbdguard: {path}: {advice}", file=sys.stderr)
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
    parser.add_argument("--version", action="version", version=f"nbdguard {__version__}")
    serve = commands.add_parser(
        "serve", help="serve the exports of a config file, or one image (--format F IMAGE)"
    )
    serve.add_argument("--config", "-c", help="TOML config (default: a scratch raw export)")
    serve.add_argument("image", nargs="?", metavar="IMAGE", help="serve this image alone")
    serve.add_argument("--format", "-f", choices=FORMATS, help="the IMAGE's format (required)")
    serve.add_argument("--read-only", "-r", action="store_true", help="serve IMAGE read-only")
    serve.add_argument("--name", "-n", default="", help='the export name (default: "")')
    serve.add_argument(
        "--allow-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="qcow2 IMAGE: a directory backing and data files may live in; repeatable",
    )
    serve.add_argument(
        "--print-uri", action="store_true", help="print the URI clients should use, once serving"
    )
    serve.add_argument(
        "--run",
        metavar="CMD",
        help="run CMD (/bin/sh, with $uri and $unixsocket) while serving; stop when it exits "
        "and exit with its status",
    )
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
