"""export_model exports a module in eval mode (BatchNorm running statistics, no dropout) and hands it
back in the train/eval modes it came in: a user who exports a checkpoint in the middle of training
(every N steps) and goes on training must not go on with BatchNorm frozen and dropout off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from genserve_export import export_model


class BatchNormGenerator(nn.Module):
    """z [N, 8] -> BatchNorm -> Linear -> Dropout -> tanh -> [N, 1, 4, 4]; a frozen head in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)
        self.body = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.BatchNorm1d(16)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.frozen(self.drop(self.body(self.norm(z))))).view(-1, 1, 4, 4)


def test_export_keeps_the_callers_train_and_eval_modes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = BatchNormGenerator()
    module.train()
    module(torch.randn(32, 8))  # running statistics away from the initial (0, 1)
    module.frozen.eval()  # a submodule the caller froze on purpose
    modes = {name: m.training for name, m in module.named_modules()}
    z = torch.randn(4, 8)

    target = export_model(
        module,
        kind="generator",
        name="bn-gen",
        out_dir=tmp_path,
        example_inputs={"z": z},
        card={"description": "batch-norm generator", "output_range": [-1, 1]},
        fp16=False,
    )

    assert {name: m.training for name, m in module.named_modules()} == modes
    # the graph is the eval-mode module (running statistics, no dropout), whatever mode it came in
    module.eval()
    with torch.no_grad():
        expected = module(z).numpy()
    session = ort.InferenceSession(str(target / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"z": z.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4)
