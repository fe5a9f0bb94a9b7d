"""A large unary response's wire bytes, built off the event loop.

grpc.aio serializes a handler's response on the event loop once the handler returns, and the
boundary's `ByteSize()` (for the response budget) serializes it there once more: upb's ByteSize is a
whole serialization. For a 50 MB response (Sample of 64 float32 256x256 images with their latents,
a SuperResolve of large images, a ModelInfer of many rows) that held the event loop 330-800 ms on
the 2-core VM of bench/README.md, in which no other call on the server made progress: a tiny model's
request behind it waited as long (bench/profile.md, "Large responses off the event loop").

A unary call whose response was predicted (its response-budget reservation) at OFF_LOOP_BYTES or
more has its bytes built by `serialize` on the codec pool (Boundary.unary), and the handler returns
those bytes: every method's response serializer passes bytes through as they are
(`passing_bytes`, applied at registration in main.py). Smaller responses stay on the fast path:
the message itself, serialized by grpc, no hop to the pool. KServe's ModelInfer returns the bytes of
a large response itself, built on the codec pool (`with_bytes_field`): its outputs are arrays, which
a message would hold only after two whole copies on the loop (tobytes, then into the field).

`serialize` writes what `SerializeToString()` writes, byte for byte (a map of several entries may
come out in another order, which parses the same), in many short calls: a bytes or string field's
value as it is, a message field framed around its own parts (each item of a repeated one of more
than FEW_ITEMS serialized whole), any other field through a message of the same type holding that
field alone; then one join. Moving a single
`SerializeToString()` of the whole message to a worker thread would not free the loop: it holds the
GIL throughout (~100 ms for 50 MB). Each of these calls holds it for at most a copy of one field's
bytes, so the loop's thread takes the GIL back within the interpreter's switch interval (5 ms), and
the join releases it (CPython copies joins of 1 MiB or more without the GIL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# A unary response predicted at this many bytes or more is serialized on the codec pool. Below it,
# grpc's SerializeToString plus the boundary's ByteSize on the loop take ~0.1-1 ms (3 ms at worst),
# not much above the hop there and back (~0.05 ms); at 16 MiB they took ~30 ms (bench/profile.md).
OFF_LOOP_BYTES = 1 << 20

# A repeated message field of more items than this has each item serialized whole, in one call
# (GIL held for one item's bytes): taking thousands of small images apart field by field cost
# 15x SerializeToString (71 ms against 4.5 ms for 4,096 images of 900 bytes); a few large items
# (one 50 MB image) are taken apart.
FEW_ITEMS = 8

_LENGTH_DELIMITED = 2
_BYTES_TYPES = (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _framed(tag: bytes, pieces: list[bytes], length: int, into: list[bytes]) -> int:
    """Appends a length-delimited field (`tag`, `length`, `pieces` of that many bytes) to `into`;
    returns its size."""
    head = tag + _varint(length)
    into.append(head)
    into.extend(pieces)
    return len(head) + length


def _parts(message: Message, into: list[bytes]) -> int:
    """Appends `message`'s wire bytes to `into` in pieces; returns their length."""
    size = 0
    for field, value in message.ListFields():  # in field-number order, as upb writes them
        items = value if field.is_repeated else (value,)
        if field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            tag = _varint(field.number << 3 | _LENGTH_DELIMITED)
            whole = len(items) > FEW_ITEMS
            for item in items:
                if whole:  # one of many (images of a response): one call, its bytes a small share
                    data = item.SerializeToString()
                    size += _framed(tag, [data], len(data), into)
                    continue
                inner: list[bytes] = []
                size += _framed(tag, inner, _parts(item, inner), into)
        elif field.type in _BYTES_TYPES:
            tag = _varint(field.number << 3 | _LENGTH_DELIMITED)
            for item in items:
                data = item.encode() if isinstance(item, str) else item
                size += _framed(tag, [data], len(data), into)
        else:  # scalars, enums, packed repeated scalars, maps: small, written by protobuf itself
            alone = type(message)()
            if field.is_repeated:
                getattr(alone, field.name).MergeFrom(value)
            else:
                setattr(alone, field.name, value)
            data = alone.SerializeToString()
            into.append(data)
            size += len(data)
    return size


def serialize(message: Message) -> bytes:
    """`message.SerializeToString()`, built in pieces that each hold the GIL briefly (on a worker
    thread: the event loop's thread runs meanwhile)."""
    parts: list[bytes] = []
    _parts(message, parts)
    return b"".join(parts)


def passing_bytes(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A response serializer that passes an already serialized response (bytes) through as it is."""
    if serializer is None:
        return None
    serialize_message = serializer

    def serialize_or_pass(response: Any) -> bytes:
        if type(response) is bytes:
            return response
        return serialize_message(response)

    return serialize_or_pass


def passing_bytes_handler(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary-unary method handler whose response serializer passes bytes through (the boundary
    returns a large response serialized: Boundary.unary); other handlers as they are."""
    if handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        handler.unary_unary, handler.request_deserializer, passing_bytes(handler.response_serializer)
    )


# A buffer's bytes are copied into `with_bytes_field`'s pieces this many at a time (each copy holds
# the GIL ~0.1-1 ms; the loop's thread may take it back between them).
COPY_CHUNK_BYTES = 1 << 20


def with_bytes_field(head: bytes, field_number: int, values: Sequence[memoryview]) -> bytes:
    """`head` (a message's serialization) followed by the repeated bytes field `field_number`
    holding `values` (1-D views of bytes): what SerializeToString() writes for that message with
    the values appended, when the field's number is above all of the head's. Each value is copied
    in COPY_CHUNK_BYTES pieces, then joined without the GIL, as `serialize` does: off the event
    loop, its thread waits for the GIL at most one piece's copy, never a whole 50 MB one."""
    tag = _varint(field_number << 3 | _LENGTH_DELIMITED)
    parts: list[bytes] = [head]
    for value in values:
        pieces = [value[i : i + COPY_CHUNK_BYTES].tobytes() for i in range(0, len(value), COPY_CHUNK_BYTES)]
        _framed(tag, pieces, len(value), parts)
    return b"".join(parts)
