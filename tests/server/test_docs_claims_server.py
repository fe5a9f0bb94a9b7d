"""Claims of the docs checked against the server's code (docs/operations.md, docs/server.md)."""

from __future__ import annotations

import json
from pathlib import Path

from genserve_contract.kinds import KIND_NAMES
from genserve_server.config import load_server_config


def test_relative_trt_engine_cache_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """docs/operations.md: "Relative paths in the config file are relative to the file's directory."
    tls and auth paths were, but `trt_engine_cache_dir` was handed to TensorRT as written, so it
    resolved against whatever directory the server was started from."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    path = config_dir / "server.json"
    path.write_text(json.dumps({"trt_engine_cache_dir": "trt-cache"}))
    assert load_server_config(path).trt_engine_cache_dir == str(config_dir / "trt-cache")
    # An absolute path is kept as it is.
    path.write_text(json.dumps({"trt_engine_cache_dir": "/var/cache/genserve/trt"}))
    assert load_server_config(path).trt_engine_cache_dir == "/var/cache/genserve/trt"


REPO_ROOT = Path(__file__).resolve().parents[2]


def _model_info_kinds(proto_text: str) -> set[str]:
    """The kinds listed in the comment above `ModelInfo.kind` in genserve.proto."""
    block = proto_text[proto_text.index("message ModelInfo {") :]
    comment = block[: block.index("string kind = 2;")]
    lines = [
        line.strip().removeprefix("//") for line in comment.splitlines() if line.strip().startswith("//")
    ]
    return {word.strip() for word in ",".join(lines).split(",") if word.strip()}


def test_model_info_kind_comment_lists_every_kind() -> None:
    """genserve.proto is the API contract: ModelInfo.kind's comment lists the values a client can
    receive. It left out two_way_translator, which ListModels returns for cyclegan-digits."""
    text = (REPO_ROOT / "protos" / "genserve" / "v1" / "genserve.proto").read_text()
    assert _model_info_kinds(text) == set(KIND_NAMES)


def test_server_md_synopsis_names_every_flag() -> None:
    """docs/server.md opens with the synopsis of `genserve-server serve` and `health`; it left out
    --trt-engine-cache-dir and the health probe's TLS and token flags."""
    import re

    from genserve_server.main import build_parser

    text = (REPO_ROOT / "docs" / "server.md").read_text()
    synopsis = text[text.index("```") + 3 :]
    synopsis = synopsis[: synopsis.index("```")]
    documented = {
        name: set(re.findall(r"--[a-z][a-z-]*", part))
        for name, part in zip(("serve", "health"), synopsis.split("genserve-server health"), strict=True)
    }
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("serve", "health"):
        flags = {
            option
            for action in subparsers.choices[name]._actions
            for option in action.option_strings
            if option.startswith("--") and option != "--help"
        }
        assert flags == documented[name], (name, flags ^ documented[name])
