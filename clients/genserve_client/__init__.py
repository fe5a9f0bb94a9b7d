"""genserve client: typed sync/asyncio library, picture-writing CLI, bulk jobs, load generator."""

from genserve_client.aio import AsyncGenserveClient
from genserve_client.channel import ChannelConfig, TlsOptions
from genserve_client.client import GenserveClient, SampleStream
from genserve_client.errors import GenserveClientError
from genserve_client.results import EncodeResult, GeneratedItem, ImageResult, Provenance, SampleResult
from genserve_client.retry import RetryPolicy

__all__ = [
    "AsyncGenserveClient",
    "ChannelConfig",
    "EncodeResult",
    "GeneratedItem",
    "GenserveClient",
    "GenserveClientError",
    "ImageResult",
    "Provenance",
    "RetryPolicy",
    "SampleResult",
    "SampleStream",
    "TlsOptions",
]
