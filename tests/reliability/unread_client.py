"""A raw HTTP/2 gRPC client that sends unary requests and never reads their responses.

It acknowledges the server's SETTINGS and PINGs (the connection stays healthy) but never sends a
WINDOW_UPDATE, so the server can deliver at most the initial 64 KiB window of all responses on the
connection: each response it computed stays in the server, as with a client that stopped reading.
"""

from __future__ import annotations

import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING = 0x0, 0x1, 0x3, 0x4, 0x6
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def _literal(name: str, value: str) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (names/values < 127 bytes)."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


class UnreadClient:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self._sock = socket.create_connection((host, port), timeout=10)
        self._sock.settimeout(None)
        self._lock = threading.Lock()
        self._next_stream = 1
        self.ended: set[int] = set()  # streams the server ended (trailers or RST_STREAM)
        self._send(PREFACE + _frame(SETTINGS, 0, 0, b""))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _send(self, data: bytes) -> None:
        with self._lock:
            self._sock.sendall(data)

    def call(self, host_port: str, method: str, message: bytes, timeout_ms: int | None = None) -> int:
        """Send one unary request (`method`: "/package.Service/Method"); returns its stream id.
        `timeout_ms`: the call's deadline (grpc-timeout), which only the server ends the call at: this
        client sends no RST_STREAM at it, as a gRPC client does at its own deadline."""
        with self._lock:
            stream_id = self._next_stream
            self._next_stream += 2
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", host_port),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if timeout_ms is not None:
            fields.append(("grpc-timeout", f"{timeout_ms}m"))
        headers = b"".join(_literal(k, v) for k, v in fields)
        body = b"\x00" + struct.pack(">I", len(message)) + message
        self._send(
            _frame(HEADERS, END_HEADERS, stream_id, headers) + _frame(DATA, END_STREAM, stream_id, body)
        )
        return stream_id

    def cancel(self, stream_id: int) -> None:
        """End one call as a cancelling client does (RST_STREAM CANCEL)."""
        self._send(_frame(RST_STREAM, 0, stream_id, struct.pack(">I", 0x8)))

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                head = self._recv_exact(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream_id = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._recv_exact(length)
                if kind == SETTINGS and not flags & ACK:
                    self._send(_frame(SETTINGS, ACK, 0, b""))
                elif kind == PING and not flags & ACK:
                    self._send(_frame(PING, ACK, 0, payload))
                elif (kind == HEADERS and flags & END_STREAM) or kind == RST_STREAM:
                    self.ended.add(stream_id)
        except OSError:
            return

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(5)
