"""genserve's model-repository contract, shared by export/ (writes it) and server/ (reads it).

Pure Python, no torch, no ONNX Runtime, no protobuf: kinds and their tensors, name and version
patterns, tolerances, file digests and the config.json rule set (docs/model-repository.md).
"""

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
