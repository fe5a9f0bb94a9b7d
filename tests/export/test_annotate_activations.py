"""annotate_version (`genserve-export count-activations`): the card rewritten in place by a rename."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from genserve_export import activations


def _version(folder: Path) -> Path:
    """A version folder with a tiny image graph (Relu then Sigmoid) and a card without the field."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, "H", "W"])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["mid"]), helper.make_node("Sigmoid", ["mid"], ["out"])],
        "g",
        [image],
        [out],
    )
    folder.mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "card.json").write_text(json.dumps({"kind": "image_to_image", "description": "tiny"}))
    return folder


def test_two_runs_annotating_one_version_at_once_each_rename_a_whole_card_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both staged the card as `.card.json.activations`: a second run (count-activations run twice on
    one repository) truncated and renamed the file the first was about to rename, and the first then
    failed with FileNotFoundError (or, caught mid-write, renamed half a card into place). Each run
    now stages under a name of its own."""
    version = _version(tmp_path / "m" / "1")
    real_fsync = os.fsync
    calls: list[int] = []
    second: list[tuple[float, float | None]] = []

    def fsync_then_another_run(fd: int) -> None:
        real_fsync(fd)
        calls.append(fd)
        if len(calls) == 1:  # the first run, its card written, not yet renamed: the other run, whole
            second.append(activations.annotate_version(version))

    monkeypatch.setattr(activations.os, "fsync", fsync_then_another_run)
    value, old = activations.annotate_version(version)
    assert old is None and second == [(value, None)]
    card = json.loads((version / "card.json").read_text())
    assert card[activations.ACTIVATION_BYTES_FIELD] == value
    assert sorted(p.name for p in version.iterdir()) == ["card.json", "model.onnx"]  # nothing staged left
