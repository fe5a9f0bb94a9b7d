"""genserve-export: train, export to ONNX and verify genserve's model repository.

Public API: :func:`export_model` (one module → one repository entry) and
:func:`verify_repository` (check every entry of a repository). Never imported by the server or
the clients.
"""

import os

# ONNX Runtime keeps a telemetry device id and an event database under $XDG_CACHE_HOME (or
# $HOME/.cache)/Microsoft/DeveloperTools/.onnxruntime from its import on: off, as in the server
# (genserve_server/__init__.py), unless the environment sets ORT_DISABLE_TELEMETRY itself. Here,
# before any module of the package imports onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# The version export/pyproject.toml builds: `genserve-export --version` where the package is not
# installed (a checkout on PYTHONPATH).
__version__ = "0.1.0"

from genserve_export.errors import (
    CardFieldError,
    ConfigFieldError,
    ExportError,
    ExportFailedError,
    ExportParityError,
    FrozenBatchAxisError,
    InvalidArgumentError,
    KindMismatchError,
    NonFiniteOutputError,
    RepositoryExistsError,
)
from genserve_export.export import export_model
from genserve_export.verify import ModelReport, VerifyReport, verify_repository

__all__ = [
    "CardFieldError",
    "ConfigFieldError",
    "ExportError",
    "ExportFailedError",
    "ExportParityError",
    "FrozenBatchAxisError",
    "InvalidArgumentError",
    "KindMismatchError",
    "ModelReport",
    "NonFiniteOutputError",
    "RepositoryExistsError",
    "VerifyReport",
    "export_model",
    "verify_repository",
]
