"""TLS and mTLS options against a fake server with certificates made by the openssl CLI."""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from client_fakes import FakeServer, FakeService, run_cli

from genserve.v1 import genserve_pb2_grpc
from genserve_client import ChannelConfig, GenserveClient, GenserveClientError, RetryPolicy, TlsOptions
from genserve_client.retry import is_permanent

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
SERVER_NAME = "genserve.test"  # not the target's host: the client must override the name


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=genserve test CA",
        cwd=d,
    )
    for name, ext in (
        ("server", f"subjectAltName=DNS:{SERVER_NAME}"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return d


@pytest.fixture
def mtls_target(pki: Path) -> Iterator[str]:
    creds = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(FakeService(), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_mtls_with_server_name_override(pki: Path, mtls_target: str) -> None:
    tls = TlsOptions.from_files(pki / "ca.pem", pki / "client.pem", pki / "client.key", SERVER_NAME)
    with GenserveClient(ChannelConfig(mtls_target, tls=tls, token="t")) as client:
        assert [m.name for m in client.list_models()] == FakeService().models
    proc = run_cli(
        "--target",
        mtls_target,
        "--tls-ca",
        str(pki / "ca.pem"),
        "--tls-cert",
        str(pki / "client.pem"),
        "--tls-key",
        str(pki / "client.key"),
        "--tls-server-name",
        SERVER_NAME,
        "models",
    )
    assert proc.returncode == 0 and "fake-cond" in proc.stdout, proc.stderr


def test_without_a_client_certificate_the_handshake_fails(pki: Path, mtls_target: str) -> None:
    tls = TlsOptions.from_files(pki / "ca.pem", server_name_override=SERVER_NAME)
    no_retry = RetryPolicy(max_attempts=1)
    with GenserveClient(ChannelConfig(mtls_target, tls=tls), retry=no_retry, timeout_s=5) as client:
        with pytest.raises(GenserveClientError) as info:
            client.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_both_cert_and_key(pki: Path) -> None:
    with pytest.raises(ValueError, match="both"):
        TlsOptions.from_files(pki / "ca.pem", cert=pki / "client.pem")


def test_an_address_list_of_host_names_checks_each_server_against_that_name(
    pki: Path, tmp_path: Path
) -> None:
    """Replicas listed by host name: each connection goes to a resolved address, and TLS still checks
    the certificate against the name as written (no --tls-server-name needed); listed by IP, a
    certificate without that IP is refused."""
    for step in (
        ("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "lh.key", "-out", "lh.csr", "-subj", "/CN=lh"),
        ("x509", "-req", "-in", "lh.csr", "-CA", str(pki / "ca.pem"), "-CAkey", str(pki / "ca.key")),
    ):
        if step[0] == "x509":
            (tmp_path / "lh.ext").write_text("subjectAltName=DNS:localhost\n")
            step += ("-CAcreateserial", "-out", "lh.pem", "-days", "2", "-extfile", "lh.ext")
        openssl(*step, cwd=tmp_path)
    key_pair = [((tmp_path / "lh.key").read_bytes(), (tmp_path / "lh.pem").read_bytes())]
    services, servers, ports = [], [], []
    for _ in range(2):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        services.append(FakeService())
        genserve_pb2_grpc.add_GenerationServiceServicer_to_server(services[-1], server)
        ports.append(server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(key_pair)))
        server.start()
        servers.append(server)
    try:
        tls = TlsOptions.from_files(pki / "ca.pem")
        by_name = ",".join(f"localhost:{p}" for p in ports)
        with GenserveClient(ChannelConfig(by_name, tls=tls), timeout_s=10) as client:
            # round_robin uses a replica once its handshake is done: both answer within a few calls.
            for _ in range(500):
                assert client.list_models()
                if all(s.calls["ListModels"] > 0 for s in services):
                    break
        assert all(s.calls["ListModels"] > 0 for s in services)  # both replicas answered
        by_ip = ",".join(f"127.0.0.1:{p}" for p in ports)
        with GenserveClient(
            ChannelConfig(by_ip, tls=tls), retry=RetryPolicy(max_attempts=1), timeout_s=5
        ) as c:
            with pytest.raises(GenserveClientError) as info:
                c.list_models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        for server in servers:
            server.stop(grace=None)


def test_a_tls_file_that_holds_no_pem_is_named_before_any_connection(pki: Path, tmp_path: Path) -> None:
    """grpc took any bytes as root certificates and only failed the connection (UNAVAILABLE, with
    its own log lines), naming no file."""
    junk = tmp_path / "ca.txt"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"--tls-ca .*ca\.txt: not a PEM file holding CA certificates"):
        TlsOptions.from_files(junk)
    with pytest.raises(ValueError, match=r"--tls-key .*: not a PEM file holding a private key"):
        TlsOptions.from_files(pki / "ca.pem", pki / "client.pem", pki / "client.pem")
    assert TlsOptions.from_files(pki / "ca.pem", pki / "client.pem", pki / "client.key").client_key


@pytest.mark.parametrize("broken", ["another certificate's key", "passphrase-protected"])
def test_a_client_key_grpc_cannot_use_with_its_certificate_is_named_before_any_connection(
    pki: Path, mtls_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str
) -> None:
    """A --tls-key that is not the key of --tls-cert (or one under a passphrase) passed from_files'
    PEM check; gRPC then failed every connection 'UNAVAILABLE: ... Failed to create security
    handshaker' with C-core error lines, retried as an outage (a bulk job for its whole retry
    window), naming neither flag. The server refuses the same files at start-up, naming them."""
    from client_fakes import cli_main

    if broken == "passphrase-protected":
        key = tmp_path / "encrypted.key"
        openssl("pkey", "-in", str(pki / "client.key"), "-aes256", "-passout", "pass:pw", "-out", str(key),
                cwd=tmp_path)  # fmt: skip
        expected = f"--tls-key {key}: encrypted (passphrase-protected)"
    else:
        key = pki / "server.key"
        expected = f"--tls-cert {pki / 'client.pem'} and --tls-key {key}: not a certificate and its private"
    with pytest.raises(ValueError) as refused:
        TlsOptions.from_files(pki / "ca.pem", pki / "client.pem", key)
    assert expected in str(refused.value), refused.value
    tls = ("--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"), "--tls-key", str(key))
    code, _, err = cli_main(capsys, "--target", mtls_target, *tls, "--tls-server-name", SERVER_NAME, "models")
    assert code == 2, err
    assert expected in err, err


def test_every_tls_file_that_cannot_be_read_is_named_in_one_error(tmp_path: Path) -> None:
    """--tls-ca, --tls-cert and --tls-key were read one after the other and the first that failed
    ended the command naming that one only: a user fixing one at a time ran it once per file."""
    ca, cert, key = tmp_path / "no-ca.pem", tmp_path / "no-cert.pem", tmp_path / "no-key.pem"
    with pytest.raises(ValueError) as raised:
        TlsOptions.from_files(ca, cert, key)
    message = str(raised.value)
    for flag, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        assert f"{flag} {path}: cannot read it (No such file or directory)" in message, message


class CountedBackoffs(random.Random):
    """Counts the backoffs drawn: one per retry the policy grants."""

    def __init__(self) -> None:
        super().__init__(0)
        self.draws = 0

    def uniform(self, a: float, b: float) -> float:
        self.draws += 1
        return 0.0


def test_a_server_certificate_the_client_rejects_is_final_not_retried(pki: Path, mtls_target: str) -> None:
    """A handshake this client's own TLS settings fail (a CA that did not sign the server's
    certificate, a name the certificate does not hold) fails the same way on every attempt: it was
    retried as an outage (UNAVAILABLE), all RetryPolicy attempts with their reconnect waits, and a
    bulk job kept reopening its streams for the whole --retry-window (300 s) before stopping as
    'resumable'. It is final at the first answer, as a message over gRPC's size limit is; a server
    that closes the connection (its refusal of a client certificate, a restart) is still retried."""
    client_creds = {"cert": pki / "client.pem", "key": pki / "client.key"}
    for tls in (
        TlsOptions.from_files(pki / "client.pem", server_name_override=SERVER_NAME, **client_creds),
        TlsOptions.from_files(pki / "ca.pem", server_name_override="other.test", **client_creds),
    ):
        backoffs = CountedBackoffs()
        policy = RetryPolicy(max_attempts=5, reconnect_wait_s=0)
        config = ChannelConfig(mtls_target, tls=tls)
        with GenserveClient(config, retry=policy, rng=backoffs, timeout_s=20) as c:
            with pytest.raises(GenserveClientError) as info:
                c.list_models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert backoffs.draws == 0, f"retried {backoffs.draws} times: {info.value.details}"
    closed = "connections to all backends failing; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    assert not is_permanent(grpc.StatusCode.UNAVAILABLE, closed)


def test_a_tls_call_to_a_plaintext_server_is_final_not_retried(pki: Path, fake_server: FakeServer) -> None:
    """docs/client.md: a TLS handshake the client's own settings fail, a plaintext server among them
    (grpc's 'WRONG_VERSION_NUMBER'), is UNAVAILABLE but final at once: every attempt would fail
    alike, so no backoff is drawn and the server is never reached."""
    backoffs = CountedBackoffs()
    policy = RetryPolicy(max_attempts=5, reconnect_wait_s=0)
    config = ChannelConfig(fake_server.target, tls=TlsOptions.from_files(pki / "ca.pem"))
    with GenserveClient(config, retry=policy, rng=backoffs, timeout_s=20) as c:
        with pytest.raises(GenserveClientError) as info:
            c.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "wrong_version_number" in info.value.details.lower(), info.value.details
    assert backoffs.draws == 0, f"retried {backoffs.draws} times: {info.value.details}"
    assert sum(fake_server.service.calls.values()) == 0


def test_a_client_certificate_outside_its_validity_is_named_in_a_warning(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An expired (or not yet valid) --tls-cert went out without a word: a server requiring client
    certificates closes the handshake ('Socket closed', UNAVAILABLE, retried as an outage: a bulk
    job for its whole retry window), naming nothing. from_files warns naming the file, its
    notBefore and notAfter and the time now; a valid one is read without a word."""
    from reliability_support import dated_certificate

    expired = dated_certificate(pki, "client", "20200101000000Z", "20200201000000Z")
    with caplog.at_level("WARNING", logger="genserve_client"):
        TlsOptions.from_files(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        assert not caplog.records, caplog.text
        TlsOptions.from_files(pki / "ca.pem", expired, pki / "client.key")
    [record] = caplog.records
    message = record.getMessage()
    assert f"--tls-cert {expired}" in message, message
    assert "notBefore Jan  1 00:00:00 2020 GMT, notAfter Feb  1 00:00:00 2020 GMT, now " in message, message


def test_a_plaintext_call_to_a_tls_server_says_to_pass_tls(pki: Path, mtls_target: str) -> None:
    """A plaintext client against a TLS server failed after its retries with 'UNAVAILABLE: ...
    Socket closed', exit 1, the very message of a server restart, which says nothing of TLS. After
    that failure the CLI tries a TLS handshake with the target: where it answers TLS, a line says to
    pass --tls; a server that is not there, or speaks plaintext, gets no such line."""
    proc = run_cli("--target", mtls_target, "models")
    assert proc.returncode == 1, proc.stderr
    assert "Socket closed" in proc.stderr, proc.stderr
    assert f"{mtls_target} speaks TLS" in proc.stderr and "--tls" in proc.stderr, proc.stderr
    from genserve_client.channel import tls_hint

    # The hint of a plaintext server or a closed port is never given.
    plain = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(FakeService(), plain)
    port = plain.add_insecure_port("127.0.0.1:0")
    plain.start()
    try:
        assert tls_hint(f"127.0.0.1:{port}") is None
    finally:
        plain.stop(grace=None)
    assert tls_hint(f"127.0.0.1:{port}") is None
    assert tls_hint(mtls_target) is not None


def test_a_plaintext_bulk_job_against_a_tls_server_says_to_pass_tls(mtls_target: str, tmp_path: Path) -> None:
    """A plaintext bulk job against a TLS server retries its 'Socket closed' for --retry-window
    (an outage, as for any command) and then stopped with 'gave up after retrying ...; last error:
    UNAVAILABLE ... Socket closed', without the line the other commands print after that failure:
    the same one-handshake check runs after a bulk job's retries are spent."""
    out = tmp_path / "job"
    job = ("bulk", "--model", "fake-gen", "--n", "2", "--out", str(out), "--retry-window", "1")
    proc = run_cli("--target", mtls_target, *job)
    assert proc.returncode == 1, proc.stderr
    assert "Socket closed" in proc.stderr, proc.stderr
    assert f"{mtls_target} speaks TLS" in proc.stderr and "--tls" in proc.stderr, proc.stderr
