"""Exceptions raised by the repository writer and verifier.

Every failure of :func:`genserve_export.export_model` is an :class:`ExportError` subclass whose
message names what is wrong; nothing is written to the repository when one is raised.
"""

from __future__ import annotations


class ExportError(Exception):
    """Base class: the module, its inputs or its card cannot become a repository entry."""


class InvalidArgumentError(ExportError):
    """A plain argument (name, version, kind, example input) is malformed."""


class KindMismatchError(ExportError):
    """The module's inputs or outputs do not fit the declared kind (names, dtypes, ranks, shapes)."""


class FrozenBatchAxisError(ExportError):
    """The exported graph does not accept every batch size (axis 0 became a constant)."""


class NonFiniteOutputError(ExportError):
    """The module (or the exported graph) produced NaN or infinite outputs."""


class CardFieldError(ExportError):
    """A card field is missing, has the wrong type, or contradicts the graph."""


class ConfigFieldError(ExportError):
    """A config.json field is unknown or malformed."""


class ExportFailedError(ExportError):
    """torch.onnx.export or the ONNX Runtime graph optimisation failed."""


class ExportParityError(ExportError):
    """The ONNX graph does not reproduce the PyTorch module within the tolerance.

    The message lists every output and input case that failed, not only the first.
    """


class RepositoryExistsError(ExportError):
    """The version directory holds a published (immutable) version and ``overwrite`` was not requested."""
