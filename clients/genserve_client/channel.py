"""Connection settings shared by the sync and asyncio clients: TLS, auth and channel options."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from genserve_client.errors import REQUEST_ID_KEY

# Images are large: a 256-image batch of 3x256x256 PNGs is ~30 MiB, one 4096x4096 RGB raw image
# 48 MiB. gRPC's default 4 MiB receive limit breaks such payloads, so both directions get 64 MiB
# (the server's documented default input limit).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return cls(read(ca), read(cert), read(key), server_name_override)

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
    # 60 s stays above gRPC servers' default minimum ping interval so they do not GOAWAY us.
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # gRPC's default reconnect backoff grows to 120 s: a server back after a 2-minute restart would
    # stay unreachable for up to 2 more minutes. 10 s bounds that delay (bulk jobs wait for restarts).
    max_reconnect_backoff_s: float = 10.0

    def options(self) -> list[tuple[str, str | int]]:
        opts: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.max_reconnect_backoff_s * 1000)),
        ]
        if self.tls is not None and self.tls.server_name_override:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        return opts

    def sync_channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.target, options=self.options())
        return grpc.secure_channel(self.target, self.tls.credentials(), options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=self.options())
        return grpc.aio.secure_channel(self.target, self.tls.credentials(), options=self.options())

    def metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        # Plain metadata rather than call credentials: gRPC refuses call credentials on a
        # plaintext channel, and a token over plaintext to 127.0.0.1 is a legitimate test setup.
        md: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, request_id),)
        if self.token:
            md += (("authorization", f"Bearer {self.token}"),)
        return md


def new_request_id() -> str:
    return uuid.uuid4().hex
