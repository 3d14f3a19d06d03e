"""nbdguard stopped (SIGTERM) and restarted under an attached kernel client.

What the user sees: the guest's in-flight and later requests fail with EIO ("block nbd0:
Receive control failed" / "shutting down sockets" in its kernel log, dd: Input/output error),
the device is dead until re-attached, and after `nbd-client -d` and a new `nbd-client` on the
restarted server, every write that was acknowledged and flushed before the stop is there.

A virtio-serial port is one connection made when QEMU starts, so the re-attach goes through a
second port whose host end the test relays to the restarted server; a third port is the
control channel between the guest script and the test."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, start_server
from tests.vm.harness import GuestImage, HostPort, start
from tests.vm.test_kernel_client import HANDSHAKE_TIMEOUT, SIZE

pytestmark = [pytest.mark.vm, pytest.mark.interop]

BLOCK = 64 << 10
BLOCKS = 160
STOP_AFTER = 6  # acknowledged blocks before the test stops the server

SCRIPT = """
exec 3<>/dev/virtio-ports/ctl
/usr/bin/socat UNIX-LISTEN:/tmp/nbd0.sock /dev/virtio-ports/nbd0 &
while [ ! -S /tmp/nbd0.sock ]; do usleep 20000; done
/usr/sbin/nbd-client -unix /tmp/nbd0.sock /dev/nbd0 -N vm1 -b 512
i=0
while [ $i -lt {blocks} ]; do
    if /usr/bin/dd if=/data/blocks of=/dev/nbd0 bs={block} skip=$i seek=$i count=1 \
            oflag=direct conv=fsync,notrunc status=none 2>/tmp/err; then
        echo "ACK $i" >&3
    else
        echo "@@FAILED=$i: $(head -n 1 /tmp/err)@@"
        break
    fi
    i=$((i+1))
done
echo "DOWN $i" >&3
read go <&3
/usr/sbin/nbd-client -d /dev/nbd0 || true
/usr/bin/socat UNIX-LISTEN:/tmp/nbd1.sock /dev/virtio-ports/nbd1 &
while [ ! -S /tmp/nbd1.sock ]; do usleep 20000; done
/usr/sbin/nbd-client -unix /tmp/nbd1.sock /dev/nbd0 -N vm1 -b 512
/usr/bin/dd if=/dev/nbd0 of=/tmp/back bs={block} count=$i iflag=direct status=none
echo "@@BACK=$(sha256sum /tmp/back | cut -d' ' -f1)@@"
/usr/sbin/nbd-client -d /dev/nbd0
echo "@@DETACHED=1@@"
"""


def test_server_restart_under_attached_kernel_client(tmp_path: Path, guest: GuestImage) -> None:
    blocks = os.urandom(BLOCK * BLOCKS)
    spec = ExportSpec("vm1", size=SIZE)
    directory = tmp_path / "srv"
    server = start_server(directory, [spec], handshake_timeout=HANDSHAKE_TIMEOUT)
    image = server.images["vm1"]
    control, later = HostPort(tmp_path / "ctl.sock"), HostPort(tmp_path / "later.sock")
    vm = start(
        tmp_path / "vm",
        SCRIPT.format(blocks=BLOCKS, block=BLOCK),
        ports={"nbd0": server.socket_path, "nbd1": later.path, "ctl": control.path},
        files={"/data/blocks": blocks},
    )
    try:
        control.accept()
        later.accept()
        assert control.peer is not None
        reader = control.peer.makefile("r")
        acked: list[int] = []
        while len(acked) < STOP_AFTER:
            kind, number = control.read_line(reader).split()
            assert kind == "ACK", (kind, number)
            acked.append(int(number))
        assert server.stop(signal.SIGTERM) == 0, server.log()
        first_log = server.log()
        while (line := control.read_line(reader).split())[0] == "ACK":
            acked.append(int(line[1]))  # answered before the server stopped reading
        stopped_at = int(line[1])
        assert line[0] == "DOWN"
        assert stopped_at < BLOCKS, "the guest never saw the server go away"
        assert acked == list(range(stopped_at))

        with open(image, "rb") as handle:  # every acknowledged, flushed write is on disk
            assert handle.read(BLOCK * stopped_at) == blocks[: BLOCK * stopped_at]

        restarted = start_server(
            directory,
            [ExportSpec("vm1", image=image)],
            handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        later.relay_to(restarted.socket_path)
        control.send_line("go")
        guest_run = vm.wait(timeout=120).check()
        assert restarted.stop() == 0, restarted.log()
    finally:
        vm.kill()
        control.close()
        later.close()
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)
    marks = guest_run.marks()
    assert marks["FAILED"].startswith(f"{stopped_at}:"), marks
    assert "Input/output error" in marks["FAILED"]
    assert marks["BACK"] == hashlib.sha256(blocks[: BLOCK * stopped_at]).hexdigest()
    assert marks["DETACHED"] == "1"
    assert "server.stopped" in first_log
    assert "block nbd0: Dead connection" in guest_run.console
