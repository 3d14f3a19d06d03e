"""Config loading: the contract shape, defaults, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdguard.config import (
    ConfigError,
    ListenAddress,
    load_config,
    parse_host_port,
    parse_listen_address,
    with_overrides,
)

CONTRACT = """
[server]
listen = ["unix:///run/nbdguard/nbd.sock", "tcp://127.0.0.1:10809"]
metrics_listen = "127.0.0.1:9109"
log_format = "json"

[[exports]]
name = "vm1"
path = "images/vm1.raw"
format = "raw"
read_only = false
description = "web server root disk"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nbdguard.toml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


def test_contract_example(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONTRACT))
    assert config.server.listen == (
        ListenAddress("unix", path="/run/nbdguard/nbd.sock"),
        ListenAddress("tcp", host="127.0.0.1", port=10809),
    )
    assert config.server.metrics_listen == ("127.0.0.1", 9109)
    assert config.server.log_format == "json"
    [export] = config.exports
    assert export.name == "vm1" and export.format == "raw" and not export.read_only
    assert export.path == tmp_path / "images" / "vm1.raw"
    assert export.description == "web server root disk"
    assert export.header_guard == "qemu" and export.on_existing_header == "warn"
    assert config.source == tmp_path / "nbdguard.toml"
    assert config.export("vm1") is export and config.export("nope") is None


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[[exports]]\nname=""\npath="/d.raw"\nformat="raw"\n'))
    assert config.server.listen == (ListenAddress("tcp", host="127.0.0.1", port=10809),)
    assert config.server.metrics_listen is None
    assert config.server.log_format == "auto" and config.server.log_level == "info"
    assert config.exports[0].name == "" and config.exports[0].path == Path("/d.raw")


def test_guard_keys(tmp_path: Path) -> None:
    text = (
        '[[exports]]\nname="a"\npath="a.raw"\nformat="raw"\nheader_guard="strict"\n'
        'allow_headers=["luks"]\non_existing_header="refuse"\n'
    )
    [export] = load_config(write(tmp_path, text)).exports
    assert export.header_guard == "strict"
    assert export.allow_headers == frozenset({"luks"})
    assert export.on_existing_header == "refuse"


@pytest.mark.parametrize("fmt_line", ["", 'format = "auto"', 'format = "vmdk"', "format = 1"])
def test_format_is_required_and_named(tmp_path: Path, fmt_line: str) -> None:
    [problem] = problems_of(tmp_path, f'[[exports]]\nname = "vm1"\npath = "a"\n{fmt_line}\n')
    assert "nbdguard.toml" in problem and 'exports[0] ("vm1")' in problem
    assert "format" in problem
    if fmt_line != "format = 1":
        assert '"raw"' in problem and '"qcow2"' in problem


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('bogus = 1\n[[exports]]\nname="a"\npath="a"\nformat="raw"\n', "bogus"),
        ('[server]\nlisten_on = []\n[[exports]]\nname="a"\npath="a"\nformat="raw"\n', "listen_on"),
        ('[[exports]]\nname="a"\npath="a"\nformat="raw"\nreadonly=true\n', "readonly"),
    ],
)
def test_unknown_keys_are_errors_listing_allowed_keys(tmp_path: Path, text: str, key: str) -> None:
    [problem] = problems_of(tmp_path, text)
    assert repr(key) in problem and "allowed keys" in problem


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('read_only = "yes"', "read_only"),
        ("description = 5", "description"),
        ('allow_headers = "luks"', "allow_headers"),
        ("allow_headers = [1]", "allow_headers"),
        ('header_guard = "paranoid"', "header_guard"),
        ('allow_headers = ["ext4"]', "allow_headers"),
        ('on_existing_header = "ignore"', "on_existing_header"),
    ],
)
def test_wrong_values(tmp_path: Path, line: str, key: str) -> None:
    [problem] = problems_of(tmp_path, f'[[exports]]\nname="a"\npath="a"\nformat="raw"\n{line}\n')
    assert repr(key) in problem


def test_header_guard_on_qcow2_is_an_error(tmp_path: Path) -> None:
    text = '[[exports]]\nname="a"\npath="a"\nformat="qcow2"\nheader_guard="qemu"\n'
    [problem] = problems_of(tmp_path, text)
    assert "raw exports only" in problem


def test_duplicate_names_and_no_exports(tmp_path: Path) -> None:
    dup = '[[exports]]\nname="a"\npath="a"\nformat="raw"\n' * 2
    [problem] = problems_of(tmp_path, dup)
    assert "duplicate" in problem and '"a"' in problem
    [problem] = problems_of(tmp_path, "[server]\n")
    assert "at least one export" in problem


@pytest.mark.parametrize(
    "address", ["tcp://127.0.0.1", "tcp://127.0.0.1:70000", "http://x:1", "tcp://:10809", "unix://"]
)
def test_bad_listen_addresses(tmp_path: Path, address: str) -> None:
    text = f'[server]\nlisten = ["{address}"]\n[[exports]]\nname="a"\npath="a"\nformat="raw"\n'
    [problem] = problems_of(tmp_path, text)
    assert "listen" in problem and address in problem


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    text = (
        '[server]\nlog_level = "loud"\nlisten = ["tcp://x"]\n'
        '[[exports]]\nname="a"\npath="a"\n'
        '[[exports]]\nname="b"\npath="b"\nformat="raw"\nread_only=1\nextra=2\n'
    )
    problems = problems_of(tmp_path, text)
    assert len(problems) == 5, problems


def test_listen_address_parsing_round_trips() -> None:
    base = Path("/etc/nbdguard")
    v6 = parse_listen_address("tcp://[::1]:10809", base)
    assert (v6.host, v6.port) == ("::1", 10809) and str(v6) == "tcp://[::1]:10809"
    rel = parse_listen_address("unix://run/nbd.sock", base)
    assert (
        rel.path == "/etc/nbdguard/run/nbd.sock" and str(rel) == "unix:///etc/nbdguard/run/nbd.sock"
    )
    assert str(parse_listen_address("tcp://0.0.0.0:0", base)) == "tcp://0.0.0.0:0"


def test_host_port_parsing() -> None:
    assert parse_host_port("[::1]:9109") == ("::1", 9109)
    assert parse_host_port("localhost:0") == ("localhost", 0)
    for bad in ("9109", "::1:9109", "[::1]9109", "host:port", "[zz]:1"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"nbdguard\.toml: invalid TOML.*line 1"):
        load_config(write(tmp_path, "[[exports]\n"))


def test_overrides(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONTRACT))
    changed = with_overrides(config, listen=["tcp://[::1]:1234"], metrics_listen="0.0.0.0:1")
    assert changed.server.listen == (ListenAddress("tcp", host="::1", port=1234),)
    assert changed.server.metrics_listen == ("0.0.0.0", 1)
    assert with_overrides(config) == config
    with pytest.raises(ConfigError, match="--listen"):
        with_overrides(config, listen=["nbd://x"])


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "config" / "nbdguard.example.toml"
    config = load_config(example)
    assert [export.name for export in config.exports] == ["vm1", "install-media"]
    assert config.exports[1].read_only
    assert config.server.metrics_listen == ("127.0.0.1", 9109)
