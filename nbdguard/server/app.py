"""The server's lifecycle in named phases: start (open exports, listen), serve,
shut down (stop accepting, ESHUTDOWN new requests, drain, flush, close)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from dataclasses import replace
from typing import Any

from nbdguard.config import Config, ConfigError, ExportConfig, load_config
from nbdguard.errors import ChainRefused, ExportOpenError, NbdguardError
from nbdguard.observability.http import OperatorEndpoint
from nbdguard.observability.logging import get_logger
from nbdguard.observability.metrics import Metrics
from nbdguard.protocol.handshake import HandshakeLimits
from nbdguard.server import listeners, notify
from nbdguard.server.admission import Admission
from nbdguard.server.budget import MemoryBudget
from nbdguard.server.connection import Connection, ConnectionSettings
from nbdguard.server.exports import (
    CloseFailed,
    CloseFailure,
    Export,
    ExportRegistry,
    open_export,
)
from nbdguard.server.tls import server_context

SHUTDOWN_GRACE = 30.0
EXIT_FORCED = 3  # a second SIGINT/SIGTERM during the drain


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log: Any = get_logger()
        self.registry = ExportRegistry()
        self.handshake_limits = HandshakeLimits(
            max_options=config.server.max_options,
            max_option_length=config.server.max_option_length,
        )
        self.tls_context = server_context(config.server.tls)
        self.connection_settings = ConnectionSettings.from_config(config.server)
        self.budget = MemoryBudget(
            config.server.memory_budget,
            config.server.max_buffered_bytes_per_connection,
            config.server.max_connections,
        )
        self.max_connections = config.server.max_connections
        self.connections: set[Connection] = set()
        self.admission = Admission(
            config.server.max_connections,
            config.server.max_connections_per_client,
            config.server.evict_idle_after,
        )
        self._listeners: list[asyncio.Server] = []
        self._socket_files: list[listeners.SocketFile] = []  # ours to remove at close
        self._stop = asyncio.Event()
        self.metrics = Metrics()
        self._endpoint: OperatorEndpoint | None = None
        self._stopping = False
        self._reloading: asyncio.Future[None] | None = None
        self._reload_again = False

    async def start(self) -> None:
        """Open every export, then every listener; any failure undoes what was done.

        Signal handlers go in first: a SIGTERM that arrives as soon as a listener accepts
        must still mean a graceful stop, not the default kill.
        """
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        try:
            self.registry = ExportRegistry(self._open_exports())
            self._start_metrics()
            for address in self.config.server.listen:
                listener = await listeners.listen(
                    address, self._factory(str(address)), socket_mode=self.config.server.socket_mode
                )
                if listener.socket_file is not None:
                    self._socket_files.append(listener.socket_file)
                self._add_listener(listener.server)
            for sock in listeners.inherited_sockets():
                server = await listeners.listen_on(sock, self._factory("systemd"))
                self._add_listener(server, activated=True)
            if not self._listeners:
                raise NbdguardError(
                    "nothing to listen on: [server] listen is empty and no sockets were passed "
                    "by socket activation (LISTEN_FDS)"
                )
        except BaseException:
            self._remove_signal_handlers()
            await self._close_listeners()
            self._report_close_failures(self.registry.close_all())
            raise
        notify.ready(f"serving {len(self.registry.exports)} export(s)")

    def _add_listener(self, server: asyncio.Server, *, activated: bool = False) -> None:
        self._listeners.append(server)
        addresses = listeners.bound_addresses(server)
        self.log.info("server.listening", address=addresses, socket_activated=activated)

    def _open_exports(self) -> list[Export]:
        """Open what can be opened; a refused export is logged, counted and reported by
        /healthz, while the others are served. With nothing to serve, fail."""
        opened: list[Export] = []
        try:
            for export_config in self.config.exports:
                export = self._open_export(export_config)
                if export is not None:
                    opened.append(export)
        except BaseException:
            for export in opened:
                export.close()
            raise
        if not opened:
            raise NbdguardError("no export could be opened")
        return opened

    def _open_export(self, export_config: ExportConfig) -> Export | None:
        metrics = self.metrics.for_export(
            export_config.name, per_request=self.config.server.request_metrics
        )
        try:
            export = open_export(export_config, metrics)
        except ExportOpenError as err:
            self._report_refusal(export_config, err)
            return None
        metrics.opened(
            size=export.info.size,
            fmt=export_config.format,
            read_only=export_config.read_only,
            header_guard=export_config.header_guard,
        )
        self.log.info(
            "export.opened",
            export=export.name,
            path=str(export_config.path),
            format=export_config.format,
            size=export.info.size,
            read_only=export_config.read_only,
        )
        return export

    def _report_refusal(self, export_config: ExportConfig, err: ExportOpenError) -> None:
        name = export_config.name
        self.metrics.export_up.labels(export=name).set(0)
        if isinstance(err, ChainRefused):
            self.metrics.chain_refused.labels(export=name, reason=err.reason).inc()
            self.log.error(
                "chain.refused",
                export=name,
                layer=err.layer,
                path=err.path,
                reason=err.reason,
                detail=err.detail,
                message=str(err),
            )
            return
        self.log.error(
            "export.refused",
            export=name,
            path=str(export_config.path),
            reason=err.reason,
            message=str(err),
        )

    def _start_metrics(self) -> None:
        endpoint = self.config.server.metrics_listen
        if endpoint is None:
            return
        host, port = endpoint
        try:
            self._endpoint = OperatorEndpoint(host, port, self.metrics, self.health)
        except OSError as err:
            raise NbdguardError(f"cannot serve metrics on {host}:{port}: {err.strerror}") from err
        limits = self._endpoint.limits
        self.log.info(
            "metrics.listening",
            address=f"{host}:{self._endpoint.port}",
            max_connections=limits.max_connections,
            request_timeout=limits.request_timeout,
        )

    def health(self) -> tuple[bool, str]:
        """Healthy when every configured export is open and every listener accepts.

        Called from the HTTP endpoint's thread: it only reads state.
        """
        if self._stopping:
            return False, "stopping"
        missing = [e.name for e in self.config.exports if self.registry.get(e.name) is None]
        if missing:
            return False, f"exports not open: {', '.join(repr(name) for name in missing)}"
        if len(self._listeners) < len(self.config.server.listen) or not self._listeners:
            return False, "listeners are not open yet"
        idle = [
            addr
            for server in self._listeners
            if not server.is_serving()
            for addr in listeners.bound_addresses(server)
        ]
        if idle:
            return False, f"listeners not accepting: {', '.join(idle)}"
        return True, "ok"

    def _factory(self, listener: str) -> Any:
        return lambda: Connection(self, listener, self.connection_settings)

    async def serve(self) -> None:
        """Serve until SIGINT/SIGTERM, then shut down gracefully (a second signal forces
        an exit)."""
        try:
            await self._stop.wait()
            await self.shutdown()
        finally:
            self._remove_signal_handlers()

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            # A second signal: the operator will not wait for the drain.
            self.log.warning("server.forced_exit", signal=name)
            os._exit(EXIT_FORCED)
        self.log.info("server.stopping", signal=name)
        self._stop.set()

    # -- reload ----------------------------------------------------------------------

    def _on_hangup(self) -> None:
        """SIGHUP: reload in a task (exports open in a worker thread: a `check_on_open =
        "full"` image can take seconds, and the loop serves everyone meanwhile). A SIGHUP
        during a reload runs one more reload after it."""
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reload_again = False
        self._reloading = asyncio.ensure_future(self._reload_until_current())

    async def _reload_until_current(self) -> None:
        while True:
            notify.reloading()
            try:
                await self.reload_off_loop()
            except Exception as err:  # a bug here must not end the server
                self.log.error("config.reload_failed", error=repr(err))
            finally:  # systemd shows "reloading" until READY=1 comes back
                notify.ready(f"serving {len(self.registry.exports)} export(s)")
            if not self._reload_again or self._stopping:
                return
            self._reload_again = False

    def reload(self) -> None:
        """Reload with exports opened on the calling thread (see reload_off_loop)."""
        fresh = self._read_config()
        if fresh is not None:
            self._apply_exports(fresh.exports, self._open_new(fresh.exports))

    async def reload_off_loop(self) -> None:
        """SIGHUP: re-read the config file. New exports open, removed ones stop taking
        connections (and close when their last one ends), unchanged ones are untouched, and
        an export that was refused is tried again. Access keys and read_only of an open export
        apply to its new connections at once; other changes wait for it to be reopened. An
        invalid file changes nothing."""
        fresh = self._read_config()
        if fresh is None:
            return
        opened = await asyncio.to_thread(self._open_new, fresh.exports)
        if self._stopping:  # shut down meanwhile: what was opened is not served
            for export in opened.values():
                if export is not None:
                    export.close()
            return
        self._apply_exports(fresh.exports, opened)

    def _read_config(self) -> Config | None:
        source = self.config.source
        if source is None:
            self.log.warning("config.reload_skipped", reason="serving without a config file")
            return None
        try:
            fresh = load_config(source)
        except ConfigError as err:
            self.log.error("config.reload_failed", path=str(source), problems=list(err.problems))
            return None
        ours = replace(
            self.config.server,
            listen=fresh.server.listen,  # command-line overrides are not changes
            metrics_listen=fresh.server.metrics_listen,
        )
        if fresh.server != ours:
            self.log.warning(
                "config.server_changed", message="[server] changes take effect at restart"
            )
        return fresh

    def _open_new(self, wanted: tuple[ExportConfig, ...]) -> dict[str, Export | None]:
        """Open the wanted exports that are not served (new, or refused before): None for
        one that is refused again (reported by _open_export)."""
        return {
            config.name: self._open_export(config)
            for config in wanted
            if self.registry.get(config.name) is None
        }

    def _apply_exports(
        self, wanted: tuple[ExportConfig, ...], opened: dict[str, Export | None]
    ) -> None:
        current = {export.name: export for export in self.config.exports}
        names = {export.name for export in wanted}
        kept: list[ExportConfig] = []
        report: dict[str, list[str]] = {"added": [], "removed": [], "kept": [], "changed": []}
        for name in current.keys() - names:
            retired = self.registry.retire(name)
            if retired is not None:
                retired.metrics.closed()
            report["removed"].append(name)
        for export_config in wanted:
            old = current.get(export_config.name)
            served = self.registry.get(export_config.name)
            if old is not None and old != export_config and served is not None:
                applied = served.reconfigure(export_config)
                if applied is None:
                    report["changed"].append(old.name)  # reopening would cut its clients off
                    kept.append(old)
                    continue
                self._access_changed(served, applied)
            kept.append(export_config)
            if self.registry.get(export_config.name) is not None:
                report["kept"].append(export_config.name)
                continue
            export = opened.pop(export_config.name, None)
            if export is not None:
                self.registry.add(export)
                report["added"].append(export_config.name)
        for unused in opened.values():  # opened, but served meanwhile under its old definition
            if unused is not None:
                unused.close()
        self.config = replace(self.config, exports=tuple(kept))
        if report["changed"]:
            self.log.warning(
                "config.export_changed",
                exports=report["changed"],
                message="a changed export keeps its old definition while it is served: "
                "remove it and reload, then add it back and reload",
            )
        self.log.info("config.reloaded", **{k: sorted(v) for k, v in report.items()})

    def _access_changed(self, export: Export, keys: list[str]) -> None:
        self.log.info(
            "config.access_changed",
            export=export.name,
            keys=keys,
            message="applies to new connections; open ones keep what they negotiated",
        )

    async def shutdown(self) -> None:
        """Stop accepting, drain, then flush and close every export, even past one that
        fails (ENOSPC or EIO on a qcow2 table, say): each failure is logged with its export
        and step, and CloseFailed is raised at the very end so the exit status says so."""
        self._stopping = True
        notify.stopping()
        for server in self._listeners:
            server.close()
        connections = list(self.connections)
        for connection in connections:
            connection.begin_shutdown()
        waits = [connection.closed for connection in connections]
        if waits:
            await asyncio.wait(waits, timeout=SHUTDOWN_GRACE)
            for connection in connections:
                if connection.transport is not None and not connection.closed.done():
                    connection.transport.abort()
        failures: list[CloseFailure] = []
        for export in self.registry.exports.values():
            try:
                await asyncio.to_thread(export.device.flush)
            except Exception as err:  # logged below; the others still close
                failures.append(CloseFailure(export.name, "flush", err))
        await self._close_listeners()
        for export in self.registry.exports.values():
            export.metrics.closed()
        failures += self.registry.close_all()
        self._report_close_failures(failures)
        if self._endpoint is not None:
            self._endpoint.close()
        self.log.info("server.stopped", failed_exports=sorted({f.export for f in failures}))
        if failures:
            raise CloseFailed(failures)

    def _report_close_failures(self, failures: list[CloseFailure]) -> None:
        for failure in failures:
            err = failure.error
            self.log.error(
                "export.close_failed",
                export=failure.export,
                step=failure.step,
                error=str(err),
                errno=errno.errorcode.get(err.errno, err.errno)
                if isinstance(err, OSError) and err.errno is not None
                else None,
                error_type=type(err).__name__,
            )

    async def _close_listeners(self) -> None:
        for server in self._listeners:
            server.close()
        for server in self._listeners:
            # uvloop's wait_closed also waits for the server's connections: bound it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        self._listeners.clear()
        for socket_file in self._socket_files:
            if not listeners.remove_socket_file(socket_file) and os.path.lexists(socket_file.path):
                self.log.warning(
                    "server.socket_kept",
                    path=socket_file.path,
                    message="the path now names another socket: left in place",
                )
        self._socket_files.clear()
