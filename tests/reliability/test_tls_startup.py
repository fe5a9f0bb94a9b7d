"""TLS start-up errors a real operator hits."""

from __future__ import annotations

import calendar
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_support import chain_with_intermediate, dated_certificate, write_gen
from server_support import ServerProcess, metric_in, start_server

from genserve_server.config import SecurityConfig
from genserve_server.launcher import genserve_command
from genserve_server.security import certificate_expiries


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


@pytest.mark.parametrize("year", ["2020", "2099"], ids=["expired", "not-yet-valid"])
def test_a_certificate_outside_its_validity_starts_with_a_warning_naming_file_dates_and_now(
    pki: Path, tmp_path: Path, year: str
) -> None:
    """An expired (or not yet valid) server certificate or client CA started the server without a
    word: every client then failed the handshake (CERTIFICATE_VERIFY_FAILED, or its certificate
    refused) and the server's log showed nothing. The server still starts (a clock a little behind
    the issuer's makes a fresh certificate not yet valid for seconds), with one warning per file
    naming it, its notBefore and notAfter and the time now."""
    start, end = f"{year}0101000000Z", f"{year}0201000000Z"
    shown = f"notBefore Jan  1 00:00:00 {year} GMT, notAfter Feb  1 00:00:00 {year} GMT, now "
    models = tmp_path / "models"
    write_gen(models)
    cert, ca = dated_certificate(pki, "server", start, end), dated_certificate(pki, "ca", start, end)
    args = ("--tls-cert", str(cert), "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(ca))
    args += ("--health-port", "0")  # a second TLS listener: still one line per file
    server = start_server(models, tmp_path / "work", extra_args=args, timeout_s=60)
    try:
        log = server.log()
    finally:
        server.stop()
    for path in (cert, ca):
        lines = [line for line in log.splitlines() if str(path) in line and "valid" in line]
        assert len(lines) == 1, log
        assert "WARNING" in lines[0] and shown in lines[0], lines[0]


def test_a_certificate_within_its_validity_starts_without_a_validity_warning(
    pki: Path, tmp_path: Path
) -> None:
    """make_pki's certificates are valid for two days from now: no validity line."""
    models = tmp_path / "models"
    write_gen(models)
    args = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    args += ("--tls-client-ca", str(pki / "ca.pem"))
    server = start_server(models, tmp_path / "work", extra_args=args, timeout_s=60)
    try:
        log = server.log()
    finally:
        server.stop()
    assert "TLS on" in log and "validity" not in log, log


def test_a_tls_server_exposes_each_certificates_expiry_as_a_gauge(pki: Path, tmp_path: Path) -> None:
    """Start-up warns about a certificate already outside its validity, but nothing told an operator
    that the certificate of a running server expires in 3 days. /metrics has each configured TLS
    file's notAfter (the client CA file's earliest) as
    genserve_tls_certificate_expiry_timestamp_seconds{file_role}, for an alert."""
    models = tmp_path / "models"
    write_gen(models)
    cert = dated_certificate(pki, "server", "20200101000000Z", "20980601000000Z")
    ca = dated_certificate(pki, "ca", "20200101000000Z", "20970301000000Z")
    args = ("--tls-cert", str(cert), "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(ca))
    server = start_server(models, tmp_path / "work", extra_args=args, timeout_s=60)
    try:
        text = server.metrics_text()
    finally:
        server.stop()
    name = "genserve_tls_certificate_expiry_timestamp_seconds"
    lines = sorted(line for line in text.splitlines() if line.startswith(name))
    expected = {
        "client_ca": calendar.timegm((2097, 3, 1, 0, 0, 0)),
        "server_cert": calendar.timegm((2098, 6, 1, 0, 0, 0)),
    }
    assert len(lines) == 2, text
    for role, seconds in expected.items():
        assert metric_in(text, name, file_role=role) == seconds, lines
    assert f"# TYPE {name} gauge" in text


def test_an_intermediate_of_the_server_chain_that_expires_first_is_warned_of_and_is_the_gauge(
    pki: Path, tmp_path: Path
) -> None:
    """A --tls-cert file holds the server certificate and its intermediates; clients fail the
    handshake once any of them has expired. Only the first certificate was read: an expired
    intermediate under a valid server certificate started without a word, and the server_cert gauge
    showed the leaf's notAfter. The warning names the chain's certificate outside its window, and the
    gauge is the earliest notAfter of the chain."""
    models = tmp_path / "models"
    write_gen(models)
    chain = chain_with_intermediate(pki, "20200101000000Z", "20200201000000Z")
    args = ("--tls-cert", str(chain), "--tls-key", str(pki / "server.key"))
    server = start_server(models, tmp_path / "work", extra_args=args, timeout_s=60)
    try:
        log, text = server.log(), server.metrics_text()
    finally:
        server.stop()
    lines = [line for line in log.splitlines() if str(chain) in line and "valid" in line]
    assert len(lines) == 1, log
    shown = "notBefore Jan  1 00:00:00 2020 GMT, notAfter Feb  1 00:00:00 2020 GMT, now "
    assert "WARNING" in lines[0] and "intermediate" in lines[0] and shown in lines[0], lines[0]
    name = "genserve_tls_certificate_expiry_timestamp_seconds"
    assert metric_in(text, name, file_role="server_cert") == calendar.timegm((2020, 2, 1, 0, 0, 0)), text


def test_the_client_ca_gauge_is_the_earliest_notafter_of_the_files_ca_certificates(
    pki: Path, tmp_path: Path
) -> None:
    """A client CA file may hold several CAs (one being rotated in): clients that one signed fail once
    it expires, so the client_ca gauge is the earliest notAfter of them, not the first one's."""
    later = dated_certificate(pki, "ca", "20200101000000Z", "20990101000000Z")
    earlier = dated_certificate(pki, "ca", "20200101000000Z", "20970301000000Z")
    cas = tmp_path / "client-cas.pem"
    cas.write_bytes(later.read_bytes() + earlier.read_bytes())
    config = SecurityConfig(
        tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key", tls_client_ca_file=cas
    )
    assert certificate_expiries(config)["client_ca"] == calendar.timegm((2097, 3, 1, 0, 0, 0))


@pytest.fixture
def full_temp_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a tmpfs whose inodes are all but spent, as a /tmp filled by others is: a file can be
    made and removed (tempfile's check of a temp folder passes), a folder and a file in it cannot."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    folder = tmp_path / "full-tmp"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=2", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_server_certificate_chain_is_read_without_a_writable_temp_folder(
    pki: Path, tmp_path: Path, full_temp_folder: Path
) -> None:
    """The start-up validity warning and the expiry gauge read a --tls-cert chain's intermediates one
    by one through a file in the temp folder: with TMPDIR full (or /tmp read-only, a
    readOnlyRootFilesystem without its emptyDir) a TLS server with an intermediate exited at start
    with an OSError traceback for a warning. It starts, warns of the expired intermediate and writes
    nothing there."""
    models = tmp_path / "models"
    write_gen(models)
    chain = chain_with_intermediate(pki, "20200101000000Z", "20200201000000Z")
    args = ("--tls-cert", str(chain), "--tls-key", str(pki / "server.key"))
    command = genserve_command(models, *args)
    server = ServerProcess.start(command, tmp_path / "work", env={"TMPDIR": str(full_temp_folder)})
    try:
        log, text = server.log(), server.metrics_text()
    finally:
        server.stop()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if str(chain) in line and "valid" in line]
    assert len(lines) == 1 and "intermediate" in lines[0], log
    name = "genserve_tls_certificate_expiry_timestamp_seconds"
    assert metric_in(text, name, file_role="server_cert") == calendar.timegm((2020, 2, 1, 0, 0, 0)), text
    assert list(full_temp_folder.iterdir()) == []


def test_a_plaintext_server_exposes_no_certificate_expiry(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_gen(models)
    server = start_server(models, tmp_path / "work", timeout_s=60)
    try:
        text = server.metrics_text()
    finally:
        server.stop()
    assert "genserve_tls_certificate_expiry_timestamp_seconds{" not in text
