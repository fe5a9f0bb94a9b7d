"""Certificate dates, with the standard library only: the server's start-up warning (security.py)
and the health probe (probe.py, which imports no more than it needs) read them alike."""

from __future__ import annotations

import re
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)


def decode_certificate(path: Path) -> dict[str, Any] | None:
    """The first certificate of a PEM file as ssl's getpeercert() dict, or None where it cannot be
    read. The standard library decodes a certificate that is not a CA only through this (CPython's
    own, undocumented) function: no new dependency for a warning; where it is missing, no warning."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded: dict[str, Any] = decode(str(path))
    except (ssl.SSLError, OSError, ValueError):
        return None
    return decoded


def outside_validity(cert: dict[str, Any], now: float) -> str | None:
    """'notBefore X, notAfter Y, now Z' where `now` lies outside the certificate's window, else None."""
    try:
        not_before = ssl.cert_time_to_seconds(cert["notBefore"])
        not_after = ssl.cert_time_to_seconds(cert["notAfter"])
    except (KeyError, ValueError):
        return None
    if not_before <= now <= not_after:
        return None
    utc = time.gmtime(now)  # as OpenSSL writes the certificate's times: "Feb  1 00:00:00 2020 GMT"
    shown = time.strftime(f"%b {utc.tm_mday:2d} %H:%M:%S %Y GMT", utc)
    return f"notBefore {cert['notBefore']}, notAfter {cert['notAfter']}, now {shown}"


def decode_certificates(path: Path) -> list[dict[str, Any]]:
    """Every certificate of a PEM file (a server certificate and its intermediates), in the file's
    order, as decode_certificate reads the first; those that cannot be read are left out. Clients
    fail the handshake once any certificate of the chain is outside its validity window."""
    try:
        blocks = _PEM_CERTIFICATE.findall(path.read_bytes())
    except OSError:
        return []
    if len(blocks) <= 1:
        first = decode_certificate(path)
        return [first] if first is not None else []
    decoded: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="genserve-cert-") as tmp:
        one = Path(tmp) / "certificate.pem"
        for block in blocks:  # the decoder reads a file's first certificate only
            one.write_bytes(block + b"\n")
            if (cert := decode_certificate(one)) is not None:
                decoded.append(cert)
    return decoded


def not_after(cert: dict[str, Any]) -> float | None:
    """The certificate's notAfter in seconds since the epoch, or None where it cannot be dated."""
    try:
        return float(ssl.cert_time_to_seconds(str(cert["notAfter"])))
    except (KeyError, ValueError):
        return None
