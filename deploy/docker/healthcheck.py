"""The image's HEALTHCHECK: GET /healthz on the metrics address of the config the container
serves ($NBDGUARD_CONFIG), so the check follows `metrics_listen` instead of naming a port.
Exit 0 when the server answers 200 (every export open, every listener accepting), else 1."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from nbdguard.config import ConfigError, load_config

# A wildcard listener is reached through the loopback of the same family.
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def health_url(config_path: Path) -> str:
    """The /healthz URL for the config's metrics_listen (ValueError when there is none)."""
    endpoint = load_config(config_path).server.metrics_listen
    if endpoint is None:
        raise ValueError(f"{config_path}: no [server] metrics_listen, so no /healthz to ask")
    host, port = endpoint
    host = LOOPBACK.get(host, host)
    return f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"


def main() -> int:
    path = Path(os.environ.get("NBDGUARD_CONFIG", "/etc/nbdguard/nbdguard.toml"))
    try:
        url = health_url(path)
    except (ConfigError, ValueError) as err:
        print(f"unhealthy: {err}")
        return 1
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            print(f"{url}: {response.status} {response.read().decode(errors='replace')}")
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as err:
        print(f"unhealthy: {url}: {err.code} {err.read().decode(errors='replace')}")
    except OSError as err:
        print(f"unhealthy: {url}: {err}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
