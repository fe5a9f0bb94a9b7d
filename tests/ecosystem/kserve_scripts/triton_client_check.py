"""Runs inside tritonclient's own venv (tests/ecosystem/test_kserve.py): exercises genserve's KServe v2
endpoint with the real tritonclient and saves what it got for the test to check.

    python triton_client_check.py --url 127.0.0.1:PORT --inputs in.npz --out out.npz --report out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--generator", required=True)
    parser.add_argument("--conditional", required=True)
    parser.add_argument("--sr", required=True)
    args = parser.parse_args()
    given = np.load(args.inputs)
    client = grpcclient.InferenceServerClient(url=args.url)
    report: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "models_ready": {m: client.is_model_ready(m) for m in (args.generator, args.conditional, args.sr)},
        # Triton answers ready=false with status OK: is_model_ready raises on an error status.
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "server": client.get_server_metadata(as_json=True),
        "metadata": {
            m: client.get_model_metadata(m, as_json=True) for m in (args.generator, args.conditional, args.sr)
        },
        "config": {
            m: client.get_model_config(m, as_json=True) for m in (args.generator, args.conditional, args.sr)
        },
    }
    out: dict[str, np.ndarray] = {}
    # Generator: explicit latents as the `z` input tensor.
    result = client.infer(
        args.generator,
        [_input("z", given["gen_z"], "FP32")],
        outputs=[grpcclient.InferRequestedOutput("image")],
        request_id="gen-z",
    )
    out["gen_z_image"] = result.as_numpy("image")
    report["gen_z_id"] = result.get_response().id
    # Generator: seed + count request parameters (the server derives the latents).
    result = client.infer(args.generator, [], parameters={"seed": 1234, "count": 3})
    out["gen_seed_image"] = result.as_numpy("image")
    report["gen_seed_params"] = result.get_response(as_json=True).get("parameters", {})
    # Conditional generator: z and label input tensors, then seeds with one label parameter.
    result = client.infer(
        args.conditional,
        [_input("z", given["cond_z"], "FP32"), _input("label", given["cond_label"], "INT64")],
    )
    out["cond_image"] = result.as_numpy("image")
    result = client.infer(args.conditional, [], parameters={"seed": 7, "count": 2, "label": 3})
    out["cond_seed_image"] = result.as_numpy("image")
    # Super-resolution: an image batch.
    result = client.infer(args.sr, [_input("image", given["sr_image"], "FP32")])
    output_name = report["metadata"][args.sr]["outputs"][0]["name"]
    out["sr_image"] = result.as_numpy(output_name)
    # Errors come back as gRPC statuses naming the field.
    errors = {}
    for case, call in {
        "label_out_of_range": lambda: client.infer(args.conditional, [], parameters={"label": 99}),
        "unknown_model": lambda: client.infer("no-such-model", [], parameters={"seed": 1}),
        "wrong_z_width": lambda: client.infer(
            args.generator, [_input("z", np.zeros((1, 3), np.float32), "FP32")]
        ),
    }.items():
        try:
            call()
            errors[case] = "no error"
        except InferenceServerException as err:
            errors[case] = f"{err.status()} {err.message()}"
    report["errors"] = errors
    report["statistics"] = client.get_inference_statistics(args.generator, as_json=True)
    np.savez(args.out, **out)
    with open(args.report, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
