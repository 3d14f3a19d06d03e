"""Build an export's layer stack from its config: pinned chain, format drivers, guard."""

from __future__ import annotations

from typing import Any

from nbdguard.config import DEFAULT_METADATA_CACHE, CheckOnOpen, ExportConfig
from nbdguard.errors import ChainRefused, ExportOpenError, Qcow2Corrupt
from nbdguard.guard.datafile import DataFileGuard, GuardedDataFile
from nbdguard.guard.sector0 import GuardPolicy, Sector0Guard
from nbdguard.observability.reporter import ExportReporter
from nbdguard.storage.chain import Chain, ChainLayer, resolve_chain
from nbdguard.storage.device import BlockDevice
from nbdguard.storage.locks import SectorLock
from nbdguard.storage.qcow2.check import check_image
from nbdguard.storage.qcow2.hostfile import HostFile
from nbdguard.storage.qcow2.image import Qcow2Image
from nbdguard.storage.raw import RawImage


def build_device(config: ExportConfig, reporter: ExportReporter | None = None) -> BlockDevice:
    """Open the export's stack; refuse (ExportOpenError) anything that is not safe to serve.
    Layers report what they find through `reporter` (none: logged without metrics)."""
    reporter = reporter or ExportReporter(config.name)
    policy = (
        None
        if config.header_guard == "off"
        else GuardPolicy(config.header_guard, config.allow_headers)
    )
    chain = resolve_chain(config)
    try:
        device = chain_device(
            chain,
            reporter,
            policy,
            metadata_cache=config.metadata_cache,
            check_on_open=config.check_on_open,
        )
    except BaseException:
        chain.close()
        raise
    top = chain.layers[0]
    if policy is None or (config.format != "raw" and top.data_file is None):
        return device
    return _guarded(config, policy, device, top, reporter)


def chain_device(
    chain: Chain,
    reporter: ExportReporter | None = None,
    policy: GuardPolicy | None = None,
    *,
    metadata_cache: int = DEFAULT_METADATA_CACHE,
    check_on_open: CheckOnOpen = "light",
) -> BlockDevice:
    """Format drivers stacked bottom-up over the chain's open files. With a `policy`, the
    top layer's external data file is written through the sector-zero backstop. The
    export's `metadata_cache` is shared evenly by its qcow2 layers; with
    check_on_open = "full", every qcow2 layer is checked whole first (`full_check`)."""
    reporter = reporter or ExportReporter(chain.export)
    share = metadata_cache // max(1, sum(layer.format == "qcow2" for layer in chain.layers))
    device: BlockDevice | None = None
    for layer in reversed(chain.layers):
        if layer.format == "raw":
            device = RawImage(layer.file)
        else:
            if check_on_open == "full":
                full_check(chain, layer, reporter)
            guard = policy if layer.index == 0 else None
            device = _qcow2(chain, layer, device, reporter, guard, metadata_cache=share)
    assert device is not None
    return device


def full_check(chain: Chain, layer: ChainLayer, reporter: ExportReporter) -> None:
    """qemu-img check's reference walk over one qcow2 layer before it is served: leaks are
    logged, anything else refuses the layer (reason=corrupt) naming the first findings."""
    assert layer.header is not None

    def progress(state: dict[str, object]) -> None:
        reporter.log.info("qcow2.check_progress", layer=layer.index, **state)

    report = check_image(layer.header, HostFile(layer.file), progress=progress)
    reporter.log.info(
        "qcow2.check_done",
        layer=layer.index,
        path=str(layer.file.path),
        seconds=round(report.seconds, 3),
        leaks=report.leaks,
        corruptions=report.corruptions,
        errors=report.errors,
        findings=[str(finding) for finding in (report.errors_kept + report.notes_kept)[:10]],
    )
    if report.errors:
        raise ChainRefused(
            chain.export,
            layer.index,
            str(layer.file.path),
            "corrupt",
            f'check_on_open = "full" found {report.summary()}',
        )


def _qcow2(
    chain: Chain,
    layer: ChainLayer,
    backing: BlockDevice | None,
    reporter: ExportReporter,
    policy: GuardPolicy | None,
    *,
    metadata_cache: int,
) -> Qcow2Image:
    assert layer.header is not None
    host = HostFile(layer.file)
    data: HostFile | None = None
    if layer.data_file is not None:
        writable = not layer.data_file.read_only
        data = (
            GuardedDataFile(layer.data_file, policy, reporter.header_write_blocked)
            if policy is not None and writable
            else HostFile(layer.data_file)
        )

    def on_corrupt(err: Qcow2Corrupt) -> None:
        reporter.qcow2_corrupt(
            kind=err.kind,
            detail=err.detail,
            guest_offset=err.guest_offset,
            host_offset=err.host_offset,
        )

    try:
        return Qcow2Image(
            layer.header,
            host,
            data,
            backing,
            on_close=layer.close,
            on_corrupt=on_corrupt,
            metadata_cache=metadata_cache,
        )
    except OSError as err:
        host.close()
        if data is not None:
            data.close()
        raise ChainRefused(
            chain.export, layer.index, str(layer.file.path), "bad_header", str(err)
        ) from err


def _guarded(
    config: ExportConfig,
    policy: GuardPolicy,
    device: BlockDevice,
    layer: ChainLayer,
    reporter: ExportReporter,
) -> BlockDevice:
    """The sector-zero guard over a raw export, or over a qcow2 export whose top layer has
    an external data file (see nbdguard.guard.datafile): the file whose sector 0 a prober
    would read is the raw image, or the data file."""
    raw = layer.data_file if layer.data_file is not None else layer.file
    hooks: dict[str, Any] = {
        "on_rmw": reporter.count_rmw,
        "on_lock_timeout": reporter.sector_lock_timeout,
        "on_blocked": reporter.header_write_blocked,
    }
    guard = (
        DataFileGuard(device, policy, raw, file_lock=SectorLock(raw.fd), **hooks)
        if layer.data_file is not None
        else Sector0Guard(device, policy, file_lock=SectorLock(raw.fd), **hooks)
    )
    existing = guard.existing_header()
    if existing is not None and config.on_existing_header == "refuse":
        guard.close()
        raise ExportOpenError(
            f"export {config.name!r}: sector 0 of {str(raw.path)!r} already holds a "
            f"{existing} header (header_guard = {config.header_guard!r}, "
            'on_existing_header = "refuse")',
            reason="existing_header",
        )
    if existing is not None:
        reporter.existing_header(existing, str(raw.path))
    return guard
