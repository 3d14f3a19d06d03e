"""STARTTLS and per-export authorization with real clients: nbdinfo/nbdsh (libnbd, GnuTLS)
and qemu-img/qemu-io (QEMU's tls-creds-x509). Certificates are made by the openssl CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, RunningServer, require, start_server

pytestmark = pytest.mark.interop

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
SERVER_EXT = (
    "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    "keyUsage=digitalSignature,keyEncipherment\n"
)
CLIENT_EXT = "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n"
ODD_SUBJECT = "/C=US/O=Example\\, Inc./OU= R\\+D #1 /CN=web01"  # -subj: a backslash escapes


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


def make_ca(pki: Path, name: str) -> None:
    openssl("req", "-x509", *EC, "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem",
            "-days", "2", "-subj", f"/CN={name}", cwd=pki)  # fmt: skip


def make_cert(pki: Path, name: str, subject: str, ext: str, ca: str = "ca") -> None:
    openssl("req", *EC, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", subject,
            cwd=pki)  # fmt: skip
    (pki / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey",
            f"{ca}-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
            "-extfile", f"{name}.ext", cwd=pki)  # fmt: skip


def client_dir(pki: Path, name: str, ca: str = "ca") -> Path:
    """The layout GnuTLS clients (libnbd, QEMU) read: ca-cert.pem, client-{cert,key}.pem."""
    directory = pki / f"as-{name}"
    directory.mkdir(exist_ok=True)
    shutil.copy(pki / f"{ca}-cert.pem", directory / "ca-cert.pem")
    if (pki / f"{name}-cert.pem").exists():
        shutil.copy(pki / f"{name}-cert.pem", directory / "client-cert.pem")
        shutil.copy(pki / f"{name}-key.pem", directory / "client-key.pem")
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("openssl")
    pki = tmp_path_factory.mktemp("pki")
    make_ca(pki, "ca")
    make_ca(pki, "rogue")
    make_cert(pki, "server", "/CN=localhost", SERVER_EXT)
    make_cert(pki, "web01", "/O=Example/CN=web01", CLIENT_EXT)
    make_cert(pki, "db02", "/O=Example/CN=db02", CLIENT_EXT)
    make_cert(pki, "intruder", "/O=Example/CN=web01", CLIENT_EXT, ca="rogue")
    # issued by our CA, but names two clients: matched on its last CN it would pass for web01
    make_cert(pki, "twocn", "/O=Example/CN=db02/CN=web01", CLIENT_EXT)
    make_cert(pki, "quoted", ODD_SUBJECT, CLIENT_EXT)
    return pki


def tls_server(tmp_path: Path, pki: Path, mode: str, *, ca: bool = True) -> RunningServer:
    tls = {"mode": mode, "cert": str(pki / "server-cert.pem"), "key": str(pki / "server-key.pem")}
    if ca:
        tls["ca"] = str(pki / "ca-cert.pem")
    exports = [
        ExportSpec("vm1", size=1 << 20, fill=b"\x5a" * 4096,
                   extra={"allow_clients": ["CN=web01"]} if ca else {}),
        ExportSpec("shared", size=1 << 20),
    ]  # fmt: skip
    return start_server(tmp_path / "srv", exports, metrics=True, tls=tls)


def nbdinfo(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", *args, uri], capture_output=True, text=True, timeout=30)


def tls_uri(server: RunningServer, export: str, certs: Path, transport: str = "unix") -> str:
    if transport == "unix":
        return f"nbds+unix:///{export}?socket={server.socket_path}&tls-certificates={certs}"
    return f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={certs}"


def qemu_tls(tool: str, server: RunningServer, export: str, certs: Path, *cmd: str) -> int:
    image = (
        f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={server.port},"
        f"file.export={export},file.tls-creds=tls0"
    )
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"
    if tool == "qemu-img":  # the subcommand comes first
        args = [tool, cmd[0], "--object", obj, *cmd[1:], "--image-opts", image]
    else:
        args = [tool, "--object", obj, *cmd, "--image-opts", image]
    return subprocess.run(args, capture_output=True, timeout=30).returncode


def test_good_certificate_works_with_libnbd_and_qemu(tmp_path: Path, pki: Path) -> None:
    require("nbdinfo", "nbdsh", "qemu-img", "qemu-io")
    server = tls_server(tmp_path, pki, "require")
    web01 = client_dir(pki, "web01")
    try:
        for transport in ("unix", "tcp"):
            result = nbdinfo(tls_uri(server, "vm1", web01, transport))
            assert result.returncode == 0, result.stderr
            assert "with TLS" in result.stdout and "1048576" in result.stdout
        assert qemu_tls("qemu-img", server, "vm1", web01, "info") == 0
        # data goes both ways through TLS: qemu-io checks the pattern, then writes
        assert qemu_tls("qemu-io", server, "vm1", web01, "-c", "read -P 0x5a 0 4k") == 0
        assert qemu_tls("qemu-io", server, "vm1", web01, "-c", "write -P 0x33 64k 4k") == 0
    finally:
        assert server.stop() == 0
    assert server.images["vm1"].read_bytes()[65536 : 65536 + 4096] == b"\x33" * 4096
    log = server.log()
    assert '"event": "connection.tls"' in log and '"client_cert": "CN=web01,O=Example"' in log


def test_require_refuses_clients_without_tls(tmp_path: Path, pki: Path) -> None:
    require("nbdinfo", "qemu-img")
    server = tls_server(tmp_path, pki, "require")
    try:
        for uri in (server.uri("shared"), server.uri("shared", "tcp")):
            assert nbdinfo(uri).returncode != 0
            assert nbdinfo(uri, "--list").returncode != 0
        plain = subprocess.run(
            ["qemu-img", "info", "-f", "raw", server.uri("shared", "tcp")],
            capture_output=True,
            timeout=30,
        )
        assert plain.returncode != 0
        # TLS without a client certificate: the handshake itself fails (a CA is configured)
        anonymous = client_dir(pki, "nobody")
        assert nbdinfo(tls_uri(server, "shared", anonymous)).returncode != 0
        assert (server.sample("nbdguard_handshake_failures_total", reason="tls") or 0) >= 1
    finally:
        assert server.stop() == 0


def test_certificate_from_another_ca_is_refused(tmp_path: Path, pki: Path) -> None:
    require("nbdinfo", "qemu-img")
    server = tls_server(tmp_path, pki, "require")
    intruder = client_dir(pki, "intruder", ca="ca")  # trusts our CA, signed by the rogue one
    try:
        assert nbdinfo(tls_uri(server, "vm1", intruder)).returncode != 0
        assert qemu_tls("qemu-img", server, "vm1", intruder, "info") != 0
        assert (server.sample("nbdguard_handshake_failures_total", reason="tls") or 0) >= 1
    finally:
        assert server.stop() == 0


def test_export_is_invisible_to_a_certificate_it_does_not_allow(tmp_path: Path, pki: Path) -> None:
    require("nbdinfo", "qemu-img")
    server = tls_server(tmp_path, pki, "require")
    db02, web01 = client_dir(pki, "db02"), client_dir(pki, "web01")
    try:
        assert nbdinfo(tls_uri(server, "vm1", db02)).returncode != 0
        assert qemu_tls("qemu-img", server, "vm1", db02, "info") != 0
        assert nbdinfo(tls_uri(server, "shared", db02)).returncode == 0
        listing = nbdinfo(tls_uri(server, "", db02), "--list", "--json")
        assert listing.returncode == 0, listing.stderr
        assert '"shared"' in listing.stdout and '"vm1"' not in listing.stdout
        full = nbdinfo(tls_uri(server, "", web01), "--list", "--json")
        assert '"vm1"' in full.stdout
    finally:
        assert server.stop() == 0


def test_mode_on_serves_plain_and_tls_clients(tmp_path: Path, pki: Path) -> None:
    require("nbdinfo")
    server = tls_server(tmp_path, pki, "on", ca=False)
    try:
        assert nbdinfo(server.uri("shared")).returncode == 0
        anonymous = client_dir(pki, "nobody")
        result = nbdinfo(tls_uri(server, "shared", anonymous))
        assert result.returncode == 0, result.stderr
        assert "with TLS" in result.stdout
    finally:
        assert server.stop() == 0


def test_allow_addresses_applies_to_tcp_clients(tmp_path: Path) -> None:
    require("nbdinfo")
    exports = [
        ExportSpec("lan", size=1 << 20, extra={"allow_addresses": ["10.0.0.0/8"]}),
        ExportSpec("local", size=1 << 20, extra={"allow_addresses": ["127.0.0.0/8", "::1"]}),
    ]
    server = start_server(tmp_path / "srv", exports)
    try:
        assert nbdinfo(server.uri("lan", "tcp")).returncode != 0
        assert nbdinfo(server.uri("local", "tcp")).returncode == 0
        assert nbdinfo(server.uri("lan")).returncode == 0  # Unix socket: file permissions rule
        listing = nbdinfo(f"nbd://127.0.0.1:{server.port}", "--list", "--json")
        assert '"local"' in listing.stdout and '"lan"' not in listing.stdout
    finally:
        assert server.stop() == 0


def rfc2253_subject(pki: Path, name: str) -> str:
    """openssl's own RFC 2253/4514 rendering of a certificate's subject, to compare with."""
    result = subprocess.run(
        ["openssl", "x509", "-in", f"{name}-cert.pem", "-noout", "-subject", "-nameopt",
         "RFC2253"], capture_output=True, text=True, check=True, cwd=pki,
    )  # fmt: skip
    return result.stdout.strip().removeprefix("subject=")


def log_records(server: RunningServer, event: str) -> list[dict[str, object]]:
    lines = server.log().splitlines()
    return [record for line in lines if (record := json.loads(line)).get("event") == event]


def test_a_certificate_with_two_cns_is_refused(tmp_path: Path, pki: Path) -> None:
    require("nbdinfo", "qemu-img")
    server = tls_server(tmp_path, pki, "require")
    twocn, web01 = client_dir(pki, "twocn"), client_dir(pki, "web01")
    try:
        for export in ("vm1", "shared"):  # refused outright, not only where CN is matched
            assert nbdinfo(tls_uri(server, export, twocn)).returncode != 0
        assert nbdinfo(tls_uri(server, "", twocn), "--list").returncode != 0
        assert qemu_tls("qemu-img", server, "vm1", twocn, "info") != 0
        assert server.sample("nbdguard_handshake_failures_total", reason="certificate") == 4
        result = nbdinfo(tls_uri(server, "vm1", web01, "tcp"))  # the well-formed one is served
        assert result.returncode == 0, result.stderr
    finally:
        assert server.stop() == 0
    refused = [
        r for r in log_records(server, "handshake.failed") if r["reason_code"] == "certificate"
    ]
    assert len(refused) == 4
    assert (
        refused[0]["client_cert"] == "CN=web01,CN=db02,O=Example" == rfc2253_subject(pki, "twocn")
    )
    assert "repeats CN" in str(refused[0]["reason"])
    assert not any(r.get("client_cert") == "CN=web01,CN=db02,O=Example"
                   for r in log_records(server, "connection.ready"))  # fmt: skip


def test_the_logged_subject_is_the_whole_escaped_rfc4514_string(tmp_path: Path, pki: Path) -> None:
    require("nbdinfo")
    server = tls_server(tmp_path, pki, "require")
    try:
        result = nbdinfo(tls_uri(server, "shared", client_dir(pki, "quoted")))
        assert result.returncode == 0, result.stderr
    finally:
        assert server.stop() == 0
    expected = "CN=web01,OU=\\ R\\+D #1\\ ,O=Example\\, Inc.,C=US"
    assert rfc2253_subject(pki, "quoted") == expected  # openssl renders it the same way
    tls = log_records(server, "connection.tls")
    assert [record["client_cert"] for record in tls] == [expected]
