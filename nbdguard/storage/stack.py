"""Build an export's layer stack from its config: pinned chain, format drivers, guard."""

from __future__ import annotations

from nbdguard.config import DEFAULT_METADATA_CACHE, ExportConfig
from nbdguard.errors import ChainRefused, ExportOpenError, Qcow2Corrupt
from nbdguard.guard.sector0 import GuardPolicy, Sector0Guard
from nbdguard.observability.reporter import ExportReporter
from nbdguard.storage.chain import Chain, ChainLayer, resolve_chain
from nbdguard.storage.device import BlockDevice
from nbdguard.storage.locks import SectorLock
from nbdguard.storage.qcow2.hostfile import HostFile
from nbdguard.storage.qcow2.image import Qcow2Image
from nbdguard.storage.raw import RawImage


def build_device(config: ExportConfig, reporter: ExportReporter | None = None) -> BlockDevice:
    """Open the export's stack; refuse (ExportOpenError) anything that is not safe to serve.
    Layers report what they find through `reporter` (none: logged without metrics)."""
    reporter = reporter or ExportReporter(config.name)
    chain = resolve_chain(config)
    try:
        device = chain_device(chain, reporter, metadata_cache=config.metadata_cache)
    except BaseException:
        chain.close()
        raise
    if config.format != "raw" or config.header_guard == "off":
        return device
    return _guarded(config, device, chain.layers[0], reporter)


def chain_device(
    chain: Chain,
    reporter: ExportReporter | None = None,
    *,
    metadata_cache: int = DEFAULT_METADATA_CACHE,
) -> BlockDevice:
    """Format drivers stacked bottom-up over the chain's open files. The export's
    `metadata_cache` is shared evenly by its qcow2 layers."""
    reporter = reporter or ExportReporter(chain.export)
    share = metadata_cache // max(1, sum(layer.format == "qcow2" for layer in chain.layers))
    device: BlockDevice | None = None
    for layer in reversed(chain.layers):
        if layer.format == "raw":
            device = RawImage(layer.file)
        else:
            device = _qcow2(chain, layer, device, reporter, share)
    assert device is not None
    return device


def _qcow2(
    chain: Chain,
    layer: ChainLayer,
    backing: BlockDevice | None,
    reporter: ExportReporter,
    metadata_cache: int,
) -> Qcow2Image:
    assert layer.header is not None
    host = HostFile(layer.file)
    data = HostFile(layer.data_file) if layer.data_file is not None else None

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
    raw: BlockDevice,
    layer: ChainLayer,
    reporter: ExportReporter,
) -> BlockDevice:
    policy = GuardPolicy(config.header_guard, config.allow_headers)
    guard = Sector0Guard(
        raw,
        policy,
        file_lock=SectorLock(layer.file.fd),
        on_rmw=reporter.count_rmw,
        on_lock_timeout=reporter.sector_lock_timeout,
    )
    existing = guard.existing_header()
    if existing is not None and config.on_existing_header == "refuse":
        guard.close()
        raise ExportOpenError(
            f"export {config.name!r}: sector 0 of {str(layer.file.path)!r} already holds a "
            f"{existing} header (header_guard = {config.header_guard!r}, "
            'on_existing_header = "refuse")',
            reason="existing_header",
        )
    return guard
