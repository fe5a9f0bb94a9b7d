"""Guard the public gRPC API against wire-incompatible changes.

`python scripts/proto_compat.py` compares the descriptors of the committed stubs in api/ (genserve.v1
and the KServe protocol, exactly what protos/ makes: tests/test_protos_fresh.py) with the snapshot
api/compat/descriptors.json, and exits 1 naming every element that a client or server built from the
snapshot would no longer understand: a removed message, enum, enum value, service or method; a field
removed without `reserved` for its number, renumbered, renamed, or given another type, label,
presence (proto3 `optional`) or oneof; a method whose request, response or streaming kind changed.
Additions pass.

`python scripts/proto_compat.py --write` refreshes the snapshot on purpose: after a release (so that
what it shipped is what later changes are checked against) or to accept a break deliberately.
tests/test_protos_fresh.py runs the check. Only the standard library and protobuf.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "api" / "genserve"
SNAPSHOT = ROOT / "api" / "compat" / "descriptors.json"

_SERIALIZED = re.compile(rb"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)")
_F = descriptor_pb2.FieldDescriptorProto


def file_descriptors(stub_sources: list[bytes]) -> list[descriptor_pb2.FileDescriptorProto]:
    """The FileDescriptorProto each *_pb2.py source embeds (read, not imported)."""
    files = []
    for source in stub_sources:
        match = _SERIALIZED.search(source)
        if match is None:
            raise ValueError("a *_pb2.py without AddSerializedFile(b'...')")
        files.append(descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(match.group(1).decode())))
    return files


def committed_descriptors(stubs: Path = STUBS) -> list[descriptor_pb2.FileDescriptorProto]:
    return file_descriptors([p.read_bytes() for p in sorted(stubs.rglob("*_pb2.py"))])


def _message(prefix: str, message: descriptor_pb2.DescriptorProto, out: dict[str, Any]) -> None:
    name = f"{prefix}.{message.name}"
    reserved = [[r.start, r.end - 1] for r in message.reserved_range]  # end is exclusive
    out["messages"][name] = {
        "fields": {
            str(f.number): {
                "name": f.name,
                "type": _F.Type.Name(f.type),
                "type_name": f.type_name,
                "label": _F.Label.Name(f.label),
                # presence: without it an explicit 0 (truncation_psi = 0) reads as unset
                "proto3_optional": f.proto3_optional,
                # a real oneof: setting one member clears the others
                "oneof": ""
                if not f.HasField("oneof_index") or f.proto3_optional
                else message.oneof_decl[f.oneof_index].name,
            }
            for f in message.field
        },
        "reserved_numbers": reserved,
        "reserved_names": list(message.reserved_name),
    }
    for nested in message.nested_type:
        _message(name, nested, out)
    for enum in message.enum_type:
        _enum(name, enum, out)


def _enum(prefix: str, enum: descriptor_pb2.EnumDescriptorProto, out: dict[str, Any]) -> None:
    out["enums"][f"{prefix}.{enum.name}"] = {
        "values": {v.name: v.number for v in enum.value},
        "reserved_numbers": [[r.start, r.end] for r in enum.reserved_range],  # end is inclusive
    }


def summarize(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, Any]:
    """What the wire depends on, keyed by full name (field numbers as strings: JSON keys)."""
    out: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}
    for file in files:
        prefix = f".{file.package}" if file.package else ""
        for message in file.message_type:
            _message(prefix, message, out)
        for enum in file.enum_type:
            _enum(prefix, enum, out)
        for service in file.service:
            out["services"][f"{prefix}.{service.name}"] = {
                m.name: {
                    "input": m.input_type,
                    "output": m.output_type,
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                }
                for m in service.method
            }
    for section in out.values():
        for name in list(section):
            section[name.lstrip(".")] = section.pop(name)
    return out


def _reserved(number: int, ranges: list[list[int]]) -> bool:
    return any(start <= number <= end for start, end in ranges)


def _field_changes(name: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    problems = []
    new_numbers = {f["name"]: number for number, f in new["fields"].items()}
    for number, field in old["fields"].items():
        where = f"field {name}.{field['name']} = {number}"
        moved_to = new_numbers.get(field["name"])
        now = new["fields"].get(number)
        if moved_to is not None and moved_to != number:
            problems.append(f"{where}: renumbered to {moved_to}")
        elif now is None:
            if not _reserved(int(number), new["reserved_numbers"]):
                problems.append(f"{where}: removed without `reserved {number};`")
            continue
        if now is None:
            continue
        if now["name"] != field["name"]:
            problems.append(f"{where}: renamed to {now['name']}")
        for key in ("type", "type_name", "label", "proto3_optional", "oneof"):
            if now[key] != field[key]:
                was, is_ = (("-" if v == "" else v) for v in (field[key], now[key]))
                problems.append(f"{where}: {key} {was} -> {is_}")
    return problems


def incompatibilities(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every change from `old` to `new` (summarize()'s) that a peer built from `old` would trip on."""
    problems = []
    for name, message in old["messages"].items():
        if name not in new["messages"]:
            problems.append(f"message {name}: removed")
        else:
            problems += _field_changes(name, message, new["messages"][name])
    for name, enum in old["enums"].items():
        if name not in new["enums"]:
            problems.append(f"enum {name}: removed")
            continue
        now = new["enums"][name]
        for value, number in enum["values"].items():
            if value not in now["values"]:
                if not _reserved(number, now["reserved_numbers"]):
                    problems.append(f"enum value {name}.{value} = {number}: removed")
            elif now["values"][value] != number:
                problems.append(f"enum value {name}.{value} = {number}: renumbered to {now['values'][value]}")
    for name, methods in old["services"].items():
        if name not in new["services"]:
            problems.append(f"service {name}: removed")
            continue
        for method, old_method in methods.items():
            new_method = new["services"][name].get(method)
            if new_method is None:
                problems.append(f"method {name}.{method}: removed")
                continue
            for key, value in old_method.items():
                if new_method[key] != value:
                    problems.append(f"method {name}.{method}: {key} {value} -> {new_method[key]}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="refresh the snapshot from the committed stubs")
    parser.add_argument("--snapshot", type=Path, default=SNAPSHOT)
    args = parser.parse_args()
    current = summarize(committed_descriptors())
    if args.write:
        args.snapshot.parent.mkdir(parents=True, exist_ok=True)
        args.snapshot.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        return
    problems = incompatibilities(json.loads(args.snapshot.read_text()), current)
    if problems:
        sys.stderr.write(
            f"wire-incompatible with {args.snapshot}:\n"
            + "".join(f"  {p}\n" for p in problems)
            + "(a deliberate break: python scripts/proto_compat.py --write)\n"
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
