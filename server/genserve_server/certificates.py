"""Certificate dates, with the standard library only: the server's start-up warning (security.py)
and the health probe (probe.py, which imports no more than it needs) read them alike."""

from __future__ import annotations

import os
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
    for block in blocks:  # the decoder reads a file's first certificate only
        if (cert := _decode_block(block + b"\n")) is not None:
            decoded.append(cert)
    return decoded


def _decode_block(pem: bytes) -> dict[str, Any] | None:
    """decode_certificate of one PEM certificate held in memory. Through an in-memory file where the
    system has one (Linux, /proc): a server may have no writable temp folder (a full /tmp, a
    read-only root file system); else through a file in the temp folder, None where it cannot be
    written."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            fd = memfd_create("genserve-cert")
        except OSError:
            pass
        else:
            try:
                os.write(fd, pem)
                if (cert := decode_certificate(Path(f"/proc/self/fd/{fd}"))) is not None:
                    return cert
            except OSError:
                pass
            finally:
                os.close(fd)
    try:
        with tempfile.TemporaryDirectory(prefix="genserve-cert-") as tmp:
            one = Path(tmp) / "certificate.pem"
            one.write_bytes(pem)
            return decode_certificate(one)
    except OSError:
        return None


def not_after(cert: dict[str, Any]) -> float | None:
    """The certificate's notAfter in seconds since the epoch, or None where it cannot be dated."""
    try:
        return float(ssl.cert_time_to_seconds(str(cert["notAfter"])))
    except (KeyError, ValueError):
        return None
