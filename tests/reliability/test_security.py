"""TLS, mutual TLS and bearer tokens on a real server, with certificates made by the openssl CLI."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from reliability_support import (
    SERVER_NAME,
    code_of,
    dated_certificate,
    health_status,
    sample_ok,
    secure_channel,
    write_gen,
)
from server_support import ServerProcess, start_server

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve_client import ChannelConfig, GenserveClient, TlsOptions
from genserve_server.config import ConfigError, load_server_config
from genserve_server.main import build_parser

TOKEN = "s3cret-token"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secure-models")
    write_gen(root)
    return root


@pytest.fixture(scope="module")
def tls_server(
    small_repo: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """TLS and a token file, from command-line flags; health open (the default)."""
    work = tmp_path_factory.mktemp("tls-server")
    (work / "tokens").write_text(f"# ops\n{TOKEN}\nsecond-token\n")
    server = start_server(
        small_repo,
        work,
        extra_args=(
            "--tls-cert",
            str(pki / "server.pem"),
            "--tls-key",
            str(pki / "server.key"),
            "--token-file",
            str(work / "tokens"),
        ),  # fmt: skip
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(
    small_repo: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Mutual TLS and a token from the environment, from the config file; health needs a token too."""
    work = tmp_path_factory.mktemp("mtls-server")
    config = {
        "tls": {"cert_file": str(pki / "server.pem"), "key_file": str(pki / "server.key"),
                "client_ca_file": str(pki / "ca.pem")},
        "auth": {"token_env": "GENSERVE_TEST_TOKENS", "open_health": False},
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENSERVE_TEST_TOKENS", f"other-token,{TOKEN}")
        server = start_server(small_repo, work, config=config)
    yield server
    server.stop()


def test_tls_refuses_plaintext_and_serves_tls_with_a_token(tls_server: ServerProcess, pki: Path) -> None:
    with grpc.insecure_channel(tls_server.target) as plain:
        assert code_of(lambda: sample_ok(plain, timeout_s=5)) == grpc.StatusCode.UNAVAILABLE
    with secure_channel(tls_server.target, pki) as channel:
        assert len(sample_ok(channel, metadata=GOOD).images) == 1
        assert len(sample_ok(channel, metadata=(("authorization", "Bearer second-token"),)).images) == 1


def test_plaintext_connections_to_a_tls_server_do_not_write_a_line_each(
    small_repo: Path, pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With GRPC_VERBOSITY unset, grpcio 1.85's C core wrote an INFO line (`Handshake failed with
    error SSL_ERROR_SSL ...`, not in --log-json's format) for every connection that did not complete
    a TLS handshake: anyone who could reach the port wrote the log at will, before any token."""
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)  # the server's default, not this process's
    server = start_server(
        small_repo,
        tmp_path,
        extra_args=("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")),
    )
    try:
        host, port = server.target.rsplit(":", 1)
        since = len(server.log().splitlines())
        for _ in range(40):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: genserve\r\n\r\n")
                with contextlib.suppress(OSError):
                    sock.recv(64)  # the server's alert, or its close
        with secure_channel(server.target, pki) as channel:  # and TLS still serves
            assert health_status(channel) == SERVING
        new = server.log().splitlines()[since:]
        assert len(new) <= 2, f"{len(new)} lines for 40 plaintext connections: {new[:3]}"
    finally:
        server.stop()


def test_every_rpc_needs_a_valid_token_and_rejections_are_counted(
    tls_server: ServerProcess, pki: Path
) -> None:
    before = tls_server.metric("genserve_requests_rejected_total", reason="unauthenticated")
    with secure_channel(tls_server.target, pki) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
        bad_metadata: list[tuple[tuple[str, str], ...]] = [
            (),
            (("authorization", "Bearer wrong"),),
            (("authorization", f"Bearer {TOKEN}x"),),
            (("authorization", f"Basic {TOKEN}"),),
            (("authorization", TOKEN),),
            (("x-api-key", TOKEN),),
        ]
        for md in bad_metadata:
            assert code_of(lambda md=md: sample_ok(channel, metadata=md)) == UNAUTHENTICATED, md
        calls = [
            lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10),
            lambda: stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10),
            lambda: list(
                stub.SampleStream(
                    pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=2)), timeout=10
                )
            ),
            lambda: kstub.ModelInfer(kpb.ModelInferRequest(model_name="gen"), timeout=10),
            lambda: kstub.ServerReady(kpb.ServerReadyRequest(), timeout=10),
        ]
        for call in calls:
            assert code_of(call) == UNAUTHENTICATED
        # Health stays open for probes (auth.open_health defaults to true).
        assert health_status(channel) == SERVING
        assert health_status(channel, "gen") == SERVING
    expected = before + len(bad_metadata) + len(calls)
    assert tls_server.metric("genserve_requests_rejected_total", reason="unauthenticated") == expected


def test_reflection_needs_a_token_while_health_stays_open(tls_server: ServerProcess, pki: Path) -> None:
    """Reflection is a service like the others (docs/operations.md: every RPC of every service needs
    the token, genserve.v1, KServe and reflection); only grpc.health.v1 is left open."""
    before = tls_server.metric("genserve_requests_rejected_total", reason="unauthenticated")
    with secure_channel(tls_server.target, pki) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        def services(metadata: tuple[tuple[str, str], ...]) -> set[str]:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            answers = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
            return {s.name for a in answers for s in a.list_services_response.service}

        assert code_of(lambda: services(())) == UNAUTHENTICATED
        assert code_of(lambda: services((("authorization", "Bearer wrong"),))) == UNAUTHENTICATED
        assert "genserve.v1.GenerationService" in services(GOOD)
        assert health_status(channel) == SERVING
    after = tls_server.metric("genserve_requests_rejected_total", reason="unauthenticated")
    assert after == before + 2


def test_a_call_with_more_than_one_authorization_header_is_refused_naming_it(
    tls_server: ServerProcess, pki: Path
) -> None:
    """Two `authorization` entries are an ambiguous credential (a proxy may check one, the server
    another): only the first bearer token counted, so a valid token followed by any other passed.
    Any call with more than one is refused UNAUTHENTICATED, saying so, and counted."""
    before = tls_server.metric("genserve_requests_rejected_total", reason="unauthenticated")
    doubled = [
        (("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong")),
        (("authorization", "Bearer wrong"), ("authorization", f"Bearer {TOKEN}")),
        (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")),
        (("authorization", "Basic x"), ("authorization", f"Bearer {TOKEN}")),
    ]
    with secure_channel(tls_server.target, pki) as channel:
        for metadata in doubled:
            with pytest.raises(grpc.RpcError) as refused:
                sample_ok(channel, metadata=metadata)
            assert refused.value.code() == UNAUTHENTICATED, metadata
            assert "more than one authorization header" in (refused.value.details() or ""), metadata
        assert len(sample_ok(channel, metadata=GOOD).images) == 1  # one header with the token: served
    after = tls_server.metric("genserve_requests_rejected_total", reason="unauthenticated")
    assert after == before + len(doubled)


def test_client_library_with_tls_and_token(tls_server: ServerProcess, pki: Path) -> None:
    tls = TlsOptions.from_files(pki / "ca.pem", server_name_override=SERVER_NAME)
    with GenserveClient(ChannelConfig(tls_server.target, tls=tls, token=TOKEN)) as client:
        assert [m.name for m in client.list_models()] == ["gen"]


def test_metrics_bind_to_localhost_by_default(tls_server: ServerProcess) -> None:
    assert build_parser().parse_args(["serve", "--models", "m"]).metrics_host == "127.0.0.1"
    assert f"metrics on 127.0.0.1:{tls_server.metrics_port}" in tls_server.log()
    assert "genserve_requests_total" in tls_server.metrics_text()


def test_mtls_needs_a_client_certificate_from_the_ca(mtls_server: ServerProcess, pki: Path) -> None:
    with secure_channel(mtls_server.target, pki) as no_cert:
        assert code_of(lambda: sample_ok(no_cert, metadata=GOOD, timeout_s=5)) == grpc.StatusCode.UNAVAILABLE
    with secure_channel(mtls_server.target, pki, client="rogue") as rogue:
        assert code_of(lambda: sample_ok(rogue, metadata=GOOD, timeout_s=5)) == grpc.StatusCode.UNAVAILABLE
    with secure_channel(mtls_server.target, pki, client="client") as channel:
        assert len(sample_ok(channel, metadata=GOOD).images) == 1
        assert code_of(lambda: sample_ok(channel)) == UNAUTHENTICATED  # a certificate is not a token


def test_closed_health_needs_a_token(mtls_server: ServerProcess, pki: Path) -> None:
    with secure_channel(mtls_server.target, pki, client="client") as channel:
        assert code_of(lambda: health_status(channel)) == UNAUTHENTICATED
        assert health_status(channel, metadata=GOOD) == SERVING


def test_security_config_is_validated(tmp_path: Path) -> None:
    def load(data: object) -> None:
        path = tmp_path / "server.json"
        path.write_text(json.dumps(data))
        load_server_config(path)

    for data, message in (
        ({"tls": {"cert_file": "a.pem"}}, "tls needs both cert_file and key_file"),
        ({"tls": {"client_ca_file": "ca.pem"}}, "tls.client_ca_file needs cert_file"),
        ({"tls": {"cert_file": 3, "key_file": "k"}}, "tls.cert_file must be a file path"),
        ({"auth": {"token_env": ""}}, "auth.token_env must be an environment variable name"),
        ({"auth": {"open_health": "yes"}}, "auth.open_health must be true or false"),
        ({"auth": {"tokens": ["inline"]}}, "auth.tokens is not a known field"),
        ({"watch_interval_s": 0}, "watch_interval_s must be a number of seconds > 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            load(data)
    path = tmp_path / "ok.json"
    path.write_text(
        json.dumps({"tls": {"cert_file": "c.pem", "key_file": "k.pem"}, "auth": {"token_file": "t"}})
    )
    security = load_server_config(path).security
    assert security.tls_cert_file == tmp_path / "c.pem" and security.token_file == tmp_path / "t"
    assert security.open_health and security.tls and security.auth


def test_a_token_source_without_tokens_stops_startup(small_repo: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("# nobody yet\n")
    with pytest.raises(RuntimeError, match="no token in the file"):
        start_server(small_repo, tmp_path, extra_args=("--token-file", str(tmp_path / "empty")), timeout_s=30)


def test_a_token_source_flag_replaces_the_config_files_token_sources(
    small_repo: Path, tmp_path: Path
) -> None:
    """Flags win over the config file: a --token-file given to retire the config's token source must
    leave only its own tokens, so the config's (an environment variable here) is refused."""
    (tmp_path / "new-tokens").write_text("new-token\n")
    config = {"auth": {"token_env": "GENSERVE_TEST_OLD_TOKENS"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENSERVE_TEST_OLD_TOKENS", "old-token")
        server = start_server(
            small_repo,
            tmp_path / "work",
            config=config,
            extra_args=("--token-file", str(tmp_path / "new-tokens")),
        )
    try:
        with grpc.insecure_channel(server.target) as channel:
            old = (("authorization", "Bearer old-token"),)
            assert code_of(lambda: sample_ok(channel, metadata=old)) == UNAUTHENTICATED
            new = (("authorization", "Bearer new-token"),)
            assert len(sample_ok(channel, metadata=new).images) == 1
    finally:
        server.stop()


def test_closed_health_without_a_token_stops_startup(small_repo: Path, tmp_path: Path) -> None:
    """--closed-health with no token source closed nothing (health and every RPC stayed open) and
    said nothing: it is refused at start-up, naming what it needs."""
    _refused_at_startup(small_repo, tmp_path, ("--closed-health",), "--closed-health .* needs a token")


def _refused_at_startup(repo: Path, work: Path, args: tuple[str, ...], message: str) -> None:
    """Start-up must fail with `message`; a server that starts anyway is stopped, then the test fails."""
    try:
        server = start_server(repo, work, extra_args=args, timeout_s=30)
    except RuntimeError as exc:
        assert re.search(message, str(exc)), exc
    else:
        server.stop()
        pytest.fail(f"the server started with {args}")


@pytest.mark.parametrize("broken", ["cert", "key", "mismatch", "ca"])
def test_tls_files_that_are_not_pem_stop_startup_naming_them(
    small_repo: Path, pki: Path, tmp_path: Path, broken: str
) -> None:
    """A certificate that is not PEM (or a key of another certificate) failed as 'cannot listen on
    ADDRESS (--host/--port)', which sent operators to the port; the error now names the TLS files."""
    cert, key = pki / "server.pem", pki / "server.key"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    if broken == "cert":
        args[1] = str(garbage)
    elif broken == "key":
        args[3] = str(garbage)
    elif broken == "mismatch":
        args[3] = str(pki / "client.key")
    else:
        args += ["--tls-client-ca", str(garbage)]
    expected = (
        "holds no PEM CA certificate" if broken == "ca" else "are not a PEM certificate and its private key"
    )
    _refused_at_startup(small_repo, tmp_path, tuple(args), expected)


def test_the_health_probe_speaks_mutual_tls_and_sends_the_servers_first_token(
    mtls_server: ServerProcess, pki: Path, tmp_path: Path
) -> None:
    """The image's HEALTHCHECK probe spoke plaintext without a token: a server with TLS on or
    --closed-health was 'unreachable' to it forever. It now takes the server's own token sources."""
    port = mtls_server.target.rsplit(":", 1)[1]
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# ops\n{TOKEN}\nsecond\n")

    def probe(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "genserve_server.probe", "--port", port, "--timeout-s", "5", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    tls = ("--tls-ca", str(pki / "ca.pem"), "--tls-server-name", SERVER_NAME)
    client = ("--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"))
    ok = probe(*tls, *client, "--token-file", str(tokens))
    assert (ok.returncode, ok.stdout) == (0, '"" SERVING\n'), ok.stderr
    assert probe(*tls, *client).returncode == 1  # no token: refused
    assert probe(*tls, "--token-file", str(tokens)).returncode == 1  # no client certificate
    missing = probe(*tls, *client, "--token-file", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "--token-file" in missing.stdout


def test_the_health_probe_exits_1_for_every_unhealthy_outcome_never_dockers_reserved_2(
    mtls_server: ServerProcess, pki: Path, tmp_path: Path, idle_port: int
) -> None:
    """Docker's HEALTHCHECK defines exit 0 (healthy) and 1 (unhealthy) and reserves 2; the probe
    exited 2 when it could not reach the server, was refused, or could not read its own TLS or token
    file. Every outcome but SERVING is now 1; 2 is left to argparse's usage errors alone."""
    port = mtls_server.target.rsplit(":", 1)[1]
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")

    def probe(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "genserve_server.probe", "--timeout-s", "5", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    tls = ("--tls-ca", str(pki / "ca.pem"), "--tls-server-name", SERVER_NAME)
    client = ("--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"))
    token = ("--token-file", str(tokens))
    unhealthy = {
        "unreachable": ("--port", str(idle_port), "--timeout-s", "1"),  # nothing listens
        "unauthenticated": ("--port", port, *tls, *client),
        "no client certificate": ("--port", port, *tls, *token),
        "unknown service": ("--port", port, *tls, *client, *token, "--service", "nothing"),
        "unreadable token file": ("--port", port, *tls, *client, "--token-file", str(tmp_path / "x")),
        "unreadable CA": ("--port", port, "--tls-ca", str(tmp_path / "x"), *client, *token),
    }
    for outcome, args in unhealthy.items():
        proc = probe(*args)
        assert proc.returncode == 1, (outcome, proc.stdout, proc.stderr)
    assert probe("--port", port, *tls, *client, *token).returncode == 0
    usage = probe("--port", "not-a-port")
    assert usage.returncode == 2 and "--port" in usage.stderr


def test_an_unauthenticated_calls_method_path_cannot_forge_log_lines_or_fields(
    small_repo: Path, tmp_path: Path
) -> None:
    """The token interceptor wrote the client's :path into its refusal line as it came: a path with
    a newline wrote a whole log line of the client's choosing, one with `key=value` forged fields,
    one with ESC or NUL sent terminal escapes to whoever tails the log. Like the boundary's line for
    an unknown method, a path that is not a plain method name is written as its repr."""
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    forged = "2026-01-01 00:00:00,000 INFO genserve_server.security: forged line request_id=forged"
    paths = [
        f"/genserve.v1.GenerationService/Sample\n{forged}",
        "/x request_id=forged method=/genserve.v1.GenerationService/Sample",
        "/y\x1b[2J\x00nul",
    ]
    server = start_server(
        small_repo,
        tmp_path / "work",
        extra_args=("--token-file", str(tmp_path / "tokens"), "--log-level", "DEBUG"),
    )
    try:
        with grpc.insecure_channel(server.target) as channel:
            for path in paths:
                assert (
                    code_of(lambda path=path: channel.unary_unary(path)(b"", timeout=10)) == UNAUTHENTICATED
                )
        log = server.log()
    finally:
        server.stop()
    lines = [line for line in log.splitlines() if "rejected unauthenticated call" in line]
    assert len(lines) == len(paths), lines
    assert not any(line.startswith(forged[:20]) for line in log.splitlines()), log
    assert "\x1b" not in log and "\x00" not in log
    # Each path whole, quoted: a forged `request_id=` is inside the quotes, never a field of the line.
    shown = sorted(line.partition("rejected unauthenticated call to ")[2] for line in lines)
    assert shown == sorted(repr(path) for path in paths), lines


def test_a_rejected_calls_log_line_names_neither_the_token_presented_nor_a_configured_one(
    small_repo: Path, tmp_path: Path
) -> None:
    """A wrong token is most often a right one mistyped, or another deployment's: the refusal's log
    line names the method and the request id, never what the call presented, nor the server's."""
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    presented = ["s3cret-tokem-typo", f"{TOKEN}-other"]
    server = start_server(
        small_repo,
        tmp_path / "work",
        extra_args=("--token-file", str(tmp_path / "tokens"), "--log-level", "DEBUG"),
    )
    try:
        with grpc.insecure_channel(server.target) as channel:
            for token in presented:
                md = (("authorization", f"Bearer {token}"),)
                assert code_of(lambda md=md: sample_ok(channel, metadata=md)) == UNAUTHENTICATED
        log = server.log()
    finally:
        server.stop()
    assert "rejected unauthenticated call to /genserve.v1.GenerationService/Sample" in log, log
    for secret in (*presented, TOKEN):
        assert secret not in log, secret


def test_unauthenticated_calls_get_a_first_line_per_method_not_one_for_all_methods(
    small_repo: Path, tmp_path: Path
) -> None:
    """docs/metrics.md: a refused call is logged at info as the first of its kind (method and
    status), unauthenticated calls the same way. The token interceptor throttled every method under
    one key: after a stale-token client's burst on Sample, a refusal of GetModel (another client's
    missing token) was only at DEBUG for 10 s. Methods no service has still share one line."""
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    server = start_server(
        small_repo, tmp_path / "work", extra_args=("--token-file", str(tmp_path / "tokens"))
    )
    paths = [
        *["/genserve.v1.GenerationService/Sample"] * 20,
        "/genserve.v1.GenerationService/GetModel",
        "/no.Such/MethodOne",
        "/no.Such/MethodTwo",
        "/genserve.v1.GenerationService/NoSuchMethod",
    ]
    try:
        md = (("authorization", "Bearer stale-token"),)
        with grpc.insecure_channel(server.target) as channel:
            for path in paths:
                assert (
                    code_of(lambda p=path: channel.unary_unary(p)(b"", metadata=md, timeout=10))
                    == UNAUTHENTICATED
                )
        log = server.log()
    finally:
        server.stop()
    lines = [line for line in log.splitlines() if "rejected unauthenticated call" in line]
    shown = [line.partition("rejected unauthenticated call to ")[2] for line in lines]
    assert shown == [
        "/genserve.v1.GenerationService/Sample",
        "/genserve.v1.GenerationService/GetModel",
        "/no.Such/MethodOne",  # the others no service has: at DEBUG, counted on its next line
    ], lines


def test_the_health_port_has_the_serving_ports_tls_and_closed_health_token(
    small_repo: Path, pki: Path, tmp_path: Path
) -> None:
    """docs/operations.md: on --health-port, TLS and tokens (--closed-health) apply as on the serving
    port: it refuses plaintext, and Check needs the token there too."""
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    args = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    args += ("--token-file", str(tmp_path / "tokens"), "--closed-health", "--health-port", "0")
    server = start_server(small_repo, tmp_path / "work", extra_args=args)
    try:
        target = f"127.0.0.1:{server.health_port}"
        with grpc.insecure_channel(target) as plain:
            assert code_of(lambda: health_status(plain, metadata=GOOD)) == grpc.StatusCode.UNAVAILABLE
        with secure_channel(target, pki) as channel:
            assert code_of(lambda: health_status(channel)) == UNAUTHENTICATED
            wrong = (("authorization", "Bearer x"),)
            assert code_of(lambda: health_status(channel, metadata=wrong)) == UNAUTHENTICATED
            assert health_status(channel, metadata=GOOD) == SERVING
    finally:
        server.stop()


def test_the_health_probe_names_an_expired_client_certificates_validity(
    mtls_server: ServerProcess, pki: Path, tmp_path: Path
) -> None:
    """An expired --tls-cert: the mutual-TLS server closes the handshake and the probe said only
    '"" UNAVAILABLE' (exit 1), naming nothing. It names the certificate, its notBefore and notAfter
    and the time now; a valid certificate's failure (none at all here) names no validity."""
    port = mtls_server.target.rsplit(":", 1)[1]
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    expired = dated_certificate(pki, "client", "20200101000000Z", "20200201000000Z")
    command = [sys.executable, "-m", "genserve_server.probe", "--port", port, "--timeout-s", "5"]
    tls = ("--tls-ca", str(pki / "ca.pem"), "--tls-server-name", SERVER_NAME, "--token-file", str(tokens))
    proc = subprocess.run(
        [*command, *tls, "--tls-cert", str(expired), "--tls-key", str(pki / "client.key")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith('"" UNAVAILABLE'), proc.stdout
    assert f"--tls-cert {expired}" in proc.stdout, proc.stdout
    assert "notBefore Jan  1 00:00:00 2020 GMT, notAfter Feb  1 00:00:00 2020 GMT, now " in proc.stdout
    valid = subprocess.run(
        [*command, *tls, "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (valid.returncode, valid.stdout) == (0, '"" SERVING\n'), valid.stderr


def test_the_health_probe_names_a_tls_file_that_holds_no_pem_rather_than_blaming_the_server(
    pki: Path, tmp_path: Path, idle_port: int
) -> None:
    """A --tls-ca, --tls-cert or --tls-key that is not PEM (an empty mounted secret, the key given as
    the CA) was handed to gRPC as it was: the probe printed `"" UNAVAILABLE`, as for a server down,
    under gRPC's own C-core lines ('Could not load any root certificate'), naming no flag or file.
    It is `genserve-server health: FLAG FILE: not a PEM file holding ...` (exit 1), before any call."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    client = ("--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"))
    cases = {
        "--tls-ca": ("--tls-ca", str(junk), *client),
        "--tls-cert": (
            "--tls-ca",
            str(pki / "ca.pem"),
            "--tls-cert",
            str(junk),
            "--tls-key",
            str(pki / "client.key"),
        ),
        "--tls-key": (
            "--tls-ca",
            str(pki / "ca.pem"),
            "--tls-cert",
            str(pki / "client.pem"),
            "--tls-key",
            str(junk),
        ),
    }
    for flag, args in cases.items():
        command = [
            sys.executable,
            "-m",
            "genserve_server.probe",
            "--port",
            str(idle_port),  # nothing listens: no answer could come from a server
            "--timeout-s",
            "2",
            *args,
        ]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1, (flag, proc.stdout, proc.stderr)
        assert proc.stdout.startswith(f"genserve-server health: {flag} {junk}: not a PEM file"), proc.stdout
        assert "UNAVAILABLE" not in proc.stdout and not proc.stderr.strip(), (proc.stdout, proc.stderr)


@pytest.mark.parametrize("broken", ["another certificate's key", "passphrase-protected"])
def test_the_health_probe_names_a_client_key_grpc_cannot_use_rather_than_blaming_the_server(
    pki: Path, tmp_path: Path, idle_port: int, broken: str
) -> None:
    """A --tls-key that is not the key of --tls-cert (or one under a passphrase) passed the PEM
    check: the probe printed `"" UNAVAILABLE: ... Failed to create security handshaker`, as for a
    server down, under gRPC's C-core error lines, naming no flag or file. The server refuses the same
    pair at start-up, naming it; the probe names it too (exit 1), before any call."""
    key = pki / "server.key"
    expected = f"--tls-cert {pki / 'client.pem'} and --tls-key {key}: not a certificate and its private key"
    if broken == "passphrase-protected":
        key = tmp_path / "encrypted.key"
        subprocess.run(
            [
                "openssl",
                "pkey",
                "-in",
                str(pki / "client.key"),
                "-aes256",
                "-passout",
                "pass:pw",
                "-out",
                str(key),
            ],
            check=True,
            capture_output=True,
        )
        expected = f"--tls-key {key}: encrypted (passphrase-protected)"
    tls = ("--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"), "--tls-key", str(key))
    command = [
        sys.executable,
        "-m",
        "genserve_server.probe",
        "--port",
        str(idle_port),
        "--timeout-s",
        "2",
        *tls,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith(f"genserve-server health: {expected}"), proc.stdout
    assert "UNAVAILABLE" not in proc.stdout and not proc.stderr.strip(), (proc.stdout, proc.stderr)


def test_a_token_file_that_cannot_be_read_stops_startup_naming_it_and_the_cause(
    small_repo: Path, tmp_path: Path
) -> None:
    """A --token-file that is not there (a Secret not mounted) ended the start with Python's own
    repr, 'auth: [Errno 2] No such file or directory: '...'', where a TLS file is 'tls: cannot read
    FILE: CAUSE': the same plain line now, naming the file."""
    missing = tmp_path / "no-tokens"
    _refused_at_startup(
        small_repo,
        tmp_path / "work",
        ("--token-file", str(missing)),
        re.escape(f"auth: cannot read {missing}: No such file or directory"),
    )


def test_every_missing_tls_file_is_named_in_one_start_up_error(small_repo: Path, tmp_path: Path) -> None:
    """With --tls-cert, --tls-key and --tls-client-ca all missing (a Secret not mounted) the start
    named only the first file it read: an operator fixing one at a time restarted once per file.
    The one error names each file that cannot be read, and why."""
    cert, key, ca = tmp_path / "no-cert.pem", tmp_path / "no-key.pem", tmp_path / "no-ca.pem"
    args = ("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca))
    try:
        server = start_server(small_repo, tmp_path / "work", extra_args=args, timeout_s=30)
    except RuntimeError as exc:
        message = str(exc)
    else:
        server.stop()
        pytest.fail("the server started without its TLS files")
    for path in (cert, key, ca):
        assert f"{path}: No such file or directory" in message, message
    assert "Traceback" not in message, message


def test_the_health_probe_names_every_tls_file_it_cannot_read_in_one_error(tmp_path: Path) -> None:
    """The probe's --tls-ca, --tls-cert and --tls-key were read one after the other and the first
    that failed ended it, naming that one only: every file that cannot be read is named at once."""
    files = {flag: tmp_path / f"no{flag}.pem" for flag in ("--tls-ca", "--tls-cert", "--tls-key")}
    command = [sys.executable, "-m", "genserve_server.probe", "--port", "1", "--timeout-s", "2"]
    for flag, path in files.items():
        command += [flag, str(path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith("genserve-server health: "), proc.stdout
    for flag, path in files.items():
        assert f"{flag} {path}: cannot read it (No such file or directory)" in proc.stdout, proc.stdout
    assert proc.stdout.count("\n") == 1 and not proc.stderr.strip(), (proc.stdout, proc.stderr)
