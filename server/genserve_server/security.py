"""Transport security and token authentication for the gRPC server.

TLS and mTLS come from grpc's own server credentials. Bearer tokens are checked by an aio server
interceptor before any handler runs, compared in constant time against every configured token
(so the time taken reveals neither which token nor how much of it matched).
"""

from __future__ import annotations

import hmac
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from genserve_contract.tls_files import DECRYPT_HINT, key_pair_problem
from genserve_server.boundary import UNKNOWN_METHOD, ThrottledLog, abort, request_id, shown_method
from genserve_server.certificates import decode_certificates as _decode_certificates
from genserve_server.certificates import not_after as _not_after
from genserve_server.certificates import outside_validity as _outside_validity
from genserve_server.config import ConfigError, SecurityConfig
from genserve_server.errors import Unauthenticated
from genserve_server.tokens import load_tokens

logger = logging.getLogger(__name__)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
AUTH_METADATA_KEY = "authorization"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Server certificate and key; a client CA turns on mutual TLS (client certificates required)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Build grpc credentials, reading the PEM files once at startup."""
    key, cert = tls.key_file.read_bytes(), tls.cert_file.read_bytes()
    if tls.client_ca_file is None:
        return grpc.ssl_server_credentials([(key, cert)])
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=tls.client_ca_file.read_bytes(), require_client_auth=True
    )


def token_matches(presented: bytes, tokens: Sequence[bytes]) -> bool:
    """Constant-time check against every token (no early exit on the first match)."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented, token)
    return matched


MISSING_TOKEN = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
# Two `authorization` entries are an ambiguous credential (RFC 7230 3.2.2: a field that is not a
# list is sent once): a proxy in front may have checked another one than the server would.
MORE_THAN_ONE = "more than one authorization header: send one 'authorization: Bearer <token>'"


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            if scheme.lower() == "bearer" and credential:
                return credential.strip().encode()
    return None


def _more_than_one_authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether the call has more than one `authorization` entry (refused whatever they hold)."""
    return sum(key == AUTH_METADATA_KEY for key, _ in metadata or ()) > 1


def _unparsed(raw: bytes) -> None:
    return None


def _deny(
    handler: grpc.RpcMethodHandler[Any, Any] | None,
    log: Callable[[grpc.aio.ServicerContext[Any, Any]], None] = lambda context: None,
    message: str = MISSING_TOKEN,
) -> grpc.RpcMethodHandler[Any, Any] | None:
    """A handler of the same streaming shape as `handler` that aborts with UNAUTHENTICATED saying
    `message`, after `log` (the call's line, which names the request id its trailing metadata
    carries)."""
    if handler is None:
        return None

    async def abort_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        log(context)
        await abort(context, Unauthenticated(message))

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        log(context)
        await abort(context, Unauthenticated(message))
        yield  # pragma: no cover - makes this an async generator for streaming responses

    # The caller's bytes are never parsed: a message of up to the receive limit (64 MiB) would cost
    # a full protobuf parse per unauthenticated call, for nothing.
    deserialize, serialize = _unparsed, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(abort_unary, deserialize, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream, deserialize, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort_unary, deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(abort_stream, deserialize, serialize)


def _throttle_key(method: str) -> str:
    """The kind of a refused call's line, one per method as the boundary's refusals (docs/metrics.md:
    the first of its kind, method and status): the method where a service the server's protos define
    has it, else one key for all (the client's :path, an unbounded set)."""
    service, _, name = method[1:].partition("/")
    try:
        descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    except KeyError:
        return UNKNOWN_METHOD
    return method


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid bearer token; health stays open for probes when configured."""

    def __init__(
        self,
        tokens: Sequence[bytes],
        *,
        open_health: bool = True,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._tokens = tuple(tokens)
        self._open_health = open_health
        self._on_reject = on_reject
        # A line per rejected call let a scanner (or a client with a stale token in a retry loop)
        # flood the log: one per boundary.REFUSAL_LOG_INTERVAL_S, with the count; the metric counts
        # every one.
        self._log = ThrottledLog(logger)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if self._open_health and method.startswith(HEALTH_METHOD_PREFIX):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        ambiguous = _more_than_one_authorization(metadata)
        presented = None if ambiguous else _bearer(metadata)
        if presented is not None and token_matches(presented, self._tokens):
            return await continuation(handler_call_details)
        if self._on_reject is not None:
            self._on_reject(method)
        shown = shown_method(method)  # the client's :path: never a line or field of its own
        refusal, why = (
            (MORE_THAN_ONE, " (more than one authorization header)") if ambiguous else (MISSING_TOKEN, "")
        )

        key = _throttle_key(method)

        def log(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            self._log.log(
                key, "request_id=%s rejected unauthenticated call to %s%s", request_id(context), shown, why
            )

        # A method no service has is UnknownMethods' (boundary.py, on every port): refused here too.
        return _deny(await continuation(handler_call_details), log, refusal)


def auth_interceptor(
    config: SecurityConfig, on_reject: Callable[[str], None] | None = None
) -> TokenAuthInterceptor | None:
    """The token interceptor the config asks for (None when auth is off); tokens are read once, here."""
    if not config.auth:
        return None
    try:
        tokens = load_tokens(config.token_file, config.token_env)
    except OSError as exc:  # as tls's: the file and the cause, not Python's repr of the error
        raise ConfigError(
            f"auth: cannot read {exc.filename or config.token_file}: {exc.strerror or exc}"
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"auth: {exc}") from exc
    logger.info(
        "token auth on: %d token(s); health %s",
        len(tokens),
        "open" if config.open_health else "needs a token",
    )
    return TokenAuthInterceptor(tokens, open_health=config.open_health, on_reject=on_reject)


def _check_readable(tls: TlsConfig) -> None:
    """ConfigError naming every TLS file that cannot be read, not only the first: an operator who
    mounted none of them would otherwise restart once per file."""
    unreadable = []
    for path in (tls.cert_file, tls.key_file, tls.client_ca_file):
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            unreadable.append(f"{path}: {exc.strerror or exc}")
    if unreadable:
        raise ConfigError(f"tls: cannot read {'; '.join(unreadable)}")


def _check_pem(tls: TlsConfig) -> None:
    """ConfigError naming the files unless they hold a PEM certificate chain with its private key
    (and PEM CA certificates): grpc only fails to listen, which read as a port problem."""
    problem, context = key_pair_problem(tls.cert_file, tls.key_file, ssl.PROTOCOL_TLS_SERVER)
    if problem is not None and problem.encrypted:
        raise ConfigError(
            f"tls: {tls.key_file} is encrypted (passphrase-protected); grpc needs an unencrypted PEM key: "
            f"{DECRYPT_HINT}"
        )
    if problem is not None:
        raise ConfigError(
            f"tls: {tls.cert_file} and {tls.key_file} are not a PEM certificate and its private key "
            f"({problem.reason})"
        )
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"tls: {tls.client_ca_file} holds no PEM CA certificate ({exc.reason or exc})"
            ) from None


def warn_outside_validity(config: SecurityConfig, now: float | None = None) -> None:
    """A warning for the server certificate, and each client CA certificate, outside its validity
    window: grpc serves them without a word, and every client then fails the handshake
    (CERTIFICATE_VERIFY_FAILED, or its certificate refused). Not refused: a clock a little behind the
    issuer's makes a fresh certificate not yet valid for a few seconds. Call once, after `bind`."""
    now = time.time() if now is None else now
    chain = _decode_certificates(config.tls_cert_file) if config.tls_cert_file is not None else []
    for index, cert in enumerate(chain):  # the server certificate, then its intermediates
        if (window := _outside_validity(cert, now)) is None:
            continue
        if index == 0:
            logger.warning(
                "tls: the server certificate %s is outside its validity window (%s): every client's "
                "handshake fails (CERTIFICATE_VERIFY_FAILED) until it is replaced and the server restarted",
                config.tls_cert_file,
                window,
            )
        else:
            logger.warning(
                "tls: the intermediate certificate %r in the server certificate chain %s is outside its "
                "validity window (%s): every client's handshake fails (CERTIFICATE_VERIFY_FAILED) until "
                "it is replaced and the server restarted",
                _subject(cert),
                config.tls_cert_file,
                window,
            )
        break  # one line per file
    if config.tls_client_ca_file is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_verify_locations(cafile=config.tls_client_ca_file)
        except (ssl.SSLError, OSError):
            return
        for ca in context.get_ca_certs():
            if (window := _outside_validity(ca, now)) is not None:
                subject = _subject(ca)
                logger.warning(
                    "tls: the client CA certificate %r in %s is outside its validity window (%s): "
                    "client certificates it signed fail the handshake until it is replaced and the "
                    "server restarted",
                    subject,
                    config.tls_client_ca_file,
                    window,
                )


def _subject(cert: dict[str, Any]) -> str:
    rdns: Any = cert.get("subject", ())
    return ", ".join(f"{k}={v}" for rdn in rdns for k, v in rdn)


def certificate_expiries(config: SecurityConfig) -> dict[str, float]:
    """{file role: notAfter in seconds since the epoch} of the configured TLS files, for
    genserve_tls_certificate_expiry_timestamp_seconds: `server_cert` (the earliest of the chain's
    certificates: the server's and its intermediates', one expired fails every handshake),
    `client_ca` (the earliest of its CA certificates: one expired, the clients it signed fail). A
    file or certificate that cannot be read or dated is left out."""
    expiries: dict[str, float] = {}
    if config.tls_cert_file is not None:
        chain_ends = [
            end
            for cert in _decode_certificates(config.tls_cert_file)
            if (end := _not_after(cert)) is not None
        ]
        if chain_ends:
            expiries["server_cert"] = min(chain_ends)
    if config.tls_client_ca_file is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_verify_locations(cafile=config.tls_client_ca_file)
        except (ssl.SSLError, OSError):
            return expiries
        ends = [end for ca in context.get_ca_certs() if (end := _not_after(ca)) is not None]
        if ends:
            expiries["client_ca"] = min(ends)
    return expiries


def bind(server: grpc.aio.Server, address: str, config: SecurityConfig) -> int:
    """Add the listening port, TLS (or mTLS) when configured; returns the bound port (0 = failed)."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return server.add_insecure_port(address)
    tls = TlsConfig(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    _check_readable(tls)
    try:
        credentials = server_credentials(tls)
    except OSError as exc:
        raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from exc
    _check_pem(tls)
    logger.info(
        "TLS on (%s)", "mutual: client certificates required" if tls.client_ca_file else "server only"
    )
    return server.add_secure_port(address, credentials)
