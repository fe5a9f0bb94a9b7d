"""The one check of a TLS certificate and its private key that the server, its health probe and
genserve-client make before gRPC sees them: gRPC takes any pair of PEM files and then fails every
connection ('Failed to create security handshaker', UNAVAILABLE), or only fails to listen, naming
neither file. Standard library only (the probe stays light).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

# What to do with an encrypted key: gRPC cannot use one.
DECRYPT_HINT = "decrypt it (openssl pkey -in KEY -out PLAIN_KEY) onto a protected path"


@dataclass(frozen=True)
class KeyPairProblem:
    """Why `key` cannot serve with `cert`: `encrypted` (passphrase-protected), else `reason`
    (OpenSSL's: KEY_VALUES_MISMATCH, no PEM data, ...)."""

    encrypted: bool
    reason: str


def key_pair_problem(
    cert: str | Path, key: str | Path, purpose: int = ssl.PROTOCOL_TLS_CLIENT
) -> tuple[KeyPairProblem | None, ssl.SSLContext]:
    """(None, the context holding the pair) where `key` is the unencrypted private key of `cert`'s
    certificate; else (the problem, that context). OpenSSL is never let prompt for a passphrase on
    the terminal (where there is none it died with OSError)."""
    context = ssl.SSLContext(purpose)
    asked: list[bool] = []

    def passphrase() -> bytes:
        """Called only for an encrypted key."""
        asked.append(True)
        return b""

    try:
        context.load_cert_chain(cert, key, password=passphrase)
    except (ssl.SSLError, OSError) as exc:
        return KeyPairProblem(bool(asked), str(getattr(exc, "reason", None) or exc)), context
    return None, context
