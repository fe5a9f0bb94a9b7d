"""Print a JSON description of protobuf modules' messages, enums and services (wire-relevant facts).

Run with any Python that can import the modules, e.g. tritonclient's venv:
    python describe_protos.py tritonclient.grpc.service_pb2 tritonclient.grpc.model_config_pb2
tests/ecosystem/test_kserve.py compares genserve's inference protos against tritonclient's this way.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any


def _is_repeated(field: Any) -> bool:
    """protobuf 7 has only `is_repeated` (a property); protobuf <= 5 only `label`."""
    flag = getattr(field, "is_repeated", None)
    if flag is None:
        return bool(field.label == field.LABEL_REPEATED)
    return bool(flag() if callable(flag) else flag)


def describe_message(message: Any, out: dict[str, Any]) -> None:
    fields = {}
    for field in message.fields:
        fields[field.name] = {
            "number": field.number,
            "type": field.type,
            "repeated": _is_repeated(field),
            "type_name": (field.message_type or field.enum_type).full_name
            if (field.message_type or field.enum_type)
            else "",
            "oneof": field.containing_oneof.name
            if field.containing_oneof is not None and not field.containing_oneof.name.startswith("_")
            else "",
        }
    out["messages"][message.full_name] = fields
    for nested in message.nested_types:
        describe_message(nested, out)  # map entries too: key = 1, value = 2
    for enum in message.enum_types:
        out["enums"][enum.full_name] = {v.name: v.number for v in enum.values}


def describe(module_names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}
    for name in module_names:
        file = importlib.import_module(name).DESCRIPTOR
        for message in file.message_types_by_name.values():
            describe_message(message, out)
        for enum in file.enum_types_by_name.values():
            out["enums"][enum.full_name] = {v.name: v.number for v in enum.values}
        for service in file.services_by_name.values():
            out["services"][service.full_name] = {
                m.name: [
                    m.input_type.full_name,
                    m.output_type.full_name,
                    m.client_streaming,
                    m.server_streaming,
                ]
                for m in service.methods
            }
    return out


if __name__ == "__main__":
    sys.stdout.write(json.dumps(describe(sys.argv[1:]), indent=1, sort_keys=True) + "\n")
