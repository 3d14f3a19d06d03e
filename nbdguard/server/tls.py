"""The server's TLS context for STARTTLS: TLS 1.2 or later, client certificates required and
verified when a CA is configured."""

from __future__ import annotations

import ssl

from nbdguard.config import TlsConfig
from nbdguard.errors import NbdguardError


def server_context(config: TlsConfig) -> ssl.SSLContext | None:
    if config.mode == "off":
        return None
    assert config.cert is not None and config.key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.cert, config.key)
        if config.ca is not None:
            context.load_verify_locations(cafile=config.ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as err:
        raise NbdguardError(f"[server.tls]: cannot load certificates: {err}") from err
    return context
