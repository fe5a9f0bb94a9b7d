"""Interpolate with truncation_psi: which end a refusal names (a missing end, two latent ends)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from server_support import TINY_LATENT, ServerProcess

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb


@pytest.fixture(scope="module")
def stub(tiny_server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(tiny_server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _latent() -> tpb.Tensor:
    z = np.zeros(TINY_LATENT, np.float32)
    return tpb.Tensor(shape=z.shape, dtype=tpb.DTYPE_FLOAT32, data=z.astype("<f4").tobytes())


@pytest.mark.parametrize(
    "start, end, field",
    [
        (None, None, "start"),
        (pb.LatentPoint(latent=_latent()), None, "end"),
        (None, pb.LatentPoint(latent=_latent()), "start"),
    ],
)
def test_interpolate_with_psi_and_a_missing_end_names_the_missing_end(
    stub: pb_grpc.GenerationServiceStub, start: pb.LatentPoint | None, end: pb.LatentPoint | None, field: str
) -> None:
    """c8569a4: truncation_psi with no seed end is refused as 'start and end are both explicit
    latents' even where an end is missing: the message must name the missing end, as without psi."""
    request = pb.InterpolateRequest(model="tiny-gen", steps=3, truncation_psi=0.7)
    if start is not None:
        request.start.CopyFrom(start)
    if end is not None:
        request.end.CopyFrom(end)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Interpolate(request)
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.details()).startswith(f"{field}: required"), err.details()
