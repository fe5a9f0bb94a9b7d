"""`genserve-server health`: a tiny grpc.health.v1 probe for Docker HEALTHCHECK and humans.

Exit status 0 when the server answers SERVING for the service (`""`, the whole server, by default;
a model name for one model), 1 for anything else: another answer, an unknown service, a server not
reached in time, a refusal (UNAUTHENTICATED, a TLS handshake), a TLS or token file it cannot use.
Docker's HEALTHCHECK defines only 0 and 1 (2 is reserved); Kubernetes exec probes take any non-zero
as failure. Only a usage error (an unknown flag, a bad --port) exits 2, argparse's, before any check.
It imports no onnxruntime and no numpy, so a probe costs a Python start and one RPC.

Kubernetes does not need it: its probes speak grpc.health.v1 natively (deploy/k8s/), in plaintext
and without a token. This probe also speaks TLS (`--tls-ca`, mutual TLS with `--tls-cert`/`--tls-key`)
and sends a bearer token (`--token-file`, `--token-env`, or both: the server's own sources, whose
first token it sends), so a server with TLS on or `--closed-health` can still be probed from inside
its container.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genserve_contract.stdio import HelpParser, Stdout
from genserve_contract.tls_files import key_pair_problem
from genserve_server.certificates import decode_certificate, outside_validity
from genserve_server.flag_types import MAX_TIMEOUT_S, nonempty_path, port_number, seconds
from genserve_server.tokens import load_tokens
from genserve_server.version import package_version

EXIT_SERVING = 0
# Every other outcome, the server unreachable or refusing the probe included: Docker's HEALTHCHECK
# defines 1 as unhealthy and reserves 2 (argparse's usage error, which never reaches a check).
EXIT_UNHEALTHY = 1
# The most characters of gRPC's details the probe's line quotes (a refused connection, an HTTP/1 port).
MAX_DETAILS = 300
EXIT_STATUS_HELP = (
    "exit status: 0 SERVING; 1 anything else (not serving, unknown service, unreachable, refused, "
    "an unusable TLS or token file); 2 a usage error (bad arguments), before any check"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `health` subcommand's options (main.py adds them to its subparser)."""
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=port_number(lowest=1),
        default=50051,
        help="gRPC port, or the server's --health-port (default 50051)",
    )
    parser.add_argument(
        "--service", default="", help='health service name: "" for the whole server (default), or a model'
    )
    parser.add_argument(
        "--timeout-s",
        type=seconds(allow_zero=False, max_s=MAX_TIMEOUT_S),
        default=3.0,
        help="deadline of the check, at most 86400 s (default 3 s)",
    )
    tls = parser.add_argument_group("TLS and token (a server with --tls-cert, or --closed-health)")
    tls.add_argument("--tls-ca", type=nonempty_path, default=None, help="CA certificates (PEM); turns TLS on")
    tls.add_argument(
        "--tls-cert", type=nonempty_path, default=None, help="client certificate (PEM), for mutual TLS"
    )
    tls.add_argument(
        "--tls-key", type=nonempty_path, default=None, help="client private key (PEM), for mutual TLS"
    )
    tls.add_argument("--tls-server-name", default=None, help="the name the server's certificate holds")
    tls.add_argument(
        "--token-file", type=nonempty_path, default=None, help="the server's token file: sends its first"
    )
    tls.add_argument("--token-env", default=None, help="the server's token variable: sends its first token")


class ProbeError(Exception):
    """A probe option that cannot be used (unreadable file, no token): unhealthy (exit 1), named."""


def first_token(token_file: Path | None, token_env: str | None) -> str | None:
    """The first token of the server's own sources, read by the server's rules (tokens.load_tokens:
    lines end at \n alone, a token no client can send is refused naming its line), or None when
    neither is named. str.splitlines broke a line at a form feed or NEL, so a comment holding one
    gave a 'token' the server does not have. Both named are both read, as the server reads them
    (its first token is then the file's): a variable the server would refuse is refused here too."""
    tokens: list[bytes] = []
    if token_file is not None:
        try:
            tokens.extend(load_tokens(token_file))
        except OSError as exc:
            raise ProbeError(f"--token-file {token_file}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ProbeError(f"--token-file {exc}") from None
    if token_env is not None:
        try:
            tokens.extend(load_tokens(env_var=token_env))
        except ValueError as exc:
            raise ProbeError(str(exc)) from None  # the variable named, or --token-env
    return tokens[0].decode() if tokens else None


def _credentials(ca: Path | None, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials | None:
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ProbeError("--tls-cert and --tls-key go together (mutual TLS)")
    # Every file that fails is named in the one error, not only the first.
    errors: list[str] = []
    root = _pem(ca, "--tls-ca", b"CERTIFICATE-----", "CA certificates", errors)
    chain = _pem(cert, "--tls-cert", b"CERTIFICATE-----", "a certificate", errors)
    private_key = _pem(key, "--tls-key", b"PRIVATE KEY-----", "a private key", errors)
    if errors:
        raise ProbeError("; ".join(errors))
    if cert is not None and key is not None:
        _check_key_pair(cert, key)
    return grpc.ssl_channel_credentials(root, private_key, chain)


def _check_key_pair(cert: Path, key: Path) -> None:
    """ProbeError naming the flags and files unless `key` is the unencrypted private key of `cert`'s
    certificate, as the server checks its own pair: gRPC takes any such pair and fails the connection
    ('Failed to create security handshaker', UNAVAILABLE, as for a server down), naming neither."""
    problem, _ = key_pair_problem(cert, key)
    if problem is None:
        return
    if problem.encrypted:
        raise ProbeError(
            f"--tls-key {key}: encrypted (passphrase-protected); gRPC needs an unencrypted PEM key"
        )
    raise ProbeError(
        f"--tls-cert {cert} and --tls-key {key}: not a certificate and its private key ({problem.reason})"
    )


def _pem(path: Path | None, flag: str, marker: bytes, what: str, errors: list[str]) -> bytes | None:
    """`path`'s bytes, or None with the error naming `flag` and the file added to `errors`: gRPC takes
    any bytes and fails only the connection (UNAVAILABLE, as for a server down, with its own C-core lines)."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        errors.append(f"{flag} {path}: cannot read it ({exc.strerror or exc})")
        return None
    if b"-----BEGIN " not in data or marker not in data:
        errors.append(f"{flag} {path}: not a PEM file holding {what}")
        return None
    return data


def check(
    host: str,
    port: int,
    service: str = "",
    timeout_s: float = 3.0,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
    token: str | None = None,
) -> tuple[int, str, str]:
    """One Health.Check (over TLS with `credentials`, with `token` as a bearer token); returns (exit
    status, the status name or the gRPC error, the error's details or "")."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            response = stub.Check(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            details = (err.details() if isinstance(err, grpc.Call) else None) or ""
            # NOT_FOUND (an unknown service), UNAVAILABLE, DEADLINE_EXCEEDED, UNAUTHENTICATED: named,
            # with gRPC's details (why: a refused connection, a port that speaks HTTP/1, a handshake).
            return EXIT_UNHEALTHY, code.name if code is not None else "UNKNOWN", details
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    return (EXIT_SERVING if serving else EXIT_UNHEALTHY), name, ""


def _shown_details(details: str) -> str:
    """`: details` on one line (its whitespace runs one space, other control characters escaped),
    cut to MAX_DETAILS; "" for none."""
    text = " ".join(details.split())
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if not text:
        return ""
    return ": " + (text if len(text) <= MAX_DETAILS else text[: MAX_DETAILS - 3] + "...")


def run(args: argparse.Namespace) -> int:
    """Run the probe for parsed arguments and write one line: `<service or ""> <status>`."""
    try:
        credentials = _credentials(args.tls_ca, args.tls_cert, args.tls_key)
        token = first_token(args.token_file, args.token_env)
    except ProbeError as exc:
        _say(f"genserve-server health: {exc}")
        return EXIT_UNHEALTHY
    status, name, details = check(
        args.host,
        args.port,
        args.service,
        args.timeout_s,
        credentials=credentials,
        server_name=args.tls_server_name,
        token=token,
    )
    shown = args.service or '""'
    _say(f"{shown} {name}{_shown_details(details)}{_certificate_note(args.tls_cert, name)}")
    return status


def _say(line: str) -> None:
    """The probe's one line. Its exit status is the answer: a stdout closed (`>&-`: no sys.stdout)
    or whose reader went away (`| true`) does not change it."""
    Stdout().say(line, flush=True)


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: `genserve-server VERSION` (the installed package's, else SERVER_VERSION), exit 0."""
    parser.add_argument(
        "--version",
        action="version",
        version=f"genserve-server {package_version()}",
        help="print the version",
    )


def _certificate_note(cert: Path | None, status: str) -> str:
    """Where the connection failed (UNAVAILABLE: a mutual-TLS server closes the handshake on a
    client certificate it refuses, 'Socket closed') and --tls-cert is outside its validity window:
    a note naming it, its notBefore and notAfter and the time now; else nothing."""
    if cert is None or status != "UNAVAILABLE":
        return ""
    decoded = decode_certificate(cert)
    window = outside_validity(decoded, time.time()) if decoded is not None else None
    return f" (--tls-cert {cert} is outside its validity window: {window})" if window else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m genserve_server.probe --port 50051`."""
    parser = HelpParser(
        prog="genserve-server health", description=__doc__.splitlines()[0], epilog=EXIT_STATUS_HELP
    )
    add_arguments(parser)
    add_version(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
