"""Connection settings shared by the sync and asyncio clients: TLS, auth and channel options.

A target names one server or several replicas, and every channel spreads its calls over all the
addresses the target resolves to (gRPC's `round_robin` policy; a call picks the next READY address,
so one whose server went away is skipped until it is back):
  - `host:port`, or any gRPC target such as `dns:///genserve-headless:50051` (a Kubernetes headless
    Service: one address per ready pod, re-resolved when a connection breaks);
  - an address list `host:port,host:port,...`, for replicas with no DNS name in common. IP literals
    are used as they are; host names are resolved once, when the channel opens.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import grpc

from genserve_client.errors import REQUEST_ID_KEY
from genserve_contract.tls_files import DECRYPT_HINT, key_pair_problem

logger = logging.getLogger(__name__)

# Images are large: a 256-image batch of 3x256x256 PNGs is ~30 MiB, one 4096x4096 RGB raw image
# 48 MiB. gRPC's default 4 MiB receive limit breaks such payloads, so both directions get 64 MiB
# (the server's documented default input limit).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC's default policy, pick_first, sends every call of a channel to one address: a target that
# resolves to many replicas would use one of them.
DEFAULT_LB_POLICY = "round_robin"
LB_POLICIES = ("round_robin", "pick_first")
# A channel in these states has no connection yet and is getting one without a call (one that lost
# its server); an IDLE channel connects only for a call.
RECONNECTING = (grpc.ChannelConnectivity.CONNECTING, grpc.ChannelConnectivity.TRANSIENT_FAILURE)


def _split_host_port(entry: str, target: str) -> tuple[str, int]:
    host, sep, port_text = entry.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--target: each address of a list must be host:port, got {entry!r} in {target!r}")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


def _resolve_host(host: str, port: int) -> list[str]:
    """IP addresses of `host`, IPv4 first (the family gRPC's ipv4: targets take)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--target: cannot resolve {host!r} ({exc.strerror})") from None
    return sorted({str(info[4][0]) for info in infos}, key=lambda a: (":" in a, a))


def _check_port(target: str) -> None:
    """A `host:port` or `dns:///host:port` target's port in 1..65535: gRPC takes a larger one modulo
    65536 (`127.0.0.1:99999` connects to port 34463), another server than the one named."""
    authority = target.removeprefix("dns:").removeprefix("//").rpartition("/")[2]
    if target.startswith(("ipv4:", "ipv6:", "unix:")) or ("://" in target and not target.startswith("dns:")):
        return  # gRPC parses (and refuses) these itself
    host, sep, port_text = authority.rpartition(":")
    if sep and host and port_text.isdigit() and not 0 < int(port_text) < 65536:
        raise ValueError(f"--target: the port must be in 1..65535, got {port_text} in {target!r}")


def is_address_list(target: str) -> bool:
    """`host:port,host:port,...` without a scheme (gRPC's own ipv4:a,b targets pass unchanged)."""
    return "," in target and ":/" not in target and not target.startswith(("ipv4:", "ipv6:", "unix:"))


def address_list_target(target: str, resolve: Callable[[str, int], list[str]] = _resolve_host) -> str:
    """The gRPC target of an address list `host:port,host:port,...` (unchanged when `target` is
    one address or has a scheme). gRPC's `ipv4:`/`ipv6:` targets take several addresses but only IP
    literals of one family, so host names are resolved here, once; a host resolving to both
    families contributes its addresses of the family every entry has."""
    if not is_address_list(target):
        _check_port(target)
        return target
    entries = [e.strip() for e in target.split(",") if e.strip()]
    per_entry: list[list[tuple[int, str]]] = []
    for entry in entries:
        host, port = _split_host_port(entry, target)
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = resolve(host, port)
        per_entry.append([(ipaddress.ip_address(a).version, _join(a, port)) for a in addresses])
    for version in (4, 6):
        if all(any(v == version for v, _ in found) for found in per_entry):
            chosen = [a for found in per_entry for v, a in found if v == version]
            return f"ipv{version}:" + ",".join(dict.fromkeys(chosen))
    raise ValueError(
        f"--target: the addresses of {target!r} mix IPv4 and IPv6; gRPC balances over one family: "
        "list addresses of one family, or use a dns:/// name"
    )


def _probe_addresses(target: str) -> list[tuple[str, int]]:
    """(host, port) of each address a host:port, dns:///host:port, ipv4:/ipv6: or address list
    target names; none for a unix: or other target."""
    if target.startswith("unix:") or ("://" in target and not target.startswith("dns:")):
        return []
    entries = target.removeprefix("ipv4:").removeprefix("ipv6:")
    entries = entries.removeprefix("dns:").removeprefix("//").rpartition("/")[2]
    found = []
    for entry in entries.split(","):
        host, sep, port = entry.strip().rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            found.append((host.removeprefix("[").removesuffix("]"), int(port)))
    return found


def _speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """Whether the server at host:port answers a TLS handshake: it completes (its certificate is
    not checked here) or ends in the server's TLS alert (a client certificate it requires)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with context.wrap_socket(sock):
                return True
    except ssl.SSLError as exc:
        return "ALERT" in (exc.reason or "").upper()
    except OSError:
        return False


def tls_hint(target: str, timeout_s: float = 1.0) -> str | None:
    """Why a plaintext call failed 'Socket closed' where the server speaks TLS: a TLS server closes
    a plaintext connection at its first bytes, which gRPC reports as it does a server restart. None
    where no address of `target` answers TLS (a server down, restarting, or plaintext)."""
    for host, port in _probe_addresses(target)[:4]:
        if _speaks_tls(host, port, timeout_s):
            return (
                f"{_join(host, port)} speaks TLS, and this client connected without it: pass --tls "
                "(--tls-ca FILE for a private CA; --tls-cert and --tls-key where it wants a client "
                "certificate)"
            )
    return None


def token_problem(token: str) -> str | None:
    """Why `token` cannot travel as `authorization: Bearer <token>` (None: it can). gRPC metadata
    values are printable ASCII; anything else failed every call with `INTERNAL: Invalid metadata`.
    The answer never quotes the token."""
    for char in token:
        if not " " <= char <= "~":
            if char in "\r\n":
                what = "a line break"
            else:
                what = "a control character" if char < " " else "a non-ASCII character"
            return f"a bearer token is printable ASCII (a gRPC header value); this one holds {what}"
    return None


def read_token_file(path: str | Path) -> str:
    """The one token of a token file in the server's format: one per line, `#` comments and blank
    lines skipped, CRLF or a UTF-8 BOM tolerated. ValueError naming the file (never a token) when it
    holds none, several (a server's list: the client sends one), or one no header can carry."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"--token-file {path}: not UTF-8 text") from None
    except OSError as exc:  # not there, a folder, not readable: a bad argument, named as such
        raise ValueError(f"--token-file {path}: cannot read it ({exc.strerror or exc})") from None
    # Lines end at \n (CRLF's \r, spaces and tabs stripped), as in the server's load_tokens:
    # str.splitlines also broke at a form feed, \x1c-\x1e, NEL or U+2028 inside the one token.
    lines = [ln.strip(" \t\r") for ln in text.split("\n")]
    tokens = [ln for ln in lines if ln and not ln.startswith("#")]
    if not tokens:
        raise ValueError(f"--token-file {path}: no token in the file")
    if len(tokens) > 1:
        raise ValueError(
            f"--token-file {path}: holds {len(tokens)} tokens (one per line, a server's list); "
            "a client sends one: give a file holding only its own"
        )
    problem = token_problem(tokens[0])
    if problem is not None:
        raise ValueError(f"--token-file {path}: {problem}")
    return tokens[0]


def _join(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _warn_outside_validity(path: str | Path, flag: str) -> None:
    """A warning when the first certificate in `path` is expired or not yet valid: a server that
    requires client certificates then closes the handshake ('Socket closed', UNAVAILABLE, which is
    retried as an outage) and says nothing more. Decoded by CPython's own (undocumented)
    ssl._ssl._test_decode_cert, the standard library's only decoder of a certificate that is not a
    CA: where it is missing or fails, no warning."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    try:
        cert = decode(str(path)) if decode is not None else None
        if not cert:
            return
        not_before, not_after = cert["notBefore"], cert["notAfter"]
        start, end = ssl.cert_time_to_seconds(not_before), ssl.cert_time_to_seconds(not_after)
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return
    now = time.time()
    if start <= now <= end:
        return
    utc = time.gmtime(now)  # as OpenSSL writes the certificate's times: "Feb  1 00:00:00 2020 GMT"
    shown = time.strftime(f"%b {utc.tm_mday:2d} %H:%M:%S %Y GMT", utc)
    logger.warning(
        "%s %s is outside its validity window (notBefore %s, notAfter %s, now %s): a server that "
        "requires client certificates refuses it (the connection fails 'Socket closed', UNAVAILABLE)",
        flag,
        path,
        not_before,
        not_after,
        shown,
    )


def _check_key_pair(cert: str | Path, key: str | Path) -> None:
    """ValueError naming the flags and files unless `key` is the unencrypted private key of `cert`'s
    certificate: gRPC takes any such pair and fails every connection ('Failed to create security
    handshaker', UNAVAILABLE, retried as an outage), naming neither."""
    problem, _ = key_pair_problem(cert, key)
    if problem is None:
        return
    if problem.encrypted:
        raise ValueError(
            f"--tls-key {key}: encrypted (passphrase-protected); gRPC needs an unencrypted PEM key: "
            + DECRYPT_HINT
        )
    raise ValueError(
        f"--tls-cert {cert} and --tls-key {key}: not a certificate and its private key ({problem.reason})"
    )


def _redacted_repr(obj: object, secrets: frozenset[str]) -> str:
    """A dataclass's repr with each secret field shown as <set> (or None), never its value: a config
    logged or embedded in an error must not carry a token or a private key."""
    parts = []
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        shown = ("<set>" if value is not None else "None") if f.name in secrets else repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS (and mTLS) settings. PEM bytes; `None` root certs means the system trust store."""

    root_certs: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    # For certificates issued to a name other than the target's host (tests, IP targets).
    server_name_override: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name_override: str | None = None,
    ) -> TlsOptions:
        if (cert is None) != (key is None):
            raise ValueError("mTLS needs both a client certificate and its key")

        errors: list[str] = []  # every file that fails, named in one error (not only the first)

        def read(path: str | Path | None, flag: str, marker: bytes, what: str) -> bytes | None:
            # grpc takes any bytes and only fails the connection later (UNAVAILABLE, with its own log
            # lines): a file that holds no PEM block is named here.
            if path is None:
                return None
            try:
                data = Path(path).read_bytes()
            except OSError as exc:  # not there, a folder, not readable: a bad argument, named as such
                errors.append(f"{flag} {path}: cannot read it ({exc.strerror or exc})")
                return None
            if b"-----BEGIN " not in data or marker not in data:
                errors.append(f"{flag} {path}: not a PEM file holding {what}")
                return None
            return data

        root_certs = read(ca, "--tls-ca", b"CERTIFICATE-----", "CA certificates")
        client_cert = read(cert, "--tls-cert", b"CERTIFICATE-----", "a certificate")
        client_key = read(key, "--tls-key", b"PRIVATE KEY-----", "a private key")
        if errors:
            raise ValueError("; ".join(errors))
        if cert is not None and key is not None:
            _check_key_pair(cert, key)
            _warn_outside_validity(cert, "--tls-cert")
        return cls(root_certs, client_cert, client_key, server_name_override)

    def __repr__(self) -> str:
        return _redacted_repr(self, frozenset({"client_key"}))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certs, self.client_key, self.client_cert)


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """Where and how to connect. Plaintext unless `tls` is set."""

    target: str = "127.0.0.1:50051"
    tls: TlsOptions | None = None
    # Sent as `authorization: Bearer <token>` on every call.
    token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Keepalive pings find a dead connection (e.g. a NAT that dropped it) during a long stream.
    # 60 s stays above genserve's keepalive_min_ping_interval_s (30 s by default) so it does not
    # GOAWAY us; gRPC C-core's own default (5 min between pings without data) is longer: a server
    # left at it may, on a connection that carries no data meanwhile (a long model call).
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # A channel that lost its server tries to connect again after a backoff (gRPC's: 1 s, x1.6 per
    # failed attempt, +-20 %, up to 120 s): a server back after a restart stays unreachable until the
    # next attempt. 2 s bounds that delay (a refused connect every 2 s is nothing to a server), and
    # a call's retries wait for it (RetryPolicy.reconnect_wait_s, longer than 2 s + 20 %).
    max_reconnect_backoff_s: float = 2.0
    # How a channel spreads its calls over the addresses of its target (see the module docs).
    lb_policy: str = DEFAULT_LB_POLICY

    def __post_init__(self) -> None:
        if not self.target.strip():
            raise ValueError("the target is empty: give host:port (--target, GENSERVE_TARGET)")
        if self.lb_policy not in LB_POLICIES:
            raise ValueError(f"ChannelConfig.lb_policy must be one of {LB_POLICIES}, got {self.lb_policy!r}")
        problem = token_problem(self.token) if self.token else None
        if problem is not None:
            raise ValueError(f"ChannelConfig.token: {problem}")

    def __repr__(self) -> str:
        return _redacted_repr(self, frozenset({"token"}))

    def grpc_target(self) -> str:
        """The target as gRPC takes it (an address list becomes an ipv4:/ipv6: target)."""
        return address_list_target(self.target)

    def options(self) -> list[tuple[str, str | int]]:
        opts: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.max_reconnect_backoff_s * 1000)),
            ("grpc.lb_policy_name", self.lb_policy),
        ]
        if is_address_list(self.target):
            # An address list's authority (the :authority header, the name TLS checks) is its
            # first address as written, not gRPC's default for an ipv4: target.
            first = self.target.split(",")[0].strip()
            opts.append(("grpc.default_authority", first))
        if self.tls is not None and self.tls.server_name_override:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        return opts

    def sync_channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.grpc_target(), options=self.options())
        return grpc.secure_channel(self.grpc_target(), self.tls.credentials(), options=self.options())

    def aio_channel(self, *, own_connection: bool = False) -> grpc.aio.Channel:
        """`own_connection`: a connection of the channel's own, never one shared with another
        channel of this process to the same target (gRPC's default, for channels of equal options)."""
        options = self.options()
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        if self.tls is None:
            return grpc.aio.insecure_channel(self.grpc_target(), options=options)
        return grpc.aio.secure_channel(self.grpc_target(), self.tls.credentials(), options=options)

    def metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        # Plain metadata rather than call credentials: gRPC refuses call credentials on a
        # plaintext channel, and a token over plaintext to 127.0.0.1 is a legitimate test setup.
        md: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, request_id),)
        if self.token:
            md += (("authorization", f"Bearer {self.token}"),)
        return md


def new_request_id() -> str:
    return uuid.uuid4().hex
