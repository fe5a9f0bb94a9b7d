"""genserve's model-repository contract, shared by export/ (writes it) and server/ (reads it).

Pure Python, no torch, no ONNX Runtime, no protobuf: kinds and their tensors, name and version
patterns, tolerances, file digests and the config.json rule set (docs/model-repository.md).

Its names load their module on first use (PEP 562): genserve_client/__main__.py imports
genserve_contract.stop_signals before it can take a Ctrl-C, and the package's own imports
(dataclasses, re, hashlib, pathlib: tens of milliseconds) would lengthen that window.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genserve_contract.config import (
        CONFIG_FIELDS,
        KNOWN_PROVIDERS,
        BatchingConfig,
        ConfigError,
        ModelConfig,
        Reader,
        VersionPolicy,
        export_config,
        parse_model_config,
    )
    from genserve_contract.kinds import (
        IMAGE_INPUT_KINDS,
        KIND_NAMES,
        LATENT_KINDS,
        SAMPLE_KINDS,
        TRANSLATE_KINDS,
        Kind,
        KindSpec,
        TensorDecl,
    )
    from genserve_contract.repository import (
        ACTIVATION_BYTES_FIELD,
        CARD_FORMAT_VERSION,
        FP16_ATOL,
        FP32_ATOL,
        NAME_PATTERN,
        RESERVED_NAMES,
        VERSION_PATTERN,
        activation_bytes_problem,
        latest_version_dir,
        sha256_file,
    )
    from genserve_contract.runtime import RuntimeConfig, RuntimeConfigError, parse_runtime_config

_MODULES = {
    "CONFIG_FIELDS": "config",
    "KNOWN_PROVIDERS": "config",
    "BatchingConfig": "config",
    "ConfigError": "config",
    "ModelConfig": "config",
    "Reader": "config",
    "VersionPolicy": "config",
    "export_config": "config",
    "parse_model_config": "config",
    "IMAGE_INPUT_KINDS": "kinds",
    "KIND_NAMES": "kinds",
    "LATENT_KINDS": "kinds",
    "SAMPLE_KINDS": "kinds",
    "TRANSLATE_KINDS": "kinds",
    "Kind": "kinds",
    "KindSpec": "kinds",
    "TensorDecl": "kinds",
    "ACTIVATION_BYTES_FIELD": "repository",
    "CARD_FORMAT_VERSION": "repository",
    "FP16_ATOL": "repository",
    "FP32_ATOL": "repository",
    "NAME_PATTERN": "repository",
    "RESERVED_NAMES": "repository",
    "VERSION_PATTERN": "repository",
    "activation_bytes_problem": "repository",
    "latest_version_dir": "repository",
    "sha256_file": "repository",
    "RuntimeConfig": "runtime",
    "RuntimeConfigError": "runtime",
    "parse_runtime_config": "runtime",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ACTIVATION_BYTES_FIELD",
    "CARD_FORMAT_VERSION",
    "CONFIG_FIELDS",
    "FP16_ATOL",
    "FP32_ATOL",
    "IMAGE_INPUT_KINDS",
    "KIND_NAMES",
    "KNOWN_PROVIDERS",
    "LATENT_KINDS",
    "NAME_PATTERN",
    "RESERVED_NAMES",
    "SAMPLE_KINDS",
    "TRANSLATE_KINDS",
    "VERSION_PATTERN",
    "BatchingConfig",
    "ConfigError",
    "Kind",
    "KindSpec",
    "ModelConfig",
    "Reader",
    "RuntimeConfig",
    "RuntimeConfigError",
    "TensorDecl",
    "VersionPolicy",
    "activation_bytes_problem",
    "export_config",
    "parse_model_config",
    "parse_runtime_config",
    "latest_version_dir",
    "sha256_file",
]
