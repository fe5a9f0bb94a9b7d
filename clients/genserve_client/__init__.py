"""genserve client: typed sync/asyncio library, picture-writing CLI, bulk jobs, load generator.

The public names below are imported on first use (PEP 562): importing the package alone loads
neither grpc nor numpy nor PIL, so that `genserve-client` (genserve_client/__main__.py) takes
Ctrl-C from its first statement on, before those imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The version clients/pyproject.toml builds: `genserve-client --version` where the package is not
# installed (a checkout on PYTHONPATH).
__version__ = "0.1.0"

if TYPE_CHECKING:
    from genserve_client.aio import AsyncGenserveClient
    from genserve_client.channel import ChannelConfig, TlsOptions
    from genserve_client.client import GenserveClient, SampleStream
    from genserve_client.errors import GenserveClientError
    from genserve_client.results import (
        CodesProgress,
        CodesResult,
        EncodeResult,
        GeneratedItem,
        ImageResult,
        Provenance,
        ReplayOptions,
        SampleResult,
    )
    from genserve_client.retry import RetryPolicy

__all__ = [
    "AsyncGenserveClient",
    "ChannelConfig",
    "CodesProgress",
    "CodesResult",
    "EncodeResult",
    "GeneratedItem",
    "GenserveClient",
    "GenserveClientError",
    "ImageResult",
    "Provenance",
    "ReplayOptions",
    "RetryPolicy",
    "SampleResult",
    "SampleStream",
    "TlsOptions",
]

# Each public name -> the module that defines it.
_MODULES = {
    "AsyncGenserveClient": "aio",
    "ChannelConfig": "channel",
    "TlsOptions": "channel",
    "GenserveClient": "client",
    "SampleStream": "client",
    "GenserveClientError": "errors",
    "CodesProgress": "results",
    "CodesResult": "results",
    "EncodeResult": "results",
    "GeneratedItem": "results",
    "ImageResult": "results",
    "Provenance": "results",
    "ReplayOptions": "results",
    "SampleResult": "results",
    "RetryPolicy": "retry",
}


if not TYPE_CHECKING:  # type checkers see the imports above, and a misspelt name stays an error

    def __getattr__(name: str) -> Any:
        module = _MODULES.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
