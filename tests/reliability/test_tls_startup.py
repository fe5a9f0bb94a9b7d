"""TLS start-up errors a real operator hits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from reliability_support import write_gen
from server_support import start_server


def test_a_passphrase_protected_key_stops_startup_naming_it(pki: Path, tmp_path: Path) -> None:
    """An encrypted private key (`openssl genpkey -aes256`, common in PKI hand-outs) made the PEM
    check ask OpenSSL's terminal prompt for a passphrase: without a terminal (a container) start-up
    died with a traceback (`OSError: [Errno 22] Invalid argument`), with one it prompted and then
    failed as 'cannot listen on ADDRESS (--host/--port)'. It is refused with a message naming the key."""
    models = tmp_path / "models"
    write_gen(models)
    key = tmp_path / "server-encrypted.key"
    encrypt = ["openssl", "pkey", "-in", str(pki / "server.key"), "-out", str(key), "-aes256"]
    subprocess.run([*encrypt, "-passout", "pass:pw"], check=True, capture_output=True, timeout=60)
    args = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(key))
    try:
        server = start_server(models, tmp_path / "work", extra_args=args, timeout_s=30)
    except RuntimeError as exc:
        message = str(exc)
        assert f"{key} is encrypted" in message and "Traceback" not in message, message
        assert "--host/--port" not in message, message
    else:
        server.stop()
        pytest.fail("the server started with an encrypted key it cannot use")
