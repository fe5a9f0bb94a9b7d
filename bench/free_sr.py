"""A near-free super-resolution model with sr-photos-x4's I/O contract, to expose serving CPU cost.

    python -m bench.free_sr --out /tmp/srfree
    python -m bench.run --quick --models sr-free-x4 --models-dir /tmp/srfree --no-bench-models \\
        --no-priority --no-readme --rounds 2 --out /tmp/srfree.json

On a GPU the SR model takes ~0.4 ms, so genserve's work around the call (decode, tiling, encode) is
the cost; on a CPU the real model's compute hides it. A nearest x4 Resize (no weights) puts a CPU run
in the GPU's regime. The card and config are sr-photos-x4's (shipped models untouched).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.common import ctrl_c_exits_130, write_line

SOURCE = Path(__file__).resolve().parents[1] / "models" / "sr-photos-x4"
NAME = "sr-free-x4"


def write(out: Path) -> Path:
    """`out`/sr-free-x4/{config.json, 1/card.json, 1/model.onnx}; returns the model directory."""
    version = out / NAME / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy(SOURCE / "config.json", out / NAME / "config.json")
    scales = numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales")
    graph = helper.make_graph(
        [helper.make_node("Resize", ["image", "", "scales"], ["output_image"], mode="nearest")],
        "sr_free",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("output_image", TensorProto.FLOAT, ["n", 3, "H", "W"])],
        [scales],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, version / "model.onnx")
    card = json.loads((SOURCE / "1" / "card.json").read_text())
    card.pop("parity", None)  # no fp16 file here
    card["name"] = NAME
    card["description"] = "near-free x4 nearest upsample (bench only: serving CPU cost)"
    card["sha256"] = {"model.onnx": hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest()}
    (version / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out / NAME


@ctrl_c_exits_130("bench.free_sr")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    write_line(str(write(parser.parse_args().out)))


if __name__ == "__main__":
    raise SystemExit(main())
